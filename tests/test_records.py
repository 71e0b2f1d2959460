"""The exam record codec, the sharded writer and dataset_info.json."""

import json
import shutil
import struct

import grain
import numpy as np
import pytest
from conftest import random_exam

from whmae.data import lookup, quantize
from whmae.data.dataset import pipeline, records, shards
from whmae.data.dataset.records import RecordError
from whmae.data.dataset.splits import SPLITS, split_of
from whmae.layout import PHENOTYPE_COLUMNS


def assert_same_exam(got: dict, want: dict):
    assert set(got) == set(want)
    assert got["eid"] == want["eid"]
    for name in records.EXAM_FIELDS:
        assert got[name].dtype == records.EXAM_FIELDS[name], name
        assert got[name].shape == np.shape(want[name]), name
        # Bitwise: NaN phenotypes must survive as NaN, so compare the raw bytes.
        assert got[name].tobytes() == np.asarray(want[name]).tobytes(), name


def test_encode_decode_is_bit_identical():
    exam = random_exam(3)
    assert_same_exam(records.decode_exam(records.encode_exam(exam)), exam)


def encode_schema_1(exam: dict) -> bytes:
    """An exam record as the schema-1 encoder wrote it (label_mask per plane, [9]): prefix,
    JSON header, 64-byte aligned raw buffers."""
    fields, buffers, offset = {}, [], 0
    for name in records.EXAM_FIELDS:
        value = np.asarray(exam[name])
        fields[name] = {"dtype": value.dtype.str, "shape": list(value.shape),
                        "offset": offset, "nbytes": value.nbytes}  # fmt: skip
        buffers += [value.tobytes(), bytes(-value.nbytes % 64)]
        offset += -(-value.nbytes // 64) * 64
    header = json.dumps({"schema": 1, "eid": exam["eid"], "fields": fields}).encode()
    header += b" " * (-(8 + len(header)) % 64)
    return b"".join([struct.pack("<4sI", b"WHEX", len(header)), header, *buffers])


def test_label_mask_is_per_plane_and_frame_and_a_per_plane_one_means_every_frame():
    exam = random_exam(6)
    assert records.SCHEMA_VERSION == 2 and exam["label_mask"].shape == (9, 4)
    assert 0 < exam["label_mask"].sum() < exam["label_mask"].any(1).sum() * 4  # some frames
    got = records.decode_exam(records.encode_exam(exam))
    np.testing.assert_array_equal(got["label_mask"], exam["label_mask"])
    per_plane = {**exam, "label_mask": exam["label_mask"].any(1)}  # [9]: every frame
    got = records.decode_exam(records.encode_exam(per_plane))["label_mask"]
    np.testing.assert_array_equal(got, np.repeat(exam["label_mask"].any(1)[:, None], 4, 1))
    with pytest.raises(RecordError, match=r"label_mask must have shape \(9, 4\)"):
        records.encode_exam({**exam, "label_mask": np.ones((9, 3), bool)})


def test_schema_1_records_and_datasets_read_with_label_mask_on_every_frame(tmp_path):
    exams = [random_exam(i) for i in range(4)]
    for exam in exams:
        exam["label_mask"] = exam["label_mask"].any(1)  # per plane, as schema 1 held it
    old = [encode_schema_1(exam) for exam in exams]
    for record, exam in zip(old, exams, strict=True):
        every_frame = np.repeat(exam["label_mask"][:, None], 4, axis=1)
        got = records.decode_exam(record)
        assert_same_exam(got, {**exam, "label_mask": every_frame})
        mask = records.decode_exam(record, ("label_mask",))["label_mask"]  # without images
        np.testing.assert_array_equal(mask, every_frame)
        # Re-encoded, it is a schema-2 record with the same masks.
        again = records.encode_exam(got)
        assert records.decode_header(again)[0]["schema"] == 2
        np.testing.assert_array_equal(records.decode_exam(again)["label_mask"], every_frame)
    # A dataset written before schema 2 (its records and dataset_info.json say 1).
    shards.write_shard(old, tmp_path, 0, 1, split_of=lambda eid: "train")
    shards.finalize_dataset(tmp_path, {})
    info = json.loads((tmp_path / records.INFO_FILE).read_text())
    (tmp_path / records.INFO_FILE).write_text(json.dumps({**info, "schema_version": 1}))
    batch = next(iter(pipeline.make_pipeline(
        tmp_path, "train", batch_size=4, fields=("eid", "labels", "label_mask"), shuffle=False,
        num_epochs=1, process_index=0, process_count=1)))  # fmt: skip
    assert batch["label_mask"].shape == (4, 9, 4)
    by_eid = {e["eid"]: e["label_mask"] for e in exams}
    for eid, mask in zip(batch["eid"].astype(str), batch["label_mask"], strict=True):
        np.testing.assert_array_equal(mask, np.repeat(by_eid[eid][:, None], 4, axis=1))
    # A schema this code does not know is refused, named.
    future = old[0].replace(b'"schema": 1', b'"schema": 3')
    with pytest.raises(RecordError, match="exam schema version 3"):
        records.decode_exam(future)


def test_decode_selected_fields_only():
    exam = random_exam(4)
    got = records.decode_exam(records.encode_exam(exam), fields=("images", "eid"))
    assert set(got) == {"images", "eid"}
    np.testing.assert_array_equal(got["images"], exam["images"])
    with pytest.raises(RecordError, match="no field 'segmentation'"):
        records.decode_exam(records.encode_exam(exam), fields=("segmentation",))


def test_dataset_round_trip_every_exam_in_its_split(random_dataset):
    data_dir, exams = random_dataset
    seen = set()
    for split in SPLITS:
        paths = records.split_paths(data_dir, split)
        if not paths:
            continue
        source = grain.sources.ArrayRecordDataSource(paths)
        for i in range(len(source)):
            exam = records.decode_exam(source[i])
            assert split_of(exam["eid"]) == split
            assert_same_exam(exam, exams[exam["eid"]])
            seen.add(exam["eid"])
    assert seen == set(exams)


def test_dataset_info_counts_and_phenotype_stats(random_dataset):
    data_dir, exams = random_dataset
    info = records.read_dataset_info(data_dir)
    assert info["image_shape"] == [9, 4, 16, 16]
    assert info["phenotype_columns"] == list(PHENOTYPE_COLUMNS)
    assert info["num_examples"] == 41
    for split in SPLITS:
        members = [e for e in exams.values() if split_of(e["eid"]) == split]
        assert info["splits"][split]["num_examples"] == len(members)
        if members:
            values = np.stack([e["phenotypes"] for e in members]).astype(np.float64)
            stats = info["splits"][split]["phenotype_stats"]["LVM (g)"]
            column = values[:, PHENOTYPE_COLUMNS.index("LVM (g)")]
            assert stats["count"] == np.count_nonzero(~np.isnan(column))
            assert stats["mean"] == pytest.approx(np.nanmean(column), rel=1e-6)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: b"XXXX" + r[4:], "bad magic"),
        (lambda r: r[: len(r) // 2], "truncated"),
        (lambda r: r[:8] + b"{not json" + r[17:], "unreadable header"),
        (lambda r: r[:5], "truncated"),
        (lambda r: r[:40], "header of .* truncated"),
    ],
)
def test_corrupt_record_names_where(damage, message):
    record = records.encode_exam(random_exam(5))
    with pytest.raises(RecordError, match=message) as err:
        records.decode_exam(damage(record), where="train-00000-of-00001.array_record record 7")
    assert "record 7" in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.update(images=e["images"].astype(np.float32)), "images must be uint8"),
        (lambda e: e.update(images=e["images"][0]), r"images must be \[9, T, H, W\]"),
        (lambda e: e.update(images=e["images"][:8], labels=e["labels"][:8]), "got shape"),
        (lambda e: e.update(labels=e["labels"][:, :2]), "labels shape"),
        (lambda e: e.update(labels=e["labels"] + 6), "outside classes"),
        (lambda e: e.update(plane_mask=np.ones(8, bool)), "plane_mask must have shape"),
        (lambda e: e.pop("phenotypes"), "missing fields \\['phenotypes'\\]"),
        (lambda e: e.update(eid=1234), "eid"),
    ],
)
def test_bad_exam_rejected_when_writing(tmp_path, change, message):
    exams = [random_exam(i) for i in range(3)]
    change(exams[1])
    with pytest.raises(RecordError, match=message) as err:
        shards.write_shard(exams, tmp_path, 0, 1)
    assert "exam #1" in str(err.value)
    # An interrupted shard leaves nothing that looks complete, not even temporaries.
    assert list(tmp_path.iterdir()) == []


