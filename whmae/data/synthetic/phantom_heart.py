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
is integrated numerically (`rv_blood_volume`: a 2D integral of the exact y-extent, ~2e-4).
Myocardial volume is constant over the cycle (the wall thickens as the pool empties).

The population (`GROUPS`, `sample_group`, `sample_targets`): each subject is drawn from a
mixture of 55 % healthy, 12 % dilated cardiomyopathy (large spherical LV, LVEF ~31 +- 7 %
down to ~15 %, thin-normal wall, RVEF often reduced), 12 % hypertrophic cardiomyopathy
(LV mass ~1.6 g per mL of LVEDV, wall ~13 mm, small-normal LV, LVEF ~66 %), 10 % RV dilation
or dysfunction (RVEDV ~240 mL, RVEF ~39 %, large RA) and 11 % atrial enlargement (LA and RA
~120 mL, LAEF ~40 %, RAEF ~31 %). Healthy centres and spreads follow UK Biobank reference
ranges. A body-size draw scales every chamber and the LV mass; LV and RV ejection fractions
are coupled; atria that are larger empty less. The heart is then built towards these targets
(`sample_heart`), and `true_phenotypes` reads the exact values back from its geometry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

RV_GRID_MM = 0.5  # ground-truth RV integration step (~2e-4 relative)
_RV_SOLVE_GRID_MM = 1.0  # coarser step while solving for the RV size (~5e-4)


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
    """RV blood pool volume (mL) at one frame.

    Both ellipsoids are centred on y = 0 with axes along x, y, z, so at each (x, z) the
    RV blood is the y-interval |y| < y_rv(x, z) less |y| < y_lv(x, z): length
    2 max(0, y_rv - y_lv). The volume is that length integrated over (x, z) below the base
    plane (midpoint rule, `step` mm: 0.5 mm is exact to ~2e-4, 2 mm to ~2e-3).
    """
    (cx, _, cz), (a, b, c) = rv.centre[frame], rv.semi_axes[frame]
    (lx, _, lz), (la, lb, lc) = lv_epi.centre[frame], lv_epi.semi_axes[frame]
    bottom, top = cz - c, min(cz + c, base_z[frame])
    if top <= bottom:
        return 0.0
    nx, nz = (max(math.ceil(extent / step), 1) for extent in (2 * a, top - bottom))
    dx, dz = 2 * a / nx, (top - bottom) / nz
    x = (cx - a + dx * (np.arange(nx) + 0.5))[:, None]
    z = (bottom + dz * (np.arange(nz) + 0.5))[None, :]
    y_rv = b * np.sqrt(np.maximum(1 - ((x - cx) / a) ** 2 - ((z - cz) / c) ** 2, 0.0))
    y_lv = lb * np.sqrt(np.maximum(1 - ((x - lx) / la) ** 2 - ((z - lz) / lc) ** 2, 0.0))
    return float(2.0 * np.maximum(y_rv - y_lv, 0.0).sum() * dx * dz / 1000.0)


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


def soft_clip(x: float, low: float, high: float, knee: float = 0.1) -> float:
    """x unchanged in the middle of (low, high); within knee * (high - low) of either end
    it saturates smoothly (tanh), so the result stays strictly inside the interval."""
    width = knee * (high - low)
    if x < low + width:
        return low + width - width * math.tanh((low + width - x) / width)
    if x > high - width:
        return high - width + width * math.tanh((x - high + width) / width)
    return x


