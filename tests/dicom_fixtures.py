"""UK Biobank-style DICOM exams written with pydicom from the phantom, beside their NIfTI twin.

`make_dicom_exam` writes one phantom exam twice: as a UK Biobank NIfTI folder
(`ukbb_fixtures.make_exam_folder`) and as DICOM, either the two UK Biobank zips
(<eid>_20209_2_0.zip: one series per short-axis slice CINE_segmented_SAX_b1..bN, plus the
derived CINE_segmented_SAX_InlineVF series and a manifest.csv; <eid>_20208_2_0.zip: the
CINE_segmented_LAX_2Ch / 3Ch / 4Ch series) or a folder of series sub-folders of .dcm files.
Pixel values are the twin's; the DICOM geometry (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing) comes from the phantom's planes in LPS, not from the
NIfTI affines, and frames carry TriggerTime = frame x frame duration, so the DICOM route is
checked against the NIfTI route of the same heart, not against itself.
"""

from __future__ import annotations

import io
import random
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from ukbb_fixtures import LONG_AXIS_VIEWS, make_exam_folder

from whmae.data.synthetic import phantom_planes
from whmae.data.synthetic.phantom import PhantomConfig, sample_subject

_LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
LONG_AXIS_DESCRIPTIONS = {
    "la_2ch": "CINE_segmented_LAX_2Ch",
    "la_3ch": "CINE_segmented_LAX_3Ch",
    "la_4ch": "CINE_segmented_LAX_4Ch",
}


def _ds(value: float) -> str:
    """A DS string (<= 16 characters)."""
    return f"{float(value):.10g}"


def _dicom_bytes(pixels: np.ndarray, tags: dict) -> bytes:
    sop = tags.pop("SOPInstanceUID")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = sop
    dataset.Modality = "MR"
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.ascontiguousarray(pixels, "<u2").tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _short_axis_planes(config: PhantomConfig, subject, num_slices: int):
    """The planes `phantom.render_short_axis_stack` renders (same default start)."""
    spacing = config.slice_spacing_mm
    apex = subject.heart.lv_epi.centre[0, 2] - subject.heart.lv_epi.semi_axes[0, 2]
    start = apex / 2 + (num_slices - 1) / 2 * spacing
    depths = start - spacing * np.arange(num_slices)
    return phantom_planes.short_axis_planes(
        subject.planning, depths, config.size, config.view_fov_mm("short_axis")
    )


def _planes_of_view(folder: Path, stem: str) -> np.ndarray:
    """The twin's NIfTI image as [Z, T, H, W]."""
    data = np.asanyarray(nib.load(str(folder / f"{stem}.nii.gz")).dataobj)
    return data.transpose(2, 3, 1, 0)


