"""Small UK Biobank-layout exam folders built from the phantom (NIfTI written with nibabel).

Each folder holds sa.nii.gz (X, Y, Z, T), la_{2,3,4}ch.nii.gz (X, Y, 1, T) and the
segmentations seg_sa / seg_la_2ch / seg_la_4ch in the UK Biobank label convention (or
ACDC / M&Ms for the short axis). Arrays are stored as UK Biobank does: X along the image
columns, Y along the rows, so the phantom's voxel (row, col, slice) affine has its first
two columns swapped. `break_exam` damages a folder in one of the ways `prepare` must
survive.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from whmae import layout
from whmae.data.ingest.label_maps import SHORT_AXIS_MAPS
from whmae.data.synthetic import phantom_planes
from whmae.data.synthetic.phantom import (
    PhantomConfig,
    render_planes,
    render_short_axis_stack,
    sample_subject,
)

LONG_AXIS_VIEWS = ("la_2ch", "la_3ch", "la_4ch")
# Layout class -> UK Biobank file label, per long-axis view.
_LONG_AXIS_FILE_LABELS = {"la_2ch": {layout.LA: 1}, "la_4ch": {layout.LA: 1, layout.RA: 2}}
BREAKS = (
    "missing_la_4ch",
    "missing_sa",
    "truncated_sa",
    "nan_sa",
    "blank_sa",
    "few_slices",
    "la_4ch_wrong_dims",
    "sa_3d",
    "missing_seg_sa",
    "nan_sa_isolated",
    "partial_sa",
)
# Voxels set to NaN by "nan_sa_isolated": (X, Y, Z, T) of the sa.nii.gz array, apart.
ISOLATED_NANS = ((20, 20, 3, 0), (25, 30, 5, 4), (10, 40, 7, 9), (33, 12, 1, 15))


def write_nifti(
    path: Path,
    planes: np.ndarray,
    affine_rcs: np.ndarray,
    frame_duration: float,
    time_unit: str = "sec",
    dtype=np.int16,
) -> None:
    """planes [Z, T, H, W] with its voxel (row, col, slice) affine -> NIfTI (X=col, Y=row, Z, T)."""
    data = np.ascontiguousarray(np.asarray(planes).transpose(3, 2, 0, 1)).astype(dtype)
    affine = np.asarray(affine_rcs, np.float64)[:, [1, 0, 2, 3]]
    image = nib.Nifti1Image(data, affine)
    zooms = image.header.get_zooms()[:3]
    scale = {"sec": 1.0, "msec": 1e3}[time_unit]
    image.header.set_zooms((*zooms, frame_duration * scale))
    image.header.set_xyzt_units("mm", time_unit)
    nib.save(image, str(path))


def _to_file_labels(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros(labels.shape, np.uint8)
    for cls, file_label in mapping.items():
        out[labels == cls] = file_label
    return out


def make_exam_folder(
    root,
    eid: str,
    index: int,
    *,
    size: int = 64,
    frames: int = 50,
    num_slices: int = 10,
    seed: int = 0,
    fov_mm: float = 200.0,
    time_unit: str = "sec",
    convention: str = "ukbb",
    long_axis: bool = True,
) -> dict:
    """Write one phantom exam as a UK Biobank folder root/eid; returns its ground truth:
    phenotypes [18], labels_sa [Z, T, H, W] (layout classes), images_sa uint8, frame_duration,
    pixel spacing and the long-axis labels {view: [T, H, W]}."""
    config = PhantomConfig(size=size, frames=frames, seed=seed, fov_mm=fov_mm)
    subject = sample_subject(config, index)
    folder = Path(root) / eid
    folder.mkdir(parents=True, exist_ok=True)
    dt = subject.frame_duration
    images, labels, planes = render_short_axis_stack(config, subject, num_slices)
    stack = planes.affines()[0]
    stack[:3, 2] = planes.centre[1] - planes.centre[0]  # slice axis: base -> apex
    intensity = images.astype(np.int16) * 3  # int16 like scanner data, not 0-255
    write_nifti(folder / "sa.nii.gz", intensity, stack, dt, time_unit)
    inverse = {cls: label for label, cls in SHORT_AXIS_MAPS[convention].items()}
    write_nifti(
        folder / "seg_sa.nii.gz", _to_file_labels(labels, inverse), stack, dt, time_unit, np.uint8
    )
    truth = {
        "eid": eid,
        "phenotypes": subject.phenotypes.copy(),
        "labels_sa": labels,
        "images_sa": images,
        "frame_duration": dt,
        "pixel_spacing": fov_mm / size,
        "slice_spacing": config.slice_spacing_mm,
        "long_axis": {},
    }
    if long_axis:
        la_planes = phantom_planes.long_axis_planes(
            subject.planning, subject.heart.outflow_angle, size, fov_mm
        )
        rng = np.random.default_rng([seed, index, 3])
        la_images, la_labels = render_planes(subject, la_planes, LONG_AXIS_VIEWS, rng)
        la_images = np.rint(la_images / la_images.max() * 700).astype(np.int16)
        for view, image, label, affine in zip(
            LONG_AXIS_VIEWS, la_images, la_labels, la_planes.affines(6.0), strict=True
        ):
            write_nifti(folder / f"{view}.nii.gz", image[None], affine, dt, time_unit)
            if view in _LONG_AXIS_FILE_LABELS:
                file_labels = _to_file_labels(label, _LONG_AXIS_FILE_LABELS[view])
                write_nifti(
                    folder / f"seg_{view}.nii.gz",
                    file_labels[None],
                    affine,
                    dt,
                    time_unit,
                    np.uint8,
                )
            truth["long_axis"][view] = label
    return truth


def break_exam(folder, how: str) -> str:
    """Damage an exam folder in one way (BREAKS); returns the reason text expected."""
    folder = Path(folder)
    sa = folder / "sa.nii.gz"
    if how == "missing_la_4ch":
        (folder / "la_4ch.nii.gz").unlink()
        (folder / "seg_la_4ch.nii.gz").unlink()
        return "la_4ch.nii.gz: missing"
    if how == "missing_sa":
        sa.unlink()
        return "sa.nii.gz: missing"
    if how == "truncated_sa":
        payload = sa.read_bytes()
        sa.write_bytes(payload[: len(payload) // 2])
        return "sa.nii.gz: truncated or corrupt gzip stream"
    if how == "missing_seg_sa":
        (folder / "seg_sa.nii.gz").unlink()
        return "seg_sa.nii.gz: missing"
    image = nib.load(str(sa))
    data = np.asanyarray(image.dataobj)
    if how == "nan_sa":  # two whole frames: more than whmae repairs
        data = data.astype(np.float32)
        data[:, :, 0, :2] = np.nan
        reason = "sa.nii.gz: NaN values in"
    elif how == "nan_sa_isolated":  # a few scattered voxels: repaired, the exam written
        data = data.astype(np.float32)
        for voxel in ISOLATED_NANS:
            data[voxel] = np.nan
        reason = f"sa.nii.gz: {len(ISOLATED_NANS)} non-finite voxels"
    elif how == "blank_sa":
        data = np.full(data.shape, 7, data.dtype)
        reason = "sa.nii.gz: blank image"
    elif how == "few_slices":  # below nifti_exam.MIN_SHORT_AXIS_SLICES: rejected
        data = data[:, :, :2]
        reason = f"sa.nii.gz: only 2 short-axis slices in subject {folder.name}, need at least 3"
    elif how == "partial_sa":  # 4 of the 6 planes: written, the others absent
        keep_short_axis_slices(folder, 3, 4)
        return "sa.nii.gz: partial stack of 4 short-axis slices"
    elif how == "sa_3d":
        data = data[:, :, :, 0]
        reason = "sa.nii.gz: expected 4-D (X, Y, Z, T), got shape"
    elif how == "la_4ch_wrong_dims":
        la = nib.load(str(folder / "la_4ch.nii.gz"))
        la_data = np.asanyarray(la.dataobj)
        doubled = np.concatenate([la_data, la_data], axis=2)
        nib.save(nib.Nifti1Image(doubled, la.affine, la.header), str(folder / "la_4ch.nii.gz"))
        return "la_4ch.nii.gz: expected 4-D (X, Y, 1, T), got shape"
    else:
        raise ValueError(f"unknown break {how!r}; expected one of {BREAKS}")
    broken = nib.Nifti1Image(data, image.affine, image.header)
    broken.set_data_dtype(data.dtype)  # keep the NaN: the old header says int16
    nib.save(broken, str(sa))
    return reason


def keep_short_axis_slices(folder, first: int, count: int) -> None:
    """Cut sa.nii.gz and seg_sa.nii.gz to slices first..first+count-1 (a partial stack),
    their affines moved to the first kept slice."""
    for stem in ("sa", "seg_sa"):
        path = Path(folder) / f"{stem}.nii.gz"
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)[:, :, first : first + count]
        affine = np.array(image.affine, np.float64)
        affine[:3, 3] += first * affine[:3, 2]
        nib.save(nib.Nifti1Image(data, affine, image.header), str(path))


def keep_label_frames(folder, frames) -> None:
    """Zero every segmentation of an exam folder outside `frames` (file frame indices), as
    ACDC and M&Ms ship them: labels at ED and ES only, the other frames all background."""
    for path in sorted(Path(folder).glob("seg_*.nii.gz")):
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj).copy()
        data[..., np.setdiff1d(np.arange(data.shape[3]), frames)] = 0
        nib.save(nib.Nifti1Image(data, image.affine, image.header), str(path))


def roll_frames(folder, shift: int) -> None:
    """Every view of an exam folder (images and segmentations) rolled `shift` frames later
    in the cycle: the file's frame t holds what frame t - shift held (ED at frame `shift`,
    as M&Ms exams may start the cycle elsewhere)."""
    for path in sorted(Path(folder).glob("*.nii.gz")):
        image = nib.load(str(path))
        data = np.roll(np.asanyarray(image.dataobj), shift, axis=3)
        nib.save(nib.Nifti1Image(data, image.affine, image.header), str(path))


def write_phenotype_csv(path, rows: dict[str, np.ndarray], eid_column: str = "eid") -> None:
    """{eid: float [18]} -> CSV with the exact UK Biobank column names; NaN -> empty cell."""
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([eid_column, *layout.PHENOTYPE_COLUMNS, "Sex"])
        for eid, values in rows.items():
            cells = ["" if math.isnan(v) else f"{v:.6g}" for v in np.asarray(values, float)]
            writer.writerow([eid, *cells, "1"])


def crash_worker_on_eid(job: dict) -> dict:
    """A `prepare` worker stand-in that kills its process for eid "crash" (os._exit)."""
    if job["eid"] == "crash":
        os._exit(3)
    return {"eid": job["eid"], "status": "written"}


def crash_shard_on_eid(slot: int, shard: int, jobs: list[dict]) -> list[dict]:
    """A whole-shard worker stand-in: `crash_worker_on_eid` per job, reporting progress."""
    from whmae.data.worker_pool import count_done

    results = []
    for job in jobs:
        results.append(crash_worker_on_eid(job))
        count_done(slot)
    return results


def grid_symmetry(rng) -> tuple[int, bool]:
    """A random symmetry of the pixel grid: (quarter turns 0-3, then flip X or not)."""
    return int(rng.integers(4)), bool(rng.integers(2))


def apply_grid_symmetry(data: np.ndarray, symmetry: tuple[int, bool]) -> np.ndarray:
    """data (X, Y, ...) rotated by quarter turns in the (X, Y) plane, then X flipped."""
    turns, flip = symmetry
    data = np.rot90(data, turns, axes=(0, 1))
    return data[::-1] if flip else data


def reorient_exam_folder(src, dst, seed: int) -> dict[str, tuple[int, bool]]:
    """Copy an exam folder with every view (image and segmentation alike) stored under a
    random grid symmetry, its affine changed to match: the same heart in the same place,
    other voxel orders. Returns {view stem: symmetry}."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    symmetries = {}
    for path in sorted(src.glob("*.nii.gz")):
        stem = path.name[: -len(".nii.gz")]
        view = stem.removeprefix("seg_")
        symmetry = symmetries.setdefault(view, grid_symmetry(rng))
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        # Which old voxel (i, j) each new voxel holds: the same symmetry on index grids.
        i, j = np.meshgrid(*map(np.arange, data.shape[:2]), indexing="ij")
        old_i, old_j = (apply_grid_symmetry(a, symmetry) for a in (i, j))
        step = np.zeros((4, 4))  # new voxel index -> old voxel index (affine)
        step[2, 2] = step[3, 3] = 1
        for row, old in enumerate((old_i, old_j)):
            step[row, :2] = old[1, 0] - old[0, 0], old[0, 1] - old[0, 0]
            step[row, 3] = old[0, 0]
        affine = image.affine @ step
        out = nib.Nifti1Image(np.ascontiguousarray(apply_grid_symmetry(data, symmetry)), affine)
        zooms = np.asarray(image.header.get_zooms(), float)
        zooms[:2] = np.linalg.norm(affine[:3, :2], axis=0)
        out.header.set_zooms(zooms)
        out.header.set_xyzt_units(*image.header.get_xyzt_units())
        out.set_data_dtype(image.get_data_dtype())
        nib.save(out, str(dst / path.name))
    return symmetries
