"""Phenotype fine-tuning: bit-exact encoder loading, probe vs full fine-tuning, masked
standardised loss, the whmae.finetune run and the prediction API reading it back."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from whmae.data.dataset.pipeline import make_pipeline
from whmae.finetune import finetune, finetune_task
from whmae.layout import PAPER_PHENOTYPES, phenotype_index
from whmae.model.io import load_config, save_model
from whmae.model.mae import MaskedAutoencoder, tiny_config
from whmae.tasks.config import load_config_file, resolve
from whmae.tasks.encoder_init import check_encoder_config
from whmae.tasks.phenotype import phenotype_loss_values, train_stats
from whmae.tasks.predict import load_finetuned, predict_phenotypes
from whmae.train.mesh import logical_rules, make_mesh
from whmae.train.optim import make_optimizer
from whmae.train.step import init_train_state

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def phenotype_config(variant: str, data_dir, checkpoint=""):
    config = load_config_file(ROOT / "configs/phenotype.py", variant)
    config.data.dir = str(data_dir)
    config.init.checkpoint = str(checkpoint)
    config.train.update(steps=STEPS, log_every=1, checkpoint_every=STEPS)
    return config


def flat_params(params) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(params)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(checkpoint dir, encoder params by path) of a freshly initialised tiny MAE."""
    model = MaskedAutoencoder(tiny_config(), rngs=nnx.Rngs(7))
    directory = tmp_path_factory.mktemp("pretrained")
    save_model(directory, model)
    params = flat_params(nnx.state(model, nnx.Param))
    return directory, params


def encoder_of(params: dict) -> dict:
    return {path[1:]: v for path, v in params.items() if path[0] == "encoder"}


