"""Launch scripts for clusters, slurm.sh and tpu_pod.sh: exact --dry-run output, argument
errors, and real runs against recording fakes of sbatch, srun and gcloud (launch_fakes.py).
"""

from __future__ import annotations

import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest
from launch_fakes import REPO, run

# ----------------------------------------------------------------------------- slurm.sh

SLURM_ARGS = [
    "--account", "acct1", "--partition", "gpu-a100", "--nodes", "4", "--gpus-per-node", "8",
    "--time", "12:00:00", "--config", "configs/pretrain.py:base", "--sbatch-option=--qos=high",
]  # fmt: skip


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_slurm_dry_run_renders_directives_and_srun_without_submitting(fakes, tmp_path):
    env, calls = fakes
    workdir = tmp_path / "run"
    result = run(
        "slurm.sh", *SLURM_ARGS, "--tasks-per-node", "gpu", "--workdir", str(workdir),
        "--venv", "/opt/venv", "--dry-run", "--", "--config.train.steps=10", "--config.n=a b",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sbatch_lines(result.stdout) == [
        "#SBATCH --job-name=whmae",
        "#SBATCH --account=acct1",
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=12:00:00",
        f"#SBATCH --chdir={REPO}",
        f"#SBATCH --output={workdir}/logs/%x-%j.log",
        "#SBATCH --qos=high",
    ]
    lines = result.stdout.splitlines()
    assert "MODULE=whmae.pretrain" in lines and "VENV=/opt/venv" in lines
    args_line = next(line for line in lines if line.startswith("ARGS=("))
    assert shlex.split(args_line[len("ARGS=(") : -1]) == [
        "--config", "configs/pretrain.py:base", "--workdir", str(workdir),
        "--config.train.steps=10", "--config.n=a b",
    ]  # fmt: skip
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and '--output="$LOG_DIR/%x-%j-%t.log"' in srun
    assert 'python -m "$MODULE" "${ARGS[@]}"' in srun
    # One task per GPU: JAX's SLURM detection picks GPU SLURM_LOCALID, so no device list.
    assert "export JAX_LOCAL_DEVICE_IDS" not in result.stdout
    assert lines[-1] == f"sbatch --parsable {workdir}/whmae.sbatch"
    assert calls("sbatch") == [] and not workdir.exists()


def test_slurm_one_task_per_node_lists_all_gpus(fakes, tmp_path):
    env, _ = fakes
    result = run("slurm.sh", *SLURM_ARGS, "--workdir", str(tmp_path), "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --ntasks-per-node=1" in sbatch_lines(result.stdout)
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in result.stdout.splitlines()


def test_slurm_submits_the_rendered_script_and_its_job_step_runs_srun(fakes, tmp_path):
    env, calls = fakes
    workdir, venv = tmp_path / "run", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/activate").write_text("export FAKE_VENV=active\n")
    args = [*SLURM_ARGS, "--workdir", str(workdir), "--venv", str(venv)]
    extra = ["--", "--config.train.steps=10", "--config.n=a b"]
    dry = run("slurm.sh", *args, "--dry-run", *extra, env=env)
    result = run("slurm.sh", *args, *extra, env=env)
    assert result.returncode == 0, result.stderr
    script = workdir / "whmae.sbatch"
    assert calls("sbatch") == [["--parsable", str(script)]]
    assert "submitted job 4242" in result.stdout
    assert (workdir / "logs").is_dir()
    rendered = dry.stdout.split("# sbatch command")[0]
    assert script.read_text() == rendered
    # Run the job script as SLURM would (bash), with the fake srun.
    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    assert calls("srun") == [
        [
            "--kill-on-bad-exit=1", f"--output={workdir}/logs/%x-%j-%t.log", "python", "-m",
            "whmae.pretrain", "--config", "configs/pretrain.py:base", "--workdir", str(workdir),
            "--config.train.steps=10", "--config.n=a b",
        ]
    ]  # fmt: skip
    srun_env = (Path(env["FAKE_RECORD_DIR"]) / "srun.env").read_text().split()
    assert srun_env == ["JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "FAKE_VENV=active"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--workdir is required"),
        (["--workdir", "w", "--tasks-per-node", "3"], "--tasks-per-node must be"),
        (["--workdir", "w", "--nodes", "0"], "--nodes must be an integer >= 1"),
        (["--workdir", "gs://bucket/run"], "shared filesystem path"),
        (["--workdir", "w", "--time", "soon"], "--time must look like"),
        (["--workdir", "w", "--sbatch-option", "qos=high"], "must be an sbatch option"),
        (["--workdir", "w", "extra"], "unknown argument 'extra'"),
    ],
)
def test_slurm_bad_arguments_fail_clearly(fakes, args, message):
    env, calls = fakes
    result = run("slurm.sh", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert calls("sbatch") == []


# ----------------------------------------------------------------------------- tpu_pod.sh

TPU_ARGS = [
    "--name", "whmae-pod", "--zone", "us-west4-a", "--project", "proj-1", "--accelerator-type",
    "v5litepod-256", "--version", "v2-alpha-tpuv5-lite", "--bucket", "gs://bkt/whmae/",
    "--config", "configs/pretrain.py:base",
]  # fmt: skip
LOCATION = ["--zone=us-west4-a", "--project=proj-1"]


def ssh_command(words: list[str]) -> str:
    (command,) = [w[len("--command=") :] for w in words if w.startswith("--command=")]
    return command


def test_tpu_dry_run_all_prints_every_command_and_runs_none(fakes, tmp_path):
    env, calls = fakes
    result = run(
        "tpu_pod.sh", "all", *TPU_ARGS, "--spot", "--dry-run", "--", "--config.n=a b", env=env
    )
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line[0] != "#"]
    gcloud = [c for c in commands if c[0] == "gcloud"]
    assert [c[:5] for c in gcloud] == [
        ["gcloud", "compute", "tpus", "tpu-vm", verb] for verb in ("create", "scp", "ssh", "ssh")
    ] + [["gcloud", "compute", "tpus", "tpu-vm", "delete"]]
    create, scp, setup, run_, delete = gcloud
    assert create[5:] == [
        "whmae-pod", "--accelerator-type=v5litepod-256", "--version=v2-alpha-tpuv5-lite",
        "--spot", *LOCATION,
    ]  # fmt: skip
    tarball = str(tmp_path / "whmae-whmae-pod.tar.gz")
    assert scp[5:] == [tarball, "whmae-pod:whmae.tar.gz", "--worker=all", *LOCATION]
    (archive,) = [c for c in commands if c[0] == "git"]
    assert archive == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    assert setup[5:7] == ["whmae-pod", "--worker=all"] and setup[-2:] == LOCATION
    assert "'jax[tpu]==0.10.2'" in ssh_command(setup) and "pip install -q -e" in ssh_command(setup)
    assert run_[5:7] == ["whmae-pod", "--worker=all"] and run_[-2:] == LOCATION
    program = (
        "python -m whmae.pretrain --config configs/pretrain.py:base --workdir"
        " gs://bkt/whmae/runs/whmae-pod --config.data.dir=gs://bkt/whmae/data '--config.n=a b'"
    )
    assert program in ssh_command(run_)
    assert delete[5:] == ["whmae-pod", "--quiet", *LOCATION]
    assert calls("gcloud") == [] and not Path(tarball).exists()
    for command in (setup, run_):  # the remote commands are valid bash
        check = subprocess.run(["bash", "-n", "-c", ssh_command(command)], capture_output=True)
        assert check.returncode == 0, check.stderr


