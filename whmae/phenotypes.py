"""Cardiac phenotypes from segmentations, following the ukbb_cardiac conventions.

Ventricles by disc summation over the short-axis stack, atria by the area-length
method on the long-axis views (SPEC "Phenotypes from segmentations"). Labels use the
`whmae.layout` classes: short-axis 1 LV blood pool, 2 LV myocardium, 3 RV blood pool;
long-axis 4 LA, 5 RA.

Array conventions:
  seg_sa          int [Z, T, H, W]  short-axis stack, slices first (as the exam's planes 3-8)
  seg_la_2ch/4ch  int [T, H, W]     one long-axis plane
  pixel spacing   (row, col) mm     as `exam["pixel_spacing"][plane]`

Atrial long-axis length L (per frame) is the chamber's extent along its long axis:
the axis is the principal axis of the chamber's pixel centres in mm (largest-variance
direction; or a given in-plane direction), and L = max - min of the pixel centres'
projections onto it plus one pixel step along it (hypot(u_row*dy, u_col*dx)), since the
extreme pixel centres lie about half a pixel inside the chamber's ends. For an ellipse
cut through its axes this is the major axis length to within about a pixel.
ukbb_cardiac instead measures from the mitral/tricuspid valve midpoint to the far
wall along the LV long axis; both give the chamber's longest extent along its axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from whmae import layout

MYOCARDIAL_DENSITY = 1.05  # g/mL
AREA_LENGTH_FACTOR = 8.0 / (3.0 * math.pi)


def _where(subject: str | None) -> str:
    return f" (subject {subject})" if subject else ""


def _check_spacing(spacing, name: str, subject: str | None) -> tuple[float, float]:
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.shape != (2,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(
            f"{name} must be two positive (row, col) mm values, got {spacing!r}{_where(subject)}"
        )
    return float(values[0]), float(values[1])


def _check_segmentation(seg, ndim: int, name: str, layout_text: str, subject: str | None):
    seg = np.asarray(seg)
    if seg.ndim != ndim:
        raise ValueError(
            f"{name} must be {layout_text} ({ndim} dims), got shape {seg.shape}{_where(subject)}"
        )
    return seg


def ventricular_volumes(
    seg_sa, pixel_spacing, slice_spacing: float, *, subject: str | None = None
) -> dict[str, np.ndarray]:
    """Per-frame LV blood pool, LV myocardium and RV blood pool volumes (mL), [T] each.

    seg_sa: [Z, T, H, W] short-axis labels. Disc summation: voxel volume is
    dy * dx * slice_spacing / 1000 mL (slice thickness is ignored, as ukbb_cardiac does).
    """
    seg = _check_segmentation(seg_sa, 4, "seg_sa", "[Z, T, H, W]", subject)
    dy, dx = _check_spacing(pixel_spacing, "short-axis pixel_spacing", subject)
    if not np.isfinite(slice_spacing) or slice_spacing <= 0:
        raise ValueError(f"slice_spacing must be > 0 mm, got {slice_spacing!r}{_where(subject)}")
    voxel_ml = dy * dx * float(slice_spacing) / 1000.0
    counts = {
        name: np.count_nonzero(seg == label, axis=(0, 2, 3)) * voxel_ml
        for name, label in (
            ("lv", layout.LV_BLOOD_POOL),
            ("myo", layout.LV_MYOCARDIUM),
            ("rv", layout.RV_BLOOD_POOL),
        )
    }
    if counts["lv"][0] == 0:
        raise ValueError(f"seg_sa has no LV blood pool at ED (frame 0){_where(subject)}")
    return counts


def chamber_area_length(
    seg_la, label: int, pixel_spacing, long_axis=None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame area (mm^2) and long-axis length L (mm) of class `label`, [T] each.

    seg_la: [T, H, W]. long_axis: optional in-plane (row, col) direction; default is
    the principal axis of the chamber in each frame. Frames without the chamber give 0, 0.
    """
    dy, dx = pixel_spacing
    mask = np.asarray(seg_la) == label  # [T, H, W]
    _, height, width = mask.shape
    rows = (np.arange(height, dtype=np.float64) * dy)[:, None]  # [H, 1] mm
    cols = (np.arange(width, dtype=np.float64) * dx)[None, :]  # [1, W] mm
    count = mask.sum(axis=(1, 2)).astype(np.float64)  # [T]
    area = count * dy * dx
    safe = np.maximum(count, 1.0)
    row_sum = (mask * rows).sum(axis=(1, 2))
    col_sum = (mask * cols).sum(axis=(1, 2))
    mean_r, mean_c = row_sum / safe, col_sum / safe
    if long_axis is None:
        # Second central moments -> angle of the largest-variance axis, per frame.
        s_rr = (mask * rows**2).sum(axis=(1, 2)) / safe - mean_r**2
        s_cc = (mask * cols**2).sum(axis=(1, 2)) / safe - mean_c**2
        s_rc = (mask * (rows * cols)).sum(axis=(1, 2)) / safe - mean_r * mean_c
        angle = 0.5 * np.arctan2(2.0 * s_rc, s_rr - s_cc)
        u_r, u_c = np.cos(angle), np.sin(angle)
    else:
        direction = np.asarray(long_axis, dtype=np.float64)
        direction = direction / np.linalg.norm(direction)
        u_r = np.full(count.shape, direction[0])
        u_c = np.full(count.shape, direction[1])
    projection = rows[None] * u_r[:, None, None] + cols[None] * u_c[:, None, None]  # [T, H, W]
    high = np.where(mask, projection, -np.inf).max(axis=(1, 2))
    low = np.where(mask, projection, np.inf).min(axis=(1, 2))
    length = np.where(count > 0, high - low + np.hypot(u_r * dy, u_c * dx), 0.0)
    return area, length


