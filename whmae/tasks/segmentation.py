"""All-planes segmentation: the MAE encoder + a UNETR-style 3D decoder, Dice + CE loss.

One pass segments every plane and frame of an exam (no masking). Decoder (SPEC,
"Downstream heads in the reference"), for an encoder of S planes, token grid (t, h, w),
patch (pt, ph, pw):
  * skips: per-block outputs `hidden[i]` for i in `skip_blocks` plus the final normed
    tokens, restored to grid order, absent planes' tokens zeroed;
  * each is projected per token to C channels (`token_channels`; 1152 / 9 = 128 in the
    reference) and the planes are folded into channels: [B, t, h, w, S * C], as the
    reference does. `per_plane=True` instead decodes every plane on its own, planes in
    the batch dimension with shared weights (plus a learned per-plane embedding added to
    the final tokens' features): [B * S, t, h, w, C], each plane with its own feature
    maps at every stage (`channels` are then per plane; ~4x the CPU time of the tiny
    folded decoder, whose full-resolution convs then run on 9x the voxels);
  * upsampling by the patch size in stages: each dim's factor is split into its prime
    factors (8 -> 2, 2, 2; 25 -> 5, 5; 5 -> 5), one stage per factor; stage i is a 1x1x1
    projection, linear interpolation by its factors (half-pixel centres, edges
    replicated: no kernel = stride transposed conv, whose blocks print a lattice at the
    patch period), then a residual block on the concatenation with a skip brought to
    the same resolution the same way (deepest block at the coarsest stage; the last,
    full-resolution stage takes the images themselves through a residual block:
    [B * S, T, H, W, 1] per plane, [B, T, H, W, S] folded);
  * residual blocks: 3x3x3 conv, instance norm (`nnx.GroupNorm(num_groups=channels)`),
    leaky ReLU, twice, plus a 1x1x1 projection when the width changes;
  * a 1x1x1 conv to 6 class logits per plane: [B, S, T, H, W, 6], plus, with
    `refine_channels` > 0, a per-plane full-resolution correction (`PlaneRefine`): the
    last features split into that many channels per plane, joined by the plane's own
    image, a 3x3x3 conv, instance norm, leaky ReLU, 1x1x1 conv to 6 logits. It gives
    each plane image-resolution features of its own for its boundaries at little cost
    (the folded head maps `channels[-1]` features to all S x 6 logits);
  * per-view classes: a plane's logits of classes it cannot hold
    (`layout.PLANE_CLASSES`: short-axis background/LV/Myo/RV, long-axis background/LA
    (+ RA in 4ch)) are replaced by DISALLOWED_LOGIT, in the model's output, so training,
    `predict_segmentation` and `whmae-segment` (argmax) never predict them.
Loss: cross-entropy + (1 - mean soft Dice of the foreground classes the model's planes
can hold, each class over the planes that can hold it, summed over the batch), both over
the labelled (`label_mask`, per plane and frame: ACDC / M&Ms label only ED and ES) frames
of acquired (`plane_mask`) planes only; other frames' logits get no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from whmae.layout import NUM_CLASSES, plane_class_mask
from whmae.model.config import MAEConfig
from whmae.model.masking import restore_order, token_availability
from whmae.model.vit import Dense, logical_param, zeros
from whmae.tasks.config import init_step
from whmae.tasks.encoder_init import MAEEncoder, encoder_config, pretrained_encoder_init
from whmae.train.loop import Task

__all__ = [
    "DISALLOWED_LOGIT",
    "SegmentationModel",
    "UNETRDecoder",
    "mask_logits",
    "segmentation_loss",
    "segmentation_loss_values",
    "segmentation_task",
    "stage_factors",
    "upsample_linear",
]

FIELDS = ("images", "plane_mask", "labels", "label_mask")
DICE_SMOOTH = 1e-5
LEAKY_SLOPE = 0.01
# The logit of a class a plane cannot hold: finite (no NaN in 0 * log p), and far below
# any logit a network produces, so softmax gives it 0 and argmax never picks it.
DISALLOWED_LOGIT = -1e9


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def stage_factors(patch_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per-stage (t, h, w) upsampling factors whose products are the patch size, coarse
    stage first: (25, 8, 8) -> [(5, 2, 2), (5, 2, 2), (1, 2, 2)]."""
    per_dim = [_prime_factors(int(p)) for p in patch_size]
    stages = max(1, *(len(f) for f in per_dim))
    per_dim = [sorted(f, reverse=True) + [1] * (stages - len(f)) for f in per_dim]
    return [tuple(f[i] for f in per_dim) for i in range(stages)]