def test_tpu_all_calls_gcloud_in_order_and_ships_the_repo(fakes, tmp_path):
    env, calls = fakes
    result = run("tpu_pod.sh", "all", *TPU_ARGS, "--preemptible", env=env)
    assert result.returncode == 0, result.stderr
    verbs = [c[3] for c in calls("gcloud")]
    assert verbs == ["create", "scp", "ssh", "ssh", "delete"]
    assert "--preemptible" in calls("gcloud")[0]
    with tarfile.open(tmp_path / "whmae-whmae-pod.tar.gz") as archive:
        names = archive.getnames()
    assert "pyproject.toml" in names and "launch/tpu_pod.sh" in names


def test_tpu_all_deletes_the_slice_when_run_fails_unless_keep(fakes):
    env, calls = fakes
    # The fake gcloud fails on the run step's ssh (its exact --command word).
    dry_run = run("tpu_pod.sh", "run", *TPU_ARGS, "--dry-run", env=env).stdout
    env["FAKE_FAIL_ON"] = "--command=" + ssh_command(shlex.split(dry_run))
    failed = run("tpu_pod.sh", "all", *TPU_ARGS, env=env)
    assert failed.returncode == 1
    assert [c[3] for c in calls("gcloud")] == ["create", "scp", "ssh", "ssh", "delete"]
    assert "deleting whmae-pod" in failed.stderr
    (Path(env["FAKE_RECORD_DIR"]) / "gcloud").unlink()
    kept = run("tpu_pod.sh", "all", *TPU_ARGS, "--keep", env=env)
    assert kept.returncode == 1
    assert [c[3] for c in calls("gcloud")] == ["create", "scp", "ssh", "ssh"]


