"""Per-exam random masking with absent planes, at fixed shapes under jit.

The reference (MAE) shuffles tokens by argsort of uniform noise and keeps the
first K = int(N * (1 - r)). Here absent planes' tokens get noise 2.0 > any
uniform draw, so they sort last; exam b keeps its first k_b = int(N_avail_b *
(1 - r)) shuffled tokens (k_b = K when every plane is present) and the model's
attention ignores the padding beyond them (`key_value_seq_lengths`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from whmae.model.config import kept_count

ABSENT_NOISE = 2.0  # uniform noise lies in [0, 1): absent tokens always sort last


def token_availability(plane_available: jnp.ndarray, tokens_per_plane: int) -> jnp.ndarray:
    """[B, S] bool per plane -> [B, S * tokens_per_plane] bool per token, (S, t, h, w) order."""
    return jnp.repeat(plane_available, tokens_per_plane, axis=1)


def kept_counts(
    num_available_planes: jnp.ndarray, tokens_per_plane: int, num_planes: int, mask_ratio: float
) -> jnp.ndarray:
    """[B] available planes -> [B] int32 kept tokens, int(N_avail * (1 - r)) as Python rounds it.

    A static table over 0..S planes, so the rounding is Python's float64 one and not
    float32 on the device (int(4608 * 0.3) = 1382 must hold exactly).
    """
    table = np.array(
        [kept_count(a * tokens_per_plane, mask_ratio) for a in range(num_planes + 1)], np.int32
    )
    return jnp.asarray(table)[num_available_planes]


def shuffle_ids(
    token_available: jnp.ndarray,
    key: jax.Array | None = None,
    ids_shuffle: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """[B, N] token order: available tokens first (random if `key`), absent ones last.

    `ids_shuffle` (e.g. the reference's exact permutation) is used as given, except
    that absent tokens are moved to the end with the available ones' order kept. With
    neither key nor ids_shuffle the order is the identity (no masking).
    """
    b, n = token_available.shape
    if ids_shuffle is None:
        if key is None:
            ids_shuffle = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        else:
            noise = jax.random.uniform(key, (b, n), jnp.float32)
            noise = jnp.where(token_available, noise, ABSENT_NOISE)
            return jnp.argsort(noise, axis=1).astype(jnp.int32)
    ids_shuffle = jnp.asarray(ids_shuffle, jnp.int32)
    if ids_shuffle.shape != (b, n):
        raise ValueError(f"ids_shuffle must be [B, N] = {(b, n)}, got {ids_shuffle.shape}")
    absent = ~jnp.take_along_axis(token_available, ids_shuffle, axis=1)
    order = jnp.argsort(absent, axis=1, stable=True)
    return jnp.take_along_axis(ids_shuffle, order, axis=1)


def restore_ids(ids_shuffle: jnp.ndarray) -> jnp.ndarray:
    """Inverse permutation: x_shuffled[ids_restore] is x in the original order."""
    return jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)


def gather_tokens(x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """[B, N, ...] tokens -> [B, len(ids), ...] = x[b, ids[b]]."""
    ids = ids.reshape(ids.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, ids, axis=1)


def restore_order(x_shuffled: jnp.ndarray, ids_shuffle: jnp.ndarray) -> jnp.ndarray:
    """[B, N, ...] tokens in shuffled order -> original (S, t, h, w) order."""
    return gather_tokens(x_shuffled, restore_ids(ids_shuffle))


def drop_planes(key: jax.Array, plane_mask: jnp.ndarray, rate: float, max_planes: int):
    """Plane dropout for fine-tuning: [B, S] bool plane_mask with, for each exam with
    probability `rate`, k ~ uniform{1..max_planes} of its present planes made absent
    (chosen at random, never the last one), so a head learns to predict from the planes
    an exam has, as `absent_planes` evaluation and real exams with missing planes ask."""
    if rate <= 0.0 or max_planes < 1:
        return plane_mask
    k_drop, k_count, k_which = jax.random.split(key, 3)
    b = plane_mask.shape[0]
    present = jnp.sum(plane_mask, axis=1)
    count = jax.random.randint(k_count, (b,), 1, max_planes + 1)
    count = jnp.where(jax.random.bernoulli(k_drop, rate, (b,)), count, 0)
    count = jnp.minimum(count, jnp.maximum(present - 1, 0))
    # Rank the present planes by uniform noise (absent ones last); drop the first `count`.
    noise = jnp.where(plane_mask, jax.random.uniform(k_which, plane_mask.shape), ABSENT_NOISE)
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return plane_mask & (rank >= count[:, None])
