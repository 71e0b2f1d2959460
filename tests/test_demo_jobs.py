"""The demo's runs side by side (`whmae.demo_jobs`): order, overlap, cores, failures, and
no orphans. The jobs here are this module's functions, run in spawned processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from whmae import demo
from whmae.demo_jobs import Job, JobFailed, run_jobs
from whmae.demo_profiles import get_profile

HERE = Path(__file__).resolve().parent


def record(out: str, seconds: float = 0.0) -> None:
    """A job: writes its start, end, pid and cores to `out`."""
    start = time.time()
    time.sleep(seconds)
    cores = sorted(os.sched_getaffinity(0))
    Path(out).write_text(json.dumps(dict(start=start, end=time.time(), pid=os.getpid(),
                                         cores=cores)))  # fmt: skip


def fail(message: str, delay: float = 0.0) -> None:
    time.sleep(delay)
    raise ValueError(message)


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def pid_then_sleep(out: str, seconds: float) -> None:
    Path(out).write_text(str(os.getpid()))
    time.sleep(seconds)


def _job(name, target, after=(), **kwargs):
    return Job(name, f"test_demo_jobs:{target}", kwargs, tuple(after))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_jobs_run_side_by_side_on_their_own_cores_after_what_they_need(tmp_path):
    out = {name: str(tmp_path / f"{name}.json") for name in "abc"}
    jobs = [
        _job("a", "record", out=out["a"], seconds=2.0),
        _job("c", "record", after=["a"], out=out["c"]),  # first in order, but waits for a
        _job("b", "record", out=out["b"], seconds=2.0),
    ]
    lines = []
    times = run_jobs(jobs, slots=2, log_dir=tmp_path / "logs", say=lines.append)
    got = {name: json.loads(Path(path).read_text()) for name, path in out.items()}
    # a and b overlap; c starts only after a ended; three distinct processes.
    assert got["b"]["start"] < got["a"]["end"] and got["a"]["start"] < got["b"]["end"]
    assert got["c"]["start"] >= got["a"]["end"]
    assert len({g["pid"] for g in got.values()} | {os.getpid()}) == 4
    if len(os.sched_getaffinity(0)) >= 2:  # each slot pinned to its own core
        assert len(got["a"]["cores"]) == len(got["b"]["cores"]) == 1
        assert got["a"]["cores"] != got["b"]["cores"]
    assert set(times) == {"a", "b", "c"} and times["c"]["start_s"] >= times["a"]["end_s"]
    assert sum("done in" in line for line in lines) == 3
    assert all((tmp_path / "logs" / f"{n}.log").exists() for n in "abc")


def test_one_slot_runs_in_this_process_in_dependency_order(tmp_path):
    out = {name: str(tmp_path / f"{name}.json") for name in "ab"}
    jobs = [_job("b", "record", after=["a"], out=out["b"]), _job("a", "record", out=out["a"])]
    sys.path.insert(0, str(HERE))
    try:
        run_jobs(jobs, slots=1, log_dir=tmp_path / "logs", say=lambda _: None)
    finally:
        sys.path.remove(str(HERE))
    got = {name: json.loads(Path(path).read_text()) for name, path in out.items()}
    assert got["a"]["pid"] == got["b"]["pid"] == os.getpid()
    assert got["a"]["end"] <= got["b"]["start"]


def test_a_failing_job_stops_the_rest_and_names_its_error_and_log(tmp_path):
    pid_file = tmp_path / "slow.pid"
    jobs = [
        _job("slow", "pid_then_sleep", out=str(pid_file), seconds=120),
        _job("bad", "fail", message="exam 1000007: images missing", delay=1.0),
        _job("never", "record", after=["bad"], out=str(tmp_path / "never.json")),
    ]
    start = time.perf_counter()
    with pytest.raises(JobFailed) as raised:
        run_jobs(jobs, slots=2, log_dir=tmp_path / "logs", say=lambda _: None)
    assert time.perf_counter() - start < 60
    message = str(raised.value)
    assert "bad" in message and "ValueError: exam 1000007: images missing" in message
    assert str(tmp_path / "logs" / "bad.log") in message
    assert "Traceback" in (tmp_path / "logs" / "bad.log").read_text()
    assert not _alive(int(pid_file.read_text())), "the running job was left behind"
    assert not (tmp_path / "never.json").exists()


def test_a_killed_job_is_reported_with_its_signal(tmp_path):
    with pytest.raises(JobFailed, match="killed by signal 9"):
        run_jobs([_job("oom", "sigkill_self")], slots=2, log_dir=tmp_path, say=lambda _: None)


def test_jobs_die_with_a_killed_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from whmae.demo_jobs import Job, run_jobs
        if __name__ == "__main__":
            run_jobs([Job("sleep", "test_demo_jobs:pid_then_sleep",
                          dict(out={str(pid_file)!r}, seconds=120))],
                     slots=2, log_dir={str(tmp_path / "logs")!r})
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and parent.poll() is None, "the job never started"
        time.sleep(0.2)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the job outlived its killed parent"


def test_bad_job_graphs_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown jobs"):
        run_jobs([_job("a", "fail", after=["nope"], message="x")], slots=2, log_dir=tmp_path)
    cycle = [_job("a", "fail", after=["b"], message="x"), _job("b", "fail", after=["a"],
                                                               message="x")]  # fmt: skip
    with pytest.raises(ValueError, match="cycle"):
        run_jobs(cycle, slots=2, log_dir=tmp_path)


def test_the_demos_jobs_wait_for_exactly_what_they_read(tmp_path):
    cpu = get_profile("cpu")
    built = demo.demo_jobs(cpu, cpu.steps, tmp_path / "data", tmp_path / "runs", tmp_path, "c")
    jobs = {j.name: j for j in built}
    mae = ("pretrain/mae_all_planes",)
    for name, job in jobs.items():
        if job.target == "whmae.demo:finetune_job":
            pretrained = name in ("phenotype/mae_probe", "phenotype/mae_finetuned",
                                  "segmentation/unetr_mae")  # fmt: skip
            assert job.after == (mae if pretrained else ()), name
    assert set(jobs["evaluate/reconstruction"].after) == {f"pretrain/{n}" for n in
                                                          demo.PRETRAIN_RUNS}  # fmt: skip
    assert set(jobs["evaluate/phenotypes"].after) == {f"phenotype/{n}" for n in
                                                      demo.PHENOTYPE_RUNS}  # fmt: skip
    assert set(jobs["evaluate/representation"].after) == {*mae, "phenotype/mae_finetuned"}
    # Every run's workdir is its own, and the gpu profile's runs go one at a time.
    workdirs = [j.kwargs["workdir"] for j in jobs.values() if "workdir" in j.kwargs]
    assert len(workdirs) == len(set(workdirs)) == 10
    assert get_profile("gpu").max_jobs == 1


def test_the_demo_command_ends_a_failed_job_in_one_line_and_exit_1(monkeypatch, capsys):
    def failing_demo(*args, **kwargs):
        raise JobFailed("phenotype/resnet50", Path("logs/phenotype_resnet50.log"), "OOM")

    monkeypatch.setattr(demo, "run_demo", failing_demo)
    assert demo.main(["--workdir", "unused"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("whmae-demo: demo job phenotype/resnet50 failed: OOM")
    assert "logs/phenotype_resnet50.log" in line and "rerunning the same command" in line