def fresh_state(config):
    """The loop's state before and after `init_params` (same seed as training)."""
    task = finetune_task(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    mesh = make_mesh(config.mesh)
    _, state, _ = init_train_state(
        task.model_fn, tx, mesh, logical_rules(config.mesh.rules), config.train.seed
    )
    before = flat_params(state.params)
    return before, flat_params(task.init_params(state).params)


def test_encoder_loads_bit_exactly_from_the_pretraining_checkpoint(tiny_dataset, pretrained):
    checkpoint, mae_params = pretrained
    config = resolve(phenotype_config("tiny", tiny_dataset, checkpoint))
    before, after = fresh_state(config)
    encoder = encoder_of(after)
    expected = {p: v for p, v in mae_params.items() if p[0] in ("patch_embed", "cls_token",
                "encoder_blocks", "encoder_norm")}  # fmt: skip
    assert set(encoder) == set(expected)
    for path, value in expected.items():
        assert encoder[path].dtype == value.dtype
        np.testing.assert_array_equal(encoder[path], value, err_msg=str(path))
    # The random init was really replaced, and the head left as it was.
    assert not np.array_equal(encoder_of(before)[("cls_token",)], expected[("cls_token",)])
    for path, value in before.items():
        if path[0] != "encoder":
            np.testing.assert_array_equal(after[path], value)


def test_encoder_mismatch_names_the_field(pretrained):
    checkpoint, _ = pretrained
    with pytest.raises(ValueError, match="width: config 65 vs checkpoint 33"):
        check_encoder_config(
            tiny_config(width=65, num_heads=5), load_config(checkpoint), str(checkpoint)
        )
    with pytest.raises(ValueError, match="not pretrained"):
        check_encoder_config(tiny_config(planes=(0, 1)), tiny_config(planes=(3, 4)), "ckpt")
    check_encoder_config(tiny_config(planes=(3, 4, 5, 6, 7, 8)), tiny_config(), "ckpt")


def test_mode_and_init_are_checked(tiny_dataset):
    with pytest.raises(ValueError, match="init.checkpoint"):
        resolve(phenotype_config("tiny", tiny_dataset))
    with pytest.raises(ValueError, match="probe"):
        resolve(phenotype_config("tiny,resnet50,probe", tiny_dataset))
    probe = resolve(phenotype_config("tiny,probe", tiny_dataset, "somewhere"))
    assert probe.optim.freeze == ["^encoder/"] and probe.optim.lr == probe.optim.probe_lr
    assert resolve(probe).optim.freeze == ["^encoder/"]  # idempotent


@pytest.fixture(scope="module")
def runs(tiny_dataset, pretrained, tmp_path_factory):
    """Workdirs and summaries of a probe and a full fine-tuning run from `pretrained`."""
    checkpoint, _ = pretrained
    out = {}
    for mode in ("probe", "finetune"):
        config = phenotype_config(f"tiny,{mode}", tiny_dataset, checkpoint)
        workdir = str(tmp_path_factory.mktemp(mode))
        out[mode] = workdir, finetune(config, workdir)
    return out


def losses(workdir: str) -> list[float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_probe_keeps_the_encoder_and_trains_the_head(runs, pretrained, tiny_dataset):
    workdir, summary = runs["probe"]
    assert summary["step"] == STEPS
    task, model, config = load_finetuned(workdir)
    assert task == "phenotype" and config.mode == "probe"
    trained = flat_params(nnx.state(model, nnx.Param))
    for path, value in encoder_of(trained).items():
        np.testing.assert_array_equal(value, pretrained[1][path], err_msg=str(path))
    before, _ = fresh_state(resolve(phenotype_config("tiny,probe", tiny_dataset, pretrained[0])))
    head = [p for p in trained if p[0] != "encoder"]
    assert head and all(not np.array_equal(trained[p], before[p]) for p in head if "out" in p)


def test_full_finetuning_changes_the_encoder_and_lowers_the_loss(runs, pretrained):
    workdir, summary = runs["finetune"]
    _, model, _ = load_finetuned(workdir)
    encoder = encoder_of(flat_params(nnx.state(model, nnx.Param)))
    changed = [p for p, v in encoder.items() if not np.array_equal(v, pretrained[1][p])]
    assert len(changed) == len(encoder)
    values = losses(workdir)
    assert len(values) == STEPS
    assert np.mean(values[-3:]) < np.mean(values[:3]), values


def test_predictions_read_back_in_physical_units(runs, tiny_dataset):
    workdir, _ = runs["finetune"]
    result = predict_phenotypes(workdir, tiny_dataset, "test", batch_size=2)
    assert result["columns"] == PAPER_PHENOTYPES
    ids = [phenotype_index(c) for c in PAPER_PHENOTYPES]
    exams = next(make_pipeline(tiny_dataset, "test", batch_size=64, shuffle=False, num_epochs=1,
                               drop_remainder=False, fields=("eid", "phenotypes")))  # fmt: skip
    np.testing.assert_array_equal(result["eid"], exams["eid"].astype(str))
    np.testing.assert_array_equal(result["target"], exams["phenotypes"][:, ids])
    mean, _ = train_stats(tiny_dataset, PAPER_PHENOTYPES)
    np.testing.assert_allclose(result["train_mean"], mean)
    # Physical units: near the train means (an 8-step model), not standardised ~0 values.
    scale = np.abs(mean)
    assert np.all(np.abs(result["pred"] - mean) < scale), result["pred"]
    # The same model in memory, and with a plane removed: a different but finite answer.
    _, model, _ = load_finetuned(workdir)
    again = predict_phenotypes(model, tiny_dataset, "test", batch_size=8)
    np.testing.assert_allclose(again["pred"], result["pred"], rtol=1e-5, atol=1e-4)
    without = predict_phenotypes(model, tiny_dataset, "test", absent_planes=(0, 3))
    assert np.isfinite(without["pred"]).all()
    assert not np.allclose(without["pred"], result["pred"])


def test_standardisation_round_trip_and_train_statistics(runs, tiny_dataset):
    _, model, _ = load_finetuned(runs["probe"][0])
    batches = make_pipeline(tiny_dataset, "train", batch_size=64, shuffle=False, num_epochs=1,
                            drop_remainder=False, fields=("phenotypes",))  # fmt: skip
    train = next(batches)["phenotypes"]
    ids = [phenotype_index(c) for c in PAPER_PHENOTYPES]
    standardised = np.asarray(model.standardise(jnp.asarray(train)))
    np.testing.assert_allclose(np.nanmean(standardised, 0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.nanstd(standardised, 0), 1.0, atol=1e-4)
    back = np.asarray(model.to_physical(jnp.asarray(standardised)))
    np.testing.assert_allclose(back, train[:, ids], rtol=1e-5)


def test_missing_targets_carry_no_loss_and_no_gradient():
    rng = np.random.default_rng(0)
    pred = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    target = rng.normal(size=(6, 3)).astype(np.float32)
    target[:, 1] = np.nan  # column 1 missing for the whole batch
    target[2, 0] = np.nan

    def loss(p):
        return phenotype_loss_values(p, jnp.asarray(target))[0]

    grad = np.asarray(jax.grad(loss)(pred))
    assert np.isfinite(grad).all()
    assert np.all(grad[:, 1] == 0) and grad[2, 0] == 0 and np.all(grad[:, 2] != 0)
    observed = ~np.isnan(target)
    expected = np.sum(np.where(observed, (np.asarray(pred) - np.nan_to_num(target)) ** 2, 0))
    np.testing.assert_allclose(float(loss(pred)), expected / observed.sum(), rtol=1e-6)
    # Changing a prediction whose target is missing does not change the loss.
    np.testing.assert_array_equal(loss(pred.at[:, 1].add(5.0)), loss(pred))


def test_freeze_patterns_that_match_nothing_are_refused():
    config = load_config_file(ROOT / "configs/phenotype.py", "tiny")
    config.optim.freeze = ["^encodr/"]
    tx, _ = make_optimizer(config.optim, 10)
    params = {"encoder": {"kernel": jnp.ones(3)}, "out": {"kernel": jnp.ones(2)}}
    with pytest.raises(ValueError, match="encodr"):
        tx.update(params, tx.init(params), params)
    config.optim.update(freeze=["^encoder/"], name="adam", weight_decay=0.0)  # no warmup
    tx, _ = make_optimizer(config.optim, 10)
    updates, _ = tx.update(params, tx.init(params), params)
    assert not np.asarray(updates["encoder"]["kernel"]).any()
    assert np.asarray(updates["out"]["kernel"]).all()


def test_tokens_pool_puts_every_token_back_in_grid_order():
    """pool 'tokens': the encoder's shuffled tokens, unshuffled, absent ones zeroed."""
    from whmae.tasks.phenotype import pool_features

    rng = np.random.default_rng(0)
    grid_tokens = rng.standard_normal((2, 6, 3)).astype(np.float32)
    ids = np.stack([rng.permutation(6) for _ in range(2)])  # shuffled slot k holds ids[k]
    valid_grid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    encoded = {
        "cls": jnp.zeros((2, 3)),
        "tokens": jnp.asarray(np.take_along_axis(grid_tokens, ids[..., None], 1)),
        "token_valid": jnp.asarray(np.take_along_axis(valid_grid, ids, 1)),
        "ids_shuffle": jnp.asarray(ids, jnp.int32),
    }
    features = np.asarray(pool_features(encoded, "tokens"))
    expected = (grid_tokens * valid_grid[..., None]).reshape(2, -1)
    np.testing.assert_allclose(features, expected, rtol=0, atol=0)
