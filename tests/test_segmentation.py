"""All-planes segmentation: the UNETR head's output, the Dice + CE loss and its plane
exclusions, and a short whmae.finetune run read back by predict_segmentation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from whmae.data.pipeline import make_pipeline
from whmae.finetune import finetune
from whmae.layout import LA_3CH, NUM_CLASSES, NUM_PLANES
from whmae.model.io import save_model
from whmae.model.mae import MaskedAutoencoder, tiny_config
from whmae.tasks.config import load_config_file
from whmae.tasks.predict import load_finetuned, predict_segmentation
from whmae.tasks.segmentation import (
    Conv1x1x1,
    Conv3x3x3,
    PatchConvTranspose,
    SegmentationModel,
    segmentation_loss_values,
    stage_factors,
)

ROOT = Path(__file__).resolve().parents[1]
B, T, SIZE = 2, 10, 32
STEPS = 6
SMALL = dict(token_channels=8, channels=(8, 8, 8), image_channels=4, skip_blocks=(0, 1))


def test_stage_factors_multiply_to_the_patch_size():
    for patch in [(25, 8, 8), (5, 8, 8), (5, 16, 16), (1, 4, 4)]:
        stages = stage_factors(patch)
        assert tuple(math.prod(s[d] for s in stages) for d in range(3)) == patch
    assert stage_factors((25, 8, 8)) == [(5, 2, 2), (5, 2, 2), (1, 2, 2)]


@pytest.fixture(scope="module")
def model_and_forward():
    model = SegmentationModel(tiny_config(), **SMALL, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x, m: nnx.merge(graphdef, state)(x, m))
    return model, lambda images, mask: np.asarray(forward(state, images, mask))


@pytest.mark.parametrize("factor", [(5, 2, 2), (1, 2, 2), (2, 3, 1)])
def test_fast_convolutions_equal_flax_convolutions_with_the_same_parameters(factor):
    """The decoder's CPU-friendly layers compute exactly what nnx.Conv / ConvTranspose do."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 6, 5, 3)), jnp.float32)
    fast = Conv3x3x3(3, 7, use_bias=True, rngs=nnx.Rngs(1))
    fast.bias[...] = jnp.asarray(rng.standard_normal(7), jnp.float32)
    reference = nnx.Conv(3, 7, (3, 3, 3), padding="SAME", rngs=nnx.Rngs(2))
    nnx.update(reference, nnx.state(fast))
    np.testing.assert_allclose(fast(x), reference(x), rtol=1e-5, atol=1e-5)
    pointwise = Conv1x1x1(3, 5, use_bias=True, rngs=nnx.Rngs(5))
    pointwise.bias[...] = jnp.asarray(rng.standard_normal(5), jnp.float32)
    reference = nnx.Conv(3, 5, (1, 1, 1), rngs=nnx.Rngs(6))
    nnx.update(reference, nnx.state(pointwise))
    np.testing.assert_allclose(pointwise(x), reference(x), rtol=1e-5, atol=1e-5)

    up = PatchConvTranspose(3, 4, factor, rngs=nnx.Rngs(3))
    up.bias[...] = jnp.asarray(rng.standard_normal(4), jnp.float32)
    reference = nnx.ConvTranspose(3, 4, factor, factor, padding="VALID", rngs=nnx.Rngs(4))
    nnx.update(reference, nnx.state(up))
    out = up(x)
    assert out.shape == (2, 4 * factor[0], 6 * factor[1], 5 * factor[2], 4)
    np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-5)


def test_head_segments_all_planes_and_frames_at_full_resolution(model_and_forward):
    _, forward = model_and_forward
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (B, NUM_PLANES, T, SIZE, SIZE), dtype=np.uint8)
    mask = np.ones((B, NUM_PLANES), bool)
    mask[1, 4] = False
    logits = forward(images, mask)
    assert logits.shape == (B, NUM_PLANES, T, SIZE, SIZE, NUM_CLASSES)
    assert np.isfinite(logits).all()
    # An absent plane's pixels reach nothing: its tokens and image are zeroed.
    changed = images.copy()
    changed[1, 4] = 255 - changed[1, 4]
    np.testing.assert_allclose(forward(changed, mask)[1], logits[1], atol=1e-5)
    # A present plane's pixels do matter, also for the other planes (planes share channels).
    changed[1, 5] = 255 - changed[1, 5]
    assert not np.allclose(forward(changed, mask)[1, 0], logits[1, 0], atol=1e-4)


