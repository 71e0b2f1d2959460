"""Cut a multi-plane cine stack into (time x row x col) patches and back.

Tokens are ordered (plane, t, h, w) row-major and each patch's values (pt, ph, pw)
row-major: exactly how a Conv3d with kernel = stride = (pt, ph, pw) over each plane
(1 input channel) flattens its weight (out, 1, pt, ph, pw). So the reference's
`patch_embed.proj.weight.reshape(D, P).T` is our [P, D] patch-embedding kernel.
"""

from __future__ import annotations

import jax.numpy as jnp


def patchify(images: jnp.ndarray, patch_size: tuple[int, int, int]) -> jnp.ndarray:
    """[B, S, T, H, W] -> [B, S*t*h*w, pt*ph*pw]."""
    b, s, t_len, h_len, w_len = images.shape
    pt, ph, pw = patch_size
    if t_len % pt or h_len % ph or w_len % pw:
        raise ValueError(f"images {images.shape} are not divisible into patches {patch_size}")
    t, h, w = t_len // pt, h_len // ph, w_len // pw
    x = images.reshape(b, s, t, pt, h, ph, w, pw)
    x = x.transpose(0, 1, 2, 4, 6, 3, 5, 7)  # [B, S, t, h, w, pt, ph, pw]
    return x.reshape(b, s * t * h * w, pt * ph * pw)


def unpatchify(
    patches: jnp.ndarray, grid: tuple[int, int, int, int], patch_size: tuple[int, int, int]
) -> jnp.ndarray:
    """[B, S*t*h*w, pt*ph*pw] -> [B, S, T, H, W] for the token grid (S, t, h, w)."""
    s, t, h, w = grid
    pt, ph, pw = patch_size
    b = patches.shape[0]
    if patches.shape[1:] != (s * t * h * w, pt * ph * pw):
        raise ValueError(
            f"patches {patches.shape} do not match grid {grid} and patch size {patch_size}"
        )
    x = patches.reshape(b, s, t, h, w, pt, ph, pw)
    x = x.transpose(0, 1, 2, 5, 3, 6, 4, 7)  # [B, S, t, pt, h, ph, w, pw]
    return x.reshape(b, s, t * pt, h * ph, w * pw)
