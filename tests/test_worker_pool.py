"""whmae.data.worker_pool: freed exam-sized buffers are reused, not mapped afresh; whole
shards run in workers and a dying worker costs only its own job."""

import subprocess
import sys

import pytest
from ukbb_fixtures import crash_shard_on_eid, crash_worker_on_eid

from whmae.data.worker_pool import WorkerPool, ordered_results, whole_shard_results

_PROBE = """
import resource, sys
from whmae.data.worker_pool import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(6):  # an inflated short-axis stack is ~40 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = b"x" * (40 << 20)  # malloc + fill, like an inflated file
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[1:]))
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_reuses_large_buffers():
    pages = (40 << 20) // 4096
    assert _page_faults("default") > pages // 2  # glibc maps >32 MiB blocks afresh
    assert _page_faults("keep") < pages // 20  # the freed block comes back


def test_whole_shards_in_workers_survive_a_dying_worker():
    names = ["a", "b", "c", "crash", "d", "e", "f", "g", "h", "i"]
    tasks = [
        (slot, 10 + slot, [{"eid": e} for e in names[2 * slot : 2 * slot + 2]]) for slot in range(5)
    ]
    reruns, progress = [], []
    pool = WorkerPool(2, progress_slots=len(tasks))

    def rerun(shard, jobs):  # what prepare does: one exam at a time, finding the culprit
        reruns.append(shard)
        return [
            r for _, r in ordered_results(((shard, j) for j in jobs), pool, 2, crash_worker_on_eid)
        ]

    try:
        results = dict(whole_shard_results(tasks, pool, crash_shard_on_eid, rerun, progress.append))
    finally:
        pool.shutdown()
    assert sorted(results) == [10, 11, 12, 13, 14]  # every shard, each once
    status = {r["eid"]: r["status"] for shard in results.values() for r in shard}
    assert status == {e: "rejected" if e == "crash" else "written" for e in names}
    assert 11 in reruns and len(reruns) <= 2  # the crashing shard and at most its neighbour
    # Progress counts the jobs of the shards that finished in workers, nothing of reruns.
    assert sum(progress) == 2 * (len(tasks) - len(reruns))


def test_workers_die_when_their_parent_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import time\n"
        "from whmae.data.worker_pool import WorkerPool\n"
        "pool = WorkerPool(2)\n"
        "futures = [pool.submit(time.sleep, 120) for _ in range(2)]\n"
        "time.sleep(1)\n"
        "while len(pool.executor._processes) < 2:\n"
        "    time.sleep(0.1)\n"
        "print(*pool.executor._processes, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    workers, left = [], []
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(1)  # the workers run their initializer (spawn: a fresh interpreter)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().split(")")[-1].split()[0] != "Z"
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in workers if alive(pid)]
        assert not left, f"workers {left} outlived their SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in left:  # only the test's own workers, still running
            os.kill(pid, signal.SIGKILL)


def test_pool_and_pipeline_remove_orphaned_segments_at_start(
    tmp_path, monkeypatch, capsys, random_dataset
):
    import os

    from whmae.data import worker_pool
    from whmae.data.dataset.pipeline import make_pipeline

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(worker_pool, "SHM_DIR", str(shm))
    monkeypatch.setattr(worker_pool, "_live_resource_trackers", lambda uid: [])

    def leave_orphans():
        for name in ("psm_0a1b2c3d", "sem.mp-abcdefgh", "other_file"):
            (shm / name).write_bytes(bytes(1000))

    leave_orphans()
    worker_pool.WorkerPool(1).shutdown()
    assert sorted(os.listdir(shm)) == ["other_file"]
    assert "removed 2 shared-memory segments (0 MB)" in capsys.readouterr().err
    leave_orphans()
    it = make_pipeline(random_dataset[0], "train", batch_size=2, fields=("eid",), worker_count=1)
    del it  # never iterated: no worker started
    assert sorted(os.listdir(shm)) == ["other_file"]
    assert "removed 2 shared-memory segments" in capsys.readouterr().err
    leave_orphans()
    make_pipeline(random_dataset[0], "train", batch_size=2, fields=("eid",), worker_count=0)
    assert len(os.listdir(shm)) == 3  # no workers: nothing to clean for
    monkeypatch.setenv(worker_pool.SHM_CLEANUP_ENV, "0")
    worker_pool.WorkerPool(1).shutdown()
    assert len(os.listdir(shm)) == 3  # turned off
