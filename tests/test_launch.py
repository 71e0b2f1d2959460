"""Launch scripts, local.sh and --help: exact --dry-run commands, argument errors, and a real
run: two JAX processes through launch/local.sh (CPU, 2 x 2 emulated devices). Cluster
scripts: test_launch_clusters.py; fakes of gcloud / sbatch / srun: launch_fakes.py.
"""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from launch_fakes import REPO, run, split_env

# ----------------------------------------------------------------------------- local.sh


def test_local_dry_run_two_cpu_processes_prints_one_exact_command_per_rank(fakes, tmp_path):
    env, _ = fakes
    env["XLA_FLAGS"] = "--xla_cpu_fast=false --xla_force_host_platform_device_count=8"
    workdir = tmp_path / "run"
    result = run(
        "local.sh", "--processes", "2", "--cpu-devices-per-process", "4", "--config",
        "configs/pretrain.py:tiny", "--workdir", str(workdir), "--python", "python3",
        "--dry-run", "--", "--config.train.steps=10", "--config.name=two words", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    coordinators = set()
    for rank, line in enumerate(lines):
        rank_env, words = split_env(shlex.split(line))
        assert rank_env["JAX_PROCESS_ID"] == str(rank)
        assert rank_env["JAX_NUM_PROCESSES"] == "2"
        assert rank_env["JAX_PLATFORMS"] == "cpu"
        # The inherited device count is replaced, other inherited flags kept.
        assert rank_env["XLA_FLAGS"] == (
            "--xla_cpu_fast=false --xla_force_host_platform_device_count=4"
        )
        assert "CUDA_VISIBLE_DEVICES" not in rank_env
        coordinators.add(rank_env["JAX_COORDINATOR_ADDRESS"])
        assert words == [
            "python3", "-m", "whmae.pretrain", "--config", "configs/pretrain.py:tiny",
            "--workdir", str(workdir), "--config.train.steps=10", "--config.name=two words",
            ">", f"{workdir}/logs/rank{rank}.log", "2>&1",
        ]  # fmt: skip
    (coordinator,) = coordinators
    host, port = coordinator.split(":")
    assert host == "127.0.0.1" and 1 <= int(port) < 65536
    assert not (workdir / "logs").exists(), "--dry-run must not create anything"


def test_local_dry_run_gpu_processes_own_disjoint_gpus(fakes, tmp_path):
    env, _ = fakes
    result = run(
        "local.sh", "--processes", "4", "--gpus-per-process", "2", "--workdir", str(tmp_path),
        "--port", "5555", "--dry-run", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    envs = [split_env(shlex.split(line))[0] for line in result.stdout.splitlines()]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3", "4,5", "6,7"]
    assert {e["JAX_COORDINATOR_ADDRESS"] for e in envs} == {"127.0.0.1:5555"}
    assert all("XLA_FLAGS" not in e and "JAX_PLATFORMS" not in e for e in envs)
    # Within an inherited CUDA_VISIBLE_DEVICES the processes split the listed GPUs.
    env["CUDA_VISIBLE_DEVICES"] = "4,5,6,7"
    result = run(
        "local.sh", "--processes", "2", "--gpus-per-process", "2", "--workdir", str(tmp_path),
        "--dry-run", env=env,
    )  # fmt: skip
    envs = [split_env(shlex.split(line))[0] for line in result.stdout.splitlines()]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4,5", "6,7"]


def test_local_dry_run_single_process_sets_no_distributed_env(fakes):
    env, _ = fakes
    result = run("local.sh", "--module", "whmae.demo", "--dry-run", "--", "--x=1", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["python -m whmae.demo --x=1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "0"], "--processes must be an integer >= 1"),
        (["--processes", "two"], "--processes must be an integer >= 1"),
        (["--processes", "2"], "needs --workdir"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--cpu-devices-per-process"], "needs a value"),
        (["--cpu-devices-per-process", "2", "--gpus-per-process", "1"], "exclude each other"),
        (["--processes", "2", "--workdir", "w", "--gpus-per-process", "2"], "need 4 GPUs"),
    ],
)
def test_local_bad_arguments_fail_clearly(fakes, args, message):
    env, _ = fakes
    env["CUDA_VISIBLE_DEVICES"] = "0,1"  # for the too-few-GPUs case
    result = run("local.sh", *args, "--dry-run", env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def probe_reports(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("PROBE ")]


def test_local_two_processes_form_one_jax_job(fakes, tmp_path):
    env, _ = fakes
    env["PYTHONPATH"] = str(REPO / "tests")
    workdir = tmp_path / "probe"
    result = run(
        "local.sh", "--processes", "2", "--cpu-devices-per-process", "2", "--module",
        "distributed_probe", "--workdir", str(workdir), "--python", sys.executable, "--",
        "--tag", "pass through", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    reports = [probe_reports((workdir / f"logs/rank{r}.log").read_text()) for r in (0, 1)]
    for rank, (report,) in enumerate(reports):
        assert report["process_index"] == rank
        assert report["process_count"] == 2
        assert report["local_device_count"] == 2
        assert report["device_count"] == 4
        assert report["global_sum"] == 2 * 1 + 2 * 2  # each rank adds (rank + 1) per device
        assert report["tag"] == "pass through"
    assert probe_reports(result.stdout) == reports[0], "rank 0's log is shown on stdout"


def test_local_failing_rank_stops_the_job(fakes, tmp_path):
    env, _ = fakes
    env["PYTHONPATH"] = str(REPO / "tests")
    result = run(
        "local.sh", "--processes", "2", "--cpu-devices-per-process", "1", "--module",
        "distributed_probe", "--workdir", str(tmp_path), "--python", sys.executable, "--",
        "--fail-rank", "1", env=env,
    )  # fmt: skip
    # Rank 0 would wait for rank 1 in jax.distributed.initialize; the launcher stops it.
    assert result.returncode == 1
    assert "rank 1 exited with status 1" in result.stderr
    assert "fails on purpose" in result.stderr
    assert probe_reports((tmp_path / "logs/rank0.log").read_text()) == []


@pytest.mark.parametrize("script", ["local.sh", "slurm.sh", "tpu_pod.sh"])
def test_help_describes_usage_and_runs_nothing(fakes, script):
    env, calls = fakes
    result = run(script, "--help", env=env)
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: launch/{script}")
    assert "--dry-run" in result.stdout and "Example" in result.stdout
    assert calls("gcloud") == calls("sbatch") == []
