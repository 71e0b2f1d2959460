"""Checkpoints (Orbax), preemption signalling, metrics files and multi-host start-up."""

from __future__ import annotations

import os
import signal

import grain
import jax
import numpy as np
import optax
import pytest

from whmae.model.mae import MaskedAutoencoder, tiny_config
from whmae.train import distributed
from whmae.train.checkpoint import Checkpointer, PreemptionWatcher, abstract_like
from whmae.train.mesh import logical_rules, make_mesh
from whmae.train.metrics import REQUIRED_KEYS, MetricsWriter, read_metrics
from whmae.train.step import abstract_state, init_train_state


def _model_fn(rngs):
    return MaskedAutoencoder(tiny_config(), rngs=rngs)


def _mesh(data, fsdp):
    return make_mesh({"data": data, "fsdp": fsdp, "tensor": 1})


def _leaves_with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_state_saved_on_data8_restores_identically_onto_data2_fsdp4(tmp_path):
    tx = optax.adam(1e-3)
    rules = logical_rules("fsdp")
    _, state, _ = init_train_state(_model_fn, tx, _mesh(8, 1), rules, seed=3)
    with Checkpointer(str(tmp_path), save_every=1) as checkpointer:
        checkpointer.save(7, state, config={"note": "data=8"}, force=True)
        checkpointer.wait_until_finished()
        _, target, shardings = abstract_state(_model_fn, tx, _mesh(2, 4), rules, seed=0)
        restored = checkpointer.restore(7, target)
        assert checkpointer.restore_config(7) == {"note": "data=8"}

    saved = _leaves_with_paths(state)
    loaded = _leaves_with_paths(restored)
    assert [p for p, _ in saved] == [p for p, _ in loaded]
    fsdp_sharded = 0
    for (path, before), (_, after) in zip(saved, loaded, strict=True):
        # Seed 0 for the target proves the values come from disk, not from init.
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after), err_msg=str(path))
        assert after.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
        fsdp_sharded += "fsdp" in str(after.sharding.spec)
    # The new layout is really used: some parameters (and their Adam moments) split 4 ways.
    assert fsdp_sharded > 0
    assert jax.tree.leaves(shardings)[0].mesh.shape["fsdp"] == 4


def test_data_iterator_resumes_at_saved_position_and_old_checkpoints_are_pruned(tmp_path):
    dataset = grain.MapDataset.range(50).seed(5).shuffle().batch(3).to_iter_dataset()
    iterator = iter(dataset)
    state = {"w": jax.numpy.arange(4.0)}
    with Checkpointer(str(tmp_path), save_every=2, keep=2) as checkpointer:
        for step in range(1, 7):
            next(iterator)
            checkpointer.save(step, {"w": state["w"] * step}, iterator)
        expected = [next(iterator) for _ in range(3)]
        checkpointer.wait_until_finished()
        # Interval 2 saves steps 2, 4, 6; keep=2 leaves the newest two.
        assert checkpointer.all_steps() == [4, 6]
        fresh = iter(dataset)
        restored = checkpointer.restore(6, abstract_like(state), fresh)
        np.testing.assert_array_equal(restored["w"], np.arange(4.0) * 6)
        for want in expected:
            np.testing.assert_array_equal(next(fresh), want)
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
            checkpointer.restore(2, abstract_like(state))


def test_sigterm_sets_preemption_flag_and_previous_handler_returns():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.reached(2)
        assert watcher.reached(3)  # stays set until the loop acts on it
    assert signal.getsignal(signal.SIGTERM) == before


def test_metrics_rows_have_keys_nan_stays_parseable_and_tensorboard_written(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True) as writer:
        for step in (1, 2):
            writer.write(
                step,
                {
                    "loss": np.float32(1.0 / step),
                    "lr": 1e-3,
                    "grad_norm": np.array(0.5),
                    "step_time_s": 0.1,
                    "exams_per_s": 80.0,
                    "masked_loss": float("nan") if step == 2 else 0.3,
                },
            )
        with pytest.raises(ValueError, match="'loss' must be a scalar"):
            writer.write(3, {"loss": np.zeros(2)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a row cut off mid-write is not returned
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(set(REQUIRED_KEYS) <= set(r) for r in rows)
    assert rows[1]["loss"] == 0.5 and rows[1]["masked_loss"] == "nan"
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_disabled_metrics_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "other"), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    ("env", "launcher"),
    [
        ({}, None),
        ({"SLURM_NTASKS": "1"}, None),
        ({"SLURM_NTASKS": "4"}, "slurm"),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, None),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "cloud_tpu"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "SLURM_NTASKS": "4"}, "explicit"),
    ],
)
def test_launcher_detection_from_environment(monkeypatch, env, launcher):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_launcher() == launcher


def test_single_process_is_not_initialised_and_bad_env_is_named(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_initialize() is False
    assert jax.process_count() == 1
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be set"):
        distributed.maybe_initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID=2 outside 0..1"):
        distributed.maybe_initialize()
    with pytest.raises(ValueError, match="expected one of"):
        distributed.maybe_initialize("sometimes")
    assert not jax.distributed.is_initialized()
