"""whmae-generate: phantom datasets, refusal, resume, workers, summary."""

import json
import shutil

import grain
import numpy as np
import pytest
from conftest import TINY_DATASET

from whmae import layout
from whmae.data.dataset import records
from whmae.data.dataset.pipeline import make_pipeline
from whmae.data.dataset.splits import SPLITS
from whmae.data.synthetic.generate import RefusedError, generate_dataset, main, shard_indices
from whmae.data.synthetic.phantom import PhantomConfig, default_fov_mm, make_exam, sample_population

SMALL = {"num_exams": 6, "size": 16, "frames": 4, "seed": 1, "num_shards": 3}


def read_all(data_dir) -> dict[str, dict]:
    exams = {}
    for split in SPLITS:
        paths = records.split_paths(data_dir, split)
        if paths:
            source = grain.sources.ArrayRecordDataSource(paths)
            for i in range(len(source)):
                exam = records.decode_exam(source[i])
                exams[exam["eid"]] = exam
    return exams


def shard_bytes(data_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.glob("*.array_record"))}


def test_tiny_dataset_holds_the_phantom_exams_bit_identically(tiny_dataset):
    exams = read_all(tiny_dataset)
    assert len(exams) == TINY_DATASET["num_exams"]
    config = PhantomConfig(size=32, frames=10, seed=0)
    for index in range(TINY_DATASET["num_exams"]):
        want = make_exam(config, index)
        got = exams[want["eid"]]
        for name in records.EXAM_FIELDS:
            assert got[name].tobytes() == np.asarray(want[name]).tobytes(), name
    info = records.read_dataset_info(tiny_dataset)
    assert info["image_shape"] == [9, 10, 32, 32]
    assert info["provenance"]["seed"] == 0 and info["provenance"]["num_exams"] == 24
    batch = next(make_pipeline(tiny_dataset, batch_size=2, process_index=0, process_count=1))
    assert batch["images"].shape == (2, 9, 10, 32, 32) and batch["images"].dtype == np.uint8


def test_shards_cover_every_index_once():
    indices = [i for s in range(7) for i in shard_indices(45, s, 7)]
    assert indices == list(range(45))


