"""DICOM input (whmae.data.ingest.dicom_exam): UK Biobank zips and DICOM folders give the record the
NIfTI route gives for the same phantom heart; broken series are named."""

import json
import shutil

import grain
import numpy as np
import pytest
from dicom_fixtures import make_dicom_exam, without_segmentations

from whmae import layout
from whmae.data.dataset import records
from whmae.data.ingest import prepare
from whmae.data.ingest.dicom_exam import DicomExam, is_dicom_folder, open_exam
from whmae.data.ingest.nifti_exam import ExamError, NiftiFolder, preprocess_exam

OPTIONS = {"frames": 20, "size": 40}
FIELDS = ("images", "labels", "plane_mask", "label_mask", "pixel_spacing", "phenotypes")


def read_exams(out) -> dict:
    info = records.read_dataset_info(out)
    exams = {}
    for split, item in info["splits"].items():
        if item["num_examples"]:
            source = grain.sources.ArrayRecordDataSource(records.split_paths(out, split, info))
            exams.update((e["eid"], e) for e in map(records.decode_exam, source))
    return exams


def assert_same_record(dicom: dict, nifti: dict, what: str) -> None:
    for field in FIELDS:
        np.testing.assert_array_equal(dicom[field], nifti[field], err_msg=f"{what}: {field}")
    for field in ("slice_spacing", "frame_duration"):
        np.testing.assert_allclose(dicom[field], nifti[field], rtol=1e-5, err_msg=field)


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """A UK Biobank zip exam, members shuffled under random names, with the derived
    InlineVF series and the twin's segmentations beside the zips."""
    root = tmp_path_factory.mktemp("dicom")
    return make_dicom_exam(
        root, "1000001", 3, shuffle=True, inline_vf=True, segmentations=True, num_slices=11
    )


def test_shuffled_zips_give_the_nifti_record_and_geometry(shuffled, tmp_path):
    source = open_exam(shuffled["dicom"])
    assert isinstance(source, DicomExam) and source.warnings == []  # InlineVF: ignored
    assert [len(source.series[v]) for v in ("sa", "la_2ch", "la_3ch", "la_4ch")] == [11, 1, 1, 1]
    exam, geometry = preprocess_exam(source, **OPTIONS)
    twin, twin_geometry = preprocess_exam(shuffled["nifti"], **OPTIONS)
    assert_same_record(exam, twin, "with segmentations")
    assert exam["label_mask"].all(1).sum() == 8  # all but the 3ch, which UK Biobank does not label
    assert geometry["views"]["sa"]["slice_rule"] == "reference"
    assert geometry["input"] == "dicom" and twin_geometry["input"] == "nifti"
    for stem, view in geometry["views"].items():
        other = twin_geometry["views"][stem]
        assert view["shape"] == other["shape"] and view["slices"] == other["slices"], stem
        assert view["crop"] == other["crop"], stem
        assert view["frame_duration"] == pytest.approx(other["frame_duration"], rel=1e-6)
        affine, expected = np.array(view["affine"]), np.array(other["affine"])
        # In-plane axes and origin: the NIfTI's. The slice axis: the stack's step for the
        # short axis; a single plane's normal follows DICOM (row x column) as UK Biobank's
        # converter writes it, which the phantom's NIfTI writer does not.
        columns = [0, 1, 2, 3] if stem == "sa" else [0, 1, 3]
        np.testing.assert_allclose(affine[:, columns], expected[:, columns], atol=1e-3)
        assert len(view["series"]) == (11 if stem == "sa" else 1)
    assert geometry["views"]["sa"]["file"] == "1000001/1000001_20209_2_0.zip sa"

    # Images only (the zips without segmentations): the NIfTI route without its seg files.
    plain = tmp_path / "plain" / "1000001"
    plain.mkdir(parents=True)
    for path in shuffled["dicom"].glob("*.zip"):
        shutil.copy(path, plain / path.name)
    exam, geometry = preprocess_exam(open_exam(plain), **OPTIONS)
    bare = without_segmentations(shuffled["nifti"], tmp_path / "bare" / "1000001")
    twin, twin_geometry = preprocess_exam(bare, **OPTIONS)
    assert_same_record(exam, twin, "images only")
    assert not exam["label_mask"].any()
    assert (
        geometry["warnings"]
        == twin_geometry["warnings"]
        == [
            "seg_sa.nii.gz: missing (plane unlabelled)",
            "slice rule reference fell back to centre",
            "seg_la_2ch.nii.gz: missing (plane unlabelled)",
            "seg_la_4ch.nii.gz: missing (plane unlabelled)",
        ]
    )


