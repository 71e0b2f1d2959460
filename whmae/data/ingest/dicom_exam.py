"""UK Biobank DICOM -> the views `nifti_exam.preprocess_exam` reads, as NIfTI would hold them.

    <root>/<eid>/<eid>_20208_2_0.zip   long axis (2ch, 3ch, 4ch): one zip of DICOM files
    <root>/<eid>/<eid>_20209_2_0.zip   short axis (one series per slice, b1 = base)
    or <root>/<eid>/**/*.dcm           a folder of DICOM series (any sub-folders)
    optional beside them: seg_sa.nii.gz, seg_la_2ch.nii.gz, seg_la_4ch.nii.gz

`open_exam` returns a source for `preprocess_exam` (`DicomExam`, or `nifti_exam.NiftiFolder`
for a folder of NIfTI files): the DICOM series become the arrays (X, Y, Z, T) and header
dicts that `nifti_io.read_nifti` returns for the files UK Biobank's converter writes, so the
checks, repair, slice choice, crops, resampling and quantisation are `nifti_exam`'s, one
code path for both inputs. Segmentations (made from the same DICOMs, e.g. by ukbb_cardiac)
are read from NIfTI files beside the DICOMs when present.

Series: files are grouped by SeriesInstanceUID; a series' view comes from its
SeriesDescription through an ordered list of (regular expression, view or None = ignore)
pairs, searched case-insensitively, the first match wins: the caller's pairs, then
`DEFAULT_SERIES_VIEWS` (UK Biobank's CINE_segmented_SAX_b1..b13, CINE_segmented_LAX_2Ch /
3Ch / 4Ch; the derived CINE_segmented_SAX_InlineVF / LAX_InlineVF, LVOT and Ao_dist are
ignored). A series no pair matches falls back to geometry: parallel to the short-axis
stack (or, with no described stack, one of >= 2 parallel series at different positions)
it is short axis; otherwise it is ignored with a warning naming the subject and file
(which long-axis view a plane is cannot be told from its geometry reliably).

Geometry (DICOM patient space is LPS; NIfTI affines are RAS): slices are ordered by their
position along the stack normal (row x column direction of ImageOrientationPatient),
base -> apex: the apex lies to the patient's left, anterior and inferior, so the order
whose step points that way is chosen (the order of UK Biobank's b1..bN). Frames are
ordered by TriggerTime. The affine maps (X = column, Y = row, Z = slice) to RAS mm:
ImageOrientationPatient's directions times PixelSpacing (column, row), the mean step
between slice positions (one slice: the normal times SpacingBetweenSlices or
SliceThickness), the first slice's ImagePositionPatient. Cine timing: the median step of
TriggerTime (ms); without trigger times, NominalInterval / CardiacNumberOfImages.

Policy (`nifti_exam`'s: an unusable short axis rejects the exam, an unusable long-axis
view is absent): a view whose slices disagree in frame count, matrix, spacing or
orientation, with two frames at one trigger time, a frame missing (a gap in the trigger
times over 1.5x the median step, or fewer frames than CardiacNumberOfImages), or an
unreadable pixel array raises ExamError naming the subject and file. When one slice
position (or long-axis view) has several series (a repeated acquisition), the last series
(highest SeriesNumber) is used and the others named in a warning.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import zipfile
from pathlib import Path

import numpy as np

from whmae.data.ingest.nifti_exam import SEGMENTATION_FILE, NiftiFolder
from whmae.data.ingest.nifti_io import ExamError, nifti_name, read_nifti

DEFAULT_SERIES_VIEWS: tuple[tuple[str, str | None], ...] = (
    (r"inlinevf", None),  # the scanner's inline analysis (derived, contours burned in)
    (r"sax", "sa"),  # CINE_segmented_SAX_b1 .. b13
    (r"2ch", "la_2ch"),  # CINE_segmented_LAX_2Ch
    (r"3ch", "la_3ch"),  # CINE_segmented_LAX_3Ch
    (r"4ch", "la_4ch"),  # CINE_segmented_LAX_4Ch
    (r"lvot|ao_dist", None),  # other UK Biobank cine views, not planes of the layout
)
VIEWS = ("sa", "la_2ch", "la_3ch", "la_4ch")
INPUTS = ("auto", "nifti", "dicom")
# Direction from base to apex in LPS (the patient's left, anterior, inferior): the LV long
# axis points within ~45 degrees of it in normal anatomy, so it orders a stack base -> apex.
_APEX_LPS = np.array([1.0, -1.0, -1.0]) / math.sqrt(3.0)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PARALLEL_COS = math.cos(math.radians(5.0))  # planes within 5 degrees are parallel
_SAME_DIRECTION_COS = math.cos(math.radians(1.0))  # one stack: orientations within 1 degree
_SLICE_TOLERANCE_MM = 0.5  # positions along the normal closer than this are one slice
_GAP_FACTOR = 1.5  # a trigger-time step this much above the median: a frame is missing
_NOT_DICOM = (".csv", ".cvs", ".txt", ".xml", ".json", ".html", ".pdf")  # zip members skipped
_DICOM_SUFFIXES = (".dcm", ".ima", "")


def is_dicom_folder(folder) -> bool:
    """Whether a subject folder holds DICOM input: a .zip, or .dcm files (any depth)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if any(folder.glob("*.zip")):
        return True
    return next(folder.rglob("*.dcm"), None) is not None


