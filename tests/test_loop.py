"""The training loop: learning, determinism, resuming on another mesh, NaN stop, metrics."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from whmae.pretrain import pretrain_task
from whmae.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from whmae.train.loop import Task, train
from whmae.train.metrics import REQUIRED_KEYS, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def pretrain_config(variant: str = "tiny"):
    spec = importlib.util.spec_from_file_location("pretrain_config", ROOT / "configs/pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _data_dir(dataset) -> str:
    return str(dataset[0] if isinstance(dataset, tuple) else dataset)


# ---- the real MAE learns -------------------------------------------------------------

MAE_STEPS = 100


@pytest.fixture(scope="module")
def mae_run(tiny_dataset, tmp_path_factory):
    """(workdir, summary) of the tiny MAE trained for MAE_STEPS steps, logging every step."""
    config = pretrain_config("tiny")
    config.data.dir = _data_dir(tiny_dataset)
    # No validation here (tests/test_validation.py): its ranked checkpoints would join
    # the interval ones.
    config.train.update(steps=MAE_STEPS, log_every=1, checkpoint_every=MAE_STEPS // 2, eval_every=0)
    config.optim.lr = 3e-3
    workdir = str(tmp_path_factory.mktemp("mae_run"))
    return workdir, train(config, workdir, pretrain_task(config))


def _per_exam_mean_mse(data_dir: str, batches: int = 8) -> float:
    """MSE of predicting each exam's mean intensity everywhere (its pixel variance)."""
    from whmae.data.dataset.pipeline import make_pipeline

    it = make_pipeline(data_dir, "train", batch_size=4, seed=1, fields=("images", "plane_mask"))
    errors = []
    for _ in range(batches):
        images = next(it)["images"].astype(np.float64) / 255.0
        errors.append(images.var(axis=(1, 2, 3, 4)))
    return float(np.mean(np.concatenate(errors)))


def test_pretraining_drives_reconstruction_loss_below_mean_intensity_guess(mae_run, tiny_dataset):
    workdir, summary = mae_run
    losses = [row["loss"] for row in read_metrics(workdir)]
    assert summary["step"] == MAE_STEPS and not summary["preempted"]
    assert len(losses) == MAE_STEPS
    # Smooth over 5 steps: single batches of 8 exams vary.
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # A model that learned only "grey everywhere per exam" stops at the per-exam pixel
    # variance; beating it clearly means it reconstructs structure (the heart, its motion).
    baseline = _per_exam_mean_mse(_data_dir(tiny_dataset))
    assert last < 0.5 * first, (first, last)
    assert last < 0.8 * baseline, (last, baseline)


