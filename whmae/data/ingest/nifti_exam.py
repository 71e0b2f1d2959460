"""One UK Biobank-layout exam folder (NIfTI) -> an exam dict of `whmae.layout` + its geometry.

    <folder>/sa.nii.gz (X, Y, Z, T)   la_2ch / la_3ch / la_4ch.nii.gz (X, Y, 1, T)
             seg_sa.nii.gz             seg_la_2ch.nii.gz, seg_la_4ch.nii.gz   (optional)

Axes: NIfTI arrays are (X, Y, Z, T) and UK Biobank's converter stores the DICOM rows
along Y, so a plane's rows (H) are Y and its columns (W) are X: a view becomes
`[Z, T, H, W] = data.transpose(2, 3, 1, 0)` (the reference swaps X and Y the same way).

Orientation: each view is first brought to one canonical in-plane orientation derived
from its affine (`canonical_orientation`: a flip / transpose of the pixel grid, so the
same heart gives the same record whatever the file's voxel order); geometry["orientation"]
is ORIENTATION_VERSION and each view's transform is in geometry["views"][v]["orientation"].
Crops and spacings below are in that canonical grid.

Per exam: six consecutive short-axis slices (`select_short_axis_slices`), a size x size
crop per view (short axis centred on the segmentation's bounding box; long axis central,
or label-centred by option; zero padding where the image is smaller), periodic linear
resampling in time to `frames` (labels: nearest frame), min-max over the acquired planes,
labels remapped to the layout classes (`label_maps`). Labels are per plane and frame
(label_mask [9, frames]): with --label-convention ukbb every frame of a segmented view is
labelled; with acdc / mnms (ED and ES only) a frame is labelled only where the view's
segmentation holds foreground, over the whole stack for the short axis
(`label_maps.labelled_frames`), and a record frame is labelled when the file frame its
labels come from is. When not every frame is labelled, the slice rule reads the labelled
frame with the most LV blood pool (ED) instead of frame 0. The returned geometry dict
(JSON-serialisable) records per view the original shape, affine, spacing, chosen
slices, crop offsets, orientation, frame count and labelled file frames
("labelled_frames", segmented views only), which `restore_labels` uses to put a
predicted segmentation back into the original NIfTI grid.

Policy: an exam without a usable short-axis image is rejected (ExamError): slice
selection and the exam's spacing need it. A stack of MIN_SHORT_AXIS_SLICES to 5 slices is
partial: the slice rule places it in the six-plane window and the planes it does not
reach are absent (plane_mask False, listed in geometry["absent"]); fewer slices reject.
A missing or unusable long-axis image makes that plane absent (plane_mask False); a
missing or unusable segmentation makes that plane unlabelled (label_mask False). An image
is blank (unusable) when its crop holds one value. Isolated non-finite voxels (NaN/inf, at
most `MAX_REPAIRED_FRACTION` of a view, none without a finite in-plane neighbour) are
repaired from their neighbours (`repair_nonfinite`); more make the view unusable. Every
such decision is listed in geometry["absent"] / geometry["warnings"].

Where the views come from: a source with `name(stem)`, `has(stem)` and `read(stem)` ->
(array (X, Y, Z, T), header dict of `nifti_io.read_nifti`'s keys). `NiftiFolder` reads
the folder's .nii.gz files (`whmae.data.ingest.nifti_io`); `whmae.data.ingest.dicom_exam.DicomExam`
assembles the same arrays and headers from DICOM series. Everything after reading
(checks, repair, slice choice, crops, resampling, quantisation) is this module's, whatever
the source.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from whmae import layout
from whmae.data.ingest import label_maps
from whmae.data.ingest.nifti_io import ExamError, frame_duration_seconds, nifti_name, read_nifti
from whmae.data.quantize import quantize_planes

LONG_AXIS_VIEWS = ("la_2ch", "la_3ch", "la_4ch")  # planes 0, 1, 2
VIEWS = (*LONG_AXIS_VIEWS, "sa")
SEGMENTATION_FILE = {"sa": "seg_sa", "la_2ch": "seg_la_2ch", "la_4ch": "seg_la_4ch"}
WINDOW = len(layout.SHORT_AXIS_PLANES)  # six consecutive short-axis slices
SLICE_RULES = ("reference", "lv_centre", "centre")
LA_CROPS = ("centre", "label")
# Largest fraction of a view's voxels that may be non-finite (NaN/inf) and still be
# repaired: 0.5 %. Isolated non-finite voxels are conversion or reconstruction glitches
# (~0.2 % of a float32 short-axis stack has been seen), and each is replaced by the mean
# of its finite in-plane neighbours, a value inside the local intensity range. 0.5 % keeps
# the invented voxels below 1 in 200 (2.5x what has been seen); more means a broken
# conversion whose finite voxels should not be trusted either, so the view is unusable.
MAX_REPAIRED_FRACTION = 0.005
# Fewest short-axis slices an exam may have and still be written: 3, half the six-plane
# window. The model reconstructs and segments absent planes from the present ones (the
# paper's robustness point), so a short stack (a truncated series, a partial
# acquisition) still carries usable short-axis information; with fewer than half of the
# window present, more short-axis planes would be invented than seen, and one or two
# slices cannot place the window (the slice rule needs the stack's extent), so such
# exams are rejected.
MIN_SHORT_AXIS_SLICES = 3
# Canonical in-plane orientation (geometry["orientation"] = this version; geometry
# without it, written before version 1, is in each file's own orientation). Every view
# is flipped / transposed (one of the 8 symmetries of the pixel grid) so that its columns
# (left -> right) point as nearly as possible toward the patient's left and its rows
# (top -> bottom) toward posterior-inferior, as measured in the affine's world frame
# (nibabel's RAS+ mm): the radiological convention. A second pair of directions decides
# exact ties (planes along the patient axes). The score depends only on the physical
# directions of the grid's axes, so any flip or 90-degree rotation of a file (with its
# affine) gives the same canonical view.
ORIENTATION_VERSION = 1
_TARGETS = (
    ((-1.0, 0.0, 0.0), (0.0, -math.sqrt(0.5), -math.sqrt(0.5))),  # columns, rows
    ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),  # tie-break: superior, anterior
)
IDENTITY_ORIENTATION = {"transpose": False, "flip_rows": False, "flip_cols": False}


def canonical_orientation(affine) -> dict:
    """The grid symmetry that brings a view with this voxel (X, Y, Z) -> world affine to the
    canonical orientation (see ORIENTATION_VERSION): {"transpose", "flip_rows",
    "flip_cols"}, applied in that order to [..., H, W] (H = Y, W = X) by `orient`."""
    affine = np.asarray(affine, np.float64)
    columns, rows = affine[:3, 0], affine[:3, 1]  # world direction of +W (X) and +H (Y)
    norms = np.linalg.norm(columns), np.linalg.norm(rows)
    if min(norms) == 0 or not np.isfinite(affine[:3, :2]).all():
        raise ValueError(f"degenerate in-plane affine columns {affine[:3, :2].tolist()}")
    columns, rows = columns / norms[0], rows / norms[1]
    best = None
    for transpose in (False, True):
        c, r = (rows, columns) if transpose else (columns, rows)
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                cc, rr = (-c if flip_cols else c), (-r if flip_rows else r)
                score = tuple(float(cc @ tc + rr @ tr) for tc, tr in _TARGETS)
                if best is None or score > best[0]:
                    best = score, (transpose, flip_rows, flip_cols)
    return dict(zip(("transpose", "flip_rows", "flip_cols"), best[1], strict=True))


def orient(view: np.ndarray, orientation: dict) -> np.ndarray:
    """[..., H, W] in the file's grid -> the canonical grid (a numpy view, no copy)."""
    if orientation["transpose"]:
        view = np.swapaxes(view, -1, -2)
    if orientation["flip_rows"]:
        view = view[..., ::-1, :]
    if orientation["flip_cols"]:
        view = view[..., ::-1]
    return view


