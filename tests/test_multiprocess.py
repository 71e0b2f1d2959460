"""Multi-process training for real: 2 processes x 4 CPU devices == 1 process x 8 devices.

`launch/local.sh` starts the processes (coordinator on 127.0.0.1); each reads its own
rows of every global batch, and the per-step losses must match the single-process run.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from whmae.data.dataset.pipeline import make_pipeline

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
GLOBAL_BATCH = 8  # the tiny config's data.batch_size


def _launch(data_dir, workdir: Path, processes: int, devices_per_process: int) -> list[dict]:
    """Run tiny pretraining with launch/local.sh; the metrics.jsonl rows of process 0."""
    command = [
        "bash", str(REPO / "launch/local.sh"),
        "--processes", str(processes),
        "--cpu-devices-per-process", str(devices_per_process),
        "--python", sys.executable,
        "--module", "whmae.pretrain",
        "--config", str(REPO / "configs/pretrain.py") + ":tiny",
        "--workdir", str(workdir),
        "--",
        f"--config.data.dir={data_dir}",
        f"--config.data.batch_size={GLOBAL_BATCH}",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=1000",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    logs = "".join(p.read_text() for p in sorted((workdir / "logs").glob("*.log")))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs[-3000:]}"
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """(one process x 8 devices, two processes x 4 devices): metrics rows and workdirs."""
    one = tmp_path_factory.mktemp("one_process")
    two = tmp_path_factory.mktemp("two_processes")
    return (_launch(tiny_dataset, one, 1, 8), one), (_launch(tiny_dataset, two, 2, 4), two)


def test_two_processes_train_like_one(runs):
    (single, _), (multi, workdir) = runs
    # The second process really joined one 8-device job.
    rank1 = (workdir / "logs/rank1.log").read_text()
    assert "process 1 of 2, 4 local / 8 global devices" in rank1
    losses = np.array([[r["loss"], r["grad_norm"]] for r in single])
    assert len(set(losses[:, 0])) == STEPS  # training moves the loss: a real comparison
    np.testing.assert_allclose([[r["loss"], r["grad_norm"]] for r in multi], losses, rtol=1e-5)


def test_processes_read_their_rows_of_the_global_batch(tiny_dataset):
    """Concatenating the processes' batches in process order gives the one-process batch
    (position matters: each row of a global batch draws its own mask)."""

    def batches(index, count):
        it = make_pipeline(
            tiny_dataset, batch_size=GLOBAL_BATCH // count, seed=5, fields=("eid",),
            process_index=index, process_count=count,
        )  # fmt: skip
        return [list(b["eid"]) for b in itertools.islice(it, 6)]  # crosses an epoch

    single = batches(0, 1)
    for count in (2, 4):
        shares = [batches(p, count) for p in range(count)]
        joined = [list(itertools.chain(*rows)) for rows in zip(*shares, strict=True)]
        assert joined == single