class Group(NamedTuple):
    """One population group: its share and the centres/spreads of its phenotype targets.

    LVEDV = lv_edv * exp(0.19 z_lv) (z_lv: body size and the rest); LVEF = lv_ef + lv_ef_sd
    * N (a little lower in larger LVs); LVM = lvm_per_edv * LVEDV * exp(lvm_sd N); RVEDV =
    rv_per_lv * LVEDV * exp(rv_sd N); RVEF = rv_ef + rv_coupling * (LVEF - 58) + rv_ef_sd
    * N; atrial maxima la, ra * exp(0.27 z) (z: body size and the rest); atrial EF la_ef,
    ra_ef less 14 * ln(max / healthy max) (enlarged atria empty less) + 6.5 * N.
    """

    share: float
    label: str
    lv_edv: float
    lv_ef: float
    lv_ef_sd: float
    lvm_per_edv: float
    lvm_sd: float
    rv_per_lv: float
    rv_sd: float
    rv_ef: float
    rv_coupling: float
    rv_ef_sd: float
    la: float
    la_ef: float
    ra: float
    ra_ef: float
    elongation: tuple[float, float]  # LV length / diameter at ED (lower: more spherical)


# The phantom population (module docstring). Healthy centres follow UK Biobank reference
# ranges (Petersen et al., JCMR 2017; men and women pooled):
# LVEDV ~148 +- 30 mL, LVEF ~58 +- 5.5 %, LVM ~0.6 g/mL of LVEDV, RVEDV ~1.07 LVEDV,
# RVEF ~56 +- 5 %, LAV max ~70 mL with LAEF ~60 %, RAV max ~80 mL with RAEF ~47 %.
GROUPS = {
    "healthy": Group(0.55, "healthy",
                     148, 58, 5.5, 0.60, 0.13, 1.07, 0.09, 56, 0.5, 4.5,
                     68, 60, 80, 47, (1.6, 2.0)),
    # Dilated cardiomyopathy: large, spherical LV, EF down to ~20 %, eccentric remodelling
    # (mass up, wall thin-normal), RV function often reduced, functional MR (LA up).
    "dcm": Group(0.12, "dilated cardiomyopathy",
                 240, 32, 7.0, 0.50, 0.15, 0.80, 0.15, 56, 0.6, 6.0,
                 95, 52, 92, 45, (1.35, 1.7)),
    # Hypertrophic cardiomyopathy: thick wall, high mass, small-normal LV, normal-high EF,
    # LA enlarged by diastolic dysfunction.
    "hcm": Group(0.12, "hypertrophic cardiomyopathy",
                 125, 67, 5.5, 1.60, 0.20, 1.05, 0.10, 57, 0.4, 4.5,
                 88, 55, 82, 47, (1.6, 2.0)),
    # RV dilation or dysfunction (pulmonary hypertension, ARVC, TR): large RV, low RVEF,
    # RA enlarged, LV a little smaller.
    "rv": Group(0.10, "RV dilation / dysfunction",
                135, 56, 6.0, 0.60, 0.13, 1.75, 0.18, 40, 0.2, 7.0,
                66, 60, 118, 42, (1.6, 2.0)),
    # Atrial enlargement (AF, valve disease): large LA and RA, low atrial EF.
    "atrial": Group(0.11, "atrial enlargement",
                    146, 57, 6.0, 0.60, 0.13, 1.07, 0.09, 55, 0.5, 5.0,
                    118, 48, 122, 37, (1.6, 2.0)),
}  # fmt: skip
GROUP_NAMES = tuple(GROUPS)
# Hard limits of the targets (soft_clip): inside what the geometry below builds exactly.
TARGET_LIMITS = {
    "lv_edv": (55.0, 460.0),
    "lv_ef": (12.0, 82.0),
    "lvm": (40.0, 340.0),
    "rv_edv": (55.0, 460.0),
    "rv_ef": (15.0, 76.0),
    "la_max": (25.0, 230.0),
    "la_ef": (10.0, 78.0),
    "ra_max": (25.0, 250.0),
    "ra_ef": (8.0, 72.0),
}


def sample_group(rng: np.random.Generator) -> str:
    """One subject's population group, drawn with the GROUPS shares."""
    shares = np.array([g.share for g in GROUPS.values()])
    index = int(np.searchsorted(np.cumsum(shares) / shares.sum(), rng.random(), side="right"))
    return GROUP_NAMES[min(index, len(GROUP_NAMES) - 1)]