def unorient(view: np.ndarray, orientation: dict) -> np.ndarray:
    """The inverse of `orient`: canonical [..., H, W] -> the file's grid."""
    if orientation["flip_cols"]:
        view = view[..., ::-1]
    if orientation["flip_rows"]:
        view = view[..., ::-1, :]
    if orientation["transpose"]:
        view = np.swapaxes(view, -1, -2)
    return view


def _geometry_orientation(geometry: dict, view: dict) -> dict:
    """A geometry view's orientation: identity for geometry written before versioning;
    ValueError for a version this code does not know."""
    version = geometry.get("orientation")
    if version is None:
        return IDENTITY_ORIENTATION
    if version != ORIENTATION_VERSION:
        raise ValueError(
            f"exam {geometry.get('eid')!r}: geometry orientation version {version}, this code "
            f"reads {ORIENTATION_VERSION} (or none: the file's own orientation)"
        )
    return view["orientation"]


class NiftiFolder:
    """The views of a UK Biobank-layout exam folder of NIfTI files (see the module docstring
    for the source interface)."""

    kind = "nifti"

    def __init__(self, folder):
        self.folder = Path(folder)
        self.eid = self.folder.name
        self.warnings: list[str] = []  # what opening the source noticed (none for NIfTI)

    def name(self, stem: str) -> str:
        return nifti_name(stem)

    def has(self, stem: str) -> bool:
        return (self.folder / nifti_name(stem)).is_file()

    def read(self, stem: str) -> tuple[np.ndarray, dict]:
        return read_nifti(self.folder / nifti_name(stem))


