"""The demo's independent runs side by side: one process per run, each on its own cores.

The demo's tiny models leave a 2-core CPU a third idle when one run has both cores (its
small ops do not split well over threads), and most of its runs do not depend on each
other: from-scratch baselines need only the data, the fine-tuned models only the
all-planes MAE, each evaluation only its runs. `run_jobs` starts every job whose
dependencies are done in a process of its own, pinned to `cores_per_slot` cores, at most
`slots` at a time, in the order given (put the longest first).

Each job's output (its progress bar, logs, a traceback) goes to its own log file; the
console gets one line per job started and finished, and every `heartbeat_s` seconds the
newest progress line of each running job. A job that fails, or a process that dies (out
of memory, SIGKILL), stops the whole set: the running jobs are killed (their newest
checkpoints stay, so a rerun continues), and `JobFailed` names the job, its log and the
error's last line. The children die with the parent (`whmae.data.worker_pool.
die_with_parent`), so a killed demo leaves no orphans.

`slots=1` runs the jobs one after another in this process, with their output on the
console (the GPU profile: one process owns the accelerator).
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Job", "JobFailed", "default_slots", "run_jobs"]


@dataclasses.dataclass(frozen=True)
class Job:
    name: str  # e.g. "segmentation/unetr_mae"
    target: str  # "module:function", called with **kwargs in the job's process
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    after: tuple[str, ...] = ()  # names of the jobs it needs finished


class JobFailed(RuntimeError):
    def __init__(self, name: str, log: Path | None, reason: str):
        where = f" (log: {log})" if log else ""
        super().__init__(f"demo job {name} failed: {reason}{where}")
        self.name, self.log, self.reason = name, log, reason


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def default_slots(max_slots: int = 4, gib_per_slot: float = 3.0) -> int:
    """Parallel jobs for this machine: one per core, at most `max_slots`, and no more than
    the memory holds at `gib_per_slot` each (the cpu demo's runs peak at ~2.5 GiB)."""
    cores = len(usable_cores()) or (os.cpu_count() or 1)
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = gib_per_slot * max_slots
    return max(1, min(cores, max_slots, int(memory_gib // gib_per_slot)))


def _call(target: str, kwargs: dict) -> Any:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(**kwargs)


def _child(target: str, kwargs: dict, cores: list[int], log: str, conn, parent_pid: int) -> None:
    from whmae.data.worker_pool import die_with_parent

    die_with_parent(parent_pid)
    try:  # tqdm's default lock is a multiprocessing one, left behind by os._exit below
        import threading

        import tqdm

        tqdm.tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)  # before JAX starts: XLA sizes its pool from it
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        _call(target, kwargs)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, then exit 1
        traceback.print_exc()
        sys.stderr.flush()
        line = f"{type(error).__name__}: {error}".strip().splitlines()
        conn.send(line[0][:400] if line else type(error).__name__)
        conn.close()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    conn.send(None)
    conn.close()
    os._exit(0)  # no interpreter teardown: a library's lingering thread cannot hang it


def _log_path(log_dir: Path, name: str) -> Path:
    return log_dir / (name.replace("/", "_") + ".log")


def newest_progress(log: Path, limit: int = 110) -> str:
    """The last non-empty line (or progress-bar refresh) of a job's log."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    pieces = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    return pieces[-1][:limit] if pieces else ""


def _check(jobs: list[Job]) -> None:
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate job names in {names}")
    for job in jobs:
        unknown = [a for a in job.after if a not in names]
        if unknown:
            raise ValueError(f"job {job.name} waits for unknown jobs {unknown}")
    done: set[str] = set()
    left = list(jobs)
    while left:
        ready = [j for j in left if set(j.after) <= done]
        if not ready:
            raise ValueError(f"jobs wait for each other in a cycle: {[j.name for j in left]}")
        done.update(j.name for j in ready)
        left = [j for j in left if j.name not in done]


def run_jobs(
    jobs: list[Job], *, slots: int, log_dir: str | os.PathLike, cores_per_slot: int | None = None,
    heartbeat_s: float = 60.0, say: Callable[[str], None] | None = None,
) -> dict[str, dict]:  # fmt: skip
    """Run `jobs` (dependencies first, then in the order given), `slots` at a time.

    Returns {name: {"start_s", "end_s", "seconds", "cores"}} (times from the call's start).
    Raises JobFailed on the first job that fails; the running ones are killed first."""
    _check(jobs)
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times: dict[str, dict] = {}
    if slots <= 1:
        for job in _in_order(jobs):
            start = time.perf_counter() - t0
            say(f"-- {job.name}")
            _call(job.target, job.kwargs)
            end = time.perf_counter() - t0
            times[job.name] = dict(start_s=start, end_s=end, seconds=end - start, cores=[])
        return times

    cores = usable_cores()
    per_slot = cores_per_slot or max(1, len(cores) // slots)
    free = [cores[i * per_slot : (i + 1) * per_slot] for i in range(slots)] if cores else [
        [] for _ in range(slots)
    ]  # fmt: skip
    context = multiprocessing.get_context("spawn")
    pending, done = list(jobs), set()
    running: dict[str, tuple] = {}  # name -> (process, conn, start, slot cores)
    last_beat = time.perf_counter()
    try:
        while pending or running:
            for job in [j for j in pending if set(j.after) <= done]:
                if not free:
                    break
                slot = free.pop(0)
                log = _log_path(log_dir, job.name)
                log.write_text("")
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_child, args=(job.target, job.kwargs, slot, str(log), send, os.getpid()),
                    name=f"whmae-{job.name}", daemon=False,
                )  # fmt: skip
                process.start()
                send.close()
                running[job.name] = (process, receive, time.perf_counter() - t0, slot)
                pending.remove(job)
                on = f" on cores {slot}" if slot else ""
                say(f"-- {job.name} started{on} (log: {log})")
            if not running:  # unreachable after _check, kept as a guard against a hang
                raise RuntimeError(f"no job can start: {[j.name for j in pending]}")
            sentinels = {entry[0].sentinel: name for name, entry in running.items()}
            wait_s = max(1.0, heartbeat_s - (time.perf_counter() - last_beat))
            ready = multiprocessing.connection.wait(list(sentinels), timeout=wait_s)
            for sentinel in ready:
                name = sentinels[sentinel]
                process, receive, start, slot = running.pop(name)
                process.join()
                try:  # a process that died sent nothing: EOF
                    error = receive.recv() if receive.poll() else "no result"
                except EOFError:
                    error = "it ended without a result"
                receive.close()
                log = _log_path(log_dir, name)
                if process.exitcode != 0 or error is not None:
                    if process.exitcode and process.exitcode < 0:
                        reason = f"its process was killed by signal {-process.exitcode}"
                    else:
                        reason = str(error)
                    raise JobFailed(name, log, reason)
                end = time.perf_counter() - t0
                times[name] = dict(start_s=start, end_s=end, seconds=end - start, cores=slot)
                done.add(name)
                free.append(slot)
                say(f"-- {name} done in {end - start:.0f} s ({len(done)}/{len(jobs)} jobs, "
                    f"{end:.0f} s in all)")  # fmt: skip
            if time.perf_counter() - last_beat >= heartbeat_s and running:
                last_beat = time.perf_counter()
                for name in running:
                    say(f"   {name}: {newest_progress(_log_path(log_dir, name))}")
    finally:
        for process, receive, _, _ in running.values():
            if process.is_alive():
                process.kill()
            process.join()
            receive.close()
    return times


def _in_order(jobs: list[Job]) -> list[Job]:
    """The jobs in the order a single slot runs them: the first whose dependencies are
    done, repeatedly."""
    left, done, order = list(jobs), set(), []
    while left:
        job = next(j for j in left if set(j.after) <= done)
        order.append(job)
        done.add(job.name)
        left.remove(job)
    return order