def _loss_case(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, (B, NUM_PLANES, 2, 6, 6))
    logits = rng.normal(size=(*labels.shape, NUM_CLASSES)).astype(np.float32)
    weight = np.ones((B, NUM_PLANES), np.float32)
    weight[:, LA_3CH] = 0  # no labels in the 3ch view
    weight[0, 6] = 0  # an absent plane
    return logits, labels, weight


def _loss(logits, labels, weight):
    loss, _ = segmentation_loss_values(jnp.asarray(logits), jnp.asarray(labels), weight)
    return float(loss)


def test_unlabelled_and_absent_planes_do_not_change_the_loss():
    logits, labels, weight = _loss_case()
    base = _loss(logits, labels, weight)
    for b, plane in [(0, LA_3CH), (1, LA_3CH), (0, 6)]:
        other_labels = labels.copy()
        other_labels[b, plane] = (other_labels[b, plane] + 1) % NUM_CLASSES
        other_logits = logits.copy()
        other_logits[b, plane] = -other_logits[b, plane] * 3
        assert _loss(logits, other_labels, weight) == pytest.approx(base, abs=1e-6)
        assert _loss(other_logits, labels, weight) == pytest.approx(base, abs=1e-6)
    labelled = labels.copy()
    labelled[1, 6] = (labelled[1, 6] + 1) % NUM_CLASSES
    assert abs(_loss(logits, labelled, weight) - base) > 1e-4


def test_dice_ce_is_minimal_for_a_perfect_prediction():
    _, labels, weight = _loss_case(1)
    perfect = 50.0 * np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    best = _loss(perfect, labels, weight)
    assert best == pytest.approx(0.0, abs=1e-4)
    # Less confident or random predictions of the same classes cost more.
    softer = [_loss(k * np.eye(NUM_CLASSES, dtype=np.float32)[labels], labels, weight)
              for k in (1.0, 3.0, 10.0)]  # fmt: skip
    assert softer[0] > softer[1] > softer[2] > best + 1e-4
    random = np.random.default_rng(2).normal(size=perfect.shape).astype(np.float32)
    assert _loss(random, labels, weight) > softer[0]
    wrong = perfect.copy()
    wrong[1, 0, 0, 0, 0] = np.roll(wrong[1, 0, 0, 0, 0], 1)  # one voxel of a labelled plane
    assert _loss(wrong, labels, weight) > best + 1e-3


@pytest.fixture(scope="module")
def segmentation_run(tiny_dataset, tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("pretrained")
    save_model(checkpoint, MaskedAutoencoder(tiny_config(), rngs=nnx.Rngs(3)))
    config = load_config_file(ROOT / "configs/segmentation.py", "tiny")
    config.data.dir = str(tiny_dataset)
    config.init.checkpoint = str(checkpoint)
    config.model.unetr.update({k: list(v) if isinstance(v, tuple) else v
                               for k, v in SMALL.items()})  # fmt: skip
    config.train.update(steps=STEPS, log_every=1, checkpoint_every=STEPS)
    workdir = tmp_path_factory.mktemp("segmentation")
    return workdir, finetune(config, str(workdir))


def test_finetuning_lowers_the_loss_and_predictions_read_back(segmentation_run, tiny_dataset):
    workdir, summary = segmentation_run
    assert summary["step"] == STEPS
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    task, model, _ = load_finetuned(workdir)
    assert task == "segmentation"
    result = predict_segmentation(workdir, tiny_dataset, "test", batch_size=2)
    exams = next(make_pipeline(tiny_dataset, "test", batch_size=64, shuffle=False, num_epochs=1,
                               drop_remainder=False, fields=("eid", "images", "labels",
                               "plane_mask", "label_mask")))  # fmt: skip
    n = len(exams["eid"])
    assert (
        result["pred"].shape == (n, NUM_PLANES, T, SIZE, SIZE) and result["pred"].dtype == np.uint8
    )
    np.testing.assert_array_equal(result["eid"], exams["eid"].astype(str))
    np.testing.assert_array_equal(result["labels"], exams["labels"])
    np.testing.assert_array_equal(result["label_mask"], exams["label_mask"])
    assert not result["label_mask"][:, LA_3CH].any()
    logits = model(jnp.asarray(exams["images"]), jnp.asarray(exams["plane_mask"]))
    # The same model outside jit and sharding: the same classes (float ties aside).
    assert np.mean(result["pred"] == np.asarray(logits.argmax(-1))) > 0.999
