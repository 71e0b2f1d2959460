"""Test set-up: 8 emulated CPU devices, set before JAX initialises."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A compilation cache shared by the xdist workers and the subprocesses tests start.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "whmae-test-jax-cache")
)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def random_exam(index: int, frames: int = 4, size: int = 16) -> dict:
    """A small random exam following the schema of whmae.layout (for format tests)."""
    rng = np.random.default_rng(index)
    phenotypes = rng.normal(100, 20, 18).astype(np.float32)
    phenotypes[rng.random(18) < 0.2] = np.nan
    return {
        "eid": str(1_000_000 + index),
        "images": rng.integers(0, 256, (9, frames, size, size), dtype=np.uint8),
        "labels": rng.integers(0, 6, (9, frames, size, size), dtype=np.uint8),
        "phenotypes": phenotypes,
        "plane_mask": rng.random(9) > 0.2,
        # Per plane and frame (schema 2): some frames of labelled planes unlabelled.
        "label_mask": (rng.random(9) > 0.5)[:, None] & (np.arange(frames) % 3 != index % 3),
        "pixel_spacing": rng.uniform(1, 2, (9, 2)).astype(np.float32),
        "slice_spacing": np.float32(rng.uniform(8, 10)),
        "frame_duration": np.float32(rng.uniform(0.02, 0.04)),
    }


@pytest.fixture(scope="session")
def random_dataset(tmp_path_factory):
    """(path, exams by eid) of 41 random exams in 3 shards, written by dataset.shards."""
    from whmae.data.dataset.shards import finalize_dataset, write_shard

    out = tmp_path_factory.mktemp("random_dataset")
    exams = [random_exam(i) for i in range(41)]
    for shard in range(3):
        write_shard(exams[shard::3], out, shard, 3)
    finalize_dataset(out, {"maker": "tests.conftest.random_exam", "num_exams": 41})
    return out, {e["eid"]: e for e in exams}


TINY_DATASET = {"num_exams": 24, "size": 32, "frames": 10, "seed": 0, "num_shards": 2}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Path of a phantom dataset: 24 exams, images [9, 10, 32, 32], seed 0, 2 shards."""
    from whmae.data.synthetic.generate import generate_dataset

    out = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(out, **TINY_DATASET, workers=1, progress=False, figure=False)
    return out


@pytest.fixture
def fakes(tmp_path):
    """Recording fakes of gcloud, sbatch and srun on PATH: (env, calls(name)); launch_fakes.py."""
    from launch_fakes import make_fakes

    return make_fakes(tmp_path)