def _promoted(layer, x):
    """(x, kernel, bias) of a flax conv layer in its compute dtype, as flax computes them."""
    bias = layer.bias[...] if layer.bias is not None else None
    return layer.promote_dtype((x, layer.kernel[...], bias), dtype=layer.dtype)


class Conv3x3x3(nnx.Conv):
    """`nnx.Conv` with a (3, 3, 3) kernel and SAME padding (same parameters, same output)
    computed as one 2D conv over (h, w) of the three time-shifted inputs stacked along
    channels: XLA:CPU runs 3D convs ~10x slower than the equivalent 2D conv
    (tests/test_segmentation.py checks it equals `nnx.Conv`)."""

    def __init__(self, features_in: int, features_out: int, **kwargs):
        super().__init__(features_in, features_out, (3, 3, 3), padding="SAME", **kwargs)

    def __call__(self, x):
        b, t, h, w, c = x.shape
        x, kernel, bias = _promoted(self, x)
        padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
        stacked = jnp.concatenate([padded[:, dt : dt + t] for dt in range(3)], axis=-1)
        planar = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * c, -1)  # (kh, kw, kt*c, o)
        y = jax.lax.conv_general_dilated(
            stacked.reshape(b * t, h, w, 3 * c), planar, (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision,
        )  # fmt: skip
        y = y.reshape(b, t, h, w, -1)
        return y if bias is None else y + bias


class Conv1x3x3(nnx.Conv):
    """`nnx.Conv` with a (1, 3, 3) kernel and SAME padding (same parameters, same output):
    a 2D conv over (h, w) of every frame."""

    def __init__(self, features_in: int, features_out: int, **kwargs):
        super().__init__(features_in, features_out, (1, 3, 3), padding="SAME", **kwargs)

    def __call__(self, x):
        b, t, h, w, c = x.shape
        x, kernel, bias = _promoted(self, x)
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, h, w, c), kernel[0], (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision,
        )  # fmt: skip
        y = y.reshape(b, t, h, w, -1)
        return y if bias is None else y + bias


def _upsample_axis(x, factor: int, axis: int):
    """Linear interpolation by an integer factor along `axis` (half-pixel centres, edge
    values replicated): output j sits at input position (j + 0.5) / factor - 0.5, so each
    output is a fixed mix of one input and its nearer neighbour."""
    if factor == 1:
        return x
    n = x.shape[axis]
    before = jnp.concatenate(
        [jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)],
        axis=axis,
    )
    after = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                             jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)  # fmt: skip
    phases = []
    for a in range(factor):
        offset = (a + 0.5) / factor - 0.5
        neighbour = before if offset < 0 else after
        phases.append(x if offset == 0 else (1 - abs(offset)) * x + abs(offset) * neighbour)
    y = jnp.stack(phases, axis=axis + 1)
    return y.reshape(*x.shape[:axis], n * factor, *x.shape[axis + 1 :])


def upsample_linear(x, factor):
    """[N, t, h, w, C] -> [N, t * ft, h * fh, w * fw, C] by separable linear interpolation
    (what `jax.image.resize(..., "linear")` gives, as a few shifted adds: cheap on CPU)."""
    for axis, f in zip((1, 2, 3), factor, strict=True):
        x = _upsample_axis(x, int(f), axis)
    return x


class Conv1x1x1(nnx.Conv):
    """`nnx.Conv` with a (1, 1, 1) kernel as a matmul (same parameters, same output)."""

    def __init__(self, features_in: int, features_out: int, **kwargs):
        super().__init__(features_in, features_out, (1, 1, 1), padding="SAME", **kwargs)

    def __call__(self, x):
        x, kernel, bias = _promoted(self, x)
        y = jnp.einsum("...c,cd->...d", x, kernel[0, 0, 0], precision=self.precision)
        return y if bias is None else y + bias