def exam_source(folder):
    """A source as it is (anything with `read`), or the NIfTI folder at that path."""
    return folder if hasattr(folder, "read") else NiftiFolder(folder)


def repair_nonfinite(view: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """An image view [Z, T, H, W] with its non-finite voxels replaced by the mean of the
    finite voxels among their 8 in-plane neighbours (same slice, same frame): (float32
    array, number repaired). The view itself is not modified.

    ExamError naming the file when more than `MAX_REPAIRED_FRACTION` of the view is
    non-finite, or when a non-finite voxel has no finite neighbour (a cluster, not an
    isolated glitch).
    """
    bad = ~np.isfinite(view)
    count = int(bad.sum())
    fraction = count / bad.size
    kinds = "NaN" if np.isnan(view).any() else "infinite"
    if fraction > MAX_REPAIRED_FRACTION:
        raise ExamError(
            f"{name}: {kinds} values in {count} voxels ({fraction:.3%} of the view), more "
            f"than the {MAX_REPAIRED_FRACTION:.1%} that are repaired"
        )
    repaired = np.where(bad, np.float32(0), view).astype(np.float32)
    frames = bad.any(axis=(2, 3))  # [Z, T]: only frames holding a bad voxel are filtered
    values, valid = repaired[frames], (~bad[frames]).astype(np.float32)
    height, width = view.shape[2:]

    def neighbour_sum(a):  # the 3x3 in-plane neighbourhood's sum, zero outside the image
        padded = np.pad(a, ((0, 0), (1, 1), (1, 1)))
        return sum(padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3))

    total, support = neighbour_sum(values), neighbour_sum(valid)
    holes = bad[frames]
    if (support[holes] == 0).any():
        raise ExamError(
            f"{name}: {kinds} values in {count} voxels, some with no finite in-plane "
            "neighbour (a cluster, not isolated voxels): not repaired"
        )
    values[holes] = total[holes] / support[holes]
    repaired[frames] = values
    return repaired, count


def load_view(folder, stem: str) -> tuple[np.ndarray, dict]:
    """An image view [Z, T, H, W] in its stored dtype (a view, no copy) plus its header dict.

    folder: an exam folder or a source (`exam_source`). Checks dimensionality and slice
    count; repairs isolated NaN/inf voxels (`repair_nonfinite`: then a float32 copy, and
    info["repaired_voxels"] says how many) or raises. Blank images: `crop_image`.
    """
    source = exam_source(folder)
    name = source.name(stem)
    data, info = source.read(stem)
    if stem == "sa":
        if data.ndim != 4:
            raise ExamError(f"{name}: expected 4-D (X, Y, Z, T), got shape {data.shape}")
        if data.shape[2] < MIN_SHORT_AXIS_SLICES:
            raise ExamError(
                f"{name}: only {data.shape[2]} short-axis slices in subject "
                f"{getattr(source, 'eid', '?')}, need at least {MIN_SHORT_AXIS_SLICES} "
                f"(fewer than {WINDOW} are written with the missing planes absent)"
            )
    elif data.ndim != 4 or data.shape[2] != 1:
        raise ExamError(f"{name}: expected 4-D (X, Y, 1, T), got shape {data.shape}")
    if 0 in data.shape:
        raise ExamError(f"{name}: empty array of shape {data.shape}")
    view = data.transpose(2, 3, 1, 0)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        view, repaired = repair_nonfinite(view, name)
        info = {**info, "repaired_voxels": repaired}
    return view, info