def open_exam(folder, input_format: str = "auto", series_views=None):
    """The source `preprocess_exam` reads an exam folder through.

    input_format: "nifti" (sa.nii.gz, ...), "dicom" (zips / DICOM files) or "auto" (NIfTI
    when sa.nii.gz is there, else DICOM when `is_dicom_folder`, else NIfTI, whose missing
    sa.nii.gz is then the rejection). series_views: (pattern, view or None) pairs tried
    before `DEFAULT_SERIES_VIEWS`.
    """
    if input_format not in INPUTS:
        raise ValueError(f"unknown input {input_format!r}; expected one of {INPUTS}")
    folder = Path(folder)
    if input_format == "auto":
        dicom = not (folder / nifti_name("sa")).is_file() and is_dicom_folder(folder)
        input_format = "dicom" if dicom else "nifti"
    if input_format == "nifti":
        return NiftiFolder(folder)
    return DicomExam(folder, series_views)


def check_series_views(pairs) -> list[tuple[str, str | None]]:
    """Validated (pattern, view or None) pairs: patterns compile, views are `VIEWS`."""
    checked = []
    for item in pairs or ():
        if not (isinstance(item, list | tuple) and len(item) == 2):
            raise ValueError(f"series view mapping entries are [pattern, view], got {item!r}")
        pattern, view = item
        if view is not None and view not in VIEWS:
            raise ValueError(f"series pattern {pattern!r}: view {view!r} not one of {VIEWS}")
        try:
            re.compile(pattern, re.IGNORECASE)
        except (re.error, TypeError) as e:
            raise ValueError(f"series pattern {pattern!r}: {e}") from None
        checked.append((str(pattern), view))
    return checked


@dataclasses.dataclass
class _Instance:
    """One DICOM image file: its header (pixels decoded only when its view is read)."""

    file: str  # display name: <eid>/<zip>:<member> or <eid>/<relative path>
    dataset: object  # pydicom Dataset
    series: str
    description: str
    series_number: int
    number: int  # InstanceNumber
    position: np.ndarray  # [3] ImagePositionPatient, LPS mm
    orientation: np.ndarray  # [6] ImageOrientationPatient: along a row, along a column
    spacing: tuple[float, float]  # PixelSpacing (between rows, between columns) mm
    shape: tuple[int, int]  # (Rows, Columns)
    trigger: float  # TriggerTime ms (NaN if absent)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


def _float(dataset, keyword: str, default=math.nan) -> float:
    value = dataset.get(keyword)
    try:
        return default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return default


