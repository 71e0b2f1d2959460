"""whmae-prepare and whmae-qc on a small UK Biobank-layout cohort with every broken case."""

import json
import math

import grain
import numpy as np
import pytest
from ukbb_fixtures import (
    BREAKS,
    break_exam,
    crash_worker_on_eid,
    make_exam_folder,
    write_phenotype_csv,
)

from whmae import layout
from whmae.data.dataset import records, shards
from whmae.data.dataset.splits import split_of
from whmae.data.ingest import prepare, qc
from whmae.data.ingest.nifti_exam import ORIENTATION_VERSION, preprocess_exam, restore_labels
from whmae.phenotypes import phenotypes_from_segmentations

GOOD = {  # eid: (phantom index, matrix, frames, slices, header time unit)
    "3100000": (0, 64, 50, 12, "sec"),
    "3100001": (6, 80, 30, 9, "msec"),  # index 6: a healthy heart that fits the crop
    "3100002": (2, 48, 50, 14, "sec"),
    "3100003": (3, 64, 30, 10, "msec"),
    "3100004": (4, 56, 50, 11, "sec"),
    "3100005": (5, 72, 30, 13, "sec"),  # has a folder but no CSV row
}
BROKEN = BREAKS  # every broken case the fixture builder knows
WRITTEN_BROKEN = {
    "missing_la_4ch",
    "la_4ch_wrong_dims",
    "missing_seg_sa",
    "nan_sa_isolated",
    "partial_sa",
}
PARTIAL = "3200010"  # a 4-slice short-axis stack: written, two planes absent
CSV_ONLY = "3199999"
NO_ROW = "3100005"
OPTIONS = {"frames": 50, "size": 40, "exams_per_shard": 4}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(root, csv path, truths by eid, expected reasons by eid) of 18 subjects."""
    base = tmp_path_factory.mktemp("cohort")
    root, truths, reasons = base / "exams", {}, {}
    for eid, (index, size, frames, slices, unit) in GOOD.items():
        truths[eid] = make_exam_folder(
            root, eid, index, size=size, frames=frames, num_slices=slices, time_unit=unit
        )
    for k, how in enumerate(BROKEN):
        eid = f"32000{k:02d}"
        truths[eid] = make_exam_folder(root, eid, 10 + k, size=48, frames=20, num_slices=10)
        reasons[eid] = (how, break_exam(root / eid, how))
    rows = {eid: t["phenotypes"].copy() for eid, t in truths.items() if eid != NO_ROW}
    rows["3100000"][layout.phenotype_index("LVM (g)")] = np.nan  # an empty cell
    rows[CSV_ONLY] = truths["3100001"]["phenotypes"]
    csv_path = base / "phenotypes.csv"
    write_phenotype_csv(csv_path, rows)
    text = csv_path.read_text().splitlines()
    cells = text[2].split(",")  # 3100001: a cell that is not a number
    cells[1 + layout.phenotype_index("RVEF (%)")] = "abc"
    text[2] = ",".join(cells)
    csv_path.write_text("\n".join(text) + "\n")
    return root, csv_path, truths, reasons


@pytest.fixture(scope="module")
def prepared(cohort, tmp_path_factory):
    root, csv_path, _, _ = cohort
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare.prepare_dataset(root, csv_path, out, workers=2, progress=False, **OPTIONS)
    return out, summary


def manifest(out) -> dict:
    lines = (out / prepare.MANIFEST_FILE).read_text().splitlines()
    return {e["eid"]: e for e in map(json.loads, lines)}


def read_exams(out) -> dict:
    info = records.read_dataset_info(out)
    exams = {}
    for split in info["splits"]:
        if info["splits"][split]["num_examples"]:
            source = grain.sources.ArrayRecordDataSource(records.split_paths(out, split, info))
            for i in range(len(source)):
                exam = records.decode_exam(source[i])
                exams[exam["eid"]] = exam
    return exams


def test_manifest_lists_every_subject_with_reasons(cohort, prepared):
    _, _, truths, reasons = cohort
    out, summary = prepared
    dataset = summary["dataset"]
    assert dataset["line"] == "exams found = 18 = written 11 + rejected 7"
    assert json.loads((out / prepare.SUMMARY_FILE).read_text()) == dataset
    entries = manifest(out)
    assert sorted(entries) == sorted([*truths, CSV_ONLY])
    for eid, (how, reason) in reasons.items():
        entry = entries[eid]
        if how in WRITTEN_BROKEN:
            assert entry["status"] == "written", eid
            assert any(t.startswith(reason) for t in entry["absent"] + entry["warnings"]), entry
        else:
            assert entry["status"] == "rejected" and entry["reason"].startswith(reason), entry
    assert entries[CSV_ONLY]["reason"].startswith(f"no exam folder {cohort[0] / CSV_ONLY}")
    assert "no phenotype CSV row: phenotypes all NaN" in entries[NO_ROW]["warnings"]
    assert "RVEF (%): not a number 'abc' (NaN)" in entries["3100001"]["warnings"]
    assert entries["3200000"]["absent"] == ["la_4ch.nii.gz: missing"]
    assert entries["3200009"]["repaired_voxels"] == {"sa": 4}  # isolated NaNs, repaired
    assert "repaired_voxels" not in entries["3100000"]
    assert dataset["flags_by_kind"]["absent"]["la_4ch.nii.gz: missing"]["eids"] == ["3200000"]
    # The partial stack: its absent planes in the manifest and counted by kind.
    partial = "sa.nii.gz: partial stack of # short-axis slices (fewer than #): planes '…' absent"
    assert dataset["flags_by_kind"]["absent"][partial] == {"count": 1, "eids": [PARTIAL]}
    assert entries[PARTIAL]["absent"][0].endswith(
        "planes '7,8' absent"
    )  # reference rule: from slice 0
    assert len(entries[PARTIAL]["slices"]) == 4


def test_dataset_equals_direct_preprocessing_with_phenotypes_joined(cohort, prepared):
    root, _, truths, _ = cohort
    out, _ = prepared
    entries = manifest(out)
    exams = read_exams(out)
    assert sorted(exams) == sorted(e for e, v in entries.items() if v["status"] == "written")
    info = records.read_dataset_info(out)
    assert info["image_shape"] == [9, 50, 40, 40] and info["num_examples"] == 11
    for eid, exam in exams.items():
        direct, _ = preprocess_exam(root / eid, frames=50, size=40)
        for field in ("images", "labels", "plane_mask", "label_mask", "pixel_spacing"):
            np.testing.assert_array_equal(exam[field], direct[field], err_msg=f"{eid} {field}")
        assert entries[eid]["split"] in ("train", "val", "test")
        expected = np.array([float(f"{v:.6g}") for v in truths[eid]["phenotypes"]], np.float32)
        if eid == "3100000":
            expected[layout.phenotype_index("LVM (g)")] = np.nan  # empty cell stays missing
        if eid == "3100001":
            expected[layout.phenotype_index("RVEF (%)")] = np.nan
        if eid == NO_ROW:
            expected[:] = np.nan
        np.testing.assert_array_equal(exam["phenotypes"], expected, err_msg=eid)
    lvm = layout.phenotype_index("LVM (g)")
    assert np.isnan(exams["3100000"]["phenotypes"][lvm])  # never 0
    assert not exams["3200000"]["plane_mask"][layout.LA_4CH]


def test_geometry_sidecars_restore_labels_into_the_original_grid(cohort, prepared):
    root, _, truths, _ = cohort
    out, _ = prepared
    exams = read_exams(out)
    geometry = {}
    for path in sorted(out.glob("geometry-*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            geometry[entry["eid"]] = entry
    assert sorted(geometry) == sorted(exams)
    for eid in GOOD:
        restored = restore_labels(exams[eid]["labels"], geometry[eid], file_labels=False)
        window = geometry[eid]["views"]["sa"]["slices"]
        # Back in (X, Y, Z, T): the truth labels [Z, T, H, W] of the window, transposed.
        expected = truths[eid]["labels_sa"][window].transpose(3, 2, 0, 1)
        np.testing.assert_array_equal(restored["sa"][:, :, window], expected, err_msg=eid)
    # The 4-slice stack (the original's slices 3..6): its four planes back in its own slices.
    restored = restore_labels(exams[PARTIAL]["labels"], geometry[PARTIAL], file_labels=False)
    slices = geometry[PARTIAL]["views"]["sa"]["slices"]
    assert slices == [0, 1, 2, 3] and restored["sa"].shape[2] == 4
    expected = truths[PARTIAL]["labels_sa"][[3 + z for z in slices]].transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(restored["sa"], expected)
    assert geometry[PARTIAL]["orientation"] == ORIENTATION_VERSION


def test_a_directory_of_an_earlier_orientation_is_refused(cohort, prepared, tmp_path):
    """Records written before canonical orientation keep each file's orientation: a rerun
    into such a directory must not add canonical records to them."""
    root, csv_path, _, _ = cohort
    arguments = json.loads((prepared[0] / prepare.ARGS_FILE).read_text())
    assert arguments["orientation"] == ORIENTATION_VERSION
    del arguments["orientation"]
    (tmp_path / prepare.ARGS_FILE).write_text(json.dumps(arguments))
    with pytest.raises(ValueError, match="'orientation': \\(None, 1\\)"):
        prepare.prepare_dataset(root, csv_path, tmp_path, workers=1, progress=False, **OPTIONS)


def test_resume_after_an_interrupted_run(cohort, prepared, tmp_path, monkeypatch):
    root, csv_path, _, _ = cohort
    real, calls = prepare._prepare_one, []

    def interrupted(job):
        calls.append(job["eid"])
        if len(calls) == 6:  # inside the second shard
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prepare, "_prepare_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(root, csv_path, tmp_path, workers=1, progress=False, **OPTIONS)
    assert sorted(shards.read_shard_markers(tmp_path)) == [0]
    assert prepare.complete_shards(tmp_path, 5) == {0}
    assert not list(tmp_path.glob("*-00001-of-00005.*"))  # nothing of shard 1 looks complete
    assert not (tmp_path / records.INFO_FILE).exists()
    first_shard = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*-00000-of-00005*")}

    calls.clear()
    monkeypatch.setattr(prepare, "_prepare_one", lambda job: calls.append(job) or real(job))
    summary = prepare.prepare_dataset(
        root, csv_path, tmp_path, workers=1, progress=False, **OPTIONS
    )
    assert summary["shards_written"] == 4
    assert {job["shard"] for job in calls} == {1, 2, 3, 4}  # shard 0 was not redone
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*-00000-of-00005*")} == (
        first_shard
    )
    assert summary["dataset"]["line"] == prepared[1]["dataset"]["line"]
    strip = {
        e: {k: v for k, v in m.items() if k != "seconds"} for e, m in manifest(tmp_path).items()
    }
    expected = {
        e: {k: v for k, v in m.items() if k != "seconds"} for e, m in manifest(prepared[0]).items()
    }
    assert strip == expected
    # A complete directory is left alone; other arguments are refused.
    again = prepare.prepare_dataset(root, csv_path, tmp_path, workers=1, progress=False, **OPTIONS)
    assert again["exams_processed"] == 0
    assert (
        again["note"] == f"host 0/1: its 5 shard(s) are already complete in {tmp_path}: "
        "nothing to write"
    )
    with pytest.raises(ValueError, match="other arguments"):
        prepare.prepare_dataset(
            root, csv_path, tmp_path, frames=30, size=40, exams_per_shard=4, progress=False
        )


def test_hosts_split_the_subjects_and_form_one_dataset(cohort, prepared, tmp_path):
    root, csv_path, _, _ = cohort
    first = prepare.prepare_dataset(
        root, csv_path, tmp_path, workers=1, progress=False, host_shard=(0, 2), **OPTIONS
    )
    assert "dataset" not in first and first["shards_written"] == 3  # shards 0, 2, 4
    assert sorted(shards.read_shard_markers(tmp_path)) == [0, 2, 4]
    second = prepare.prepare_dataset(
        root, csv_path, tmp_path, workers=1, progress=False, host_shard=(1, 2), **OPTIONS
    )
    assert second["dataset"]["line"] == "exams found = 18 = written 11 + rejected 7"
    merged = records.read_dataset_info(tmp_path)
    single = records.read_dataset_info(prepared[0])
    assert merged["splits"] == single["splits"]


def test_cli_require_phenotypes_and_bad_arguments(cohort, tmp_path, capsys):
    root, csv_path, _, _ = cohort
    args = [
        "--root",
        str(root),
        "--phenotypes",
        str(csv_path),
        "--out",
        str(tmp_path / "d"),
        "--size",
        "32",
        "--frames",
        "20",
        "--workers",
        "1",
        "--require-phenotypes",
    ]
    assert prepare.main(args) == 0
    printed = capsys.readouterr().out
    assert "exams found = 18 = written 10 + rejected 8" in printed
    assert f"rejected {NO_ROW}: no phenotype CSV row (--require-phenotypes)" in printed
    # Every warning kind on the console: count and first exams (not only in the manifest).
    warnings, absent = printed.split("warnings by kind")[1].split("absent planes by kind")
    good = [e for e in GOOD if e != NO_ROW]  # 50 or 30 frames, resampled to 20
    expected = [
        f"  5 x sa.nii.gz: # frames resampled to #  [{', '.join(good)}]",
        "  1 x RVEF (%): not a number '…' (NaN)  [3100001]",
        "  1 x sa.nii.gz: # non-finite voxels (#%) repaired from their in-plane neighbours  "
        "[3200009]",
        "  1 x seg_sa.nii.gz: missing (plane unlabelled)  [3200008]",
        "  1 x slice rule reference fell back to centre  [3200008]",
    ]
    assert warnings.splitlines()[1:] == expected
    assert absent.splitlines()[1:3] == [
        "  1 x la_4ch.nii.gz: expected #-D (X, Y, #, T), got shape (#, #, #, #)  [3200006]",
        "  1 x la_4ch.nii.gz: missing  [3200000]",
    ]
    # A host whose share of the shards is empty says why (exit 0: nothing failed).
    empty = [*args[:5], str(tmp_path / "f"), "--shard", "5/6", "--exams-per-shard", "4"]
    assert prepare.main(empty) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        "host 5/6 has no shards to write: 18 subjects make 5 shard(s) of --exams-per-shard 4, "
        "and host i writes shards i, i + 6, ...; use at most 5 host(s) or a smaller "
        "--exams-per-shard\nhost 5/6: 0 exams"
    )
    assert records.read_dataset_info(tmp_path / "d")["image_shape"] == [9, 20, 32, 32]
    assert prepare.main([*args[:5], str(tmp_path / "e"), "--shard", "2/2"]) == 2
    assert "--shard 2/2: need 0 <= i < n" in capsys.readouterr().err


def test_flags_by_kind_counts_exams_and_lists_the_first_few():
    entries = [
        {
            "eid": f"e{k}",
            "status": "written",
            "absent": [],
            "warnings": [
                f"sa.nii.gz: {30 + k} frames resampled to 50",
                f"sa.nii.gz: {k} frames resampled to 50",  # the same kind twice: one exam
                f"la_{2 + k % 2}ch.nii.gz: missing",
            ],
        }
        for k in range(7)
    ]
    entries.append({"eid": "r", "status": "rejected", "reason": "sa.nii.gz: missing"})
    flags = prepare.flags_by_kind(entries)
    assert flags["warnings"]["sa.nii.gz: # frames resampled to #"] == {
        "count": 7,
        "eids": ["e0", "e1", "e2", "e3", "e4"],
    }
    assert flags["warnings"]["la_2ch.nii.gz: missing"]["count"] == 4  # la_2ch != la_3ch
    assert flags["warnings"]["la_3ch.nii.gz: missing"]["eids"] == ["e1", "e3", "e5"]
    lines = prepare.format_flags(flags)
    assert lines[1] == "  7 x sa.nii.gz: # frames resampled to #  [e0, e1, e2, e3, e4 ...]"
    assert len(lines) == 4 and flags["absent"] == {}


def _other_split(eid: str) -> str:
    """A split that the hash does not give `eid`: proves the file, not the hash, decided."""
    return next(s for s in ("val", "test", "train") if s != split_of(eid))


def test_split_file_decides_splits_and_unlisted_subjects_are_flagged(cohort, tmp_path, capsys):
    root = cohort[0]
    small = tmp_path / "exams"  # three subjects keep this quick
    small.mkdir()
    for eid in ("3100000", "3100002", "3100004"):
        (small / eid).symlink_to(root / eid, target_is_directory=True)
    pheno_csv = tmp_path / "pheno.csv"  # eids only: phenotypes all NaN
    pheno_csv.write_text("eid\n3100000\n3100002\n3100004\n")
    listed = {"3100000": _other_split("3100000"), "3100002": _other_split("3100002")}
    split_csv = tmp_path / "splits.csv"
    split_csv.write_text("eid,split\n" + "".join(f"{e},{s}\n" for e, s in listed.items()))
    options = {"frames": 10, "size": 24, "progress": False}
    summary = prepare.prepare_dataset(
        small, pheno_csv, tmp_path / "d", split_file=split_csv, workers=1, **options
    )
    entries = manifest(tmp_path / "d")
    for eid, split in listed.items():
        assert (entries[eid]["split"], entries[eid]["split_source"]) == (split, "file")
    unlisted = entries["3100004"]
    assert (unlisted["split"], unlisted["split_source"]) == (split_of("3100004"), "hash")
    assert "not in split file splits.csv: hash split" in unlisted["warnings"]
    assert summary["dataset"]["split_sources"] == {"file": 2, "hash": 1}
    info = records.read_dataset_info(tmp_path / "d")
    markers = shards.read_shard_markers(tmp_path / "d")
    stored = {e: s for m in markers.values() for s, v in m["splits"].items() for e in v["eids"]}
    assert stored == {**listed, "3100004": split_of("3100004")}
    assert sum(v["num_examples"] for v in info["splits"].values()) == 3

    strict = prepare.prepare_dataset(
        small, pheno_csv, tmp_path / "s", split_file=split_csv, strict_split=True, **options
    )
    reason = strict["dataset"]["rejections"]["3100004"]
    assert reason == f"not listed in split file {split_csv} (--strict-split)"
    assert strict["dataset"]["line"] == "exams found = 3 = written 2 + rejected 1"

    split_csv.write_text("eid,split\n3100000,train\n3100002,validation\n")
    args = ["--root", str(small), "--phenotypes", str(pheno_csv), "--out", str(tmp_path / "x")]
    assert prepare.main([*args, "--split-file", str(split_csv)]) == 2
    err = capsys.readouterr().err
    assert f"{split_csv} line 3: eid 3100002: unknown split 'validation'" in err
    split_csv.write_text("eid,split\n3100000,train\n3100000,test\n")
    with pytest.raises(
        ValueError, match="line 3: eid 3100000 is 'test' here but 'train' on line 2"
    ):
        prepare.read_split_file(split_csv)
    split_csv.write_text("eid,fold\n3100000,train\n")
    with pytest.raises(ValueError, match="split file needs columns eid,split"):
        prepare.read_split_file(split_csv)


def test_qc_recomputes_phenotypes_from_the_full_stack(cohort, tmp_path, capsys):
    root, _, truths, reasons = cohort
    rows = {eid: truths[eid]["phenotypes"].copy() for eid in GOOD}
    lvm = layout.phenotype_index("LVM (g)")
    rows["3100002"][lvm] *= 1.5  # a wrong CSV value
    rows[CSV_ONLY] = truths["3100001"]["phenotypes"]  # a CSV row without a folder
    csv_path = tmp_path / "pheno.csv"
    write_phenotype_csv(csv_path, rows)
    args = ["--root", str(root), "--phenotypes", str(csv_path), "--out", str(tmp_path / "qc")]
    assert qc.main([*args, "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "qc" / qc.SUMMARY_FILE).read_text())
    assert summary["exams"] == 17 and summary["computed"] == 16
    # Subjects on one side only are reported, not skipped: the 11 broken folders have no
    # CSV row here (computed, nothing to compare), the CSV-only eid nothing to compute.
    no_row = sorted(reasons)
    assert summary["folders_without_csv_row"] == no_row and len(no_row) == 11
    assert summary["csv_rows_without_folder"] == [CSV_ONLY]
    assert (
        f"  11 exam folders without a CSV row (not compared): {', '.join(no_row[:5])} ...\n"
        in printed
    )
    assert f"  1 CSV eids without an exam folder (not computed): {CSV_ONLY}\n" in printed
    assert summary["failed"] == {
        "3200008": "seg_sa.nii.gz: missing (ventricular phenotypes need it)"
    }
    pairs = [line.split(",") for line in (tmp_path / "qc/qc_pairs.csv").read_text().splitlines()]
    by_key = {(p[0], p[1]): p for p in pairs[1:]}
    truth = truths["3100002"]
    spacing = (truth["pixel_spacing"],) * 2
    mine = phenotypes_from_segmentations(
        truth["labels_sa"],
        truth["long_axis"]["la_2ch"],
        truth["long_axis"]["la_4ch"],
        sa_pixel_spacing=spacing,
        slice_spacing=truth["slice_spacing"],
        la_2ch_pixel_spacing=spacing,
        la_4ch_pixel_spacing=spacing,
        frame_duration=truth["frame_duration"],
    )
    for column in ("LVM (g)", "RVEDV (mL)", "LAV max (mL)", "RAEF (%)", "LVCO (L/min)"):
        assert float(by_key[("3100002", column)][3]) == pytest.approx(mine[column], rel=1e-4)
    flagged = by_key[("3100002", "LVM (g)")]
    assert flagged[5] == "True"
    assert float(flagged[4]) == pytest.approx(mine["LVM (g)"] - float(flagged[2]), rel=1e-4)
    assert "3100002" in summary["subjects_flagged"]
    # The full 14-slice stack covers the ventricles: LVEDV agrees with the phantom's truth.
    lvedv = layout.phenotype_index("LVEDV (mL)")
    assert mine["LVEDV (mL)"] == pytest.approx(truth["phenotypes"][lvedv], rel=0.1)
    assert summary["columns"]["LAV max (mL)"]["pairs"] == 6
    assert math.isfinite(summary["columns"]["LVEDV (mL)"]["mae"])


def test_a_dying_worker_rejects_only_its_exam():
    pool = prepare.WorkerPool(2)
    jobs = [(k // 3, {"eid": eid}) for k, eid in enumerate(("a", "b", "crash", "c", "d", "e"))]
    try:
        results = list(prepare.ordered_results(iter(jobs), pool, 4, crash_worker_on_eid))
    finally:
        pool.shutdown()
    assert [(shard, r["eid"], r["status"]) for shard, r in results] == [
        (0, "a", "written"),
        (0, "b", "written"),
        (0, "crash", "rejected"),
        (1, "c", "written"),
        (1, "d", "written"),
        (1, "e", "written"),
    ]
    assert results[2][1]["reason"].startswith("the worker process died")


def test_the_training_pipeline_reads_the_prepared_dataset(prepared):
    from whmae.data.dataset.pipeline import make_pipeline

    out, _ = prepared
    exams = read_exams(out)
    batches = make_pipeline(
        out,
        "train",
        batch_size=2,
        fields=records.ALL_FIELDS,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
        read_threads=0,
    )
    seen = 0
    for batch in batches:
        assert batch["images"].shape == (2, 9, 50, 40, 40)
        for i, eid in enumerate(batch["eid"]):
            np.testing.assert_array_equal(batch["labels"][i], exams[str(eid)]["labels"])
            np.testing.assert_array_equal(batch["phenotypes"][i], exams[str(eid)]["phenotypes"])
        seen += 2
    assert seen == records.read_dataset_info(out)["splits"]["train"]["num_examples"] // 2 * 2 > 0