def load_segmentation(
    folder: Path, view: str, shape, convention: str | None
) -> tuple[np.ndarray, dict]:
    """A view's labels as uint8 layout classes [Z, T, H, W] and its header dict.

    shape: the image's [Z, T, H, W] to match, or None. convention None: the file's labels,
    not remapped (a view; remap the parts you use). ExamError if unusable.
    """
    source = exam_source(folder)
    name = source.name(SEGMENTATION_FILE[view])
    data, info = source.read(SEGMENTATION_FILE[view])
    if data.ndim != 4:
        raise ExamError(f"{name}: expected 4-D (X, Y, Z, T), got shape {data.shape}")
    labels = data.transpose(2, 3, 1, 0)
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ExamError(
            f"{name}: shape {data.shape} does not match its image (X, Y, Z, T) "
            f"{tuple(shape[i] for i in (3, 2, 0, 1))}"
        )
    if convention is None:
        return labels, info
    return remap_segmentation(labels, view, convention), info


def remap_segmentation(labels: np.ndarray, view: str, convention: str) -> np.ndarray:
    """`label_maps.remap_labels`, raising ExamError that names the view's file."""
    try:
        return label_maps.remap_labels(labels, view, convention)
    except ValueError as e:
        raise ExamError(f"{nifti_name(SEGMENTATION_FILE[view])}: {e}") from None


def select_short_axis_slices(
    seg_sa: np.ndarray | None, num_slices: int, rule: str
) -> tuple[list[int], str]:
    """Six consecutive slice indices (one per short-axis plane, base -> apex) of a stack of
    `num_slices` and the rule used.

    reference: start two slices below (apex-wards of) the first slice whose frame-0
      segmentation holds LV blood pool; shifted back if the window runs off the stack.
    lv_centre: the window centred on the slices whose frame-0 segmentation holds LV.
    centre:    the window centred in the stack (no segmentation needed).
    The segmentation rules fall back to "centre" when there is no LV at frame 0.
    A partial stack (MIN_SHORT_AXIS_SLICES <= num_slices < 6): the same rule, shifted so
    that the window holds the whole stack; indices outside 0..num_slices-1 are planes the
    stack does not reach (absent). seg_sa: [Z, T, H, W] layout classes, or None.
    """
    if rule not in SLICE_RULES:
        raise ValueError(f"unknown slice rule {rule!r}; expected one of {SLICE_RULES}")
    if num_slices < MIN_SHORT_AXIS_SLICES:
        raise ExamError(
            f"only {num_slices} short-axis slices, need at least {MIN_SHORT_AXIS_SLICES}"
        )
    has_lv = None if seg_sa is None else (seg_sa[:, 0] == layout.LV_BLOOD_POOL).any(axis=(1, 2))
    if rule == "centre" or has_lv is None or not has_lv.any():
        start, used = (num_slices - WINDOW) // 2, "centre"
    elif rule == "reference":
        start, used = int(np.argmax(has_lv)) + 2, rule
    else:
        lv = np.flatnonzero(has_lv)
        start, used = (lv[0] + lv[-1] + 1) // 2 - WINDOW // 2, rule
    spare = num_slices - WINDOW  # < 0: a partial stack, the window overhangs it
    start = max(min(0, spare), min(start, max(0, spare)))
    return list(range(start, start + WINDOW)), used


