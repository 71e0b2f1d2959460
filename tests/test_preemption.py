"""SIGTERM mid-run: `whmae.pretrain` saves, exits 0, and a restart repeats the exact losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from whmae.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from whmae.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
SIGNAL_AFTER_STEP = 3


def _pretrain_command(config_file: Path, workdir: Path, data_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "whmae.pretrain",
        f"--config={config_file}:tiny",
        f"--workdir={workdir}",
        f"--config.data.dir={data_dir}",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        # No interval checkpoints: the only mid-run checkpoint is the preemption one (no
        # validation either: it checkpoints the steps it ranks; resuming with validation
        # is tested in tests/test_validation.py).
        "--config.train.checkpoint_every=1000",
        "--config.train.eval_every=0",
    ]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """configs/pretrain.py with `data.dir` a string, so `--config.data.dir=` overrides it
    whatever its default (ml_collections cannot override a field whose value is None)."""
    path = tmp_path_factory.mktemp("config") / "pretrain_config.py"
    base = str(ROOT / "configs/pretrain.py")
    path.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('base', {base!r})\n"
        "base = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(base)\n\n\n"
        "def get_config(arg=None):\n"
        "    config = base.get_config(arg)\n"
        "    config.data.dir = config.data.dir or ''\n"
        "    return config\n"
    )
    return path


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    env.update(
        # Two devices keep the step sharded yet compile twice as fast as eight on 2 cores.
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        # The three runs compile the same step: the first compiles, the others load it.
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def _run(command, env, timeout=240) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(workdir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_metrics(str(workdir))]


def test_sigterm_saves_exits_zero_and_restart_repeats_uninterrupted_losses(
    tiny_dataset, tmp_path, config_file, subprocess_env
):
    data_dir = str(tiny_dataset[0] if isinstance(tiny_dataset, tuple) else tiny_dataset)
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    _run(_pretrain_command(config_file, reference_dir, data_dir), subprocess_env)
    reference = _losses(reference_dir)
    assert [step for step, _ in reference] == list(range(1, STEPS + 1))

    process = subprocess.Popen(
        _pretrain_command(config_file, preempted_dir, data_dir),
        env=subprocess_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not any(s >= SIGNAL_AFTER_STEP for s, _ in _losses(preempted_dir)):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never reached the signal step"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    assert "preempted: checkpoint saved at step" in stderr
    with Checkpointer(str(preempted_dir / CHECKPOINT_DIR), save_every=1) as checkpointer:
        saved = checkpointer.all_steps()
    assert len(saved) == 1 and SIGNAL_AFTER_STEP <= saved[0] < STEPS, saved
    # The preempted run logged exactly up to the step it saved.
    assert max(step for step, _ in _losses(preempted_dir)) == saved[0]

    resumed = _run(_pretrain_command(config_file, preempted_dir, data_dir), subprocess_env)
    assert f"done: step {STEPS}" in resumed.stderr
    # Every step once (no repeats after the restart) and the very same losses: the
    # parameters, optimizer state, data position and per-step keys were all restored.
    assert _losses(preempted_dir) == reference