def _parse(raw: bytes, file: str, warnings: list[str], strict: bool) -> _Instance | None:
    """A DICOM image's header, or None (not DICOM, or no image: noted when strict)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(raw))
    except InvalidDicomError:
        if strict:
            warnings.append(f"{file}: not a DICOM file, skipped")
        return None
    except Exception as e:  # a damaged file raises many types
        warnings.append(f"{file}: unreadable DICOM ({type(e).__name__}: {e}), skipped")
        return None
    if "PixelData" not in dataset:
        return None  # DICOMDIR, reports, presentation states: not images
    missing = [
        keyword
        for keyword in (
            "SeriesInstanceUID",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
        )
        if keyword not in dataset
    ]
    if missing:
        warnings.append(f"{file}: image without {', '.join(missing)}, skipped")
        return None
    try:
        orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient], np.float64)
        position = np.asarray([float(v) for v in dataset.ImagePositionPatient], np.float64)
        spacing = tuple(float(v) for v in dataset.PixelSpacing)
        if orientation.shape != (6,) or position.shape != (3,) or len(spacing) != 2:
            raise ValueError("wrong number of values")
    except (TypeError, ValueError) as e:
        warnings.append(f"{file}: unusable geometry tags ({e}), skipped")
        return None
    orientation[:3] /= np.linalg.norm(orientation[:3]) or 1.0
    orientation[3:] /= np.linalg.norm(orientation[3:]) or 1.0
    return _Instance(
        file=file,
        dataset=dataset,
        series=str(dataset.SeriesInstanceUID),
        description=str(dataset.get("SeriesDescription", "") or ""),
        series_number=int(_float(dataset, "SeriesNumber", 0)),
        number=int(_float(dataset, "InstanceNumber", 0)),
        position=position,
        orientation=orientation,
        spacing=spacing,  # type: ignore[arg-type]
        shape=(int(dataset.Rows), int(dataset.Columns)),
        trigger=_float(dataset, "TriggerTime"),
    )


def _read_files(folder: Path, eid: str, warnings: list[str]) -> tuple[list[_Instance], list[str]]:
    """Every DICOM image of the folder's zips and loose DICOM files; and the containers."""
    instances, containers = [], []
    for path in sorted(folder.glob("*.zip")):
        containers.append(path.name)
        try:
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()]
                for member in sorted(members, key=lambda m: m.filename):
                    if member.filename.lower().endswith(_NOT_DICOM):
                        continue
                    file = f"{eid}/{path.name}:{member.filename}"
                    strict = member.filename.lower().endswith(".dcm")
                    instance = _parse(archive.read(member), file, warnings, strict)
                    if instance is not None:
                        instances.append(instance)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ExamError(f"{eid}/{path.name}: unreadable zip ({e})") from None
    loose = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _DICOM_SUFFIXES
        and not p.name.startswith(".")
        and (p.suffix or p.parent != folder)  # suffix-less files only inside series folders
    )
    for path in loose:
        relative = path.relative_to(folder)
        if relative.parts[0] not in containers:
            containers.append(relative.parts[0] if len(relative.parts) > 1 else "*.dcm")
        strict = path.suffix.lower() in (".dcm", ".ima")
        instance = _parse(path.read_bytes(), f"{eid}/{relative}", warnings, strict)
        if instance is not None:
            instances.append(instance)
    return instances, list(dict.fromkeys(containers))


def _match(description: str, pairs) -> tuple[bool, str | None]:
    for pattern, view in pairs:
        if re.search(pattern, description, re.IGNORECASE):
            return True, view
    return False, None


def _slice_positions(instances: list[_Instance], normal: np.ndarray) -> list[float]:
    """Distinct positions (mm along normal) of instances, merged within the tolerance."""
    distances = sorted(float(i.position @ normal) for i in instances)
    merged = [distances[0]]
    for d in distances[1:]:
        if d - merged[-1] > _SLICE_TOLERANCE_MM:
            merged.append(d)
    return merged