def crop_offsets(labels: np.ndarray | None, height: int, width: int, size: int) -> tuple[int, int]:
    """(row, col) of the top-left corner of a size x size crop (may be < 0: padding).

    Centred on the bounding box of the non-zero voxels of labels [..., H, W] (bool or
    layout classes) when there are any, else on the image; kept inside the image along an
    axis at least `size` long. The leading axes are collapsed by one max over them.
    """
    footprint = None
    if labels is not None:
        footprint = labels.max(axis=tuple(range(labels.ndim - 2))) if labels.ndim > 2 else labels
        footprint = footprint if footprint.any() else None
    offsets = []
    for axis, extent in ((1, height), (0, width)):
        if footprint is not None:
            hits = np.flatnonzero(footprint.any(axis=axis))
            offset = (hits[0] + hits[-1] + 1) // 2 - size // 2
        else:
            offset = (extent - size) // 2
        offsets.append(
            int(min(max(offset, 0), extent - size)) if extent >= size else (extent - size) // 2
        )
    return offsets[0], offsets[1]


def crop(volume: np.ndarray, row: int, col: int, size: int, fill=0) -> np.ndarray:
    """volume [..., H, W] -> [..., size, size] from (row, col), `fill` outside the image."""
    *lead, height, width = volume.shape
    out = np.full((*lead, size, size), fill, volume.dtype)
    r0, r1 = max(row, 0), min(row + size, height)
    c0, c1 = max(col, 0), min(col + size, width)
    if r1 > r0 and c1 > c0:
        out[..., r0 - row : r1 - row, c0 - col : c1 - col] = volume[..., r0:r1, c0:c1]
    return out


def crop_image(view: np.ndarray, row: int, col: int, size: int, name: str, first=0, count=1):
    """Slices first..first+count-1 of an image view [Z, T, H, W] cropped like `crop` ->
    [count, T, size, size], padded with the view's minimum (its background).

    ExamError naming the file if the crop is blank (one value throughout: a blank image, or
    nothing but background where the heart should be). Only the crop is scanned, and the
    whole view only when the crop reaches outside it.
    """
    height, width = view.shape[-2:]
    inside = 0 <= row <= height - size and 0 <= col <= width - size
    window = crop(view[first : first + count], row, col, size, 0 if inside else view.min())
    low, high = window.min(), window.max()
    if low == high:
        raise ExamError(f"{name}: blank image (constant {float(low):g} in the {size}x{size} crop)")
    return window


def resample_time(volume: np.ndarray, frames: int, labels: bool = False) -> np.ndarray:
    """[..., T, H, W] -> [..., frames, H, W] over one periodic cardiac cycle.

    Images: linear interpolation between neighbouring frames (the last wraps to the
    first); labels: the nearest frame. Frame k sits at time k * T / frames.
    """
    length = volume.shape[-3]
    if length == frames:
        return volume
    position = np.arange(frames) * (length / frames)
    if labels:
        return np.take(volume, np.rint(position).astype(int) % length, axis=-3)
    before = np.floor(position).astype(int)
    weight = (position - before).astype(np.float32)[:, None, None]
    return (1 - weight) * np.take(volume, before % length, axis=-3) + weight * np.take(
        volume, (before + 1) % length, axis=-3
    )


def _view_geometry(
    name: str, info: dict, spacing, slices, row: int, col: int, orientation: dict
) -> dict:
    geometry = {
        "file": name,
        "shape": info["shape"],
        "affine": info["affine"].tolist(),
        "orientation": dict(orientation),  # file grid -> canonical grid (`orient`)
        "pixel_spacing": [float(s) for s in spacing],
        "slices": [int(s) for s in slices],
        "crop": [int(row), int(col)],  # in the canonical grid
        "frames": int(info["shape"][3]),
        "frame_duration": frame_duration_seconds(info),
    }
    for key in ("series", "repaired_voxels"):  # DICOM series read; non-finite voxels repaired
        if key in info:
            geometry[key] = info[key]
    return geometry


def _view_notes(name: str, info: dict, frames: int, geometry: dict, short_axis=None) -> None:
    """Warnings of a usable view: repaired voxels; frames resampled (a long-axis view only
    when its frame count differs from the short axis's, `short_axis` = (name, count))."""
    if info.get("repaired_voxels"):
        voxels = info["repaired_voxels"]
        fraction = voxels / math.prod(info["shape"])
        geometry["warnings"].append(
            f"{name}: {voxels} non-finite voxels ({fraction:.3%}) repaired from their "
            "in-plane neighbours"
        )
    length = info["shape"][3]
    if short_axis is None and length != frames:
        geometry["warnings"].append(f"{name}: {length} frames resampled to {frames}")
    elif short_axis is not None and length != short_axis[1]:
        geometry["warnings"].append(
            f"{name}: {length} frames ({short_axis[0]}: {short_axis[1]}) resampled to {frames}"
        )