class ResBlock(nnx.Module):
    """Two 3x3x3 conv + instance norm + leaky ReLU, residual (1x1x1 projection if needed)."""

    def __init__(self, features_in: int, features_out: int, *, dtype, rngs: nnx.Rngs):
        conv = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.conv1 = Conv3x3x3(features_in, features_out, **conv)
        self.norm1 = nnx.GroupNorm(features_out, num_groups=features_out, dtype=dtype, rngs=rngs)
        self.conv2 = Conv3x3x3(features_out, features_out, **conv)
        self.norm2 = nnx.GroupNorm(features_out, num_groups=features_out, dtype=dtype, rngs=rngs)
        project = features_in != features_out
        self.skip = Conv1x1x1(features_in, features_out, **conv) if project else None
        self.skip_norm = (
            nnx.GroupNorm(features_out, num_groups=features_out, dtype=dtype, rngs=rngs)
            if project
            else None
        )

    def __call__(self, x):
        y = jax.nn.leaky_relu(self.norm1(self.conv1(x)), LEAKY_SLOPE)
        y = self.norm2(self.conv2(y))
        if self.skip is not None:
            x = self.skip_norm(self.skip(x))
        return jax.nn.leaky_relu(x + y, LEAKY_SLOPE)


class Upsample(nnx.Module):
    """1x1x1 conv to `features_out` then linear interpolation by `factor` (the conv runs
    at the coarse resolution: both are linear, so the order does not matter)."""

    def __init__(self, features_in: int, features_out: int, factor, *, dtype, rngs):
        self.project = Conv1x1x1(features_in, features_out, dtype=dtype, rngs=rngs)
        self.factor = tuple(int(f) for f in factor)

    def __call__(self, x):
        return upsample_linear(self.project(x), self.factor)


