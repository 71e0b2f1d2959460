"""Label conventions of the segmentation files -> the 6 classes of `whmae.layout`.

Every dataset numbers its structures differently, so labels are always remapped
explicitly, per view, through a lookup table (never by arithmetic):

  view     convention  file label -> class (whmae.layout)
  sa       ukbb        1 LV blood pool, 2 LV myocardium, 3 RV blood pool   (UK Biobank seg_sa)
  sa       acdc        1 RV blood pool, 2 LV myocardium, 3 LV blood pool   (ACDC challenge)
  sa       mnms        1 LV blood pool, 2 LV myocardium, 3 RV blood pool   (M&Ms, M&Ms-2)
  la_2ch   any         1 LA                                              (UK Biobank seg_la_2ch)
  la_4ch   any         1 LA, 2 RA                                        (UK Biobank seg_la_4ch)

ACDC (Bernard et al., IEEE TMI 2018) ships 1 = RV cavity, 2 = myocardium, 3 = LV cavity;
M&Ms (Campello et al., IEEE TMI 2021) ships 1 = LV, 2 = myocardium, 3 = RV, the same
order as UK Biobank. Label 0 is background everywhere. The 3ch view has no labels.

Labelled frames (`labelled_frames`): UK Biobank segments every frame of the cycle, so with
"ukbb" every frame of a view with a segmentation file is labelled. ACDC and M&Ms segment
only end-diastole and end-systole and leave the other frames all zero, so with "acdc" or
"mnms" a frame is labelled only when the view's segmentation holds foreground in it
(anywhere in the stack, for the short axis): an all-background frame there means "not
segmented", not "no heart".
"""

from __future__ import annotations

import numpy as np

from whmae.data.lookup import apply_table
from whmae.layout import (
    BACKGROUND,
    LA,
    LV_BLOOD_POOL,
    LV_MYOCARDIUM,
    NUM_CLASSES,
    RA,
    RV_BLOOD_POOL,
)

CONVENTIONS = ("ukbb", "acdc", "mnms")
_INVALID = 255  # table entry of a file label outside the convention
SHORT_AXIS_MAPS = {
    "ukbb": {1: LV_BLOOD_POOL, 2: LV_MYOCARDIUM, 3: RV_BLOOD_POOL},
    "acdc": {1: RV_BLOOD_POOL, 2: LV_MYOCARDIUM, 3: LV_BLOOD_POOL},
    "mnms": {1: LV_BLOOD_POOL, 2: LV_MYOCARDIUM, 3: RV_BLOOD_POOL},
}
# Long-axis segmentations exist only in the UK Biobank layout, whatever the SA convention.
LONG_AXIS_MAPS = {"la_2ch": {1: LA}, "la_4ch": {1: LA, 2: RA}}
LABELLED_VIEWS = ("sa", "la_2ch", "la_4ch")
# Conventions whose segmentation files cover only some frames (ED and ES).
PARTIAL_FRAME_CONVENTIONS = ("acdc", "mnms")


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {CONVENTIONS}")
    return convention


def view_label_map(view: str, convention: str = "ukbb") -> dict[int, int]:
    """File label -> `whmae.layout` class for one view ("sa", "la_2ch", "la_4ch")."""
    check_convention(convention)
    if view == "sa":
        return SHORT_AXIS_MAPS[convention]
    if view in LONG_AXIS_MAPS:
        return LONG_AXIS_MAPS[view]
    raise ValueError(f"view {view!r} has no segmentation; labelled views are {LABELLED_VIEWS}")


def remap_labels(seg: np.ndarray, view: str, convention: str = "ukbb") -> np.ndarray:
    """File labels (any numeric dtype) -> uint8 `whmae.layout` classes, same shape.

    Raises ValueError naming the unexpected values (non-integers, labels outside the map).
    """
    mapping = view_label_map(view, convention)
    seg = np.asarray(seg)
    if np.issubdtype(seg.dtype, np.floating):
        rounded = np.rint(seg)
        if not np.array_equal(rounded, seg):  # also catches NaN
            raise ValueError(f"non-integer label values (e.g. {seg[rounded != seg].flat[0]!r})")
        seg = rounded.astype(np.int64)
    if seg.size == 0:
        return np.zeros(seg.shape, np.uint8)
    low, high = int(seg.min()), int(seg.max())
    if low >= 0 and high <= 255:
        # A lookup table, not np.unique: remapping is one gather (np.unique sorts).
        table = np.full(high + 1, _INVALID, np.uint8)
        table[0] = 0
        for source, target in mapping.items():
            if source <= high:
                table[source] = target
        if np.array_equal(table, np.arange(high + 1)):  # e.g. UK Biobank sa: a copy, no gather
            return seg.astype(np.uint8)
        out = apply_table(table, seg)
        if (table != _INVALID).all() or not (out == _INVALID).any():
            return out
    values = np.unique(seg)
    bad = [int(v) for v in values if v != 0 and int(v) not in mapping]
    raise ValueError(
        f"unexpected label values {bad} for the {convention!r} convention "
        f"(view {view}: expects 0 and {sorted(mapping)})"
    )


def restore_file_labels(labels: np.ndarray, view: str, convention: str = "ukbb") -> np.ndarray:
    """`whmae.layout` classes -> the view's file labels (the inverse of `remap_labels`).

    Classes the view's files cannot hold (e.g. RV predicted on a 2ch plane) become 0.
    The 3ch view has no file convention: its classes are returned unchanged.
    """
    labels = np.asarray(labels)
    if view == "la_3ch":
        return labels.astype(np.uint8, copy=False)
    table = np.full(NUM_CLASSES, BACKGROUND, np.uint8)
    for source, target in view_label_map(view, convention).items():
        table[target] = source
    return table[labels.astype(np.intp, copy=False)]


def labelled_frames(seg: np.ndarray, convention: str) -> np.ndarray:
    """bool [T]: the frames of a view's segmentation seg [Z, T, H, W] (file labels or
    layout classes: 0 is background in both) that count as labelled under `convention`
    (module docstring): all of them for "ukbb", those holding foreground for "acdc" and
    "mnms"."""
    check_convention(convention)
    if convention not in PARTIAL_FRAME_CONVENTIONS:
        return np.ones(seg.shape[1], bool)
    return np.asarray(seg).any(axis=(0, 2, 3))


def end_diastolic_frame(seg_sa: np.ndarray, frames: np.ndarray, convention: str) -> int:
    """The end-diastolic frame of a short-axis segmentation seg_sa [Z, T, H, W] in the
    file's labels: frame 0 when every frame is labelled (UK Biobank's convention), else the
    labelled frame (`frames`, bool [T]) holding the most LV blood pool (0 if none is
    labelled)."""
    if frames.all() or not frames.any():
        return 0
    lv = next(f for f, c in SHORT_AXIS_MAPS[check_convention(convention)].items()
              if c == LV_BLOOD_POOL)  # fmt: skip
    labelled = np.flatnonzero(frames)
    counts = np.count_nonzero(np.asarray(seg_sa)[:, labelled] == lv, axis=(0, 2, 3))
    return int(labelled[np.argmax(counts)])
