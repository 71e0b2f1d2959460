"""Worker processes for batch jobs that must survive a dying worker.

One bad exam (out of memory, a crash in a C extension) must not stop a run of
thousands: `ordered_results` reruns the unfinished jobs one at a time in a fresh pool
and rejects only the job whose worker dies again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import multiprocessing
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


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

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = self._start()

    def _start(self):
        context = multiprocessing.get_context("spawn")  # safe beside JAX threads
        return concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=keep_freed_memory
        )

    def submit(self, work, job):
        return self.executor.submit(work, job)

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
