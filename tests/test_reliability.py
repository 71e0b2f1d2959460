"""Reliability (issue 17): a full disk, damaged checkpoints and repeated metrics."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from whmae.train import metrics as train_metrics
from whmae.train.metrics import MetricsWriteError, MetricsWriter, read_metrics, truncate_metrics

ROW = {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "step_time_s": 0.1, "exams_per_s": 8.0}


class _FullDisk:
    """A file whose writes fail as on a full disk (after `room` successful ones)."""

    def __init__(self, room: int = 0):
        self.room = room

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= 1

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def _write_in_thread(writer, steps, timeout=20):
    """writer.write each step in a thread; (finished, exception). A hang fails, not hangs."""
    outcome = {}

    def target():
        try:
            for step in steps:
                writer.write(step, ROW)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), outcome.get("error")


def test_full_disk_under_tensorboard_raises_enospc_at_once_instead_of_hanging(
    tmp_path, monkeypatch
):
    import tensorboardX.record_writer

    monkeypatch.setattr(tensorboardX.record_writer, "open_file", lambda path: _FullDisk(room=8))
    writer = MetricsWriter(str(tmp_path), enabled=True)
    # The old writer handed events to a thread that died on ENOSPC; the queue (10) then
    # filled and the training thread blocked in Queue.put for ever.
    finished, error = _write_in_thread(writer, range(1, 40))
    assert finished, "MetricsWriter.write blocked on a full disk"
    assert isinstance(error, MetricsWriteError) and error.errno == errno.ENOSPC
    assert "tensorboard" in str(error)
    writer.close()  # does not raise a second disk-full error over the first


def test_full_disk_under_metrics_jsonl_raises_enospc(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.write(1, ROW)
    writer._file = _FullDisk()
    with pytest.raises(MetricsWriteError, match=r"step 2.*metrics.jsonl") as caught:
        writer.write(2, ROW)
    assert caught.value.errno == errno.ENOSPC
    writer.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1]


def _log(workdir, steps, **kwargs):
    with MetricsWriter(str(workdir), enabled=True, **kwargs) as writer:
        for step in steps:
            writer.write(step, {**ROW, "loss": float(step)})


def test_resume_after_a_crash_drops_the_redone_rows(tmp_path):
    _log(tmp_path, [10, 20, 30, 40])  # crashed after 40; newest checkpoint 20
    with open(tmp_path / train_metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 50, "lo')  # and a row cut off mid-write
    _log(tmp_path, [30, 40, 50], resume_step=20)
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50]
    assert open(tmp_path / train_metrics.METRICS_FILE).read().endswith("}\n")


def test_resume_without_the_step_drops_rows_from_the_first_logged_step_on(tmp_path):
    _log(tmp_path, [1, 2, 3, 4, 5])
    _log(tmp_path, [4, 5, 6])  # resumed from 3, logging every step
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    _log(tmp_path, [7])  # a plain continuation (e.g. after SIGTERM) keeps everything
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6, 7]


def test_truncate_metrics_rewrites_atomically_and_only_when_needed(tmp_path):
    assert truncate_metrics(str(tmp_path), 3) == 0  # no file: nothing to do
    _log(tmp_path, [1, 2, 3])
    path = tmp_path / train_metrics.METRICS_FILE
    before = os.stat(path).st_ino
    assert truncate_metrics(str(tmp_path), 3) == 0
    assert os.stat(path).st_ino == before  # untouched
    assert truncate_metrics(str(tmp_path), 1) == 2
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _two_checkpoints(directory):
    import jax.numpy as jnp

    from whmae.train.checkpoint import Checkpointer

    state = {"w": jnp.arange(20000.0), "b": jnp.ones(3)}
    with Checkpointer(str(directory), save_every=1) as checkpointer:
        for step in (50, 60):
            checkpointer.save(step, {"w": state["w"] * step, "b": state["b"]}, force=True)
    return state


def _truncate_largest_data_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 10)


def test_damaged_newest_checkpoint_is_moved_aside_and_the_older_one_restored(tmp_path, caplog):
    import numpy as np

    from whmae.train.checkpoint import Checkpointer, abstract_like

    directory = tmp_path / "checkpoints"
    state = _two_checkpoints(directory)
    _truncate_largest_data_file(directory / "60")
    with Checkpointer(str(directory), save_every=1) as checkpointer:
        assert checkpointer.latest_step() == 60
        with caplog.at_level("WARNING"):
            restored = checkpointer.restore(60, abstract_like(state))
        np.testing.assert_array_equal(restored["w"], np.arange(20000.0) * 50)
        assert checkpointer.latest_step() == 50 and checkpointer.all_steps() == [50]
        assert checkpointer.verify(50) is None
    warning = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warning) == 1 and "\n" not in warning[0]
    assert "step 60" in warning[0] and "restoring step 50 instead" in warning[0]
    assert "OUT_OF_RANGE" in warning[0] or "DATA_LOSS" in warning[0], warning[0]
    # Not deleted: moved aside with the reason beside it.
    aside = tmp_path / "damaged_checkpoints" / "step_60"
    assert (aside / "state").is_dir()
    assert "could not be read back" in (aside / "DAMAGED.txt").read_text()


def test_a_changed_model_is_not_taken_for_damage(tmp_path):
    import jax.numpy as jnp

    from whmae.train.checkpoint import Checkpointer, abstract_like

    directory = tmp_path / "checkpoints"
    _two_checkpoints(directory)
    other = {"w": jnp.arange(200.0), "b": jnp.ones(3)}
    with Checkpointer(str(directory), save_every=1) as checkpointer:
        with pytest.raises(ValueError, match="not compatible with the stored shape"):
            checkpointer.restore(60, abstract_like(other))
        assert checkpointer.all_steps() == [50, 60]
    assert not (tmp_path / "damaged_checkpoints").exists()


def test_every_checkpoint_damaged_says_so_and_keeps_them(tmp_path):
    from whmae.train.checkpoint import Checkpointer, NoIntactCheckpointError, abstract_like

    directory = tmp_path / "checkpoints"
    state = _two_checkpoints(directory)
    for step in ("50", "60"):
        _truncate_largest_data_file(directory / step)
    with Checkpointer(str(directory), save_every=1) as checkpointer:
        with pytest.raises(NoIntactCheckpointError, match="no intact checkpoint"):
            checkpointer.restore(60, abstract_like(state))
        assert checkpointer.latest_step() is None
    assert sorted(p.name for p in (tmp_path / "damaged_checkpoints").iterdir()) == [
        "step_50",
        "step_60",
    ]


def test_pretrain_on_a_full_disk_ends_in_one_line_naming_the_last_checkpoint(
    tiny_dataset, tmp_path, monkeypatch
):
    import tensorboardX.record_writer

    from whmae import pretrain

    class FillsUp(_FullDisk):
        opened = []

        def __init__(self):
            # The file header, the (re)start marker, then 3 logged steps of 6 scalars.
            super().__init__(room=4 * (2 + 3 * 6))
            FillsUp.opened.append(self)

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tensorboardX.record_writer, "open_file", lambda path: FillsUp())
    data = str(tiny_dataset[0] if isinstance(tiny_dataset, tuple) else tiny_dataset)
    workdir = tmp_path / "run"
    args = [
        "--config", "configs/pretrain.py:tiny", "--workdir", str(workdir),
        f"--config.data.dir={data}", "--config.train.steps=8", "--config.train.log_every=1",
        "--config.train.checkpoint_every=2", "--config.data.batch_size=8",
    ]  # fmt: skip
    finished, error = False, None

    def target():
        nonlocal error
        try:
            pretrain.main(args)
        except BaseException as e:  # noqa: BLE001 - examined below
            error = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(240)
    finished = not thread.is_alive()
    assert finished, "the run hung on a full disk"
    assert isinstance(error, SystemExit), repr(error)
    line = error.code
    assert isinstance(line, str) and "\n" not in line, line
    assert line.startswith("error: disk full"), line
    # Step k's row reached metrics.jsonl, its events did not: the run stopped before
    # saving step k, and the newest checkpoint is the last even step before it.
    steps = [r["step"] for r in read_metrics(str(workdir))]
    failed_at = steps[-1]
    assert steps == list(range(1, failed_at + 1)) and 3 <= failed_at < 8, steps
    last = 2 * ((failed_at - 1) // 2)
    assert f"Last good checkpoint: step {last} in {workdir / 'checkpoints'}" in line, line


@pytest.fixture
def dataset_copy(random_dataset, tmp_path):
    import shutil

    out = tmp_path / "data"
    shutil.copytree(random_dataset[0], out)
    return out


def _first_train_shard(data_dir):
    from whmae.data.dataset.records import split_paths

    return split_paths(data_dir, "train")[0]


@pytest.mark.parametrize("sizes_recorded", [True, False])
@pytest.mark.parametrize("keep", [0, 0.5])
def test_truncated_or_empty_shard_is_named_when_the_dataset_opens(
    dataset_copy, keep, sizes_recorded
):
    import json

    from whmae.data.dataset.pipeline import make_pipeline
    from whmae.data.dataset.records import INFO_FILE, RecordError

    if not sizes_recorded:  # a dataset written before the sizes were recorded
        info = json.loads((dataset_copy / INFO_FILE).read_text())
        for entry in info["splits"].values():
            del entry["file_info"]
        (dataset_copy / INFO_FILE).write_text(json.dumps(info))
    shard = _first_train_shard(dataset_copy)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(RecordError) as caught:
        make_pipeline(dataset_copy, "train", batch_size=2, fields=("images",))
    message = str(caught.value)
    assert shard in message and "\n" not in message
    if sizes_recorded:  # a stat finds it, before any reading
        assert message.startswith(f"{shard}: {int(size * keep)} bytes, but {INFO_FILE} records")
    else:
        assert "not a readable ArrayRecord shard" in message


def test_overwritten_bytes_in_a_shard_name_the_file_and_record(dataset_copy):
    from whmae.data.dataset.pipeline import make_pipeline
    from whmae.data.dataset.records import RecordError

    shard = _first_train_shard(dataset_copy)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.seek(size // 3)
        f.write(os.urandom(size // 3))
    with pytest.raises(RecordError) as caught:
        it = make_pipeline(
            dataset_copy, "train", batch_size=2, fields=("images",), shuffle=False, num_epochs=1
        )
        for _ in it:
            pass
    assert shard in str(caught.value), str(caught.value)


def _children(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_grain_workers_die_when_the_training_process_is_killed(random_dataset):
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from whmae.data.dataset.pipeline import make_pipeline\n"
        "it = make_pipeline(sys.argv[1], 'train', batch_size=2, fields=('eid',), worker_count=2)\n"
        "next(it)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(random_dataset[0])], stdout=subprocess.PIPE, text=True
    )
    workers, left = [], []
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = [pid for pid in _children(parent.pid) if _alive(pid)]
        assert len(workers) >= 2, workers  # the Grain workers (and a resource tracker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in workers if _alive(pid)]
        names = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:120] for pid in left}
        assert not [p for p, cmd in names.items() if "resource_tracker" not in cmd], names
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in left:  # only this test's own processes, still running
            os.kill(pid, signal.SIGKILL)


def test_batches_in_flight_left_in_dev_shm_by_a_killed_process_group_are_removed(
    random_dataset,
):
    """SIGKILL of the whole group (the resource tracker too) leaves Grain's psm_* batches
    and sem.mp-* semaphores; `remove_orphaned_segments` removes them, and keeps a segment
    still mapped."""
    import signal
    import subprocess
    import sys
    import time
    from multiprocessing import shared_memory

    from whmae.data.worker_pool import SEGMENT_PREFIXES, SHM_DIR, remove_orphaned_segments

    script = (
        "import sys, time\n"
        "from whmae.data.dataset.pipeline import make_pipeline\n"
        "it = make_pipeline(sys.argv[1], 'train', batch_size=2, fields=('images',),\n"
        "                   worker_count=2, prefetch_batches=4)\n"
        "next(it)\n"
        "time.sleep(2)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    before = set(os.listdir(SHM_DIR))
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(random_dataset[0])],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, killed whole below
    )
    leaked = set()
    in_use = shared_memory.SharedMemory(create=True, size=4096)  # mapped here: kept
    try:
        assert parent.stdout.readline().strip() == "ready"
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)
        time.sleep(1)
        leaked = set(os.listdir(SHM_DIR)) - before - {in_use.name}
        leaked = {n for n in leaked if n.startswith(SEGMENT_PREFIXES)}
        assert any(n.startswith("psm_") for n in leaked), "expected batches left behind"
        names = leaked | {in_use.name}
        # A live resource tracker (this test's own, for `in_use`) may own them: none removed.
        assert remove_orphaned_segments(names=names) == (0, 0)
        count, size = remove_orphaned_segments(names=names, trackers=[])
        assert count == len(leaked) and size > 0
        assert not leaked & set(os.listdir(SHM_DIR))
        assert in_use.name in os.listdir(SHM_DIR)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
        for name in leaked & set(os.listdir(SHM_DIR)):  # only this test's own
            os.unlink(os.path.join(SHM_DIR, name))
        in_use.close()
        in_use.unlink()
