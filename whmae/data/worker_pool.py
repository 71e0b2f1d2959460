"""Worker processes for batch jobs that must survive a dying worker.

One bad exam (out of memory, a crash in a C extension) must not stop a run of
thousands: `ordered_results` reruns the unfinished jobs one at a time in a fresh pool
and rejects only the job whose worker dies again. `whole_shard_results` runs whole
shards in workers (no per-job traffic through the parent) and hands the shards a dying
worker took down back to the caller (which reruns them with `ordered_results`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
SHM_DIR = "/dev/shm"
# multiprocessing's names there: shared_memory.SharedMemory (Grain's batches) and semaphores.
SEGMENT_PREFIXES = ("psm_", "sem.mp-")
SHM_CLEANUP_ENV = "WHMAE_SHM_CLEANUP"
_done_counts = None  # in a worker: the pool's shared progress counters (one per shard slot)


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let glibc malloc reuse freed blocks up to `mmap_threshold` bytes instead of mapping
    fresh pages for each one (glibc never keeps blocks over 32 MiB by default).

    An exam inflates ~70 MB of NIfTI data: with fresh pages for every exam, zeroing them in
    the kernel costs ~20 % of `whmae-prepare`'s CPU time (benchmarks/bench_prepare.py). A
    worker then keeps up to `trim_threshold` bytes of freed heap. A no-op (False) where the
    C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """In a worker process: end it as soon as process `parent_pid` is gone.

    A parent killed with SIGKILL cannot stop its workers; left alive they finish (and
    write) work nobody waits for, racing a rerun on the same files. On Linux the kernel
    sends SIGKILL when the parent dies (PR_SET_PDEATHSIG); everywhere a daemon thread also
    checks every `poll_s` seconds whether the worker was handed to another parent.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _user_processes(uid: int):
    """Yield (pid, read) for each process of `uid`: read(name, mode) opens
    /proc/<pid>/<name>; a process that is gone meanwhile (OSError) is skipped."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        yield (
            int(entry.name),
            lambda name, mode="r", pid=entry.name: open(f"/proc/{pid}/{name}", mode),
        )


def _live_resource_trackers(uid: int) -> list[int]:
    """Pids of this user's running multiprocessing resource trackers."""
    pids = []
    for pid, read in _user_processes(uid):
        try:
            with read("cmdline", "rb") as f:
                if b"multiprocessing.resource_tracker" in f.read():
                    pids.append(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _mapped_under(directory: str) -> set[str]:
    """Files under `directory` that a process of this user has mapped."""
    prefix, mapped = directory.rstrip("/") + "/", set()
    for _, read in _user_processes(os.getuid()):
        try:
            with read("maps") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        mapped.add(line[at:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            continue
    return mapped


def remove_orphaned_segments(
    shm_dir: str | None = None, *, names=None, trackers: list[int] | None = None
) -> tuple[int, int]:
    """Unlink this user's multiprocessing shared-memory segments and semaphores that a run
    killed with its whole process group (OOM killer, `kill -9 -PGID`, a scheduler) left in
    /dev/shm; returns (count, bytes) removed.

    Grain's workers (mp_prefetch) hand each batch over in a `psm_*` segment, and a
    ProcessPoolExecutor makes `sem.mp-*` semaphores. When only the parent is SIGKILLed, its
    resource tracker outlives it and unlinks them; when the tracker dies too, nothing does
    (measured: 66 segments, one per batch in flight, with 2 workers and 8 batches of
    prefetch). The names hold no owner pid, so a segment is taken as orphaned only when no
    resource tracker of this user is alive (every live Python process family that made
    one has its tracker running) and no process of this user maps it. Otherwise nothing is
    removed. `names`: only these (tests); `trackers`: the live trackers' pids (tests).
    """
    shm_dir = SHM_DIR if shm_dir is None else shm_dir
    if not (sys.platform.startswith("linux") and os.path.isdir(shm_dir)):
        return 0, 0
    uid = os.getuid()
    if _live_resource_trackers(uid) if trackers is None else trackers:
        return 0, 0
    candidates = []
    for entry in os.scandir(shm_dir):
        if not entry.name.startswith(SEGMENT_PREFIXES):
            continue
        if names is not None and entry.name not in names:
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.st_uid == uid and entry.is_file(follow_symlinks=False):
            candidates.append((entry.path, stat.st_size))
    if not candidates:
        return 0, 0
    mapped = _mapped_under(shm_dir)
    count = size = 0
    for path, nbytes in candidates:
        if path in mapped:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        count, size = count + 1, size + nbytes
    return count, size


def clean_shared_memory(shm_dir: str | None = None) -> None:
    """Before starting workers: `remove_orphaned_segments`, said on stderr when it did.
    WHMAE_SHM_CLEANUP=0 turns it off (e.g. /dev/shm shared with other containers' processes,
    which /proc here does not show)."""
    if os.environ.get(SHM_CLEANUP_ENV, "1") == "0":
        return
    shm_dir = SHM_DIR if shm_dir is None else shm_dir
    count, size = remove_orphaned_segments(shm_dir)
    if count:
        print(
            f"whmae: removed {count} shared-memory segments ({size / 1e6:.0f} MB) in {shm_dir} "
            "left by a killed run",
            file=sys.stderr,
        )


def _initialize_worker(done_counts, parent_pid: int | None = None) -> None:
    global _done_counts
    if parent_pid is not None:
        die_with_parent(parent_pid)
    _done_counts = done_counts
    keep_freed_memory()


def count_done(slot: int, count: int = 1) -> None:
    """In a worker: add `count` finished jobs to progress counter `slot` of its pool.

    One shard (one worker) writes a slot, so no lock is needed, and a worker killed
    mid-update cannot leave a lock held that would hang the others. Outside a pool with
    counters, a no-op.
    """
    if _done_counts is not None and slot < len(_done_counts):
        _done_counts[slot] += count


class _Inline:
    """A finished 'future' (jobs run in this process, or decided without reading files)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def exception(self):
        return None


class WorkerPool:
    """Spawn-safe worker processes that come back after a worker dies (out of memory, a
    crash in a C extension): one bad exam must not stop the run."""

    def __init__(self, workers: int, progress_slots: int = 0):
        self.workers = workers
        clean_shared_memory()  # what a run killed with its resource tracker left behind
        self.context = multiprocessing.get_context("spawn")  # safe beside JAX threads
        # Shared (lock-free) progress counters for `count_done`; they outlive restarts.
        self.done_counts = self.context.RawArray("q", max(progress_slots, 1))
        self.executor = self._start()

    def _start(self):
        return concurrent.futures.ProcessPoolExecutor(
            self.workers,
            mp_context=self.context,
            initializer=_initialize_worker,
            initargs=(self.done_counts, os.getpid()),
        )

    def submit(self, work, *args):
        return self.executor.submit(work, *args)

    def restart(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._start()

    def shutdown(self) -> None:
        self.executor.shutdown(cancel_futures=True)


def ordered_results(jobs, pool: WorkerPool | None, lookahead: int, work):
    """(shard, result) in job order, keeping up to `lookahead` exams in flight.

    When a worker process dies, the unfinished exams are rerun one at a time in a fresh
    pool; the exam whose worker dies again is rejected, the others go on.
    """
    pending = collections.deque()

    def start(job):
        if "status" in job:  # decided without reading files
            return _Inline(job)
        if pool is None:
            return _Inline(work(job))
        try:
            return pool.submit(work, job)
        except concurrent.futures.process.BrokenProcessPool as broken:
            # A worker died before `finish` saw it: hand the failure to `finish`.
            failed = concurrent.futures.Future()
            failed.set_exception(broken)
            return failed

    def finish(item):
        shard, _, future = item
        try:
            return shard, future.result()
        except concurrent.futures.process.BrokenProcessPool:
            # Rerun the unfinished exams one at a time in a fresh pool to find the culprit.
            for other in (item, *pending):
                if not (other[2].done() and not other[2].cancelled() and not other[2].exception()):
                    other[2] = _Inline(_isolated(other[1], other[0]))
            return shard, item[2].result()

    def _isolated(job, shard):
        pool.restart()
        try:
            return pool.submit(work, job).result()
        except concurrent.futures.process.BrokenProcessPool:
            pool.restart()
            reason = "the worker process died while preparing it (out of memory? a crash?)"
            return {"eid": job["eid"], "shard": shard, "status": "rejected", "reason": reason}

    for shard, job in jobs:
        pending.append([shard, job, start(job)])
        while len(pending) > lookahead:
            yield finish(pending.popleft())
    while pending:
        yield finish(pending.popleft())


def whole_shard_results(tasks, pool: WorkerPool, work_shard, rerun, on_progress=None):
    """(shard, result) for each task (slot, shard, jobs), in the order shards finish.

    Each shard runs whole in one worker: work_shard(slot, shard, jobs) (picklable; calls
    `count_done(slot)` per job). At most `pool.workers` shards are in flight. When a worker
    dies, the pool restarts and every shard that was in flight is handed to
    rerun(shard, jobs), called here (e.g. one job at a time through `ordered_results`,
    which finds the culprit); its return value is that shard's result.
    on_progress(delta): change in the number of jobs the workers report done.
    """
    waiting, running = collections.deque(tasks), {}
    reported = 0

    def progress():
        nonlocal reported
        done = sum(pool.done_counts)
        if on_progress is not None and done != reported:
            on_progress(done - reported)
        reported = done

    while waiting or running:
        broken, pool_broke = [], False
        while waiting and len(running) < pool.workers:
            slot, shard, jobs = task = waiting.popleft()
            try:
                running[pool.submit(work_shard, slot, shard, jobs)] = task
            except concurrent.futures.process.BrokenProcessPool:
                waiting.appendleft(task)  # not started: it runs after the restart
                pool_broke = True
                break
        finished, _ = concurrent.futures.wait(
            running, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if pool_broke or any(f.exception() is not None for f in finished):
            finished = concurrent.futures.wait(running).done  # the others fail with it
        progress()
        for future in finished:
            task = running.pop(future)
            if isinstance(future.exception(), concurrent.futures.process.BrokenProcessPool):
                broken.append(task)
            else:
                yield task[1], future.result()  # another exception stops the run
        if broken or pool_broke:
            pool.restart()
            for slot, shard, jobs in broken:
                pool.done_counts[slot] = 0  # its worker is gone; rerun reports anew
                progress()
                yield shard, rerun(shard, jobs)
