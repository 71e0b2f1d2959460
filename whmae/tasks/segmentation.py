"""All-planes segmentation: the MAE encoder + a UNETR-style 3D decoder, Dice + CE loss.

One pass segments every plane and frame of an exam (no masking). Decoder (SPEC,
"Downstream heads in the reference"), for an encoder of S planes, token grid (t, h, w),
patch (pt, ph, pw):
  * skips: per-block outputs `hidden[i]` for i in `skip_blocks` plus the final normed
    tokens, restored to grid order, absent planes' tokens zeroed;
  * each is projected per token to C channels (`token_channels`; 1152 / 9 = 128 in the
    reference) and the planes are folded into channels: [B, t, h, w, S * C];
  * upsampling by the patch size in stages: each dim's factor is split into its prime
    factors (8 -> 2, 2, 2; 25 -> 5, 5; 5 -> 5), one stage per factor; stage i is a
    transposed conv (kernel = stride = its factors) then a residual block on the
    concatenation with a skip brought to the same resolution (deepest block at the
    coarsest stage; the last, full-resolution stage takes the images themselves,
    [B, T, H, W, S] through a residual block);
  * residual blocks: 3x3x3 conv, instance norm (`nnx.GroupNorm(num_groups=channels)`),
    leaky ReLU, twice, plus a 1x1x1 projection when the width changes;
  * a 1x1x1 conv to S x 6 class logits: [B, S, T, H, W, 6].
Loss: cross-entropy + (1 - mean soft Dice of the 5 foreground classes, summed over the
batch), both over labelled (`label_mask`) and acquired (`plane_mask`) planes only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from whmae.layout import NUM_CLASSES
from whmae.model.config import MAEConfig
from whmae.model.masking import restore_order, token_availability
from whmae.model.vit import Dense
from whmae.tasks.config import init_step
from whmae.tasks.encoder_init import MAEEncoder, encoder_config, pretrained_encoder_init
from whmae.train.loop import Task

__all__ = [
    "SegmentationModel",
    "UNETRDecoder",
    "segmentation_loss",
    "segmentation_loss_values",
    "segmentation_task",
    "stage_factors",
]

FIELDS = ("images", "plane_mask", "labels", "label_mask")
DICE_SMOOTH = 1e-5
LEAKY_SLOPE = 0.01


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


class PatchConvTranspose(nnx.ConvTranspose):
    """`nnx.ConvTranspose` with kernel = stride and VALID padding (same parameters, same
    output) as one matmul and a reshape: every input voxel fills its own block.
    XLA:CPU's transposed conv is orders of magnitude slower at these shapes."""

    def __init__(self, features_in: int, features_out: int, factor, **kwargs):
        factor = tuple(factor)
        super().__init__(features_in, features_out, factor, factor, padding="VALID", **kwargs)

    def __call__(self, x):
        b, t, h, w, _ = x.shape
        ft, fh, fw = self.kernel_size
        x, kernel, bias = _promoted(self, x)
        # lax.conv_transpose fills block offset a with kernel tap (f - 1 - a): flipped.
        kernel = kernel[::-1, ::-1, ::-1]
        y = jnp.einsum("bthwc,xyzcd->btxhywzd", x, kernel, precision=self.precision)
        y = y.reshape(b, t * ft, h * fh, w * fw, -1)
        return y if bias is None else y + bias


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