class DicomExam:
    """The DICOM series of one subject folder as `preprocess_exam`'s views (module docstring).

    Opening reads every file's header and assigns series to views; `read(stem)` decodes one
    view's pixels. Attributes: eid, kind ("dicom"), warnings (what opening noticed), series
    ({view: [SeriesInstanceUID]}).
    """

    kind = "dicom"

    def __init__(self, folder, series_views=None):
        self.folder = Path(folder)
        self.eid = self.folder.name
        self.warnings: list[str] = []
        pairs = [*check_series_views(series_views), *DEFAULT_SERIES_VIEWS]
        instances, self.containers = _read_files(self.folder, self.eid, self.warnings)
        if not instances:
            raise ExamError(f"{self.eid}: no DICOM images in {self.folder} (zips or .dcm files)")
        by_series: dict[str, list[_Instance]] = {}
        for instance in instances:
            by_series.setdefault(instance.series, []).append(instance)
        self._views: dict[str, list[list[_Instance]]] = {view: [] for view in VIEWS}
        unknown = []
        for series in by_series.values():
            matched, view = _match(series[0].description, pairs)
            if view is not None:
                self._views[view].append(series)
            elif not matched:
                unknown.append(series)
        self._assign_by_geometry(unknown)
        self.series = {
            view: sorted(s[0].series for s in group) for view, group in self._views.items()
        }
        # Slices grouped now (headers only), so that every warning is known before reading;
        # a view's error is raised when it is read (a long-axis view's makes it absent).
        self._slices: dict[str, list[list[_Instance]] | ExamError] = {}
        for view in VIEWS:
            if self._views[view]:
                try:
                    self._slices[view] = self._group_slices(view)
                except ExamError as e:
                    self._slices[view] = e

    def _assign_by_geometry(self, unknown: list[list[_Instance]]) -> None:
        """Series no description pattern matched: short axis when parallel to the stack."""
        stack = self._views["sa"]
        if stack:
            normal = stack[0][0].normal
        else:  # no described stack: the largest set of parallel series at >= 2 positions
            best: list[list[_Instance]] = []
            for candidate in unknown:
                group = [
                    s for s in unknown if abs(s[0].normal @ candidate[0].normal) > _PARALLEL_COS
                ]
                flat = [i for s in group for i in s]
                positions = len(_slice_positions(flat, candidate[0].normal))
                if positions >= 2 and len(group) > len(best):
                    best = group
            normal = best[0][0].normal if best else None
        for series in unknown:
            first = series[0]
            label = (
                f"{first.file}: series {first.description!r} (SeriesNumber {first.series_number})"
            )
            if normal is not None and abs(first.normal @ normal) > _PARALLEL_COS:
                self._views["sa"].append(series)
                self.warnings.append(
                    f"{label} matches no series description pattern: short axis by geometry "
                    "(parallel to the short-axis stack)"
                )
            else:
                self.warnings.append(
                    f"{label} matches no series description pattern and is not parallel to "
                    "the short-axis stack: ignored (add its description to --dicom-views)"
                )

    def name(self, stem: str) -> str:
        if stem in VIEWS:
            if not self._views[stem]:
                return f"{self.eid}: {stem} DICOM series"
            containers = sorted({_container(i.file) for s in self._views[stem] for i in s})
            return f"{self.eid}/{'+'.join(containers)} {stem}"
        return nifti_name(stem)  # segmentations: NIfTI files beside the DICOMs

    def has(self, stem: str) -> bool:
        if stem in VIEWS:
            return bool(self._views[stem])
        return (self.folder / nifti_name(stem)).is_file()

    def read(self, stem: str) -> tuple[np.ndarray, dict]:
        """A view as NIfTI holds it: (array (X, Y, Z, T), header dict of `read_nifti`'s
        keys plus "series", the SeriesInstanceUIDs used). ExamError names the file."""
        if stem not in VIEWS:
            if stem not in SEGMENTATION_FILE.values():
                raise KeyError(stem)
            return read_nifti(self.folder / nifti_name(stem))
        if not self._views[stem]:
            raise ExamError(f"{self.name(stem)}: missing")
        slices = self._slices[stem]
        if isinstance(slices, ExamError):
            raise slices
        return _assemble(slices, stem)

    def _group_slices(self, stem: str) -> list[list[_Instance]]:
        """The view's instances grouped by slice position (a long-axis view: one slice),
        repeated acquisitions resolved to the last series, base -> apex."""
        groups = self._views[stem]
        if stem != "sa" and len(groups) > 1:
            groups = sorted(groups, key=lambda s: (s[0].series_number, s[0].series))
            dropped = ", ".join(repr(s[0].file) for s in groups[:-1])
            self.warnings.append(
                f"{self.name(stem)}: {len(groups)} series; used the last, "
                f"SeriesNumber {groups[-1][0].series_number} (not {dropped})"
            )
            groups = groups[-1:]
        instances = [i for s in groups for i in s]
        reference = instances[0]
        normal = reference.normal
        for instance in instances:
            same = (
                instance.orientation[:3] @ reference.orientation[:3] > _SAME_DIRECTION_COS
                and instance.orientation[3:] @ reference.orientation[3:] > _SAME_DIRECTION_COS
            )
            if not same:
                raise ExamError(
                    f"{instance.file}: ImageOrientationPatient differs from {reference.file}'s "
                    f"in the {stem} view (one stack must share one orientation)"
                )
        positions = _slice_positions(instances, normal)
        slices: list[list[_Instance]] = [[] for _ in positions]
        for instance in instances:
            d = float(instance.position @ normal)
            slices[int(np.argmin([abs(d - p) for p in positions]))].append(instance)
        if stem != "sa" and len(slices) > 1:
            raise ExamError(
                f"{reference.file}: {len(slices)} slice positions in the {stem} series, "
                "a long-axis view has one"
            )
        for k, group in enumerate(slices):
            series = {i.series for i in group}
            if len(series) > 1:  # a slice acquired again: keep the last series
                last = max(group, key=lambda i: (i.series_number, i.series))
                self.warnings.append(
                    f"{last.file}: {len(series)} series at slice position "
                    f"{positions[k]:.1f} mm; used the last, SeriesNumber {last.series_number}"
                )
                slices[k] = [i for i in group if i.series == last.series]
        if len(slices) > 1 and (slices[-1][0].position - slices[0][0].position) @ _APEX_LPS < 0:
            slices.reverse()  # base -> apex
        return slices