def make_dicom_exam(
    root,
    eid: str,
    index: int,
    *,
    size: int = 48,
    frames: int = 20,
    num_slices: int = 10,
    seed: int = 0,
    fov_mm: float = 200.0,
    form: str = "zip",
    shuffle: bool = False,
    descriptions: dict | None = None,
    drop: tuple = (),
    inline_vf: bool = False,
    segmentations: bool = False,
    cardiac_number: bool = True,
) -> dict:
    """Write phantom exam `index` as DICOM in root/eid and as NIfTI in root/../nifti/eid.

    form: "zip" (UK Biobank's two zips) or "folder" (series sub-folders of .dcm files).
    shuffle: zip members in random order under random names, short-axis SeriesNumbers
    against the slice order. descriptions: {(view, slice): SeriesDescription} overrides
    (view "sa" slice k, or a long-axis view with slice 0). drop: (view, slice, frame) files
    left out. inline_vf: add the derived CINE_segmented_SAX_InlineVF series (all slices,
    altered pixels). segmentations: copy the twin's seg_*.nii.gz beside the DICOMs.
    cardiac_number: write CardiacNumberOfImages (the frame count).
    Returns {"dicom": folder, "nifti": twin folder, "truth": make_exam_folder's truth}.
    """
    root = Path(root)
    twin_root = root.parent / f"{root.name}_nifti"
    truth = make_exam_folder(
        twin_root, eid, index, size=size, frames=frames, num_slices=num_slices, seed=seed,
        fov_mm=fov_mm,
    )  # fmt: skip
    twin = twin_root / eid
    config = PhantomConfig(size=size, frames=frames, seed=seed, fov_mm=fov_mm)
    subject = sample_subject(config, index)
    frame_ms = subject.frame_duration * 1000.0
    descriptions = dict(descriptions or {})
    rng = random.Random(f"{eid}-{index}")
    study = generate_uid(entropy_srcs=[eid, "study"])

    views = {"sa": (_short_axis_planes(config, subject, num_slices), _planes_of_view(twin, "sa"))}
    la_planes = phantom_planes.long_axis_planes(
        subject.planning, subject.heart.outflow_angle, size, fov_mm
    )
    for k, stem in enumerate(LONG_AXIS_VIEWS):
        views[stem] = (la_planes, _planes_of_view(twin, stem), k)

    files: dict[str, list[tuple[str, bytes]]] = {"20209": [], "20208": []}
    numbers = list(range(num_slices))
    if shuffle:
        rng.shuffle(numbers)

    def write_series(stem, z, plane, images, description, number, field, alter=0):
        series = generate_uid(entropy_srcs=[eid, stem, str(z), description])
        position = (plane.origin[z] * _LPS).tolist()
        orientation = [*(plane.col_direction[z] * _LPS), *(plane.row_direction[z] * _LPS)]
        for t in range(images.shape[0]):
            if (stem, z if stem == "sa" else 0, t) in drop and not alter:
                continue
            sop = generate_uid(entropy_srcs=[series, str(t)])
            tags = {
                "SOPInstanceUID": sop,
                "PatientID": eid,
                "StudyInstanceUID": study,
                "SeriesInstanceUID": series,
                "SeriesDescription": description,
                "SeriesNumber": number,
                "InstanceNumber": t + 1,
                "ImagePositionPatient": [_ds(v) for v in position],
                "ImageOrientationPatient": [_ds(v) for v in orientation],
                "PixelSpacing": [_ds(v) for v in plane.pixel_spacing[z]],
                "SliceThickness": _ds(8.0 if stem == "sa" else 6.0),
                "TriggerTime": _ds(t * frame_ms),
            }
            if cardiac_number:
                tags["CardiacNumberOfImages"] = images.shape[0]
            pixels = images[t].astype(np.int32) + alter
            name = f"{description}_{t + 1:03d}.dcm"
            if shuffle:  # names that say nothing of the order
                name = f"{sop}.dcm"
            elif alter:  # the derived series holds every slice
                name = f"{description}_{z + 1:02d}_{t + 1:03d}.dcm"
            folder = description
            files[field].append((f"{folder}/{name}", _dicom_bytes(pixels, tags)))

    sa_planes, sa_images = views["sa"][:2]
    for z in range(num_slices):
        description = descriptions.get(("sa", z), f"CINE_segmented_SAX_b{z + 1}")
        write_series("sa", z, sa_planes, sa_images[z], description, 20 + numbers[z], "20209")
        if inline_vf:  # derived: same planes, contours burned in (brighter pixels)
            write_series("sa", z, sa_planes, sa_images[z], "CINE_segmented_SAX_InlineVF", 99,
                         "20209", alter=400)  # fmt: skip
    for k, stem in enumerate(LONG_AXIS_VIEWS):
        planes, images, _ = views[stem]
        description = descriptions.get((stem, 0), LONG_AXIS_DESCRIPTIONS[stem])
        write_series(stem, k, planes, images[0], description, 10 + k, "20208")

    folder = root / eid
    folder.mkdir(parents=True, exist_ok=True)
    for field, members in files.items():
        if shuffle:
            rng.shuffle(members)
        if form == "zip":
            members = [(name.rsplit("/", 1)[1], data) for name, data in members]
            if field == "20209":
                members.append(("manifest.csv", b"filename,series\n"))
            path = folder / f"{eid}_{field}_2_0.zip"
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
                for name, data in members:
                    archive.writestr(name, data)
        else:
            for name, data in members:
                path = folder / "dicom" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    if segmentations:
        for path in twin.glob("seg_*.nii.gz"):
            shutil.copy(path, folder / path.name)
    return {"dicom": folder, "nifti": twin, "truth": truth}


def without_segmentations(folder: Path, out: Path) -> Path:
    """A copy of a NIfTI exam folder without its seg_*.nii.gz files."""
    out.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("*.nii.gz"):
        if not path.name.startswith("seg_"):
            shutil.copy(path, out / path.name)
    return out
