"""Fixed 4D sine-cosine positional embedding of the multi-view token grid.

Row 0 is the cls token (all zeros). Token (s, t, h, w) gets, at width D = 1 + 4B:

  [axis flag | sincos(plane) | sincos(t) | sincos(h) | sincos(w)]

flag = 0 for long-axis planes and 1 for short-axis planes (the raw value, one
column); plane = the plane's index within its axis (long-axis 0-2, short-axis
0-5); each block of width B is [sin(p * w_i), cos(p * w_i)] with
w_i = 1 / 10000**(i / (B/2)), i = 0..B/2-1. This is `sincos_pos_embed(...,
use_both_axes=True)` of the reference (WholeHeartRL utils/model_related.py),
computed in float32 as there.

With a plane subset (config.planes) each plane keeps its index in the full
9-plane layout, so an SA-only model's planes are still short-axis 0-5 and its
weights stay interchangeable with the all-planes model. (The reference's
single-view models instead drop the flag and index planes from 0 with width 8k;
that variant is not reproduced here.)
"""

from __future__ import annotations

import numpy as np

from whmae.layout import SHORT_AXIS_PLANES, is_short_axis


def plane_axis_and_index(plane: int) -> tuple[int, int]:
    """(axis flag, index within the axis) of a plane of the 9-plane layout."""
    if is_short_axis(plane):
        return 1, plane - SHORT_AXIS_PLANES[0]
    return 0, plane


def sincos_1d(positions: np.ndarray, width: int) -> np.ndarray:
    """[M] positions -> [M, width] = [sin(p * w_i), cos(p * w_i)], float32 as the reference."""
    if width % 2:
        raise ValueError(f"sin-cos block width must be even, got {width}")
    half = width // 2
    omega = np.arange(half, dtype=np.float32) / np.float32(half)
    omega = np.float32(1.0) / np.float32(10000.0) ** omega
    angles = np.asarray(positions, np.float32).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def positional_embedding(
    width: int, planes: tuple[int, ...], grid_thw: tuple[int, int, int]
) -> np.ndarray:
    """[1 + N, width] float32, N = len(planes) * t * h * w in (plane, t, h, w) row-major order."""
    if (width - 1) % 8 or width < 9:
        raise ValueError(f"positional embedding width must be 1 + 4 * (even), got {width}")
    block = (width - 1) // 4
    t, h, w = grid_thw
    flag_index = np.array([plane_axis_and_index(p) for p in planes], np.float32)  # [S, 2]
    plane_pos, t_pos, h_pos, w_pos = np.meshgrid(
        flag_index[:, 1], np.arange(t), np.arange(h), np.arange(w), indexing="ij"
    )
    flag, *_ = np.meshgrid(
        flag_index[:, 0], np.arange(t), np.arange(h), np.arange(w), indexing="ij"
    )
    tokens = np.concatenate(
        [flag.reshape(-1, 1).astype(np.float32)]
        + [sincos_1d(p, block) for p in (plane_pos, t_pos, h_pos, w_pos)],
        axis=1,
    )
    cls = np.zeros((1, width), np.float32)
    return np.concatenate([cls, tokens], axis=0)