def test_interrupted_shard_is_invisible_and_rewritable(tmp_path):
    def exams_then_crash():
        yield random_exam(0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards.write_shard(exams_then_crash(), tmp_path, 0, 1)
    assert shards.read_shard_markers(tmp_path) == {}
    assert list(tmp_path.iterdir()) == []
    counts = shards.write_shard([random_exam(0), random_exam(1)], tmp_path, 0, 1)
    assert sum(counts.values()) == 2
    assert set(shards.read_shard_markers(tmp_path)) == {0}


def test_finalize_refuses_missing_shard_and_mixed_shapes(tmp_path):
    shards.write_shard([random_exam(0)], tmp_path, 0, 2)
    with pytest.raises(RecordError, match=r"shards \[1\] of 2"):
        shards.finalize_dataset(tmp_path, {})
    shards.write_shard([random_exam(1, size=8)], tmp_path, 1, 2)
    with pytest.raises(RecordError, match="different image shapes"):
        shards.finalize_dataset(tmp_path, {})


def test_duplicate_eid_across_shards_refused(tmp_path):
    shards.write_shard([random_exam(0)], tmp_path, 0, 2)
    shards.write_shard([random_exam(0)], tmp_path, 1, 2)
    with pytest.raises(RecordError, match="1000000"):
        shards.finalize_dataset(tmp_path, {})


def test_reading_bad_dataset_directories(tmp_path, random_dataset):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        records.read_dataset_info(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset_info.json is missing"):
        records.read_dataset_info(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(random_dataset[0], copy)
    with pytest.raises(ValueError, match="unknown split 'training'"):
        records.split_paths(copy, "training")
    info = json.loads((copy / records.INFO_FILE).read_text())
    lost = info["splits"]["train"]["files"][1]
    (copy / lost).unlink()
    with pytest.raises(FileNotFoundError, match=f"{lost} is listed"):
        records.read_dataset_info(copy)


def test_quantize_error_within_half_a_level():
    rng = np.random.default_rng(0)
    images = rng.normal(300.0, 80.0, (9, 3, 8, 8)).astype(np.float32)
    plane_mask = np.ones(9, bool)
    plane_mask[1] = False
    images[1] = 1e6  # an absent plane must not set the intensity range
    q = quantize.quantize_images(images, plane_mask)
    present = images[plane_mask]
    lo, hi = present.min(), present.max()
    restored = q[plane_mask].astype(np.float64) / 255 * (hi - lo) + lo
    assert np.abs(restored - present).max() <= (hi - lo) / 510 * (1 + 1e-4)
    assert q[plane_mask].min() == 0 and q[plane_mask].max() == 255
    assert not q[1].any()


def test_quantisation_cost_on_a_phantom_exam():
    """The documented bound on real (rendered float) phantom images."""
    from whmae.data.synthetic import phantom

    config = phantom.PhantomConfig(size=32, frames=6, seed=0)
    subject = phantom.sample_subject(config, 0)
    views = ("la_2ch", "la_3ch", "la_4ch") + ("short_axis",) * 6
    images, _ = phantom.render_planes(
        subject, phantom.exam_planes(config, subject), views, np.random.default_rng(0)
    )
    q = quantize.quantize_images(images)
    lo, hi = float(images.min()), float(images.max())
    error = q.astype(np.float64) / 255 * (hi - lo) + lo - images
    assert np.abs(error).max() <= (hi - lo) / 510 * (1 + 1e-4)
    rms = np.sqrt(np.mean(error**2)) / (hi - lo)
    assert rms == pytest.approx(1 / (255 * np.sqrt(12)), rel=0.1)


@pytest.mark.parametrize("chunk", [None, 3 * 36])  # one call / blocks of 3 frames + 1 frame
@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.int8])
def test_quantize_planes_of_integers_equals_the_float_formula(dtype, chunk, monkeypatch):
    """The lookup-table path (NIfTI integers) gives the float32 formula's numbers exactly,
    also with a float (time-resampled) plane beside integer ones and an absent plane, and
    when the table is applied a few frames at a time."""
    if chunk is not None:
        monkeypatch.setattr(lookup, "CHUNK", chunk)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    planes = {
        i: rng.integers(info.min, info.max, (4, 6, 6), endpoint=True).astype(dtype)
        for i in (0, 2, 3, 4, 5, 6, 7, 8)
    }
    planes[3] = planes[3] // 3  # a narrower range on one plane
    planes[7] = (planes[7].astype(np.float32) * 0.37).astype(np.float32)  # resampled
    stack = np.zeros((9, 4, 6, 6), np.float32)
    for i, p in planes.items():
        stack[i] = p
    mask = np.isin(np.arange(9), list(planes))
    expected = quantize.quantize_images(stack, mask)
    got = quantize.quantize_planes(planes, stack.shape)
    np.testing.assert_array_equal(got, expected)
    assert not got[1].any() and got[mask].max() == 255 and got[mask].min() == 0
    # Not the identity of a trivial table: many distinct levels come out.
    assert len(np.unique(got[0])) > 100


@pytest.mark.parametrize(("flush_mb", "more_than_at_close"), [("0", False), ("0.0001", True)])
def test_shard_files_are_flushed_as_they_grow_and_before_the_marker(
    tmp_path, monkeypatch, flush_mb, more_than_at_close
):
    synced, real_fdatasync = [], shards.os.fdatasync

    def fdatasync(fd):
        synced.append(shards.os.fstat(fd).st_size)
        real_fdatasync(fd)

    monkeypatch.setenv(shards.FLUSH_ENV, flush_mb)
    monkeypatch.setattr(shards.os, "fdatasync", fdatasync)
    # ~3 MB each, 40 MB in all: the writer hands its file 16 MiB blocks.
    exams = [random_exam(k, frames=16, size=128) for k in range(12)]

    def written():
        for exam in exams:
            yield exam
            # Nothing is marked complete while the shard is being written.
            assert shards.read_shard_markers(tmp_path) == {}

    counts = shards.write_shard(written(), tmp_path, 0, 1, split_of=lambda eid: "train")
    files = [s for s in SPLITS if counts[s]]
    # Every split file is synced at its full size before the marker appears...
    final_sizes = {(tmp_path / records.shard_file(s, 0, 1)).stat().st_size for s in files}
    assert final_sizes <= set(synced)
    # ...and, with a small threshold, also while it grows.
    assert files == ["train"] and (len(synced) > 1) == more_than_at_close
    source = grain.sources.ArrayRecordDataSource(
        [str(tmp_path / records.shard_file(s, 0, 1)) for s in files]
    )
    got = sorted(
        (records.decode_exam(source[i]) for i in range(len(source))), key=lambda e: e["eid"]
    )
    for g, want in zip(got, sorted(exams, key=lambda e: e["eid"]), strict=True):
        assert_same_exam(g, want)


def test_bad_flush_setting_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(shards.FLUSH_ENV, "lots")
    with pytest.raises(ValueError, match="WHMAE_WRITE_FLUSH_MB='lots'"):
        shards.write_shard([random_exam(0)], tmp_path, 0, 1)