def test_rerun_complete_is_a_no_op_and_other_arguments_are_refused(tiny_dataset, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    assert generate_dataset(copy, **TINY_DATASET, progress=False)["status"] == "complete"
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before

    argv = ["--out", str(copy), "--num-exams", "24", "--size", "32", "--frames", "10"]
    assert main([*argv, "--num-shards", "2"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main([*argv, "--num-shards", "2", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert str(copy) in err and "'seed': (0, 5)" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RefusedError, match="not written by whmae-generate"):
        generate_dataset(foreign, **SMALL, progress=False)


def test_interrupted_run_resumes_only_missing_shards(tmp_path):
    out = tmp_path / "data"
    generate_dataset(out, **SMALL, progress=False, figure=False)
    complete = shard_bytes(out)
    # Simulate a crash during shard 1: its files gone, a temporary left, no dataset_info.
    for path in out.glob("*-00001-of-00003.*"):
        path.unlink()
    (out / ".train-00001-of-00003.array_record.tmp").write_bytes(b"half an exam")
    (out / records.INFO_FILE).unlink()
    (out / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset_info.json is missing"):
        make_pipeline(out, batch_size=1, process_index=0, process_count=1)

    summary = generate_dataset(out, **SMALL, progress=False, figure=False)
    assert summary["status"] == "resume"
    assert summary["shards_written"] == 1
    assert summary["exams_written"] == len(shard_indices(6, 1, 3))
    assert shard_bytes(out) == complete
    assert not list(out.glob(".*.tmp"))
    assert records.read_dataset_info(out)["num_examples"] == 6


def test_overwrite_replaces_a_dataset(tmp_path):
    out = tmp_path / "data"
    generate_dataset(out, **SMALL, progress=False, figure=False)
    first = set(read_all(out))
    summary = generate_dataset(
        out, **{**SMALL, "seed": 2}, overwrite=True, progress=False, figure=False
    )
    assert summary["status"] == "new"
    assert set(read_all(out)).isdisjoint(first)  # eids carry the seed
    assert len(read_all(out)) == 6


def test_cli_with_worker_processes_matches_one_process(tmp_path, capsys):
    one = tmp_path / "one"
    generate_dataset(one, **SMALL, workers=1, progress=False, figure=False)
    many = tmp_path / "many"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert main(["--out", str(many), *argv, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "exams 6:" in out and "LVM (g)" in out
    assert shard_bytes(many) == shard_bytes(one)
    summary = json.loads((many / "summary.json").read_text())
    assert summary["num_examples"] == 6 and summary["image_shape"] == [9, 4, 16, 16]
    lvm = [e["phenotypes"][5] for e in read_all(many).values()]
    assert summary["phenotypes"]["LVM (g)"]["max"] == pytest.approx(max(lvm))
    assert summary["bytes_on_disk"] == sum(len(b) for b in shard_bytes(many).values())
    png = (many / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_overwrite_forces_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    summary = generate_dataset(tmp_path, **SMALL, overwrite=True, progress=False, figure=False)
    assert summary["status"] == "new" and summary["num_examples"] == 6


def test_fields_of_view_and_groups_are_recorded(tmp_path, capsys):
    out = tmp_path / "data"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    fovs = ["--short-axis-fov-mm", "120", "--long-axis-fov-mm", "180"]
    assert main(["--out", str(out), *argv, *fovs]) == 0
    printed = capsys.readouterr().out
    assert "short-axis 120 mm (7.50 mm/pixel), long-axis 180 mm" in printed
    arguments = json.loads((out / "generate_args.json").read_text())
    assert arguments["short_axis_fov_mm"] == 120.0 and arguments["long_axis_fov_mm"] == 180.0
    config = PhantomConfig(
        size=16, frames=4, seed=1, short_axis_fov_mm=120.0, long_axis_fov_mm=180.0
    )
    exams = read_all(out)
    for eid, exam in exams.items():
        spacing = exam["pixel_spacing"]
        np.testing.assert_allclose(spacing[list(layout.SHORT_AXIS_PLANES)], 120 / 16)
        np.testing.assert_allclose(spacing[list(layout.LONG_AXIS_PLANES)], 180 / 16)
        index = int(eid.rsplit("-", 1)[1])
        assert exam["images"].tobytes() == make_exam(config, index)["images"].tobytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fov_mm"] == {"short_axis": 120.0, "long_axis": 180.0}
    want = {}
    for eid in exams:
        group = sample_population(config, int(eid.rsplit("-", 1)[1]))[0]
        want[group] = want.get(group, 0) + 1
    assert summary["groups"] == want and sum(want.values()) == 6
    by_split = summary["groups_by_split"]
    assert {s: sum(c.values()) for s, c in by_split.items()} == summary["splits"]
    assert "groups: " in printed

    # Defaults: resolved per view for the size, recorded as numbers.
    default = tmp_path / "default"
    generate_dataset(default, **SMALL, progress=False, figure=False)
    arguments = json.loads((default / "generate_args.json").read_text())
    assert arguments["short_axis_fov_mm"] == default_fov_mm("short_axis", 16)
    assert arguments["long_axis_fov_mm"] == default_fov_mm("long_axis", 16)
    with pytest.raises(ValueError, match="short_axis_fov_mm must be > 0"):
        generate_dataset(tmp_path / "bad", **SMALL, short_axis_fov_mm=0.0, progress=False)


def test_a_dataset_of_an_older_phantom_is_refused(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    old = {"generator": "whmae.data.synthetic.phantom", "schema_version": records.SCHEMA_VERSION,
           **SMALL}  # fmt: skip
    (out / "generate_args.json").write_text(json.dumps(old))
    with pytest.raises(RefusedError, match="'phantom_version': \\(None, 2\\)"):
        generate_dataset(out, **SMALL, progress=False, figure=False)