def test_tpu_create_reuse_skips_an_existing_slice(fakes):
    env, calls = fakes
    result = run("tpu_pod.sh", "create", *TPU_ARGS, "--reuse", env=env)
    assert result.returncode == 0, result.stderr
    assert [c[3] for c in calls("gcloud")] == ["describe"]
    env["FAKE_FAIL_ON"] = "describe"  # no such slice yet
    result = run("tpu_pod.sh", "create", *TPU_ARGS, "--reuse", env=env)
    assert result.returncode == 0, result.stderr
    assert [c[3] for c in calls("gcloud")] == ["describe", "describe", "create"]


def test_tpu_run_command_keeps_status_and_saves_each_worker_log(fakes, tmp_path):
    """Execute the remote run command locally, with a fake home, python, curl and gcloud."""
    env, calls = fakes
    words = shlex.split(run("tpu_pod.sh", "run", *TPU_ARGS, "--dry-run", "--", "--x=a b",
                            env=env).stdout)  # fmt: skip
    home, fake_bin = tmp_path / "home", tmp_path / "remote-bin"
    (home / "whmae").mkdir(parents=True)
    (home / "whmae-venv/bin").mkdir(parents=True)
    (home / "whmae-venv/bin/activate").write_text(f"export PATH={fake_bin}:$PATH\n")
    fake_bin.mkdir()
    tools = {
        "python": 'printf "%s|" "$@" > "$FAKE_RECORD_DIR/python.args"; echo trained; exit 7',
        "curl": "echo 3",  # the metadata server's agent-worker-number
    }
    for name, body in tools.items():
        (fake_bin / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (fake_bin / name).chmod(0o755)
    worker = subprocess.run(
        ["bash", "-c", ssh_command(words)], env=dict(env, HOME=str(home)), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert worker.returncode == 7, worker.stderr  # the program's status, not tee's
    assert "trained" in worker.stdout
    assert (home / "whmae-logs/worker3.log").read_text() == "trained\n"
    args = (Path(env["FAKE_RECORD_DIR"]) / "python.args").read_text().split("|")[:-1]
    assert args == [
        "-m", "whmae.pretrain", "--config", "configs/pretrain.py:base", "--workdir",
        "gs://bkt/whmae/runs/whmae-pod", "--config.data.dir=gs://bkt/whmae/data", "--x=a b",
    ]  # fmt: skip
    ((*copy, destination),) = calls("gcloud")
    assert copy == ["storage", "cp", str(home / "whmae-logs/worker3.log")]
    assert destination.startswith("gs://bkt/whmae/runs/whmae-pod/logs/worker3-")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "n", "--zone", "z"], "a subcommand is required"),
        (["run", "--name", "n"], "--zone is required"),
        (["delete", "--name", "Bad_Name", "--zone", "z"], "must be lower-case"),
        (["create", "--name", "n", "--zone", "z", "--version", "v"], "needs --accelerator-type"),
        (["run", "--name", "n", "--zone", "z", "--bucket", "/local/dir"], "must be a gs:// path"),
        (["run", "--name", "n", "--zone", "z"], "needs --bucket"),
        (
            ["run", "--name", "n", "--zone", "z", "--bucket", "gs://b", "--data-dir", "rel/data"],
            "gs:// path or an absolute path",
        ),
        (["delete", "--name", "n", "--zone", "z", "--", "--x=1"], "only apply to run and all"),
        (["create", "create", "--name", "n"], "two subcommands"),
        (["all", "--spot", "--preemptible"], "exclude each other"),
    ],
)
def test_tpu_bad_arguments_fail_clearly(fakes, args, message):
    env, calls = fakes
    result = run("tpu_pod.sh", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert calls("gcloud") == []