class Up(nnx.Module):
    """Transposed conv by `factor` (kernel = stride), then a residual block."""

    def __init__(self, features_in: int, features_out: int, factor, *, dtype, rngs):
        self.deconv = PatchConvTranspose(features_in, features_out, factor, dtype=dtype, rngs=rngs)
        self.block = ResBlock(features_out, features_out, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.block(self.deconv(x))


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
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(encoder.dtype)
        self.factors = stage_factors(encoder.patch_size)
        stages = len(self.factors)
        if len(channels) != stages:
            raise ValueError(
                f"unetr.channels {tuple(channels)} needs one width per upsampling stage: "
                f"{stages} for patch {encoder.patch_size} (factors {self.factors})"
            )
        self.num_skips = min(num_skips, stages - 1)
        s, c = encoder.num_planes, token_channels
        folded = s * c
        dense = dict(dtype=dtype, rngs=rngs)
        # Projections: [0] the final tokens, [1 + i] the skip of stage i (deepest first).
        self.project = nnx.List(
            [Dense(encoder.width, c, ("embed", None), **dense) for _ in range(1 + self.num_skips)]
        )
        self.bottom = ResBlock(folded, folded, **dense)
        skip_paths, ups, previous = [], [], folded
        for i, width in enumerate(channels):
            if i < self.num_skips:
                chain, features = [], folded
                for factor in self.factors[: i + 1]:
                    chain.append(Up(features, width, factor, **dense))
                    features = width
                skip_paths.append(nnx.List(chain))
                skip_width = width
            elif i == stages - 1:
                skip_width = image_channels
            else:
                skip_width = 0
            ups.append(PatchConvTranspose(previous, width, self.factors[i], **dense))
            ups.append(ResBlock(width + skip_width, width, **dense))
            previous = width
        self.skip_paths = nnx.List(skip_paths)
        self.ups = nnx.List(ups)
        self.image_block = ResBlock(s, image_channels, **dense)
        self.head = Conv1x1x1(previous, s * NUM_CLASSES, **dense)
        self.grid = encoder.grid
        self.dtype = dtype

    def _fold(self, tokens, project):
        """[B, N, D] grid-order tokens -> [B, t, h, w, S * C]."""
        s, t, h, w = self.grid
        x = project(tokens).reshape(tokens.shape[0], s, t, h, w, -1)
        return x.transpose(0, 2, 3, 4, 1, 5).reshape(tokens.shape[0], t, h, w, -1)

    def __call__(self, final_tokens, skip_tokens: Sequence, images) -> jax.Array:
        """final_tokens [B, N, D], skip_tokens deepest first [B, N, D] each, images float
        [B, S, T, H, W] -> logits float32 [B, S, T, H, W, 6]."""
        b, s, t, h, w = images.shape
        x = self.bottom(self._fold(final_tokens, self.project[0]))
        for i in range(len(self.factors)):
            x = self.ups[2 * i](x)
            if i < self.num_skips:
                skip = self._fold(skip_tokens[i], self.project[1 + i])
                for up in self.skip_paths[i]:
                    skip = up(skip)
                x = jnp.concatenate([x, skip], axis=-1)
            elif i == len(self.factors) - 1:
                skip = self.image_block(images.transpose(0, 2, 3, 4, 1).astype(self.dtype))
                x = jnp.concatenate([x, skip], axis=-1)
            x = self.ups[2 * i + 1](x)
        logits = self.head(x).astype(jnp.float32).reshape(b, t, h, w, s, NUM_CLASSES)
        return logits.transpose(0, 4, 1, 2, 3, 5)


class SegmentationModel(nnx.Module):
    """images uint8 [B, 9, T, H, W], plane_mask [B, 9] -> logits [B, S, T, H, W, 6] for
    the encoder's S planes (`planes`); S = 9 for the all-planes model."""

    def __init__(
        self,
        encoder: MAEConfig,
        *,
        token_channels: int = 128,
        channels: Sequence[int] = (256, 128, 64),
        image_channels: int = 32,
        skip_blocks: Sequence[int] = (1, 3),
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
        self.decoder = UNETRDecoder(
            encoder,
            token_channels=token_channels,
            channels=channels,
            image_channels=image_channels,
            num_skips=len(self.skip_blocks),
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
        return self.decoder(final, skips, pixels)


def segmentation_loss_values(logits, labels, weight) -> tuple[jax.Array, dict]:
    """Dice + CE of logits [B, S, T, H, W, 6] vs labels int [B, S, T, H, W] over planes
    with weight [B, S] (1 = labelled and acquired, 0 = excluded).

    CE: mean over the voxels of included planes. Dice: per foreground class, summed over
    the batch's included voxels, (2 I + e) / (|P| + |G| + e) with softmax P; loss = CE +
    1 - mean Dice. Returns (loss, {"ce", "dice"}).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, NUM_CLASSES, dtype=jnp.float32)
    w = weight.astype(jnp.float32)[:, :, None, None, None]
    voxels = math.prod(labels.shape[2:])
    ce_voxel = -jnp.sum(onehot * log_probs, axis=-1)
    ce = jnp.sum(ce_voxel * w) / jnp.maximum(jnp.sum(w) * voxels, 1.0)
    probs = jnp.exp(log_probs) * w[..., None]
    onehot = onehot * w[..., None]
    axes = tuple(range(5))
    intersection = jnp.sum(probs * onehot, axis=axes)
    total = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    dice = (2 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
    mean_dice = jnp.mean(dice[1:])
    return ce + 1.0 - mean_dice, {"ce": ce, "dice": mean_dice}


def plane_weights(batch, planes: Sequence[int]) -> jax.Array:
    """[B, S] float: label_mask & plane_mask of the model's planes."""
    planes = np.asarray(planes)
    return (batch["label_mask"][:, planes] & batch["plane_mask"][:, planes]).astype(jnp.float32)


def segmentation_loss(model, batch, key):
    """`loss_fn(model, batch, key)` for the training loop."""
    del key
    logits = model(batch["images"], batch["plane_mask"])
    planes = np.asarray(model.planes)
    return segmentation_loss_values(
        logits, batch["labels"][:, planes], plane_weights(batch, model.planes)
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
        freeze_encoder=config.mode == "probe",
        rngs=rngs,
    )


def segmentation_task(config: Any) -> Task:
    """The segmentation `Task` of a resolved config (`whmae.tasks.config.resolve`)."""
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
    )