def _ratio_ml(numerator: np.ndarray, length: np.ndarray) -> np.ndarray:
    """8/(3 pi) * numerator / length in mL (numerator mm^4, length mm); 0 where length is 0."""
    safe = np.where(length > 0, length, 1.0)
    return np.where(length > 0, AREA_LENGTH_FACTOR * numerator / safe / 1000.0, 0.0)


def left_atrial_volume(seg_la_2ch, seg_la_4ch, spacing_2ch, spacing_4ch) -> np.ndarray:
    """Biplane area-length LA volume per frame (mL), [T]: 8/(3 pi) A2 A4 / ((L2 + L4)/2)."""
    area_2, length_2 = chamber_area_length(seg_la_2ch, layout.LA, spacing_2ch)
    area_4, length_4 = chamber_area_length(seg_la_4ch, layout.LA, spacing_4ch)
    mean_length = np.where((area_2 > 0) & (area_4 > 0), 0.5 * (length_2 + length_4), 0.0)
    return _ratio_ml(area_2 * area_4, mean_length)


def right_atrial_volume(seg_la_4ch, spacing_4ch) -> np.ndarray:
    """Single-plane (4ch) area-length RA volume per frame (mL), [T]: 8/(3 pi) A^2 / L."""
    area, length = chamber_area_length(seg_la_4ch, layout.RA, spacing_4ch)
    return _ratio_ml(area**2, length)


def _atrial_phenotypes(volume: np.ndarray, prefix: str) -> dict[str, float]:
    if not np.any(volume > 0):
        return {f"{prefix}V max (mL)": math.nan, f"{prefix}V min (mL)": math.nan,
                f"{prefix}SV (mL)": math.nan, f"{prefix}EF (%)": math.nan}  # fmt: skip
    v_max, v_min = float(volume.max()), float(volume.min())
    return {
        f"{prefix}V max (mL)": v_max,
        f"{prefix}V min (mL)": v_min,
        f"{prefix}SV (mL)": v_max - v_min,
        f"{prefix}EF (%)": 100.0 * (v_max - v_min) / v_max,
    }


