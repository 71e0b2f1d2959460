"""The phantom's heart: chamber shapes over the cardiac cycle and their true volumes.

Heart frame (mm): origin at the centre of the LV base (mitral) plane at end-diastole;
z along the LV long axis from apex to base (atria at z > 0); x from the septum towards
the RV free wall; y = z cross x. Every chamber is an axis-aligned ellipsoid in this
frame, cut by the base plane z = base_z[t] (which descends in systole, apex fixed):

  LV blood pool   endocardial ellipsoid below the base plane
  LV myocardium   epicardial ellipsoid (same centre) below the base plane, minus the pool
  RV blood pool   RV ellipsoid below the base plane, minus the LV epicardial ellipsoid
  LA, RA          atrial ellipsoids above the base plane (long axis along z)

LV, myocardium and atrial volumes are exact (truncated ellipsoids, `cap_volume`); the RV
is integrated numerically (`rv_blood_volume`, soft occupancy on a 1 mm grid, ~0.3 %).
Myocardial volume is constant over the cycle (the wall thickens as the pool empties).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

RV_GRID_MM = 1.0  # ground-truth RV integration step
_RV_SOLVE_GRID_MM = 2.0  # coarser step while solving for the RV size


class Ellipsoid(NamedTuple):
    centre: np.ndarray  # [T, 3] mm, heart frame
    semi_axes: np.ndarray  # [T, 3] mm, along heart x, y, z


@dataclasses.dataclass(frozen=True, eq=False)
class Heart:
    """Chamber geometry per frame (heart frame, mm) and true volumes (mL)."""

    base_z: np.ndarray  # [T] height of the AV (base) plane
    lv_endo: Ellipsoid
    lv_epi: Ellipsoid
    rv: Ellipsoid
    la: Ellipsoid
    ra: Ellipsoid
    aorta_origin: np.ndarray  # [3] on the ED base plane; moves with base_z
    aorta_axis: np.ndarray  # [3] unit vector of the aortic root
    aorta_radius: float
    outflow_angle: float  # radians, direction of the LVOT (3ch plane) in the x-y plane
    volumes: dict[str, np.ndarray]  # lv, myo, la, ra: [T]; rv: [2] at (ED, ES)
    es_frame: int


def ramp(phase: np.ndarray, start: float, stop: float) -> np.ndarray:
    """Smooth 0 -> 1 step (half cosine) between two phases of the cycle."""
    x = np.clip((phase - start) / (stop - start), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(math.pi * x)


def cap_volume(a, b, c, height) -> np.ndarray:
    """Volume (mm^3) of the ellipsoid part with z <= height (z from its centre along c)."""
    h = np.clip(height, -c, c)
    return math.pi * a * b * ((h + c) - (h**3 + c**3) / (3.0 * c**2))


def ellipsoid_distance(x, y, z, centre, semi_axes):
    """Approximate signed distance (mm, < 0 inside) to an axis-aligned ellipsoid.

    x, y, z broadcast against centre/semi_axes components; first order in the level set:
    (q - 1) / |grad q| with q = sum((p / axes)^2), exact on the surface's sign.
    """
    u = (x - centre[..., 0]) / semi_axes[..., 0]
    v = (y - centre[..., 1]) / semi_axes[..., 1]
    w = (z - centre[..., 2]) / semi_axes[..., 2]
    level = u * u + v * v + w * w - 1.0
    gradient = 2.0 * np.sqrt(
        (u / semi_axes[..., 0]) ** 2 + (v / semi_axes[..., 1]) ** 2 + (w / semi_axes[..., 2]) ** 2
    )
    return level / np.maximum(gradient, 1e-3)


def _epicardial_volume(endo_axes, height, wall, apex_ratio):
    """Truncated epicardial ellipsoid volume for wall thickness `wall` (broadcasts)."""
    a = endo_axes[..., 0] + wall
    b = endo_axes[..., 1] + wall
    c = endo_axes[..., 2] + apex_ratio * wall
    return cap_volume(a, b, c, height)


def _solve_wall(endo_axes, height, target_volume, apex_ratio):
    """Wall thickness [T] making the epicardial volume equal target_volume (bisection)."""
    low = np.zeros_like(target_volume)
    high = np.full_like(target_volume, 60.0)
    for _ in range(50):
        mid = 0.5 * (low + high)
        too_big = _epicardial_volume(endo_axes, height, mid, apex_ratio) > target_volume
        high = np.where(too_big, mid, high)
        low = np.where(too_big, low, mid)
    return 0.5 * (low + high)


def rv_blood_volume(rv: Ellipsoid, lv_epi: Ellipsoid, base_z, frame: int, step=RV_GRID_MM):
    """RV blood pool volume (mL) at one frame: soft occupancy summed on a grid of `step` mm."""
    centre, axes = rv.centre[frame], rv.semi_axes[frame]
    low = centre - axes - step
    high = np.minimum(centre + axes, [np.inf, np.inf, base_z[frame]]) + step
    low[1] = 0.0  # mirror symmetry in y: integrate y >= 0 and double
    x, y, z = (np.arange(lo + step / 2, hi, step) for lo, hi in zip(low, high, strict=True))
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    distance = np.maximum(
        ellipsoid_distance(x, y, z, centre, axes),
        -ellipsoid_distance(x, y, z, lv_epi.centre[frame], lv_epi.semi_axes[frame]),
    )
    distance = np.maximum(distance, z - base_z[frame])
    occupancy = np.clip(0.5 - distance / step, 0.0, 1.0)
    return 2.0 * occupancy.sum() * step**3 / 1000.0


def _rv_ellipsoid(scale, anchor_x, base_z, shape, drop):
    """RV ellipsoid: scaled `shape` [3] whose septal extreme stays at x = anchor_x."""
    scale = np.asarray(scale, dtype=np.float64)[..., None]
    axes = scale * shape
    centre = np.stack(
        [anchor_x + axes[..., 0], np.zeros_like(axes[..., 0]), base_z - drop * axes[..., 2]], -1
    )
    return Ellipsoid(centre, axes)


def _solve_rv_scale(target_ml, anchor_x, base_z, shape, drop, lv_epi, frame):
    """RV scale whose blood volume at `frame` is target_ml (secant on the cube root)."""

    def volume(scale):
        rv = _rv_ellipsoid(np.full(len(base_z), scale), anchor_x, base_z, shape, drop)
        return rv_blood_volume(rv, lv_epi, base_z, frame, step=_RV_SOLVE_GRID_MM)

    s0, v0 = 1.0, volume(1.0)
    s1 = s0 * (target_ml / v0) ** (1 / 3)
    for _ in range(4):
        v1 = volume(s1)
        denominator = v1 ** (1 / 3) - v0 ** (1 / 3)
        if abs(v1 - target_ml) < 1e-3 * target_ml or abs(denominator) < 1e-9:
            break
        s0, v0, s1 = s1, v1, s1 + (target_ml ** (1 / 3) - v1 ** (1 / 3)) * (s1 - s0) / denominator
    return s1


def bounded(u, low, high):
    """Map a standard normal draw into (low, high), bell-shaped around the middle."""
    return low + (high - low) / (1.0 + math.exp(-1.6 * u))


def sample_heart(rng: np.random.Generator, frames: int, size: float) -> tuple[Heart, dict]:
    """One subject's heart over `frames` frames; `size` is a standard normal body-size draw.

    Returns the Heart and the phenotype targets it was built towards (the true values
    differ slightly: volumes are read at the sampled frames and the RV is solved to 0.1 %).
    """
    e = rng.standard_normal(12)
    u_lv_edv = 0.8 * size + 0.6 * e[0]
    u_lv_ef = e[1]
    targets = {
        "lv_edv": bounded(u_lv_edv, 102.0, 216.0),
        "lv_ef": bounded(u_lv_ef, 51.0, 69.0),
        "lvm": bounded(0.6 * size + 0.8 * e[2], 72.0, 176.0),
        "rv_edv": bounded(0.75 * u_lv_edv + 0.66 * e[3], 113.0, 235.0),
        "rv_ef": bounded(0.4 * u_lv_ef + 0.92 * e[4], 46.5, 64.0),
        "la_max": bounded(0.4 * size + 0.92 * e[5], 42.0, 107.0),
        "la_ef": bounded(e[6], 47.0, 69.0),
        "ra_max": bounded(0.4 * size + 0.92 * e[7], 42.0, 117.0),
        "ra_ef": bounded(e[8], 36.5, 59.0),
    }
    phase = np.arange(frames) / frames
    # ES and the atrial peaks fall on frames, so the sampled cycle reaches its targets.
    es_phase = max(round(rng.uniform(0.30, 0.40) * frames), 1) / frames
    atrial_kick = rng.uniform(0.80, 0.85)
    early_filling = rng.uniform(0.55, 0.8)
    # LV: 1 at ED, 0 at ES; rapid filling, diastasis, atrial kick.
    lv_curve = (
        1.0
        - ramp(phase, 0.0, es_phase)
        + early_filling * ramp(phase, es_phase, es_phase + 0.17)
        + 0.05 * ramp(phase, es_phase + 0.17, atrial_kick)
        + (0.95 - early_filling) * ramp(phase, atrial_kick, 0.97)
    )
    edv, esv = targets["lv_edv"] * 1e3, targets["lv_edv"] * (1 - targets["lv_ef"] / 100) * 1e3
    lv_volume = esv + (edv - esv) * lv_curve  # [T] mm^3

    # LV endocardium: truncated kappa*c above the centre; length/diameter ratio at ED.
    kappa = rng.uniform(0.3, 0.45)
    elongation = rng.uniform(1.6, 2.0)
    ellipticity = rng.uniform(0.92, 1.08)
    long_shortening = rng.uniform(0.84, 0.92)
    apex_ratio = rng.uniform(0.6, 0.85)
    fill = (1 + kappa) - (1 + kappa**3) / 3
    radius_ed = (edv / (math.pi * ellipticity * fill * 2 * elongation / (1 + kappa))) ** (1 / 3)
    length_ed = 2 * elongation * radius_ed / (1 + kappa)  # semi-axis c
    c = length_ed * (1 - (1 - long_shortening) * (1 - lv_curve))
    r = np.sqrt(lv_volume / (math.pi * ellipticity * c * fill))
    endo_axes = np.stack([r, ellipticity * r, c], -1)
    myo_volume = targets["lvm"] / 1.05 * 1e3
    wall = _solve_wall(endo_axes, kappa * c, lv_volume + myo_volume, apex_ratio)
    apex_z = -(kappa * length_ed + length_ed + apex_ratio * wall[0])
    centre_z = apex_z + c + apex_ratio * wall
    base_z = centre_z + kappa * c
    lv_centre = np.stack([np.zeros(frames), np.zeros(frames), centre_z], -1)
    epi_axes = endo_axes + wall[:, None] * np.array([1.0, 1.0, apex_ratio])
    lv_endo, lv_epi = Ellipsoid(lv_centre, endo_axes), Ellipsoid(lv_centre, epi_axes)
    volumes = {
        "lv": cap_volume(r, ellipticity * r, c, kappa * c) / 1e3,
        "myo": (cap_volume(*epi_axes.T, kappa * c) - cap_volume(r, ellipticity * r, c, kappa * c))
        / 1e3,
    }
    es_frame = int(np.argmin(volumes["lv"]))

    # RV: scaled about its septal extreme, sized to the ED/ES volume targets.
    epi_radius = r[0] + wall[0]
    rv_drop = rng.uniform(0.2, 0.4)
    rv_shape = np.array(
        [
            epi_radius * rng.uniform(1.1, 1.35),
            epi_radius * rng.uniform(1.3, 1.6),
            0.8 * (base_z[0] - apex_z) / (1 + rv_drop),
        ]
    )
    anchor_x = -epi_radius * rng.uniform(0.1, 0.3)
    rv_esv = targets["rv_edv"] * (1 - targets["rv_ef"] / 100)
    s_ed = _solve_rv_scale(targets["rv_edv"], anchor_x, base_z, rv_shape, rv_drop, lv_epi, 0)
    s_es = _solve_rv_scale(rv_esv, anchor_x, base_z, rv_shape, rv_drop, lv_epi, es_frame)
    sigma = (volumes["lv"] - volumes["lv"][es_frame]) / (volumes["lv"][0] - volumes["lv"][es_frame])
    rv = _rv_ellipsoid(s_es + (s_ed - s_es) * sigma, anchor_x, base_z, rv_shape, rv_drop)
    volumes["rv"] = np.array(
        [rv_blood_volume(rv, lv_epi, base_z, frame) for frame in (0, es_frame)]
    )

    # Atria: reservoir filling in ventricular systole, conduit, then atrial contraction.
    atria = {}
    for name, elong, flat in (("la", (1.25, 1.55), (0.85, 1.15)), ("ra", (1.2, 1.5), (0.94, 1.06))):
        peak = es_phase + round(rng.uniform(0.0, 0.06) * frames) / frames
        passive = rng.uniform(0.45, 0.65)
        curve = (
            ramp(phase, 0.0, peak)
            - (1 - passive) * ramp(phase, peak, peak + 0.15)
            + 0.05 * ramp(phase, peak + 0.15, atrial_kick)
            - (passive + 0.05) * ramp(phase, atrial_kick, atrial_kick + 0.12)
        )
        v_max = targets[f"{name}_max"] * 1e3
        volume = v_max * (1 - targets[f"{name}_ef"] / 100 * (1 - curve))  # [T] mm^3
        depth = rng.uniform(0.75, 0.9)  # centre height above the base, in long semi-axes
        ratios = np.array([1.0, rng.uniform(*flat), rng.uniform(*elong)])  # x, y, z over x
        cap_fraction = (1 + depth) - (1 + depth**3) / 3
        b_max = (v_max / (math.pi * ratios[1] * ratios[2] * cap_fraction)) ** (1 / 3)
        axes = b_max * ratios * np.cbrt(volume / v_max)[:, None]
        atria[name] = (axes, depth)
        volumes[name] = cap_volume(axes[:, 0], axes[:, 1], axes[:, 2], depth * axes[:, 2]) / 1e3
    gap = rng.uniform(5.0, 9.0)
    ra_x = atria["la"][0][:, 0].max() + atria["ra"][0][:, 0].max() + gap
    ellipsoids = {}
    for name, x in (("la", 0.0), ("ra", ra_x)):
        axes, depth = atria[name]
        centre = np.stack([np.full(frames, x), np.zeros(frames), base_z + depth * axes[:, 2]], -1)
        ellipsoids[name] = Ellipsoid(centre, axes)

    outflow_angle = rng.uniform(-1.4, -0.95)
    outflow = np.array([math.cos(outflow_angle), math.sin(outflow_angle), 0.0])
    aorta_axis = np.array([0.0, 0.0, 1.0]) + rng.uniform(0.25, 0.45) * outflow
    heart = Heart(
        base_z=base_z,
        lv_endo=lv_endo,
        lv_epi=lv_epi,
        rv=rv,
        la=ellipsoids["la"],
        ra=ellipsoids["ra"],
        aorta_origin=outflow * 0.65 * radius_ed,
        aorta_axis=aorta_axis / np.linalg.norm(aorta_axis),
        aorta_radius=rng.uniform(11.0, 14.0),
        outflow_angle=outflow_angle,
        volumes=volumes,
        es_frame=es_frame,
    )
    return heart, targets


def true_phenotypes(heart: Heart, heart_rate: float) -> dict[str, float]:
    """All 18 phenotype columns from the continuous geometry (same ED/ES rule as
    `whmae.phenotypes`: ED = frame 0, ES = frame of minimum LV volume)."""
    v, es = heart.volumes, heart.es_frame
    result = {}
    for prefix, edv, esv in (("LV", v["lv"][0], v["lv"][es]), ("RV", v["rv"][0], v["rv"][1])):
        result[f"{prefix}EDV (mL)"] = float(edv)
        result[f"{prefix}ESV (mL)"] = float(esv)
        result[f"{prefix}SV (mL)"] = float(edv - esv)
        result[f"{prefix}EF (%)"] = float(100 * (edv - esv) / edv)
    result["LVCO (L/min)"] = result["LVSV (mL)"] * heart_rate / 1000.0
    result["LVM (g)"] = float(v["myo"][0] * 1.05)
    for prefix, volume in (("LA", v["la"]), ("RA", v["ra"])):
        v_max, v_min = float(volume.max()), float(volume.min())
        result[f"{prefix}V max (mL)"] = v_max
        result[f"{prefix}V min (mL)"] = v_min
        result[f"{prefix}SV (mL)"] = v_max - v_min
        result[f"{prefix}EF (%)"] = 100 * (v_max - v_min) / v_max
    return result