def test_a_folder_of_dicom_series(tmp_path):
    made = make_dicom_exam(tmp_path / "dicom", "1000002", 4, form="folder", frames=30)
    assert is_dicom_folder(made["dicom"]) and not list(made["dicom"].glob("*.zip"))
    exam, geometry = preprocess_exam(open_exam(made["dicom"]), **OPTIONS)
    bare = without_segmentations(made["nifti"], tmp_path / "bare" / "1000002")
    twin, _ = preprocess_exam(bare, **OPTIONS)
    assert_same_record(exam, twin, "folder")
    assert "1000002/dicom sa: 30 frames resampled to 20" in geometry["warnings"]
    assert isinstance(open_exam(made["nifti"]), NiftiFolder)  # auto: sa.nii.gz wins
    with pytest.raises(ValueError, match="unknown input 'png'"):
        open_exam(made["dicom"], "png")
    with pytest.raises(ExamError, match="^1000002: no DICOM images in"):
        open_exam(made["nifti"], "dicom")


def test_a_missing_frame_is_named_rejecting_the_short_axis_or_dropping_the_view(tmp_path):
    # A frame missing inside a short-axis slice: the gap in trigger times.
    made = make_dicom_exam(tmp_path / "a", "1000003", 5, drop=[("sa", 4, 7)])
    with pytest.raises(ExamError) as error:
        preprocess_exam(open_exam(made["dicom"]), **OPTIONS)
    message = str(error.value)
    assert message.startswith("1000003/1000003_20209_2_0.zip:CINE_segmented_SAX_b5_009.dcm: ")
    assert "a frame missing before it in the sa view" in message

    # The last frame of one slice, no CardiacNumberOfImages: the slices disagree.
    made = make_dicom_exam(tmp_path / "b", "1000004", 5, drop=[("sa", 2, 19)], cardiac_number=False)
    with pytest.raises(ExamError) as error:
        preprocess_exam(open_exam(made["dicom"]), **OPTIONS)
    assert str(error.value).startswith(
        "1000004/1000004_20209_2_0.zip:CINE_segmented_SAX_b3_001.dcm: 19 frames in this "
        "slice, 20 in the other slices of the sa view"
    )

    # The last 4ch frame: fewer than CardiacNumberOfImages; the long-axis view is absent.
    made = make_dicom_exam(tmp_path / "c", "1000005", 5, drop=[("la_4ch", 0, 19)])
    exam, geometry = preprocess_exam(open_exam(made["dicom"]), **OPTIONS)
    assert exam["plane_mask"].tolist() == [True, True, False] + [True] * 6
    assert geometry["absent"] == [
        "1000005/1000005_20208_2_0.zip:CINE_segmented_LAX_4Ch_019.dcm: 19 frames of "
        "CardiacNumberOfImages 20 in the la_4ch view (frames missing)"
    ]
    bare = without_segmentations(made["nifti"], tmp_path / "bare" / "1000005")
    (bare / "la_4ch.nii.gz").unlink()  # min-max runs over the acquired planes
    twin, _ = preprocess_exam(bare, **OPTIONS)
    assert_same_record(exam, twin, "without 4ch")


