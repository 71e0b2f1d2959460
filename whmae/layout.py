"""The reference exam layout: planes, label classes and phenotype columns.

One home for every convention shared by the phantom, the dataset format, the
model and the evaluation code (see ../shared/SPEC.md).

An *exam* is a dict of numpy arrays (the dataset record; see
`whmae.data.dataset.records`):

  eid             str                     subject id
  images          uint8   [S=9, T, H, W]  min-max over the exam, x255, rounded
  labels          uint8   [S=9, T, H, W]  classes 0-5 (CLASS_NAMES)
  phenotypes      float32 [18]            PHENOTYPE_COLUMNS order, NaN = missing
  plane_mask      bool    [9]             plane acquired (False: absent, pixels meaningless)
  label_mask      bool    [9, T]          (plane, frame) has a segmentation (3ch never
                                          does; ACDC / M&Ms label only ED and ES)
  pixel_spacing   float32 [9, 2]          (row, col) mm per pixel of each plane
  slice_spacing   float32 []              mm between consecutive short-axis slices
  frame_duration  float32 []              seconds per frame

The split (train/val/test) is a function of the eid (`whmae.data.dataset.splits`).

Labels are available per plane AND frame (record schema 2): a (plane, frame) whose
label_mask is False has no truth, its `labels` are 0 and mean nothing, and the
segmentation loss and metrics leave it out. UK Biobank segments every frame of a
labelled plane; ACDC and M&Ms segment only end-diastole and end-systole, so their exams
have two labelled frames (`whmae.data.ingest.label_maps.labelled_frames`). Schema-1 records
hold a per-plane label_mask [9]: decoding broadcasts it to every frame, [9, T]
(`frame_label_mask` does the same for arrays made elsewhere).
"""

from __future__ import annotations

NUM_PLANES = 9
PLANE_NAMES = ("la_2ch", "la_3ch", "la_4ch", "sa_0", "sa_1", "sa_2", "sa_3", "sa_4", "sa_5")
LONG_AXIS_PLANES = (0, 1, 2)
SHORT_AXIS_PLANES = (3, 4, 5, 6, 7, 8)
LA_2CH, LA_3CH, LA_4CH = LONG_AXIS_PLANES
# Planes that carry labels in UK Biobank; the 3ch view has none.
LABELLED_PLANES = (0, 2, 3, 4, 5, 6, 7, 8)

CLASS_NAMES = ("background", "lv_blood_pool", "lv_myocardium", "rv_blood_pool", "la", "ra")
NUM_CLASSES = len(CLASS_NAMES)
BACKGROUND, LV_BLOOD_POOL, LV_MYOCARDIUM, RV_BLOOD_POOL, LA, RA = range(NUM_CLASSES)
SHORT_AXIS_CLASSES = (LV_BLOOD_POOL, LV_MYOCARDIUM, RV_BLOOD_POOL)
LONG_AXIS_CLASSES = (LA, RA)
# The classes each plane's segmentation can hold, background included (UK Biobank label
# files: seg_sa 1-3 -> LV, Myo, RV; seg_la_2ch 1 -> LA; seg_la_4ch 1, 2 -> LA, RA). The
# unlabelled 3ch view shows the LA but not the RA. Segmentation models predict only these.
PLANE_CLASSES = (
    (BACKGROUND, LA),
    (BACKGROUND, LA),
    (BACKGROUND, LA, RA),
    *((BACKGROUND, *SHORT_AXIS_CLASSES),) * len(SHORT_AXIS_PLANES),
)

# Exact UK Biobank column names, in the order of the `phenotypes` vector.
PHENOTYPE_COLUMNS = (
    "LVEDV (mL)",
    "LVESV (mL)",
    "LVSV (mL)",
    "LVEF (%)",
    "LVCO (L/min)",
    "LVM (g)",
    "RVEDV (mL)",
    "RVESV (mL)",
    "RVSV (mL)",
    "RVEF (%)",
    "LAV max (mL)",
    "LAV min (mL)",
    "LASV (mL)",
    "LAEF (%)",
    "RAV max (mL)",
    "RAV min (mL)",
    "RASV (mL)",
    "RAEF (%)",
)
NUM_PHENOTYPES = len(PHENOTYPE_COLUMNS)
# The paper's regression targets.
PAPER_PHENOTYPES = ("LVM (g)", "RVEF (%)", "RAEF (%)", "RVEDV (mL)", "LASV (mL)")


def is_short_axis(plane: int) -> bool:
    return plane in SHORT_AXIS_PLANES


def plane_class_mask(planes=tuple(range(NUM_PLANES))) -> tuple[tuple[bool, ...], ...]:
    """[len(planes)][NUM_CLASSES]: True where the class can occur in the plane
    (`PLANE_CLASSES`)."""
    return tuple(tuple(c in PLANE_CLASSES[p] for c in range(NUM_CLASSES)) for p in planes)


def frame_label_mask(label_mask, shape):
    """label_mask as bool `shape` = [..., 9, T] (the labels' shape without H, W): as it is
    when it has that shape, or a per-plane [..., 9] (record schema 1, predictions made
    elsewhere) taken as every frame (a read-only broadcast view)."""
    import numpy as np

    mask, shape = np.asarray(label_mask, bool), tuple(shape)
    if mask.shape == shape:
        return mask
    if mask.shape == shape[:-1]:
        return np.broadcast_to(mask[..., None], shape)
    raise ValueError(f"label_mask must have shape {shape} or {shape[:-1]}, got {mask.shape}")


def phenotype_index(column: str) -> int:
    """Position of a UK Biobank column name in the phenotype vector."""
    try:
        return PHENOTYPE_COLUMNS.index(column)
    except ValueError:
        raise KeyError(
            f"unknown phenotype column {column!r}; expected one of {PHENOTYPE_COLUMNS}"
        ) from None
