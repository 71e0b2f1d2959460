"""The ResNet50 regression baseline: a 2D ResNet over planes x frames stacked as channels.

An exam [9, T, H, W] becomes one image [H, W, S * T] (the model's S planes, absent
planes zeroed through plane_mask), scaled to [0, 1]. Bottleneck blocks ([3, 4, 6, 3]
for ResNet50; `blocks` and `widths` configurable, so a tiny variant runs on CPU),
expansion 4, global average pool, linear head. The stem (`stem`, `stem_stride`):

  imagenet  7x7 conv, stride `stem_stride` (2), then a 3x3/2 max pool: the ResNet50 of
            He et al., for the paper's 128x128 planes (final feature maps 4x4).
  cifar     3x3 conv, stride `stem_stride`, no max pool: the small-image stem of CIFAR
            ResNets (stride 1 there). On 32x32 planes the imagenet stem divides by 4
            before stages that divide by 8 more, leaving 1x1 maps (see below); the tiny
            config uses cifar with stride 2 (final maps 2x2): a train step costs ~1.5x
            the imagenet stem's on a CPU (stride 1, 32x32 maps in stage 1: ~7x).

Normalisation is GroupNorm (`groups`, reduced to a divisor of each channel count), not
BatchNorm: no batch statistics to carry in the state, identical in training and
inference, and independent of how the batch is sharded over devices. A GroupNorm
whose groups hold too few values (channels per group x feature-map pixels) is
degenerate: with 1 value it outputs its bias whatever the input, with 2 only a sign,
and no gradient passes through it. The tiny widths [8, 8, 16, 16] (groups of 1
channel) with the imagenet stem on 32x32 did exactly that in the last stage, so the
network predicted one constant for every exam; the constructor now refuses any
geometry that leaves a group fewer than MIN_GROUP_VALUES values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from whmae.model.config import MAEConfig
from whmae.tasks.phenotype import Standardised

__all__ = ["STEMS", "ResNetRegressor", "feature_sizes", "stack_planes"]

EXPANSION = 4
STEMS = ("imagenet", "cifar")
MIN_GROUP_VALUES = 4  # values per GroupNorm group (channels per group x pixels)


def _norm(channels: int, groups: int, rngs: nnx.Rngs, zero_scale: bool = False) -> nnx.GroupNorm:
    scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
    return nnx.GroupNorm(
        channels, num_groups=math.gcd(groups, channels), scale_init=scale_init, rngs=rngs
    )


def _strided(size: int, stride: int) -> int:
    return -(-size // stride)  # SAME padding


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride) -> 1x1 x4, GroupNorm, ReLU; projection shortcut when needed."""

    def __init__(self, features_in: int, width: int, stride: int, groups: int, rngs: nnx.Rngs):
        out = width * EXPANSION
        self.conv1 = nnx.Conv(features_in, width, (1, 1), use_bias=False, rngs=rngs)
        self.norm1 = _norm(width, groups, rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), stride, use_bias=False, rngs=rngs)
        self.norm2 = _norm(width, groups, rngs)
        self.conv3 = nnx.Conv(width, out, (1, 1), use_bias=False, rngs=rngs)
        # Zero-initialised last norm: each block starts as the identity (Goyal et al.).
        self.norm3 = _norm(out, groups, rngs, zero_scale=True)
        project = stride != 1 or features_in != out
        self.shortcut = (
            nnx.Conv(features_in, out, (1, 1), stride, use_bias=False, rngs=rngs)
            if project
            else None
        )
        self.shortcut_norm = _norm(out, groups, rngs) if project else None

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = jax.nn.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        if self.shortcut is not None:
            x = self.shortcut_norm(self.shortcut(x))
        return jax.nn.relu(x + y)


