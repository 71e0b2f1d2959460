"""The Grain pipeline: contents, determinism, process sharding, checkpoint/restore."""

import collections
import itertools
import json
import os
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from whmae.data.dataset import pipeline, records, shards
from whmae.data.dataset.records import RecordError
from whmae.data.dataset.splits import split_of

ALL = ("eid", *records.EXAM_FIELDS)
EIDS = {"fields": ("eid",)}


def train_eids(exams):
    return sorted(e for e in exams if split_of(e) == "train")


def eids_of(batches):
    return [str(e) for b in batches for e in b["eid"]]


def make(data_dir, **kwargs):
    kwargs = {"batch_size": 4, "process_index": 0, "process_count": 1, **kwargs}
    return pipeline.make_pipeline(data_dir, **kwargs)


def test_batches_hold_the_exams_as_uint8(random_dataset):
    data_dir, exams = random_dataset
    batch = next(make(data_dir, fields=ALL))
    assert batch["images"].dtype == np.uint8 and batch["images"].shape == (4, 9, 4, 16, 16)
    assert batch["plane_mask"].dtype == bool and batch["plane_mask"].shape == (4, 9)
    assert batch["eid"].shape == (4,)
    for i, eid in enumerate(batch["eid"]):
        for name in records.EXAM_FIELDS:
            want = np.asarray(exams[str(eid)][name])
            assert batch[name][i].tobytes() == want.tobytes(), name
    assert set(next(make(data_dir))) == {"images", "plane_mask"}


def test_one_epoch_visits_every_exam_once_and_epochs_differ(random_dataset):
    data_dir, exams = random_dataset
    train = train_eids(exams)
    n = pipeline.num_examples(data_dir, "train")
    assert n == len(train)
    one = eids_of(make(data_dir, fields=("eid",), num_epochs=1, drop_remainder=False))
    assert sorted(one) == train
    two = eids_of(make(data_dir, fields=("eid",), num_epochs=2, drop_remainder=False))
    assert sorted(two[:n]) == train and sorted(two[n:]) == train
    assert two[:n] != two[n:]  # reshuffled each epoch
    assert two[:n] == one  # and the first epoch does not depend on num_epochs


def test_same_seed_same_batches_other_seed_other_order(random_dataset):
    data_dir, _ = random_dataset
    first = [b["images"] for b in itertools.islice(make(data_dir, seed=7), 5)]
    again = [b["images"] for b in itertools.islice(make(data_dir, seed=7, read_threads=1), 5)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = eids_of(itertools.islice(make(data_dir, seed=8, fields=("eid",)), 5))
    assert other != eids_of(itertools.islice(make(data_dir, seed=7, fields=("eid",)), 5))
    plain = eids_of(make(data_dir, shuffle=False, num_epochs=1, drop_remainder=False, **EIDS))
    source = grain.sources.ArrayRecordDataSource(records.split_paths(data_dir, "train"))
    assert plain == [records.decode_exam(source[i], ("eid",))["eid"] for i in range(len(source))]


def test_processes_partition_an_epoch(random_dataset):
    data_dir, exams = random_dataset
    train = train_eids(exams)
    assert len(train) % 5 != 0  # an odd split, so the partition is uneven
    per_process = [
        eids_of(
            make(
                data_dir,
                fields=("eid",),
                num_epochs=1,
                drop_remainder=False,
                batch_size=5,
                process_index=p,
                process_count=5,
            )
        )
        for p in range(5)
    ]
    counts = collections.Counter(itertools.chain(*per_process))
    assert sorted(counts) == train and set(counts.values()) == {1}
    assert max(map(len, per_process)) - min(map(len, per_process)) <= 1


def test_orbax_checkpoint_resumes_at_the_next_batch(random_dataset, tmp_path):
    data_dir, _ = random_dataset
    it = make(data_dir, fields=("eid", "images"), seed=3)
    for _ in range(3):
        next(it)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(12)]  # crosses an epoch boundary (36 train exams)

    fresh = make(data_dir, fields=("eid", "images"), seed=3)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want, got in zip(expected, (next(fresh) for _ in range(12)), strict=True):
        assert list(got["eid"]) == list(want["eid"])
        np.testing.assert_array_equal(got["images"], want["images"])
    manager.close()


def test_state_round_trip_with_worker_processes(random_dataset):
    data_dir, _ = random_dataset
    reference = eids_of(itertools.islice(make(data_dir, fields=("eid",)), 6))
    it = make(data_dir, fields=("eid",), worker_count=1)
    head = eids_of(itertools.islice(it, 2))
    state = it.get_state()
    resumed = make(data_dir, fields=("eid",), worker_count=1)
    resumed.set_state(state)
    assert head + eids_of(itertools.islice(resumed, 4)) == reference


def test_corrupt_record_is_reported_by_file(random_dataset, tmp_path):
    from array_record.python import array_record_module

    copy = tmp_path / "copy"
    shutil.copytree(random_dataset[0], copy)
    victim = records.split_paths(copy, "train")[0]
    count = array_record_module.ArrayRecordReader(victim).num_records()
    writer = array_record_module.ArrayRecordWriter(victim, shards.RECORD_OPTIONS)
    for _ in range(count):
        writer.write(b"not an exam record")
    writer.close()
    with pytest.raises(RecordError, match=f"{victim}: .* bytes, but dataset_info.json records"):
        make(copy)  # opening stats the files: the new size is caught before any reading
    info = json.loads((copy / records.INFO_FILE).read_text())
    info["splits"]["train"]["file_info"][os.path.basename(victim)]["bytes"] = os.path.getsize(
        victim
    )  # the size as recorded: the records themselves are read and found bad
    (copy / records.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(RecordError, match=f"{victim} record .*bad magic"):
        list(make(copy, shuffle=False, num_epochs=1, read_threads=0))


def test_bad_arguments(random_dataset, tmp_path):
    data_dir, _ = random_dataset
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make(data_dir, split="dev")
    with pytest.raises(ValueError, match="process_index 3"):
        make(data_dir, process_index=3, process_count=3)
    with pytest.raises(FileNotFoundError, match="dataset_info.json is missing"):
        make(tmp_path)
