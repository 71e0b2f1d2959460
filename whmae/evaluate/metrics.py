"""Metric functions: pure numpy/scipy, no model code.

Undefined values are NaN (JSON null, via `whmae.evaluate.results`), never a
made-up score:
  dice   NaN when the class is absent from both prediction and truth (the reference
         scores that 1.0, which inflates means); 0.0 when only one side has it.
  hd95   NaN when absent from both; +inf when present on one side only (no surface to
         measure to); means over exams skip both (`summary` counts them).
Distances are in mm: `sampling=spacing` in scipy's Euclidean distance transform.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "bland_altman",
    "dice",
    "dice_from_counts",
    "hd95",
    "mse",
    "pearson_r",
    "psnr",
    "psnr_from_mse",
    "regression_stats",
    "ssim",
    "summary",
    "surface_distances",
]

SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # window radius 5 at sigma 1.5: the 11x11 Gaussian of Wang et al.


# ------------------------------------------------------------------ segmentation
def dice(pred, truth, label: int | None = None) -> float:
    """Dice of class `label` (or of boolean masks), any shape; NaN if both are empty."""
    p = np.asarray(pred) == label if label is not None else np.asarray(pred, bool)
    t = np.asarray(truth) == label if label is not None else np.asarray(truth, bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    return float(dice_from_counts(int(np.count_nonzero(p & t)), total))


def dice_from_counts(intersection, total):
    """2 |P & T| / (|P| + |T|) from the counts (arrays elementwise); NaN where total is 0
    (the class is absent from both: undefined, never 1)."""
    intersection = np.asarray(intersection, np.float64)
    total = np.asarray(total, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, 2.0 * intersection / np.where(total > 0, total, 1.0), np.nan)
    return out if out.ndim else float(out)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a background neighbour (face connectivity; image edge = outside)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)  # fmt: skip
    return mask & ~eroded


def surface_distances(a, b, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm): from each surface pixel of `a` to the surface of
    `b`, and back. a, b: boolean [..., H, W] (any ndim), spacing: mm per axis, one per dim.
    Both must be non-empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    spacing = np.asarray(spacing, np.float64).reshape(-1)
    if spacing.shape != (a.ndim,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be {a.ndim} positive mm values, got {spacing}")
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    return to_b[surface_a], to_a[surface_b]


def hd95(pred, truth, spacing, label: int | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between the surfaces of class
    `label` (or boolean masks): max of the two directed 95th percentiles (as MONAI).
    NaN if both are empty, +inf if only one is. pred, truth: [H, W] (or any ndim),
    spacing: mm per axis, e.g. (row, col) pixel spacing."""
    p = np.asarray(pred) == label if label is not None else np.asarray(pred, bool)
    t = np.asarray(truth) == label if label is not None else np.asarray(truth, bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    has_p, has_t = bool(p.any()), bool(t.any())
    if not (has_p or has_t):
        return math.nan
    if not (has_p and has_t):
        return math.inf
    # Distances only involve the two masks: crop to their bounding box (+1 pixel of
    # background, so the crop edge never makes surface where the image had none).
    rows = np.argwhere(p | t)
    low, high = np.maximum(rows.min(0) - 1, 0), rows.max(0) + 2
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    forward, backward = surface_distances(p[box], t[box], spacing)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


# -------------------------------------------------------------------- regression
def _paired(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64).reshape(-1)
    target = np.asarray(target, np.float64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in length")
    keep = np.isfinite(pred) & np.isfinite(target)
    return pred[keep], target[keep]


def pearson_r(pred, target) -> float:
    """Pearson correlation over pairs where both are finite; NaN if < 2 pairs or constant."""
    p, t = _paired(pred, target)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return math.nan
    return float(stats.pearsonr(p, t).statistic)


def bland_altman(pred, target) -> dict[str, float]:
    """Bias (mean of pred - target), its SD (ddof 1), and the limits bias -+ 1.96 SD."""
    p, t = _paired(pred, target)
    diff = p - t
    bias = float(diff.mean()) if len(diff) else math.nan
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def regression_stats(pred, target) -> dict[str, float]:
    """n, MAE +- SD of |error| (ddof 1), RMSE, Pearson r, Bland-Altman (bias, sd, limits);
    pairs with a NaN on either side are left out."""
    p, t = _paired(pred, target)
    error = np.abs(p - t)
    n = len(p)
    return {
        "n": n,
        "mae": float(error.mean()) if n else math.nan,
        "mae_sd": float(error.std(ddof=1)) if n > 1 else math.nan,
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))) if n else math.nan,
        "pearson_r": pearson_r(p, t),
        **bland_altman(p, t),
    }


def summary(values) -> dict[str, float]:
    """mean, sd (ddof 1), n over the finite values; n_undefined (NaN), n_infinite (inf)."""
    v = np.asarray(values, np.float64).reshape(-1)
    finite = v[np.isfinite(v)]
    return {
        "mean": float(finite.mean()) if len(finite) else math.nan,
        "sd": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
        "n": int(len(finite)),
        "n_undefined": int(np.count_nonzero(np.isnan(v))),
        "n_infinite": int(np.count_nonzero(np.isinf(v))),
    }


# ---------------------------------------------------------------- reconstruction
def mse(pred, target) -> float:
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    return float(np.mean((pred - target) ** 2))


def psnr(pred, target, data_range: float = 1.0) -> float:
    """10 log10(data_range^2 / MSE) in dB; +inf for identical images."""
    return float(psnr_from_mse(mse(pred, target), data_range))


def psnr_from_mse(error, data_range: float = 1.0):
    """10 log10(data_range^2 / error) in dB of an MSE (arrays elementwise); +inf at 0."""
    error = np.asarray(error, np.float64)
    with np.errstate(divide="ignore"):
        out = np.where(error > 0, 10.0 * np.log10(data_range**2 / np.where(error > 0, error, 1.0)),
                       np.inf)  # fmt: skip
    return out if out.ndim else float(out)


def ssim(pred, target, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004) of 2D images [..., H, W], each frame
    on its own: Gaussian window sigma 1.5 (radius 5), K1 0.01, K2 0.03, population
    (co)variances, borders (radius 5) cropped from the mean when the image allows."""
    x = np.asarray(pred, np.float64)
    y = np.asarray(target, np.float64)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"ssim needs two equal [..., H, W] arrays, got {x.shape}, {y.shape}")
    sigma = (0.0,) * (x.ndim - 2) + (SSIM_SIGMA, SSIM_SIGMA)

    def blur(z):
        return ndimage.gaussian_filter(z, sigma, mode="reflect", truncate=SSIM_TRUNCATE)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if min(x.shape[-2:]) > 2 * radius:
        ssim_map = ssim_map[..., radius:-radius, radius:-radius]
    return float(ssim_map.mean())