def phenotypes_from_segmentations(
    seg_sa=None,
    seg_la_2ch=None,
    seg_la_4ch=None,
    *,
    sa_pixel_spacing=None,
    slice_spacing: float | None = None,
    la_2ch_pixel_spacing=None,
    la_4ch_pixel_spacing=None,
    frame_duration: float | None = None,
    subject: str | None = None,
) -> dict[str, float]:
    """All 18 `layout.PHENOTYPE_COLUMNS` from segmentations; NaN where a view is absent.

    seg_sa [Z, T, H, W] gives the LV/RV columns (ED = frame 0, ES = frame of minimum
    LV volume, used for the RV too); LVCO needs frame_duration (s). seg_la_2ch and
    seg_la_4ch [T, H, W] give the LA (biplane, needs both) and seg_la_4ch the RA.
    """
    result = dict.fromkeys(layout.PHENOTYPE_COLUMNS, math.nan)
    if seg_sa is not None:
        if sa_pixel_spacing is None or slice_spacing is None:
            raise ValueError(f"seg_sa needs sa_pixel_spacing and slice_spacing{_where(subject)}")
        volumes = ventricular_volumes(seg_sa, sa_pixel_spacing, slice_spacing, subject=subject)
        frames = volumes["lv"].shape[0]
        es = int(np.argmin(volumes["lv"]))
        for name, prefix in (("lv", "LV"), ("rv", "RV")):
            edv, esv = float(volumes[name][0]), float(volumes[name][es])
            result[f"{prefix}EDV (mL)"] = edv
            result[f"{prefix}ESV (mL)"] = esv
            result[f"{prefix}SV (mL)"] = edv - esv
            result[f"{prefix}EF (%)"] = 100.0 * (edv - esv) / edv if edv > 0 else math.nan
        result["LVM (g)"] = float(volumes["myo"][0]) * MYOCARDIAL_DENSITY
        if frame_duration is not None:
            if not np.isfinite(frame_duration) or frame_duration <= 0:
                raise ValueError(
                    f"frame_duration must be > 0 s, got {frame_duration!r}{_where(subject)}"
                )
            heart_rate = 60.0 / (frames * float(frame_duration))
            result["LVCO (L/min)"] = result["LVSV (mL)"] * heart_rate / 1000.0
    if seg_la_4ch is not None:
        seg_4 = _check_segmentation(seg_la_4ch, 3, "seg_la_4ch", "[T, H, W]", subject)
        spacing_4 = _check_spacing(la_4ch_pixel_spacing, "la_4ch pixel_spacing", subject)
        result.update(_atrial_phenotypes(right_atrial_volume(seg_4, spacing_4), "RA"))
        if seg_la_2ch is not None:
            seg_2 = _check_segmentation(seg_la_2ch, 3, "seg_la_2ch", "[T, H, W]", subject)
            spacing_2 = _check_spacing(la_2ch_pixel_spacing, "la_2ch pixel_spacing", subject)
            if seg_2.shape[0] != seg_4.shape[0]:
                raise ValueError(
                    f"seg_la_2ch has {seg_2.shape[0]} frames but seg_la_4ch has "
                    f"{seg_4.shape[0]}{_where(subject)}"
                )
            volume = left_atrial_volume(seg_2, seg_4, spacing_2, spacing_4)
            result.update(_atrial_phenotypes(volume, "LA"))
    return result


def phenotypes_from_exam(exam: Mapping, *, subject: str | None = None) -> dict[str, float]:
    """Phenotypes from an exam dict's labels (`whmae.layout` schema).

    Only the exam's six short-axis slices are summed, so ventricular volumes cover
    that window, not necessarily the whole heart. Absent or unlabelled planes -> NaN.
    """
    subject = subject or str(exam.get("eid", "")) or None
    labels, spacing = exam["labels"], exam["pixel_spacing"]
    labelled = np.asarray(exam["plane_mask"]) & np.asarray(exam["label_mask"])
    short_axis = list(layout.SHORT_AXIS_PLANES)
    has_sa = bool(np.all(labelled[short_axis]))
    return phenotypes_from_segmentations(
        labels[short_axis] if has_sa else None,
        labels[layout.LA_2CH] if labelled[layout.LA_2CH] else None,
        labels[layout.LA_4CH] if labelled[layout.LA_4CH] else None,
        sa_pixel_spacing=spacing[short_axis[0]],
        slice_spacing=float(exam["slice_spacing"]),
        la_2ch_pixel_spacing=spacing[layout.LA_2CH],
        la_4ch_pixel_spacing=spacing[layout.LA_4CH],
        frame_duration=float(exam["frame_duration"]),
        subject=subject,
    )


def phenotype_vector(phenotypes: Mapping[str, float]) -> np.ndarray:
    """float32 [18] in `layout.PHENOTYPE_COLUMNS` order (missing columns -> NaN)."""
    return np.array(
        [phenotypes.get(column, math.nan) for column in layout.PHENOTYPE_COLUMNS], np.float32
    )
