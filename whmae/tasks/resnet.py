"""The ResNet50 regression baseline: a 2D ResNet over planes x frames stacked as channels.

An exam [9, T, H, W] becomes one image [H, W, S * T] (the model's S planes, absent
planes zeroed through plane_mask), scaled to [0, 1]. Bottleneck blocks ([3, 4, 6, 3]
for ResNet50; `blocks` and `widths` configurable, so a tiny variant runs on CPU),
expansion 4, a 7x7/2 stem and 3x3/2 max pool, global average pool, linear head.

Normalisation is GroupNorm (`groups`, reduced to a divisor of each channel count), not
BatchNorm: no batch statistics to carry in the state, identical in training and
inference, and independent of how the batch is sharded over devices.
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

__all__ = ["ResNetRegressor", "stack_planes"]

EXPANSION = 4


def _norm(channels: int, groups: int, rngs: nnx.Rngs, zero_scale: bool = False) -> nnx.GroupNorm:
    scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
    return nnx.GroupNorm(
        channels, num_groups=math.gcd(groups, channels), scale_init=scale_init, rngs=rngs
    )


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


class ResNetRegressor(Standardised):
    """images [B, 9, T, H, W], plane_mask [B, 9] -> [B, K] standardised phenotypes.

    Input geometry (planes, frames) from `geometry`, the config's encoder fields.
    """

    def __init__(
        self,
        geometry: MAEConfig,
        columns: Sequence[str],
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (3, 4, 6, 3),
        groups: int = 32,
        mean=None,
        std=None,
        rngs: nnx.Rngs,
    ):
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"resnet widths {widths} and blocks {blocks} must pair up")
        self._init_scale(columns, mean, std)
        self.geometry, self.planes = geometry, geometry.planes
        channels_in = len(self.planes) * geometry.frames
        self.stem = nnx.Conv(channels_in, widths[0], (7, 7), 2, use_bias=False, rngs=rngs)
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
        x = nnx.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for layer in self.layers:
            x = layer(x)
        return self.out(jnp.mean(x, axis=(1, 2)))
