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

Labels on some frames only (ACDC / M&Ms segment ED and ES; `whmae.layout` label_mask
[9, T]): volumes are read at the labelled frames only. ED and ES are then the labelled
frames of largest and smallest LV blood pool (with two labelled frames: those two), the
atrial max and min are over the labelled frames (with ED and ES only, an approximation),
and a prediction is measured at the truth's ED and ES (`cardiac_phases`). With every
frame labelled, ED is frame 0 and ES the minimum-LV frame (ukbb_cardiac).
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
    Frames without LV give 0 (`phenotypes_from_segmentations` requires LV at ED).
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
    labelled_frames: Mapping | None = None,
    phases: tuple[int, int] | None = None,
    subject: str | None = None,
) -> dict[str, float]:
    """All 18 `layout.PHENOTYPE_COLUMNS` from segmentations; NaN where a view is absent.

    seg_sa [Z, T, H, W] gives the LV/RV columns (ED = frame 0, ES = frame of minimum
    LV volume, used for the RV too); LVCO needs frame_duration (s). seg_la_2ch and
    seg_la_4ch [T, H, W] give the LA (biplane, needs both) and seg_la_4ch the RA.
    labelled_frames: {"sa" | "la_2ch" | "la_4ch": bool [T]}, the frames each view is
    segmented on (a view not named: all); volumes are read only there, and with some
    short-axis frames unlabelled ED / ES are the labelled frames of largest / smallest LV
    (module docstring). phases: (ED, ES) frames to use instead (a prediction measured at
    its truth's phases).
    """
    result = dict.fromkeys(layout.PHENOTYPE_COLUMNS, math.nan)
    labelled_frames = labelled_frames or {}
    if seg_sa is not None:
        if sa_pixel_spacing is None or slice_spacing is None:
            raise ValueError(f"seg_sa needs sa_pixel_spacing and slice_spacing{_where(subject)}")
        volumes = ventricular_volumes(seg_sa, sa_pixel_spacing, slice_spacing, subject=subject)
        frames = volumes["lv"].shape[0]
        ed, es = phases or _phases(volumes["lv"], labelled_frames.get("sa"))
        if volumes["lv"][ed] == 0:
            raise ValueError(f"seg_sa has no LV blood pool at ED (frame {ed}){_where(subject)}")
        for name, prefix in (("lv", "LV"), ("rv", "RV")):
            edv, esv = float(volumes[name][ed]), float(volumes[name][es])
            result[f"{prefix}EDV (mL)"] = edv
            result[f"{prefix}ESV (mL)"] = esv
            result[f"{prefix}SV (mL)"] = edv - esv
            result[f"{prefix}EF (%)"] = 100.0 * (edv - esv) / edv if edv > 0 else math.nan
        result["LVM (g)"] = float(volumes["myo"][ed]) * MYOCARDIAL_DENSITY
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
        frames_4 = _frames(labelled_frames.get("la_4ch"), seg_4.shape[0])
        ra = right_atrial_volume(seg_4, spacing_4)
        result.update(_atrial_phenotypes(ra[frames_4], "RA"))
        if seg_la_2ch is not None:
            seg_2 = _check_segmentation(seg_la_2ch, 3, "seg_la_2ch", "[T, H, W]", subject)
            spacing_2 = _check_spacing(la_2ch_pixel_spacing, "la_2ch pixel_spacing", subject)
            if seg_2.shape[0] != seg_4.shape[0]:
                raise ValueError(
                    f"seg_la_2ch has {seg_2.shape[0]} frames but seg_la_4ch has "
                    f"{seg_4.shape[0]}{_where(subject)}"
                )
            volume = left_atrial_volume(seg_2, seg_4, spacing_2, spacing_4)
            both = frames_4 & _frames(labelled_frames.get("la_2ch"), seg_2.shape[0])
            result.update(_atrial_phenotypes(volume[both], "LA"))
    return result


def _frames(labelled, count: int) -> np.ndarray:
    """bool [count]: the labelled frames (None: all)."""
    return np.ones(count, bool) if labelled is None else np.asarray(labelled, bool)