def preprocess_exam(
    folder,
    *,
    eid: str | None = None,
    phenotype_row=None,
    frames: int = 50,
    size: int = 128,
    slice_rule: str = "reference",
    label_convention: str = "ukbb",
    la_crop: str = "centre",
) -> tuple[dict, dict]:
    """Read and preprocess one exam folder: (exam dict of `whmae.layout`, geometry dict).

    folder: an exam folder of NIfTI files, or a source (`exam_source`, e.g. a DICOM exam
    from `whmae.data.ingest.dicom_exam.open_exam`). phenotype_row: float [18] in
    `layout.PHENOTYPE_COLUMNS` order (NaN = missing), or None (all missing). Raises
    ExamError (message names the file) if the exam must be rejected.
    """
    source = exam_source(folder)
    eid = source.eid if eid is None else str(eid)
    label_maps.check_convention(label_convention)
    if la_crop not in LA_CROPS:
        raise ValueError(f"unknown long-axis crop {la_crop!r}; expected one of {LA_CROPS}")
    shape = (layout.NUM_PLANES, frames, size, size)
    windows = {}  # plane -> [frames, size, size] in the file's dtype (float32 if resampled)
    labels = np.zeros(shape, np.uint8)
    plane_mask = np.zeros(layout.NUM_PLANES, bool)
    label_mask = np.zeros((layout.NUM_PLANES, frames), bool)
    spacing = np.full((layout.NUM_PLANES, 2), np.nan, np.float32)
    geometry = {
        "eid": eid,
        "frames": frames,
        "size": size,
        "label_convention": label_convention,
        "input": source.kind,
        "orientation": ORIENTATION_VERSION,
        "views": {},
        "absent": [],
        "warnings": list(source.warnings),
    }

    if not source.has("sa"):
        raise ExamError(
            f"{source.name('sa')}: missing (exams without a short-axis stack are rejected: "
            "slice selection needs it)"
        )
    short_axis, sa_info = load_view(source, "sa")
    # Remap only frame 0 (for the slice choice) and the window, not the whole stack.
    seg_sa = _optional_segmentation(source, "sa", short_axis.shape, None, geometry)
    sa_orientation = _orientation(source.name("sa"), sa_info)
    short_axis = orient(short_axis, sa_orientation)
    seg_sa = None if seg_sa is None else orient(seg_sa, sa_orientation)
    num_slices = short_axis.shape[0]
    window_seg = ed_seg = None
    try:
        if seg_sa is not None:  # labelled frames over the whole stack; the slice rule at ED
            sa_frames = label_maps.labelled_frames(seg_sa, label_convention)
            ed = label_maps.end_diastolic_frame(seg_sa, sa_frames, label_convention)
            ed_seg = remap_segmentation(seg_sa[:, ed : ed + 1], "sa", label_convention)
        window_slices, rule_used = select_short_axis_slices(ed_seg, num_slices, slice_rule)
        if seg_sa is not None:
            stack = _stack_part(window_slices, num_slices)  # consecutive: a view, no gather
            window_seg = remap_segmentation(seg_sa[stack], "sa", label_convention)
    except ExamError as e:
        geometry["warnings"].append(f"{e} (plane unlabelled)")
        window_slices, rule_used = select_short_axis_slices(None, num_slices, slice_rule)
    if rule_used != slice_rule:
        geometry["warnings"].append(f"slice rule {slice_rule} fell back to {rule_used}")
    # The planes the stack reaches (all six unless it is partial) and their slices.
    present = [
        (plane, z)
        for plane, z in zip(layout.SHORT_AXIS_PLANES, window_slices, strict=True)
        if 0 <= z < num_slices
    ]
    planes, slices = [p for p, _ in present], [z for _, z in present]
    if len(planes) < WINDOW:
        missing = [p for p in layout.SHORT_AXIS_PLANES if p not in planes]
        geometry["absent"].append(
            f"{source.name('sa')}: partial stack of {num_slices} short-axis slices (fewer "
            f"than {WINDOW}): planes '{','.join(map(str, missing))}' absent"
        )
    height, width = short_axis.shape[2:]
    row, col = crop_offsets(window_seg, height, width, size)
    window = crop_image(short_axis, row, col, size, source.name("sa"), slices[0], len(slices))
    windows.update(zip(planes, resample_time(window, frames), strict=True))
    if window_seg is not None:
        labels[planes] = resample_time(crop(window_seg, row, col, size), frames, labels=True)
        label_mask[planes] = _labelled(sa_frames, frames, source.name("seg_sa"), geometry)
    plane_mask[planes] = True
    zooms = sa_info["zooms"]
    spacing[planes] = _pixel_spacing(zooms, sa_orientation)
    sa_name = source.name("sa")
    geometry["views"]["sa"] = _view_geometry(
        sa_name, sa_info, spacing[planes[0]], slices, row, col, sa_orientation
    )
    geometry["views"]["sa"].update(
        planes=planes, slice_rule=rule_used, slice_spacing=zooms[2], window=window_slices
    )
    if window_seg is not None:
        geometry["views"]["sa"]["labelled_frames"] = np.flatnonzero(sa_frames).tolist()
    _view_notes(sa_name, sa_info, frames, geometry)
    frame_duration = geometry["views"]["sa"]["frame_duration"] * sa_info["shape"][3] / frames
    if math.isnan(frame_duration):
        geometry["warnings"].append(f"{sa_name}: no frame duration in the header (pixdim[4])")

    for plane, stem in enumerate(LONG_AXIS_VIEWS):
        if not source.has(stem):
            geometry["absent"].append(f"{source.name(stem)}: missing")
            continue
        try:
            view, info = load_view(source, stem)
            seg = None
            if stem in SEGMENTATION_FILE:
                seg = _optional_segmentation(source, stem, view.shape, label_convention, geometry)
            orientation = _orientation(source.name(stem), info)
            view = orient(view, orientation)
            seg = None if seg is None else orient(seg, orientation)
            use_label = la_crop == "label" and seg is not None
            row, col = crop_offsets(seg if use_label else None, *view.shape[2:], size)
            window = crop_image(view, row, col, size, source.name(stem))[0]
        except ExamError as e:
            geometry["absent"].append(str(e))
            continue
        windows[plane] = resample_time(window, frames)
        if seg is not None:
            labels[plane] = resample_time(crop(seg[0], row, col, size), frames, labels=True)
            la_frames = label_maps.labelled_frames(seg, label_convention)
            name = source.name(SEGMENTATION_FILE[stem])
            label_mask[plane] = _labelled(la_frames, frames, name, geometry)
        plane_mask[plane] = True
        spacing[plane] = _pixel_spacing(info["zooms"], orientation)
        geometry["views"][stem] = _view_geometry(
            source.name(stem), info, spacing[plane], [0], row, col, orientation
        )
        geometry["views"][stem]["planes"] = [plane]
        if seg is not None:
            geometry["views"][stem]["labelled_frames"] = np.flatnonzero(la_frames).tolist()
        _view_notes(source.name(stem), info, frames, geometry, (sa_name, sa_info["shape"][3]))

    phenotypes = np.full(layout.NUM_PHENOTYPES, np.nan, np.float32)
    if phenotype_row is not None:
        phenotypes[:] = np.asarray(phenotype_row, np.float32)
    exam = {
        "eid": eid,
        "images": quantize_planes(windows, shape),
        "labels": labels,
        "phenotypes": phenotypes,
        "plane_mask": plane_mask,
        "label_mask": label_mask,
        "pixel_spacing": spacing,
        "slice_spacing": np.float32(zooms[2]),
        "frame_duration": np.float32(frame_duration),
    }
    return exam, geometry