def test_metrics_rows_per_logging_step_and_tensorboard_events(mae_run):
    workdir, _ = mae_run
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == list(range(1, MAE_STEPS + 1))
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row), row
        assert all(math.isfinite(row[k]) for k in REQUIRED_KEYS)
        assert row["step_time_s"] > 0 and row["exams_per_s"] > 0
    # warmup_steps=2 of the tiny AdamW schedule: lr rises from 0 over the first steps.
    assert rows[0]["lr"] < rows[2]["lr"]
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    steps = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1).all_steps()
    assert steps == [MAE_STEPS // 2, MAE_STEPS]


# ---- loop properties, on a small model that compiles in seconds -------------------------


class PixelAutoencoder(nnx.Module):
    """Per-frame linear autoencoder of images [B, S, T, H, W]; weights split over fsdp."""

    def __init__(self, pixels: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.xavier_uniform()
        self.encoder = nnx.Linear(
            pixels, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs
        )
        self.decoder = nnx.Linear(
            16, pixels, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs
        )


def pixel_loss(model: PixelAutoencoder, batch, key):
    images = batch["images"].astype(jnp.float32) / 255.0
    frames = images.reshape(*images.shape[:3], -1)
    kept = jax.random.bernoulli(key, 0.5, frames.shape)  # the key matters: dropout noise
    recon = model.decoder(jax.nn.gelu(model.encoder(frames * kept)))
    return jnp.mean((recon - frames) ** 2), {"kept_fraction": jnp.mean(kept)}


def pixel_task(image_size: int) -> Task:
    return Task(
        name="pixels",
        model_fn=lambda rngs: PixelAutoencoder(image_size * image_size, rngs=rngs),
        loss_fn=pixel_loss,
        fields=("images",),
    )


def pixel_config(data_dir: str, steps: int, *, data: int = 8, fsdp: int = 1):
    config = pretrain_config("tiny")
    config.data.dir = data_dir
    # Constant lr: runs of different length take identical first steps.
    config.optim.update(name="adam", lr=1e-2, warmup_steps=0, weight_decay=0.0)
    config.mesh.update(data=data, fsdp=fsdp, tensor=1, rules="fsdp")
    config.train.update(steps=steps, log_every=1, checkpoint_every=4, keep_checkpoints=5)
    return config


def _losses(workdir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir)}


def test_same_seed_same_losses_and_resume_on_another_mesh(tiny_dataset, tmp_path):
    data_dir = _data_dir(tiny_dataset)
    image_size = pretrain_config("tiny").model.image_size
    task = pixel_task(image_size)
    full = str(tmp_path / "full")
    train(pixel_config(data_dir, 8), full, task)
    short = str(tmp_path / "short")
    train(pixel_config(data_dir, 4), short, task)
    reference, resumed = _losses(full), _losses(short)
    # Same seed, same data order, same keys: bit-identical losses.
    assert [resumed[s] for s in range(1, 5)] == [reference[s] for s in range(1, 5)]
    assert len(set(reference.values())) == 8  # the run does move

    # Continue the data=8 checkpoint of step 4 on data=2 x fsdp=4.
    summary = train(pixel_config(data_dir, 8, data=2, fsdp=4), short, task)
    assert summary["start_step"] == 4 and summary["step"] == 8
    resumed = _losses(short)
    # Other mesh, other reduction order: equal up to float32 rounding.
    np.testing.assert_allclose(
        [resumed[s] for s in range(5, 9)], [reference[s] for s in range(5, 9)], rtol=1e-5
    )
    with Checkpointer(os.path.join(full, CHECKPOINT_DIR), save_every=1) as a:
        final_full = a.restore_arrays(8)
    with Checkpointer(os.path.join(short, CHECKPOINT_DIR), save_every=1) as b:
        final_short = b.restore_arrays(8)
    assert int(final_short["step"]) == 8
    for x, y in zip(jax.tree.leaves(final_full), jax.tree.leaves(final_short), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(
    tiny_dataset, tmp_path
):
    data_dir = _data_dir(tiny_dataset)
    image_size = pretrain_config("tiny").model.image_size
    config = pixel_config(data_dir, 8)
    # Adam moves every weight by ~lr in step 1; with lr 1e20 step 2's float32 forward
    # pass overflows (1e20 x 1e20 > 3e38), so step 1 is the last finite state.
    config.optim.lr = 1e20
    config.train.update(log_every=10, checkpoint_every=1)
    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"at step 2 .*Last good checkpoint: step 1"):
        train(config, workdir, pixel_task(image_size))
    with Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1) as checkpointer:
        assert checkpointer.all_steps() == [1]
        state = checkpointer.restore_arrays(1)
    assert int(state["step"]) == 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"]))


def test_pretrain_without_dataset_says_how_to_make_one(tmp_path):
    from whmae.pretrain import check_data_dir

    with pytest.raises(SystemExit, match="run `whmae-generate --out DIR"):
        check_data_dir(None)
    with pytest.raises(SystemExit, match="missing' does not exist"):
        check_data_dir(str(tmp_path / "missing"))
    assert check_data_dir(str(tmp_path)) == str(tmp_path)