def _phases(lv: np.ndarray, labelled) -> tuple[int, int]:
    """(ED, ES) from per-frame LV volumes: frame 0 and the minimum when every frame is
    labelled; else the labelled frames of largest and smallest volume."""
    frames = _frames(labelled, lv.shape[0])
    if frames.all() or not frames.any():
        return 0, int(np.argmin(lv))
    index = np.flatnonzero(frames)
    return int(index[np.argmax(lv[index])]), int(index[np.argmin(lv[index])])


def _labelled(exam: Mapping) -> np.ndarray:
    """bool [9, T]: acquired and labelled (plane, frame) of an exam."""
    labels = np.asarray(exam["labels"])
    label_mask = layout.frame_label_mask(exam["label_mask"], labels.shape[:2])
    return np.asarray(exam["plane_mask"], bool)[:, None] & label_mask


def _short_axis_frames(labelled: np.ndarray) -> np.ndarray | None:
    """bool [T]: the frames labelled on all six short-axis planes, or None (none)."""
    frames = labelled[list(layout.SHORT_AXIS_PLANES)].all(axis=0)
    return frames if frames.any() else None


def cardiac_phases(exam: Mapping) -> tuple[int, int] | None:
    """(ED, ES) frames of an exam (`whmae.layout` schema) whose short axis is labelled on
    some frames only: of the frames labelled on all six short-axis planes, those of largest
    and smallest LV blood pool in its labels (ED and ES when just those two are labelled).
    None when every frame is labelled (ED is frame 0 and ES is found on each
    segmentation) or the short axis has no frame labelled throughout."""
    frames = _short_axis_frames(_labelled(exam))
    if frames is None or frames.all():
        return None
    lv = np.count_nonzero(
        np.asarray(exam["labels"])[list(layout.SHORT_AXIS_PLANES)] == layout.LV_BLOOD_POOL,
        axis=(0, 2, 3),
    )
    return _phases(lv, frames)


def phenotypes_from_exam(
    exam: Mapping, *, phases: tuple[int, int] | None = None, subject: str | None = None
) -> dict[str, float]:
    """Phenotypes from an exam dict's labels (`whmae.layout` schema).

    Only the exam's six short-axis slices are summed, so ventricular volumes cover
    that window, not necessarily the whole heart. Absent or unlabelled planes -> NaN;
    volumes are read at the labelled frames only (label_mask [9, T], module docstring),
    the short axis at the frames labelled on all six planes. phases: (ED, ES) frames
    (e.g. the truth's `cardiac_phases`, to measure a prediction at them).
    """
    subject = subject or str(exam.get("eid", "")) or None
    labels, spacing = exam["labels"], exam["pixel_spacing"]
    labelled = _labelled(exam)
    short_axis = list(layout.SHORT_AXIS_PLANES)
    sa_frames = _short_axis_frames(labelled)
    has_la = {p: bool(labelled[p].any()) for p in (layout.LA_2CH, layout.LA_4CH)}
    return phenotypes_from_segmentations(
        labels[short_axis] if sa_frames is not None else None,
        labels[layout.LA_2CH] if has_la[layout.LA_2CH] else None,
        labels[layout.LA_4CH] if has_la[layout.LA_4CH] else None,
        sa_pixel_spacing=spacing[short_axis[0]],
        slice_spacing=float(exam["slice_spacing"]),
        la_2ch_pixel_spacing=spacing[layout.LA_2CH],
        la_4ch_pixel_spacing=spacing[layout.LA_4CH],
        frame_duration=float(exam["frame_duration"]),
        labelled_frames={
            "sa": sa_frames,
            "la_2ch": labelled[layout.LA_2CH],
            "la_4ch": labelled[layout.LA_4CH],
        },
        phases=phases,
        subject=subject,
    )


def phenotype_vector(phenotypes: Mapping[str, float]) -> np.ndarray:
    """float32 [18] in `layout.PHENOTYPE_COLUMNS` order (missing columns -> NaN)."""
    return np.array(
        [phenotypes.get(column, math.nan) for column in layout.PHENOTYPE_COLUMNS], np.float32
    )