def _labelled(view_frames: np.ndarray, frames: int, name: str, geometry: dict) -> np.ndarray:
    """A view's labelled frames, bool [T] (`label_maps.labelled_frames`) -> the record's
    [frames]: a record frame is labelled when the frame its labels come from is (the nearest,
    as `resample_time` takes labels). Warns of a view with no labelled frame and, when only
    some frames are labelled (ED, ES), of those that no record frame takes (resampling to
    fewer frames)."""
    source = np.arange(len(view_frames))[:, None, None]
    taken = resample_time(source, frames, labels=True)[:, 0, 0]  # record frame -> file frame
    if not view_frames.any():
        geometry["warnings"].append(f"{name}: no frame holds a label (plane unlabelled)")
    lost = sorted(set(np.flatnonzero(view_frames).tolist()) - set(taken.tolist()))
    if lost and not view_frames.all():
        geometry["warnings"].append(
            f"{name}: labelled frames {lost} of {len(view_frames)} fall between the "
            f"{frames} resampled frames (their labels are not in the record)"
        )
    return view_frames[taken]


def _orientation(name: str, info: dict) -> dict:
    """`canonical_orientation` of a view's affine, ExamError naming the file if degenerate."""
    try:
        return canonical_orientation(info["affine"])
    except ValueError as e:
        raise ExamError(f"{name}: {e}") from None