class Up(nnx.Module):
    """Upsample by `factor`, then a residual block."""

    def __init__(self, features_in: int, features_out: int, factor, *, dtype, rngs):
        self.upsample = Upsample(features_in, features_out, factor, dtype=dtype, rngs=rngs)
        self.block = ResBlock(features_out, features_out, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.block(self.upsample(x))


class PlaneRefine(nnx.Module):
    """A per-plane full-resolution correction of the logits: the decoder's last features
    [N, T, H, W, F] (N = B items of `fold` planes each) are projected to `channels` per
    plane, each plane's map is joined by its own image and goes through a (1, 3, 3) conv
    (in-plane: boundaries are in-plane, time is in the features already), instance norm,
    leaky ReLU and a 1x1x1 conv to 6 logits: [B, S, T, H, W, 6], shared weights over
    planes. Kept this small because on XLA:CPU every op on [B * S, T, H, W, c] costs about
    as much as a whole stage of the folded decoder. The last conv starts at zero, so the
    correction starts at zero."""

    def __init__(self, features_in: int, fold: int, channels: int, *, dtype=jnp.float32, rngs):
        self.channels = channels
        self.project = Conv1x1x1(features_in, fold * channels, dtype=dtype, rngs=rngs)
        self.conv = Conv1x3x3(channels + 1, channels, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm = nnx.GroupNorm(channels, num_groups=channels, dtype=dtype, rngs=rngs)
        self.out = Conv1x1x1(
            channels, NUM_CLASSES, kernel_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
        )

    def __call__(self, features, images):
        b, s, t, h, w = images.shape
        x = self.project(features)
        if x.shape[0] != b * s:  # folded [B, T, H, W, S * c] -> [B * S, T, H, W, c]
            x = x.reshape(b, t, h, w, s, self.channels).transpose(0, 4, 1, 2, 3, 5)
        x = x.reshape(b * s, t, h, w, self.channels)
        pixels = images.reshape(b * s, t, h, w, 1).astype(x.dtype)
        y = jax.nn.leaky_relu(self.norm(self.conv(jnp.concatenate([x, pixels], -1))), LEAKY_SLOPE)
        return self.out(y).astype(jnp.float32).reshape(b, s, t, h, w, NUM_CLASSES)


class UNETRDecoder(nnx.Module):
    """Encoder features -> class logits [B, S, T, H, W, 6] (see the module docstring)."""

    def __init__(
        self,
        encoder: MAEConfig,
        *,
        token_channels: int,
        channels: Sequence[int],
        image_channels: int,
        num_skips: int,
        per_plane: bool = False,
        refine_channels: int = 0,
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(encoder.dtype)
        self.factors = tuple(stage_factors(encoder.patch_size))  # static: hashable
        stages = len(self.factors)
        if len(channels) != stages:
            raise ValueError(
                f"unetr.channels {tuple(channels)} needs one width per upsampling stage: "
                f"{stages} for patch {encoder.patch_size} (factors {self.factors})"
            )
        self.num_skips = min(num_skips, stages - 1)
        self.per_plane = bool(per_plane)
        s, c = encoder.num_planes, token_channels
        # Planes per decoded item: 1 (planes in the batch) or S (planes in the channels).
        fold = 1 if self.per_plane else s
        bottom = fold * c
        dense = dict(dtype=dtype, rngs=rngs)
        # Projections: [0] the final tokens, [1 + i] the skip of stage i (deepest first).
        self.project = nnx.List(
            [Dense(encoder.width, c, ("embed", None), **dense) for _ in range(1 + self.num_skips)]
        )
        self.plane_embedding = (
            logical_param(zeros, None, (s, c), (None, None)) if self.per_plane else None
        )
        self.bottom = ResBlock(bottom, bottom, **dense)
        skip_paths, ups, previous = [], [], bottom
        for i, width in enumerate(channels):
            if i < self.num_skips:
                chain, features = [], bottom
                for factor in self.factors[: i + 1]:
                    chain.append(Up(features, width, factor, **dense))
                    features = width
                skip_paths.append(nnx.List(chain))
                skip_width = width
            elif i == stages - 1:
                skip_width = image_channels
            else:
                skip_width = 0
            ups.append(Upsample(previous, width, self.factors[i], **dense))
            ups.append(ResBlock(width + skip_width, width, **dense))
            previous = width
        self.skip_paths = nnx.List(skip_paths)
        self.ups = nnx.List(ups)
        self.image_block = ResBlock(fold, image_channels, **dense)
        self.head = Conv1x1x1(previous, fold * NUM_CLASSES, **dense)
        self.refine = (
            PlaneRefine(previous, fold, refine_channels, **dense) if refine_channels else None
        )
        self.grid = encoder.grid
        self.dtype = dtype

    def _features(self, tokens, project, embedding=None):
        """[B, N, D] grid-order tokens -> [B * S, t, h, w, C] per plane or
        [B, t, h, w, S * C] folded."""
        s, t, h, w = self.grid
        b = tokens.shape[0]
        x = project(tokens).reshape(b, s, t, h, w, -1)
        if embedding is not None:
            x = x + embedding[...].astype(x.dtype)[None, :, None, None, None]
        if self.per_plane:
            return x.reshape(b * s, t, h, w, -1)
        return x.transpose(0, 2, 3, 4, 1, 5).reshape(b, t, h, w, -1)

    def __call__(self, final_tokens, skip_tokens: Sequence, images) -> jax.Array:
        """final_tokens [B, N, D], skip_tokens deepest first [B, N, D] each, images float
        [B, S, T, H, W] -> logits float32 [B, S, T, H, W, 6]."""
        b, s, t, h, w = images.shape
        x = self.bottom(self._features(final_tokens, self.project[0], self.plane_embedding))
        for i in range(len(self.factors)):
            x = self.ups[2 * i](x)
            if i < self.num_skips:
                skip = self._features(skip_tokens[i], self.project[1 + i])
                for up in self.skip_paths[i]:
                    skip = up(skip)
                x = jnp.concatenate([x, skip], axis=-1)
            elif i == len(self.factors) - 1:
                if self.per_plane:
                    pixels = images.reshape(b * s, t, h, w, 1)
                else:
                    pixels = images.transpose(0, 2, 3, 4, 1)
                x = jnp.concatenate([x, self.image_block(pixels.astype(self.dtype))], axis=-1)
            x = self.ups[2 * i + 1](x)
        logits = self.head(x).astype(jnp.float32)
        if self.per_plane:
            logits = logits.reshape(b, s, t, h, w, NUM_CLASSES)
        else:
            logits = logits.reshape(b, t, h, w, s, NUM_CLASSES).transpose(0, 4, 1, 2, 3, 5)
        if self.refine is not None:
            logits = logits + self.refine(x, images)
        return logits


def mask_logits(logits, allowed) -> jax.Array:
    """logits [B, S, ..., 6] with DISALLOWED_LOGIT where allowed [S, 6] is False."""
    allowed = jnp.asarray(allowed, bool)
    shape = (1, allowed.shape[0]) + (1,) * (logits.ndim - 3) + (allowed.shape[1],)
    return jnp.where(allowed.reshape(shape), logits, DISALLOWED_LOGIT)


class SegmentationModel(nnx.Module):
    """images uint8 [B, 9, T, H, W], plane_mask [B, 9] -> logits [B, S, T, H, W, 6] for
    the encoder's S planes (`planes`); S = 9 for the all-planes model. Classes a plane
    cannot hold (`allowed`, from `layout.PLANE_CLASSES`) have DISALLOWED_LOGIT."""

    def __init__(
        self,
        encoder: MAEConfig,
        *,
        token_channels: int = 128,
        channels: Sequence[int] = (256, 128, 64),
        image_channels: int = 32,
        skip_blocks: Sequence[int] = (1, 3),
        per_plane: bool = False,
        refine_channels: int = 8,
        freeze_encoder: bool = False,
        rngs: nnx.Rngs,
    ):
        bad = [i for i in skip_blocks if not 0 <= i < encoder.depth]
        if bad:
            raise ValueError(
                f"unetr.skip_blocks {bad} outside the encoder's blocks 0..{encoder.depth - 1}"
            )
        self.encoder = MAEEncoder(encoder, rngs=rngs)
        self.skip_blocks = tuple(sorted(skip_blocks, reverse=True))  # deepest first
        self.freeze_encoder = freeze_encoder
        self.planes = encoder.planes
        self.allowed = plane_class_mask(self.planes)  # [S][6] bool (static)
        self.decoder = UNETRDecoder(
            encoder,
            token_channels=token_channels,
            channels=channels,
            image_channels=image_channels,
            num_skips=len(self.skip_blocks),
            per_plane=per_plane,
            refine_channels=refine_channels,
            rngs=rngs,
        )

    def __call__(self, images, plane_mask) -> jax.Array:
        pixels, plane_available = self.encoder.select_planes(images, plane_mask)
        encoded = self.encoder.encode(images, plane_mask)
        ids = encoded["ids_shuffle"]
        tokens_per_plane = self.encoder.config.tokens_per_plane
        available = token_availability(plane_available, tokens_per_plane)[..., None]

        def grid_order(tokens):
            tokens = restore_order(tokens, ids) * available.astype(tokens.dtype)
            return jax.lax.stop_gradient(tokens) if self.freeze_encoder else tokens

        final = grid_order(encoded["tokens"])
        skips = [grid_order(encoded["hidden"][i][:, 1:]) for i in self.skip_blocks]
        pixels = pixels * plane_available[:, :, None, None, None].astype(pixels.dtype)
        return mask_logits(self.decoder(final, skips, pixels), self.allowed)


def segmentation_loss_values(logits, labels, weight, allowed=None) -> tuple[jax.Array, dict]:
    """Dice + CE of logits [B, S, T, H, W, 6] vs labels int [B, S, T, H, W] over the
    (plane, frame) images with weight [B, S, T] (1 = labelled and acquired, 0 = excluded;
    a per-plane [B, S] applies to every frame); allowed [S, 6] bool: the classes each plane
    can hold (default: all).

    CE: mean over the voxels of included images (a voxel labelled with a class its plane
    cannot hold is left out). Dice: per foreground class that some plane can hold, over
    the included images of the planes that can hold it, summed over the batch's voxels,
    (2 I + e) / (|P| + |G| + e) with softmax P; loss = CE + 1 - mean Dice.
    Returns (loss, {"ce", "dice"}).
    """
    s = logits.shape[1]
    allowed = np.ones((s, NUM_CLASSES), bool) if allowed is None else np.asarray(allowed, bool)
    classes = np.asarray([c for c in range(1, NUM_CLASSES) if allowed[:, c].any()])
    # Written for few passes over the [B, S, T, H, W, 6] logits: no float one-hot, the
    # label's logit and Dice terms picked with `where` (XLA:CPU ran the one-hot form at
    # ~2x the time, ~a fifth of the tiny segmentation step).
    logits = mask_logits(logits.astype(jnp.float32), allowed)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    onehot = labels[..., None] == jnp.arange(NUM_CLASSES)
    b, _, t = labels.shape[:3]
    w = weight.astype(jnp.float32)
    w = jnp.broadcast_to(w[:, :, None] if w.ndim == 2 else w, (b, s, t))[..., None, None]
    # A voxel counts for CE where its image is included and its plane can hold its label.
    label_ok = jnp.asarray(allowed)[jnp.arange(s)[None, :, None, None, None], labels]
    label_logit = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    pixels = math.prod(labels.shape[3:])
    ce = jnp.sum((lse - label_logit) * w * label_ok) / jnp.maximum(jnp.sum(w) * pixels, 1.0)
    plane_weight = w[..., None] * jnp.asarray(allowed, jnp.float32)[None, :, None, None, None]
    probs = probs * plane_weight
    axes = tuple(range(5))
    intersection = jnp.sum(jnp.where(onehot, probs, 0.0), axis=axes)
    total = jnp.sum(probs, axis=axes) + jnp.sum(jnp.where(onehot, plane_weight, 0.0), axis=axes)
    dice = (2 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
    mean_dice = jnp.mean(dice[classes])
    return ce + 1.0 - mean_dice, {"ce": ce, "dice": mean_dice}


def plane_weights(batch, planes: Sequence[int]) -> jax.Array:
    """[B, S, T] float: label_mask & plane_mask of the model's planes, per frame ([B, S]
    for a per-plane label_mask [B, 9])."""
    planes = np.asarray(planes)
    label_mask, plane_mask = batch["label_mask"][:, planes], batch["plane_mask"][:, planes]
    if label_mask.ndim == 3:
        plane_mask = plane_mask[:, :, None]
    return (label_mask & plane_mask).astype(jnp.float32)


def segmentation_loss(model, batch, key):
    """`loss_fn(model, batch, key)` for the training loop."""
    del key
    logits = model(batch["images"], batch["plane_mask"])
    planes = np.asarray(model.planes)
    return segmentation_loss_values(
        logits, batch["labels"][:, planes], plane_weights(batch, model.planes), model.allowed
    )


def build_segmenter(config: Any, rngs: nnx.Rngs) -> SegmentationModel:
    m = config.model
    if m.arch != "vit":
        raise ValueError(f"segmentation needs model.arch 'vit' (UNETR), got {m.arch!r}")
    u = m.unetr
    return SegmentationModel(
        encoder_config(m),
        token_channels=int(u.token_channels),
        channels=tuple(u.channels),
        image_channels=int(u.image_channels),
        skip_blocks=tuple(u.skip_blocks),
        per_plane=bool(u.get("per_plane", False)),
        refine_channels=int(u.get("refine_channels", 0)),
        freeze_encoder=config.mode == "probe",
        rngs=rngs,
    )


def segmentation_task(config: Any) -> Task:
    """The segmentation `Task` of a resolved config (`whmae.tasks.config.resolve`), with
    val Dice per class (`whmae.evaluate.segmentation.validation`)."""
    from whmae.evaluate.segmentation import validation

    init_params = None
    if config.init.pretrained:
        init_params = pretrained_encoder_init(
            config.init.checkpoint, init_step(config), encoder_config(config.model)
        )
    return Task(
        name="segmentation",
        model_fn=lambda rngs: build_segmenter(config, rngs),
        loss_fn=segmentation_loss,
        fields=FIELDS,
        init_params=init_params,
        validation=validation(encoder_config(config.model).planes),
    )