def _container(file: str) -> str:
    """The zip or first folder of a display name <eid>/<container>:<member> or <eid>/<path>."""
    rest = file.split("/", 1)[1]
    return rest.split(":", 1)[0] if ":" in rest else rest.split("/", 1)[0]


def _ordered_frames(group: list[_Instance], stem: str) -> list[_Instance]:
    """A slice's instances by trigger time (InstanceNumber without trigger times); a
    missing or doubled frame is an ExamError naming the file."""
    frames = sorted(group, key=lambda i: (math.isnan(i.trigger), i.trigger, i.number))
    triggers = np.array([i.trigger for i in frames])
    if np.isfinite(triggers).all() and len(frames) > 1:
        steps = np.diff(triggers)
        repeated = np.flatnonzero(steps <= 0)
        if repeated.size:
            k = int(repeated[0])
            raise ExamError(
                f"{frames[k + 1].file}: trigger time {triggers[k + 1]:g} ms also in "
                f"{frames[k].file} ({stem} view: two frames at one time)"
            )
        median = float(np.median(steps))
        gaps = np.flatnonzero(steps > _GAP_FACTOR * median)
        if gaps.size:
            k = int(gaps[0])
            raise ExamError(
                f"{frames[k + 1].file}: a frame missing before it in the {stem} view "
                f"(trigger times {triggers[k]:g} -> {triggers[k + 1]:g} ms, the step is "
                f"{median:g} ms)"
            )
    expected = _float(frames[0].dataset, "CardiacNumberOfImages", 0)
    if expected and len(frames) < expected:
        raise ExamError(
            f"{frames[-1].file}: {len(frames)} frames of CardiacNumberOfImages "
            f"{int(expected)} in the {stem} view (frames missing)"
        )
    return frames