def _pixel_spacing(zooms, orientation: dict) -> tuple[float, float]:
    """(row, col) spacing in the canonical grid: the file's rows are Y, its columns X."""
    spacing = (zooms[1], zooms[0])
    return spacing[::-1] if orientation["transpose"] else spacing


def _stack_part(window_slices: list[int], num_slices: int) -> slice:
    """The stack's slices inside the window (all six unless the stack is partial)."""
    return slice(max(window_slices[0], 0), min(window_slices[-1] + 1, num_slices))


def _optional_segmentation(source, view, shape, convention, geometry) -> np.ndarray | None:
    """A view's labels (remapped unless convention is None), or None (absent or unusable;
    the reason goes to warnings)."""
    name = source.name(SEGMENTATION_FILE[view])
    if not source.has(SEGMENTATION_FILE[view]):
        geometry["warnings"].append(f"{name}: missing (plane unlabelled)")
        return None
    try:
        return load_segmentation(source, view, shape, convention)[0]
    except ExamError as e:
        geometry["warnings"].append(f"{e} (plane unlabelled)")
        return None


def restore_labels(pred_labels: np.ndarray, geometry: dict, *, file_labels: bool = True) -> dict:
    """Predicted labels [9, T, H, W] (layout classes) -> {view: uint8 array in the view's
    original NIfTI shape and orientation (X, Y, Z, T)}: the inverse of `preprocess_exam`'s
    geometry (crop, slice window, time resampling and canonical orientation undone).

    Voxels outside the crop and short-axis slices outside the window are 0. Each original
    frame takes the nearest resampled frame. file_labels: map back to the file's label
    convention (`label_maps.restore_file_labels`), else keep layout classes. Geometry
    written before orientation versioning is in the file's orientation already; a newer
    orientation version than this code knows raises ValueError.
    """
    pred_labels = np.asarray(pred_labels)
    frames, size = pred_labels.shape[1], pred_labels.shape[2]
    restored = {}
    for stem, view in geometry["views"].items():
        orientation = _geometry_orientation(geometry, view)
        x, y, z, t = view["shape"]
        height, width = (x, y) if orientation["transpose"] else (y, x)  # canonical grid
        volume = np.zeros((z, t, height, width), np.uint8)  # [Z, T, H, W]
        nearest = np.rint(np.arange(t) * (frames / t)).astype(int) % frames
        row, col = view["crop"]
        r0, r1 = max(row, 0), min(row + size, height)
        c0, c1 = max(col, 0), min(col + size, width)
        for plane, index in zip(view["planes"], view["slices"], strict=True):
            window = pred_labels[plane][nearest]  # [t, size, size]
            volume[index, :, r0:r1, c0:c1] = window[:, r0 - row : r1 - row, c0 - col : c1 - col]
        volume = unorient(volume, orientation)  # -> the file's [Z, T, Y, X]
        if file_labels:
            volume = label_maps.restore_file_labels(volume, stem, geometry["label_convention"])
        restored[stem] = volume.transpose(3, 2, 0, 1)  # -> (X, Y, Z, T)
    return restored
