"""whmae-embed and the shared checkpoint loader (whmae.model.io)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from whmae import embed as embed_cli
from whmae.data.dataset.pipeline import make_pipeline
from whmae.data.dataset.splits import SPLITS
from whmae.embed import embed_dataset, local_data_mesh, make_embed_fn, parse_planes
from whmae.model.io import load_model, save_model
from whmae.model.mae import MAEConfig, MaskedAutoencoder, embeddings, tiny_config
from whmae.train.checkpoint import Checkpointer
from whmae.train.step import TrainState

ROOT = Path(__file__).resolve().parents[1]


def dataset_exams(data_dir, split: str) -> dict[str, np.ndarray]:
    it = make_pipeline(data_dir, split, batch_size=64, fields=("eid", "images", "plane_mask"),
                       shuffle=False, num_epochs=1, drop_remainder=False,
                       process_index=0, process_count=1)  # fmt: skip
    batches = list(it)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def tiny_model():
    return MaskedAutoencoder(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_checkpoint")
    save_model(out, tiny_model, step=3)
    return out


@pytest.fixture(scope="module")
def cli_run(tiny_checkpoint, tiny_dataset, tmp_path_factory):
    """The .npz of `whmae-embed --split all` with a batch that leaves partial batches."""
    out = tmp_path_factory.mktemp("embed") / "all.npz"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--split", "all",
            "--out", str(out), "--batch-size", "10", "--no-progress"]  # fmt: skip
    assert embed_cli.main(argv) == 0
    return dict(np.load(out))


def test_one_row_per_exam_in_dataset_order_with_the_model_values(cli_run, tiny_dataset, tiny_model):
    offset = 0
    for split in SPLITS:
        exams = dataset_exams(tiny_dataset, split)
        n = len(exams["eid"])
        rows = slice(offset, offset + n)
        np.testing.assert_array_equal(cli_run["eid"][rows], exams["eid"].astype(str))
        assert set(cli_run["split"][rows]) == {split}
        np.testing.assert_array_equal(cli_run["plane_mask"][rows], exams["plane_mask"])
        # Unsharded, unpadded, one device: the values themselves, not just their consistency.
        cls, mean = nnx.jit(embeddings)(tiny_model, exams["images"], exams["plane_mask"])
        np.testing.assert_allclose(cli_run["cls"][rows], cls, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cli_run["mean_pooled"][rows], mean, rtol=1e-5, atol=1e-5)
        offset += n
    assert offset == len(cli_run["eid"]) == 24 == len(set(cli_run["eid"]))
    assert cli_run["cls"].shape == cli_run["mean_pooled"].shape == (24, 33)
    assert int(cli_run["step"]) == 3
    assert not np.allclose(cli_run["cls"], cli_run["mean_pooled"])


def test_two_runs_give_identical_values_and_padding_changes_nothing(
    cli_run, tiny_model, tiny_dataset
):
    again = embed_dataset(tiny_model, tiny_dataset, SPLITS, batch_size=10, progress=False)
    for key in ("eid", "cls", "mean_pooled", "plane_mask"):
        np.testing.assert_array_equal(again[key], cli_run[key])
    other_batch = embed_dataset(tiny_model, tiny_dataset, ("val",), batch_size=24, progress=False)
    rows = cli_run["split"] == "val"
    np.testing.assert_allclose(other_batch["cls"], cli_run["cls"][rows], rtol=1e-6, atol=1e-6)


def test_a_removed_plane_changes_the_embedding_and_its_pixels_do_not_matter(
    tiny_model, tiny_dataset
):
    exams = dataset_exams(tiny_dataset, "train")
    images, full = exams["images"][:8].copy(), np.ones((8, 9), bool)
    embed = make_embed_fn(tiny_model, local_data_mesh())
    without_3ch = full.copy()
    without_3ch[:, 1] = False
    cls_full, mean_full = embed(images, full)
    cls_drop, mean_drop = embed(images, without_3ch)
    assert np.min(np.abs(cls_full - cls_drop).max(axis=1)) > 1e-3
    assert np.min(np.abs(mean_full - mean_drop).max(axis=1)) > 1e-3
    noisy = images.copy()
    noisy[:, 1] = np.random.default_rng(0).integers(0, 256, noisy[:, 1].shape, dtype=np.uint8)
    cls_noisy, mean_noisy = embed(noisy, without_3ch)
    np.testing.assert_allclose(cls_noisy, cls_drop, atol=1e-6)
    np.testing.assert_allclose(mean_noisy, mean_drop, atol=1e-6)
    assert np.abs(embed(noisy, full)[0] - cls_full).max() > 1e-3  # the pixels did change


def test_absent_planes_option_masks_those_planes_for_every_exam(
    tiny_checkpoint, tiny_dataset, cli_run, tmp_path
):
    out = tmp_path / "no_3ch.npz"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--split", "val",
            "--out", str(out), "--absent-planes", "la_3ch,8", "--no-progress"]  # fmt: skip
    assert embed_cli.main(argv) == 0
    result = np.load(out)
    rows = cli_run["split"] == "val"
    expected_mask = cli_run["plane_mask"][rows] & ~np.isin(np.arange(9), [1, 8])
    np.testing.assert_array_equal(result["plane_mask"], expected_mask)
    assert not np.allclose(result["cls"], cli_run["cls"][rows], atol=1e-4)
    assert parse_planes("sa_0, 2") == (2, 3)
    with pytest.raises(ValueError, match="unknown plane 'sa_9'"):
        parse_planes("sa_9")


def test_one_model_embeds_every_split_and_removal_with_one_compile(tiny_model, tiny_dataset):
    """Robustness runs the same model ~20 times (planes removed, controls): the jitted
    apply is cached by (graphdef, function, shapes), not recompiled per call."""
    from whmae.model.io import apply_split

    embed_dataset(tiny_model, tiny_dataset, ("test",), batch_size=4, progress=False)
    compiled = apply_split._cache_size()
    for removed in [(1,), (2, 5), ()]:
        embed_dataset(tiny_model, tiny_dataset, ("val", "test"), batch_size=4,
                      absent_planes=removed, progress=False)  # fmt: skip
    assert apply_split._cache_size() == compiled


def test_bad_inputs_fail_with_clear_messages(tiny_dataset, tmp_path, capsys):
    wrong = MaskedAutoencoder(tiny_config(image_size=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"images are \(9, 10, 32, 32\).*needs \(9, 10, 16, 16\)"):
        embed_dataset(wrong, tiny_dataset, ("test",), progress=False)
    argv = ["--checkpoint", str(tmp_path), "--data", str(tiny_dataset), "--out", "x.npz"]
    assert embed_cli.main(argv) == 2
    assert "holds no checkpoint steps" in capsys.readouterr().err
    assert embed_cli.main([*argv[:4], "--split", "dev", "--out", "x.npz"]) == 2
    assert "unknown split(s) ['dev']" in capsys.readouterr().err


def test_load_model_reads_a_training_loop_checkpoint(tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain_config", ROOT / "configs/pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    model_config = MAEConfig(**config.model.to_dict())
    # The loop's TrainState, built eagerly (init_train_state's sharded jit costs ~20 s here).
    _, params, rest = nnx.split(MaskedAutoencoder(model_config, rngs=nnx.Rngs(5)), nnx.Param, ...)
    state = TrainState(step=np.int32(7), params=params, rest=rest,
                       opt_state=optax.adam(1e-3).init(params))  # fmt: skip
    with Checkpointer(str(tmp_path / "checkpoints"), save_every=1) as checkpointer:
        checkpointer.save(7, state, config=config.to_dict(), force=True)
    model, loaded_config = load_model(tmp_path)  # the workdir, as whmae-pretrain writes it
    assert loaded_config == model_config
    expected = jax.tree.leaves(nnx.to_pure_dict(state.params))
    loaded = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert len(loaded) == len(expected)
    for a, b in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 2 .*\[7\]"):
        load_model(tmp_path, step=2)


def test_random_init_control_is_the_checkpoints_config_from_its_train_seed(
    tmp_path, tiny_checkpoint, tiny_dataset, cli_run
):
    spec = importlib.util.spec_from_file_location("pretrain_config", ROOT / "configs/pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.train.seed = 5
    model_config = MAEConfig(**config.model.to_dict())
    # "Trained" parameters (seed 7) stored with train.seed 5: the control ignores them.
    _, params, rest = nnx.split(MaskedAutoencoder(model_config, rngs=nnx.Rngs(7)), nnx.Param, ...)
    state = TrainState(step=np.int32(2), params=params, rest=rest,
                       opt_state=optax.adam(1e-3).init(params))  # fmt: skip
    with Checkpointer(str(tmp_path / "checkpoints"), save_every=1) as checkpointer:
        checkpointer.save(2, state, config=config.to_dict(), force=True)
    model, loaded_config, seed = embed_cli.random_init_model(tmp_path)
    assert seed == embed_cli.init_seed(tmp_path) == 5 and loaded_config == model_config
    expected = nnx.state(MaskedAutoencoder(model_config, rngs=nnx.Rngs(5)), nnx.Param)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                    jax.tree.leaves(nnx.to_pure_dict(expected)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert embed_cli.random_init_model(tmp_path, seed=3)[2] == 3
    # A checkpoint without train.seed (save_model, whmae-convert): seed 0. tiny_checkpoint
    # holds exactly the seed-0 model, so its random-init control embeds identically.
    out = tmp_path / "control.npz"
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--split", "val",
            "--out", str(out), "--random-init", "--no-progress"]  # fmt: skip
    assert embed_cli.main(argv) == 0
    result = np.load(out)
    assert bool(result["random_init"]) and int(result["seed"]) == 0
    rows = cli_run["split"] == "val"
    np.testing.assert_allclose(result["cls"], cli_run["cls"][rows], rtol=1e-6, atol=1e-6)
    assert embed_cli.main([*argv, "--seed", "1"]) == 0
    assert not np.allclose(np.load(out)["cls"], cli_run["cls"][rows], atol=1e-4)