def _pixels(instance: _Instance) -> np.ndarray:
    dataset = instance.dataset
    if int(_float(dataset, "NumberOfFrames", 1)) > 1:
        raise ExamError(
            f"{instance.file}: multi-frame (enhanced) DICOM is not supported; one file per "
            "frame as UK Biobank stores it"
        )
    try:
        pixels = dataset.pixel_array
    except Exception as e:  # compressed without a decoder, truncated, ...
        raise ExamError(
            f"{instance.file}: pixel data unreadable ({type(e).__name__}: {e})"
        ) from None
    if pixels.shape != instance.shape:
        raise ExamError(
            f"{instance.file}: pixel array {pixels.shape}, Rows x Columns {instance.shape}"
        )
    slope, intercept = _float(dataset, "RescaleSlope", 1.0), _float(dataset, "RescaleIntercept", 0)
    if slope != 1.0 or intercept != 0.0:
        pixels = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return pixels


def _assemble(slices: list[list[_Instance]], stem: str) -> tuple[np.ndarray, dict]:
    """Slices (base -> apex) of instances -> ((X, Y, Z, T) array, NIfTI-style header)."""
    ordered = [_ordered_frames(group, stem) for group in slices]
    counts = {len(frames) for frames in ordered}
    if len(counts) > 1:
        most = max(counts, key=[len(f) for f in ordered].count)
        odd = next(frames for frames in ordered if len(frames) != most)
        raise ExamError(
            f"{odd[0].file}: {len(odd)} frames in this slice, {most} in the other slices "
            f"of the {stem} view (a frame missing or extra)"
        )
    first = ordered[0][0]
    for frames in ordered:
        for instance in frames:
            if instance.shape != first.shape or not np.allclose(
                instance.spacing, first.spacing, rtol=1e-4
            ):
                raise ExamError(
                    f"{instance.file}: {instance.shape[0]}x{instance.shape[1]} pixels of "
                    f"{instance.spacing} mm, {first.file} {first.shape[0]}x{first.shape[1]} of "
                    f"{first.spacing} mm (one {stem} view, one matrix)"
                )
    depth, length = len(ordered), len(ordered[0])
    pixels = [[_pixels(i) for i in frames] for frames in ordered]
    dtype = np.result_type(*(p.dtype for row in pixels for p in row))
    volume = np.empty((depth, length, *first.shape), dtype)  # [Z, T, H, W]
    for z, row in enumerate(pixels):
        for t, image in enumerate(row):
            volume[z, t] = image
    row_spacing, col_spacing = first.spacing
    affine = np.eye(4)
    affine[:3, 0] = first.orientation[:3] * col_spacing  # X: along a row (the columns)
    affine[:3, 1] = first.orientation[3:] * row_spacing  # Y: down a column (the rows)
    if depth > 1:
        affine[:3, 2] = (ordered[-1][0].position - first.position) / (depth - 1)
    else:
        thickness = _float(first.dataset, "SpacingBetweenSlices")
        if not thickness > 0:
            thickness = _float(first.dataset, "SliceThickness", 1.0)
        affine[:3, 2] = first.normal * thickness
    affine[:3, 3] = first.position
    affine = _LPS_TO_RAS @ affine
    triggers = np.array([[i.trigger for i in frames] for frames in ordered])
    if length > 1 and np.isfinite(triggers).all():
        frame_ms = float(np.median(np.diff(triggers, axis=1)))
    else:  # no trigger times: the nominal R-R interval over the frame count
        interval = _float(first.dataset, "NominalInterval")
        frame_ms = interval / length if interval > 0 else math.nan
    zooms = [col_spacing, row_spacing, float(np.linalg.norm(affine[:3, 2])), frame_ms]
    info = {
        "shape": [first.shape[1], first.shape[0], depth, length],
        "zooms": zooms,
        "time_unit": "msec",
        "affine": affine,
        "series": sorted({i.series for frames in ordered for i in frames}),
    }
    return volume.transpose(3, 2, 0, 1), info