def test_unknown_descriptions_fall_back_to_geometry_or_are_named(tmp_path):
    made = make_dicom_exam(
        tmp_path / "dicom",
        "1000006",
        6,
        descriptions={("sa", 4): "localiser_oblique", ("la_4ch", 0): "mystery_view"},
    )
    bare = without_segmentations(made["nifti"], tmp_path / "bare" / "1000006")
    twin, _ = preprocess_exam(bare, **OPTIONS)
    source = open_exam(made["dicom"])
    exam, geometry = preprocess_exam(source, **OPTIONS)
    la_warning, sa_warning = sorted(source.warnings, key=lambda w: "localiser" in w)
    assert sa_warning.startswith(
        "1000006/1000006_20209_2_0.zip:localiser_oblique_001.dcm: series 'localiser_oblique' "
        "(SeriesNumber 24) matches no series description pattern: short axis by geometry"
    )
    assert la_warning.startswith(
        "1000006/1000006_20208_2_0.zip:mystery_view_001.dcm: series 'mystery_view' "
        "(SeriesNumber 12) matches no series description pattern and is not parallel to the "
        "short-axis stack: ignored"
    )
    assert geometry["warnings"][:2] == source.warnings
    assert geometry["absent"] == ["1000006: la_4ch DICOM series: missing"]
    assert not exam["plane_mask"][layout.LA_4CH] and exam["plane_mask"].sum() == 8

    # The mapping names the 4ch: the twin's record exactly.
    mapped = open_exam(made["dicom"], series_views=[["^mystery", "la_4ch"]])
    exam, geometry = preprocess_exam(mapped, **OPTIONS)
    assert_same_record(exam, twin, "mapped")
    with pytest.raises(ValueError, match="view 'la_5ch' not one of"):
        open_exam(made["dicom"], series_views=[["x", "la_5ch"]])

    # No short-axis description at all: the parallel series are the stack.
    made = make_dicom_exam(
        tmp_path / "d2", "1000007", 7, descriptions={("sa", z): f"series {z}" for z in range(10)}
    )
    source = open_exam(made["dicom"])
    assert len(source.series["sa"]) == 10 and len(source.warnings) == 10
    exam, _ = preprocess_exam(source, **OPTIONS)
    bare = without_segmentations(made["nifti"], tmp_path / "bare" / "1000007")
    assert_same_record(exam, preprocess_exam(bare, **OPTIONS)[0], "stack by geometry")


def test_prepare_reads_dicom_and_nifti_subjects_side_by_side(shuffled, tmp_path, capsys):
    root = tmp_path / "exams"
    made = {
        "2000001": make_dicom_exam(root, "2000001", 8, segmentations=True),
        "2000002": make_dicom_exam(root, "2000002", 9, drop=[("sa", 3, 5)]),
    }
    nifti = made["2000001"]["nifti"]
    (root / "2000003").symlink_to(nifti, target_is_directory=True)  # a NIfTI subject
    (root / "2000004").mkdir()  # an empty folder: neither; rejected as NIfTI without sa
    csv_path = tmp_path / "pheno.csv"
    csv_path.write_text("eid\n2000001\n2000002\n2000003\n2000004\n")
    views = tmp_path / "views.json"
    views.write_text(json.dumps([["^nothing$", None]]))
    args = ["--root", str(root), "--phenotypes", str(csv_path), "--out", str(tmp_path / "d")]
    options = ["--frames", "20", "--size", "40", "--workers", "1", "--dicom-views", str(views)]
    assert prepare.main([*args, *options]) == 0
    printed = capsys.readouterr().out
    assert "exams found = 4 = written 2 + rejected 2" in printed
    lines = (tmp_path / "d" / prepare.MANIFEST_FILE).read_text().splitlines()
    entries = {e["eid"]: e for e in map(json.loads, lines)}
    assert entries["2000001"]["input"] == "dicom" and "input" not in entries["2000003"]
    assert entries["2000002"]["reason"].startswith(
        "2000002/2000002_20209_2_0.zip:CINE_segmented_SAX_b4_007.dcm: a frame missing"
    )
    assert entries["2000004"]["reason"].startswith("sa.nii.gz: missing")
    arguments = json.loads((tmp_path / "d" / prepare.ARGS_FILE).read_text())
    assert arguments["input"]["series_views"] == [["^nothing$", None]]
    assert prepare.main([*args, *options]) == 0  # a rerun with the same mapping resumes
    assert "host 0/1: its 1 shard(s) are already complete in" in capsys.readouterr().out
    exams = read_exams(tmp_path / "d")
    assert sorted(exams) == ["2000001", "2000003"]
    assert_same_record(exams["2000001"], exams["2000003"], "prepared")
    assert exams["2000001"]["label_mask"].all(1).sum() == 8  # segmentations beside the zips

    views.write_text("[[1, 2")
    assert prepare.main([*args[:5], str(tmp_path / "e"), *options]) == 2
    assert "--dicom-views" in capsys.readouterr().err
