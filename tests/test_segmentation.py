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

from whmae.data.dataset.pipeline import make_pipeline
from whmae.finetune import finetune
from whmae.layout import LA_2CH, LA_3CH, LA_4CH, NUM_CLASSES, NUM_PLANES, PLANE_CLASSES
from whmae.model.io import save_model
from whmae.model.mae import MaskedAutoencoder, tiny_config
from whmae.tasks.config import load_config_file
from whmae.tasks.predict import load_finetuned, predict_segmentation
from whmae.tasks.segmentation import (
    Conv1x1x1,
    Conv3x3x3,
    PlaneRefine,
    SegmentationModel,
    UNETRDecoder,
    plane_weights,
    segmentation_loss_values,
    stage_factors,
    upsample_linear,
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


def test_fast_convolutions_equal_flax_convolutions_with_the_same_parameters():
    """The decoder's CPU-friendly layers compute exactly what nnx.Conv does."""
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


@pytest.mark.parametrize("factor", [(5, 2, 2), (1, 2, 2), (2, 3, 1), (1, 8, 8)])
def test_upsampling_is_linear_interpolation(factor):
    """Equal to jax.image.resize's linear interpolation (half-pixel centres, edges held),
    so a linear ramp stays a ramp: no blocks, no lattice at the patch period."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 5, 2)), jnp.float32)
    out = upsample_linear(x, factor)
    shape = (2, 3 * factor[0], 4 * factor[1], 5 * factor[2], 2)
    np.testing.assert_allclose(out, jax.image.resize(x, shape, "linear"), atol=1e-5)
    ramp = jnp.arange(6, dtype=jnp.float32).reshape(1, 1, 1, 6, 1)
    steps = np.diff(np.asarray(upsample_linear(ramp, (1, 1, 4)))[0, 0, 0, :, 0])
    np.testing.assert_allclose(steps[2:-2], 0.25, atol=1e-6)  # uniform away from the edges


def _lattice_power(x, period: int, axis: int) -> float:
    """Spectral power of x along `axis` at the harmonics of `period` over the mean power
    of their neighbouring frequencies (summed over everything else; Hann window). A
    pattern repeating every `period` pixels peaks there (>> 1); a smooth signal does not."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    n = x.shape[-1]
    x = (x - x.mean(-1, keepdims=True)) * np.hanning(n)
    power = (np.abs(np.fft.rfft(x, axis=-1)) ** 2).reshape(-1, n // 2 + 1).sum(0)
    harmonics = range(n // period, n // 2, n // period)
    return float(sum(power[k] for k in harmonics)
                 / sum(0.5 * (power[k - 1] + power[k + 1]) for k in harmonics))  # fmt: skip


@pytest.mark.parametrize("per_plane", [True, False])
def test_decoder_output_has_no_lattice_at_the_patch_period(per_plane):
    """Random weights, smooth features in: no periodic component at the patch period in
    the logits (kernel = stride transposed convs give each offset in a patch its own
    kernel tap, a lattice at the patch period: ratios ~2 with these weights; linear
    interpolation then convs: ~0.7)."""
    encoder = tiny_config()
    decoder = UNETRDecoder(encoder, token_channels=8, channels=(8, 8, 8), image_channels=4,
                           num_skips=2, per_plane=per_plane, rngs=nnx.Rngs(0))  # fmt: skip
    s, t, h, w = encoder.grid
    grid = np.stack(np.meshgrid(*(np.linspace(0, 1, n) for n in (s, t, h, w)), indexing="ij"))
    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((3, 4, encoder.width))
    smooth = [jnp.asarray(np.sin(2 + 1.5 * np.einsum("kshtw,kd->shtwd", grid, m))
                          .reshape(1, -1, encoder.width), jnp.float32) for m in mixing]  # fmt: skip
    images = jnp.zeros((1, s, encoder.frames, encoder.image_size, encoder.image_size))
    logits = np.asarray(decoder(smooth[0], smooth[1:], images))
    _, ph, pw = encoder.patch_size
    for axis, period in ((3, ph), (4, pw)):
        ratio = _lattice_power(logits, period, axis)
        assert ratio < 1.0, (axis, ratio)


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


def test_per_plane_decoding_keeps_planes_apart():
    """per_plane: a plane's logits depend on its own tokens and image only (the encoder
    mixes planes; the decoder does not). The refinement sees only its plane's image."""
    encoder = tiny_config()
    decoder = UNETRDecoder(encoder, token_channels=8, channels=(8, 8, 8), image_channels=4,
                           num_skips=2, per_plane=True, refine_channels=2,
                           rngs=nnx.Rngs(0))  # fmt: skip
    s, t, h, w = encoder.grid
    rng = np.random.default_rng(0)
    tokens = [rng.standard_normal((1, s, t * h * w, encoder.width)).astype(np.float32)
              for _ in range(3)]  # fmt: skip
    images = rng.random((1, s, encoder.frames, SIZE, SIZE)).astype(np.float32)

    def run(tokens, images):
        flat = [jnp.asarray(x.reshape(1, -1, encoder.width)) for x in tokens]
        return np.asarray(decoder(flat[0], flat[1:], jnp.asarray(images)))

    base = run(tokens, images)
    changed_tokens = [x.copy() for x in tokens]
    for x in changed_tokens:
        x[0, 4] += 1.0
    changed_images = images.copy()
    changed_images[0, 4] = 1 - changed_images[0, 4]
    for out in (run(changed_tokens, images), run(tokens, changed_images)):
        others = [p for p in range(s) if p != 4]
        np.testing.assert_allclose(out[0, others], base[0, others], atol=1e-5)
        assert not np.allclose(out[0, 4], base[0, 4], atol=1e-3)

    refine = PlaneRefine(6, s, 2, rngs=nnx.Rngs(1))
    refine.out.kernel[...] = jnp.asarray(rng.standard_normal(refine.out.kernel.shape),
                                         jnp.float32)  # fmt: skip
    features = jnp.asarray(rng.standard_normal((1, encoder.frames, SIZE, SIZE, 6)), jnp.float32)
    base = np.asarray(refine(features, jnp.asarray(images)))
    out = np.asarray(refine(features, jnp.asarray(changed_images)))
    np.testing.assert_allclose(out[0, others], base[0, others], atol=1e-5)
    assert not np.allclose(out[0, 4], base[0, 4], atol=1e-3)


def test_a_plane_never_predicts_a_class_it_cannot_hold():
    """Per-view classes: even a head biased towards every class gives short-axis planes
    only background/LV/Myo/RV, la_2ch only background/LA, la_4ch background/LA/RA."""
    model = SegmentationModel(tiny_config(), **SMALL, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.integers(0, 256, (1, NUM_PLANES, T, SIZE, SIZE), dtype=np.uint8))
    mask = jnp.ones((1, NUM_PLANES), bool)
    for favoured in range(NUM_CLASSES):
        bias = np.zeros(NUM_CLASSES, np.float32)
        bias[favoured] = 1e4  # every pixel's raw favourite is this class
        repeats = model.decoder.head.bias.shape[0] // NUM_CLASSES  # folded: plane-major
        model.decoder.head.bias[...] = jnp.asarray(np.tile(bias, repeats))
        pred = np.asarray(model(images, mask).argmax(-1))
        for plane in range(NUM_PLANES):
            found = set(np.unique(pred[0, plane]).tolist())
            assert found <= set(PLANE_CLASSES[plane]), (favoured, plane, found)
            if favoured in PLANE_CLASSES[plane]:
                assert found == {favoured}
    assert PLANE_CLASSES[LA_2CH] == (0, 4) and PLANE_CLASSES[LA_4CH] == (0, 4, 5)
    assert all(PLANE_CLASSES[p] == (0, 1, 2, 3) for p in range(3, NUM_PLANES))


def test_loss_ignores_logits_of_classes_a_plane_cannot_hold():
    """Dice and CE see only the allowed classes of each plane: raising a disallowed
    class's logit changes neither the loss nor its gradient's finiteness."""
    allowed = np.array([[c in PLANE_CLASSES[p] for c in range(NUM_CLASSES)]
                        for p in range(NUM_PLANES)])  # fmt: skip
    rng = np.random.default_rng(4)
    labels = np.stack([rng.choice(PLANE_CLASSES[p], (B, 2, 6, 6)) for p in range(NUM_PLANES)], 1)
    logits = rng.normal(size=(*labels.shape, NUM_CLASSES)).astype(np.float32)
    weight = np.ones((B, NUM_PLANES), np.float32)

    def loss(x):
        return segmentation_loss_values(jnp.asarray(x), jnp.asarray(labels), weight, allowed)[0]

    base = float(loss(logits))
    shifted = logits + 20.0 * ~allowed[None, :, None, None, None, :]
    assert float(loss(shifted)) == pytest.approx(base, abs=1e-5)
    grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    assert np.isfinite(grad).all()
    disallowed = np.broadcast_to(~allowed[None, :, None, None, None, :], grad.shape)
    assert np.all(grad[disallowed] == 0) and np.abs(grad[~disallowed]).max() > 0
    # Perfect allowed-class logits give zero loss.
    perfect = 50.0 * np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    assert float(loss(perfect)) == pytest.approx(0.0, abs=1e-4)


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


def _frame_weights(weight):
    """[B, S] -> [B, S, 2]: ACDC-style, frame 1 unlabelled on some planes, frame 0 on others."""
    weight = np.repeat(weight[:, :, None], 2, axis=2)
    weight[0, 3:, 1] = 0
    weight[1, [0, 2, 5], 0] = 0
    return weight


@pytest.mark.parametrize("per_frame", [False, True], ids=["per_plane", "per_frame"])
def test_loss_equals_the_dice_ce_formula_written_out_in_numpy(per_frame):
    """CE over included voxels whose label their plane can hold, + 1 - mean soft Dice per
    foreground class over the planes that can hold it (module docstring), in float64;
    weights per plane [B, S] or per plane and frame [B, S, T]."""
    allowed = np.array([[c in PLANE_CLASSES[p] for c in range(NUM_CLASSES)]
                        for p in range(NUM_PLANES)])  # fmt: skip
    logits, labels, weight = _loss_case(3)  # labels include classes a plane cannot hold
    if per_frame:
        weight = _frame_weights(weight)
    loss, aux = segmentation_loss_values(jnp.asarray(logits), jnp.asarray(labels), weight, allowed)
    x = np.where(allowed[None, :, None, None, None], logits.astype(np.float64), -1e9)
    log_p = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_p -= x.max(-1, keepdims=True)
    onehot = np.eye(NUM_CLASSES)[labels] * allowed[None, :, None, None, None]
    frames = np.broadcast_to(weight if per_frame else weight[:, :, None], labels.shape[:3])
    w = frames[..., None, None]
    ce = -(onehot * log_p).sum(-1) * w
    ce = ce.sum() / (frames.sum() * math.prod(labels.shape[3:]))
    p = np.exp(log_p) * w[..., None] * allowed[None, :, None, None, None]
    g = onehot * w[..., None]
    axes = tuple(range(5))
    dice = (2 * (p * g).sum(axes) + 1e-5) / (p.sum(axes) + g.sum(axes) + 1e-5)
    mean_dice = dice[1:].mean()
    assert float(aux["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(aux["dice"]) == pytest.approx(mean_dice, rel=1e-5)
    assert float(loss) == pytest.approx(ce + 1 - mean_dice, rel=1e-5)


def test_unlabelled_frames_get_no_gradient_and_do_not_change_the_loss():
    """Frames whose label_mask is False (ACDC / M&Ms: all but ED and ES): their logits get
    exactly zero gradient, garbage there changes nothing, and the training loss's weights
    (`plane_weights`) are per frame."""
    logits, labels, _ = _loss_case(5)
    label_mask = _frame_weights(np.ones((B, NUM_PLANES), np.float32)).astype(bool)
    label_mask[:, LA_3CH] = False
    plane_mask = np.ones((B, NUM_PLANES), bool)
    plane_mask[1, 4] = False  # an absent plane: none of its frames count
    weight = np.asarray(plane_weights({"label_mask": label_mask, "plane_mask": plane_mask},
                                      range(NUM_PLANES)))  # fmt: skip
    assert weight.shape == (B, NUM_PLANES, 2)
    np.testing.assert_array_equal(weight, label_mask & plane_mask[:, :, None])

    def loss(x, y=labels):
        return segmentation_loss_values(jnp.asarray(x), jnp.asarray(y), weight)[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    excluded = weight == 0  # [B, S, T]
    assert excluded.any() and (~excluded).any()
    assert np.all(grad[excluded] == 0) and np.abs(grad[~excluded]).max() > 0
    base = float(loss(logits))
    garbage, other_labels = logits.copy(), labels.copy()
    rng = np.random.default_rng(6)
    garbage[excluded] = 30 * rng.normal(size=garbage[excluded].shape)
    other_labels[excluded] = rng.integers(0, NUM_CLASSES, other_labels[excluded].shape)
    assert float(loss(garbage, other_labels)) == pytest.approx(base, abs=1e-6)
    # A labelled frame does count.
    changed = labels.copy()
    changed[1, 6, 1] = (changed[1, 6, 1] + 1) % NUM_CLASSES
    assert abs(float(loss(logits, changed)) - base) > 1e-4


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
    for plane in range(NUM_PLANES):  # per-view classes, also after a few steps
        assert set(np.unique(result["pred"][:, plane]).tolist()) <= set(PLANE_CLASSES[plane])
