"""Fakes for the launch-script tests (test_launch*.py): `gcloud`, `sbatch` and `srun` on
PATH that record their argv, so tests see exactly what the scripts would run; `run` starts
a launch script. The `fakes` fixture (conftest.py) calls `make_fakes`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SEP = "\x1f"

FAKE_TOOL = """#!/usr/bin/env bash
# Fake {name}: record argv (fields split by 0x1f), optionally fail on one verb.
printf '%s\\x1f' "$@" >> "$FAKE_RECORD_DIR/{name}"
printf '\\n' >> "$FAKE_RECORD_DIR/{name}"
for arg in "$@"; do
  if [[ -n ${{FAKE_FAIL_ON:-}} && $arg == "$FAKE_FAIL_ON" ]]; then exit 1; fi
done
{body}
"""


def make_fakes(tmp_path: Path):
    """PATH with recording fakes of gcloud, sbatch and srun; returns (env, calls(name))."""
    bin_dir, record_dir = tmp_path / "fake-bin", tmp_path / "records"
    bin_dir.mkdir()
    record_dir.mkdir()
    bodies = {
        "gcloud": "",
        "sbatch": 'cp "${@: -1}" "$FAKE_RECORD_DIR/submitted.sbatch"; echo 4242',
        # srun: also record the environment the job step would see.
        "srun": 'echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS-unset}'
        ' FAKE_VENV=${FAKE_VENV-unset}" > "$FAKE_RECORD_DIR/srun.env"',
    }
    for name, body in bodies.items():
        tool = bin_dir / name
        tool.write_text(FAKE_TOOL.format(name=name, body=body))
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.update(FAKE_RECORD_DIR=str(record_dir), TMPDIR=str(tmp_path))
    env.pop("CUDA_VISIBLE_DEVICES", None)

    def calls(name: str) -> list[list[str]]:
        path = record_dir / name
        if not path.exists():
            return []
        return [line.split(SEP)[:-1] for line in path.read_text().splitlines()]

    return env, calls


def run(script: str, *args: str, env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading NAME=VALUE words of a command line, and the rest."""
    env = {}
    while words and "=" in words[0] and words[0].split("=")[0].isidentifier():
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words