def stack_planes(images, plane_mask, planes: Sequence[int]) -> jax.Array:
    """uint8/float [B, 9, T, H, W], bool [B, 9] -> float32 [B, H, W, S * T] in [0, 1],
    channel s * T + t = plane planes[s], frame t; absent planes are zeros."""
    planes = np.asarray(planes)
    x = images[:, planes]
    x = x.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else x.astype(jnp.float32)
    x = x * plane_mask[:, planes, None, None, None].astype(jnp.float32)
    b, s, t, h, w = x.shape
    return x.transpose(0, 3, 4, 1, 2).reshape(b, h, w, s * t)


def feature_sizes(
    image_size: int, stages: int, stem: str = "imagenet", stem_stride: int = 2
) -> list[int]:
    """Side of the feature maps after the stem and after each stage (SAME padding)."""
    size = _strided(image_size, stem_stride)
    if stem == "imagenet":
        size = _strided(size, 2)  # max pool
    sizes = [size]
    for stage in range(stages):
        size = _strided(size, 2) if stage > 0 else size
        sizes.append(size)
    return sizes


class ResNetRegressor(Standardised):
    """images [B, 9, T, H, W], plane_mask [B, 9] -> [B, K] standardised phenotypes.

    Input geometry (planes, frames, image size) from `geometry`, the config's encoder
    fields; `stem`, `stem_stride` as in the module docstring.
    """

    def __init__(
        self,
        geometry: MAEConfig,
        columns: Sequence[str],
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (3, 4, 6, 3),
        groups: int = 32,
        stem: str = "imagenet",
        stem_stride: int = 2,
        mean=None,
        std=None,
        rngs: nnx.Rngs,
    ):
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"resnet widths {widths} and blocks {blocks} must pair up")
        if stem not in STEMS:
            raise ValueError(f"resnet stem must be one of {STEMS}, got {stem!r}")
        if stem_stride < 1:
            raise ValueError(f"resnet stem_stride must be >= 1, got {stem_stride}")
        _check_group_sizes(geometry.image_size, widths, groups, stem, stem_stride)
        self._init_scale(columns, mean, std)
        self.geometry, self.planes = geometry, geometry.planes
        self.stem_pool = stem == "imagenet"
        channels_in = len(self.planes) * geometry.frames
        kernel = (7, 7) if stem == "imagenet" else (3, 3)
        self.stem = nnx.Conv(channels_in, widths[0], kernel, stem_stride, use_bias=False, rngs=rngs)
        self.stem_norm = _norm(widths[0], groups, rngs)
        layers, features = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(Bottleneck(features, width, stride, groups, rngs))
                features = width * EXPANSION
        self.layers = nnx.List(layers)
        self.out = nnx.Linear(features, len(self.columns), rngs=rngs)

    def __call__(self, images, plane_mask) -> jax.Array:
        x = stack_planes(images, plane_mask, self.planes)
        x = jax.nn.relu(self.stem_norm(self.stem(x)))
        if self.stem_pool:
            x = nnx.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for layer in self.layers:
            x = layer(x)
        return self.out(jnp.mean(x, axis=(1, 2)))


def _check_group_sizes(image_size, widths, groups, stem, stem_stride) -> None:
    """Refuse a geometry where some GroupNorm group holds < MIN_GROUP_VALUES values."""
    sizes = feature_sizes(image_size, len(widths), stem, stem_stride)
    # (channels, side) of every norm: the stem's, and in each stage the 3x3 conv's
    # (smallest: width channels at the stage's resolution) and the block outputs'.
    norms = [(widths[0], sizes[0])]
    for width, side in zip(widths, sizes[1:], strict=True):
        norms += [(width, side), (width * EXPANSION, side)]
    for channels, side in norms:
        values = channels // math.gcd(groups, channels) * side * side
        if values < MIN_GROUP_VALUES:
            raise ValueError(
                f"resnet on {image_size}x{image_size} images with the {stem!r} stem (stride "
                f"{stem_stride}) reaches {side}x{side} feature maps where a GroupNorm group "
                f"of {channels} channels / {math.gcd(groups, channels)} groups holds "
                f"{values} value(s) (< {MIN_GROUP_VALUES}): its output would not depend on "
                "the input. Use model.resnet.stem='cifar' (small images), fewer groups, "
                "or wider stages."
            )