def sample_targets(rng: np.random.Generator, size: float, group: str) -> dict[str, float]:
    """Phenotype targets of one subject of `group`; `size` is a standard normal body-size
    draw shared by all chambers (volumes and mass grow with it)."""
    g = GROUPS[group]
    e = [soft_clip(x, -2.75, 2.75) for x in rng.standard_normal(9)]  # no 3-sigma outliers
    z_lv = 0.65 * size + 0.76 * e[0]
    lv_edv = g.lv_edv * math.exp(0.19 * z_lv)
    lv_ef = g.lv_ef + g.lv_ef_sd * (-0.2 * z_lv + 0.98 * e[1])
    la_max = g.la * math.exp(0.27 * (0.45 * size + 0.89 * e[5]))
    ra_max = g.ra * math.exp(0.27 * (0.45 * size + 0.89 * e[7]))
    healthy = GROUPS["healthy"]
    targets = {
        "lv_edv": lv_edv,
        "lv_ef": lv_ef,
        "lvm": g.lvm_per_edv * lv_edv * math.exp(g.lvm_sd * e[2]),
        "rv_edv": g.rv_per_lv * lv_edv * math.exp(g.rv_sd * e[3]),
        "rv_ef": g.rv_ef + g.rv_coupling * (lv_ef - healthy.lv_ef) + g.rv_ef_sd * e[4],
        "la_max": la_max,
        "la_ef": g.la_ef - 14.0 * math.log(la_max / healthy.la) + 6.5 * e[6],
        "ra_max": ra_max,
        "ra_ef": g.ra_ef - 14.0 * math.log(ra_max / healthy.ra) + 6.5 * e[8],
    }
    return {name: soft_clip(value, *TARGET_LIMITS[name]) for name, value in targets.items()}


def sample_heart(
    rng: np.random.Generator, frames: int, targets: dict[str, float], group: str = "healthy"
) -> Heart:
    """One subject's heart over `frames` frames, built towards the phenotype `targets`
    (`sample_targets`; the true values differ slightly: volumes are read at the sampled
    frames and the RV is solved to 0.1 %)."""
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
    elongation = rng.uniform(*GROUPS[group].elongation)
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
    return heart


def heart_extent(heart: Heart) -> dict[str, tuple[float, float]]:
    """Heart-frame extent (mm, over the cycle) of what the views must hold: "x" and "y" of
    the ventricles (short axis), "z" from the lower apex to the top of the atria, and
    "x_4ch" across the 4ch view (LV, RV, LA and RA)."""
    epi, rv = heart.lv_epi, heart.rv
    x = (
        float((epi.centre[:, 0] - epi.semi_axes[:, 0]).min()),  # the RV starts inside the LV
        float(max((epi.centre[:, 0] + epi.semi_axes[:, 0]).max(),
                  (rv.centre[:, 0] + rv.semi_axes[:, 0]).max())),
    )  # fmt: skip
    y = float(max(epi.semi_axes[:, 1].max(), rv.semi_axes[:, 1].max()))
    bottom = min((epi.centre[:, 2] - epi.semi_axes[:, 2]).min(),
                 (rv.centre[:, 2] - rv.semi_axes[:, 2]).min())  # fmt: skip
    top = max((a.centre[:, 2] + a.semi_axes[:, 2]).max() for a in (heart.la, heart.ra))
    atria_x = (
        (heart.la.centre[:, 0] - heart.la.semi_axes[:, 0]).min(),
        (heart.ra.centre[:, 0] + heart.ra.semi_axes[:, 0]).max(),
    )
    return {
        "x": x,
        "y": (-y, y),
        "z": (float(bottom), float(top)),
        "x_4ch": (float(min(x[0], atria_x[0])), float(max(x[1], atria_x[1]))),
    }


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
