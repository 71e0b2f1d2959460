"""Fixed 4D sine-cosine positional embeddings of the multi-view token grid.

Two kinds, chosen by `MAEConfig.posembed`; both give row 0 (the cls token) all zeros,
rows 1.. the tokens (s, t, h, w) in row-major order, float32, and index a plane by its
position within its own axis (long-axis 0-2, short-axis 0-5). A sin-cos block of even
width B for an integer position p is [sin(p * w_i), cos(p * w_i)] with
w_i = 1 / 10000**(i / (B/2)), i = 0..B/2-1 (`sincos_1d`).

"flag_sincos" (default; the reference's, bit-compatible with the authors' weights), at
width D = 1 + 4B:

  [axis flag | sincos(plane) | sincos(t) | sincos(h) | sincos(w)]

flag = 0 for long-axis planes and 1 for short-axis planes (the raw value, one column).
This is `sincos_pos_embed(..., use_both_axes=True)` of the reference (WholeHeartRL
utils/model_related.py), computed in float32 as there. The flag column makes every
width odd (1025, 513): head dims like 205, widths that pad on matrix units, weights
that do not split evenly over a mesh axis.

"view_sincos", at any width D = 4B with B even (D a multiple of 8: 1024, 512):

  [a * sincos(plane) | sincos(t) | sincos(h) | sincos(w)],  a = +1 short axis, -1 long axis

The axis identity moves from its own column into the phase of the plane block: a
long-axis plane sits at angle p * w_i + pi, i.e. its plane block is the negated
short-axis one (sin(x + pi) = -sin x, cos(x + pi) = -cos x). Why this way:
  - no column is spent on the flag, so D needs only be a multiple of 8, and at
    D = 4 x 256 the plane, t, h and w blocks hold the reference's frequencies exactly
    (columns 1.. of `flag_sincos` at D + 1, the plane block times a);
  - within an axis the geometry is plain sin-cos: dot products between planes depend
    on the index difference only, equally for both axes, and the t/h/w blocks do not
    depend on the axis at all;
  - the axis is a strong, linearly readable signal rather than one column of value 1
    beside a norm of ~sqrt(2 D / 4) per block: the low-frequency cos columns of the
    plane block (p * w_i << 1 for p <= 5; ~94 of 128 at D = 1024 stay above 0.9) are
    +-1 copies of the axis sign, so one fixed linear read-out recovers it;
  - a plane of one axis never coincides with a plane of the other: -v(p) = v(q) would
    need (p - q) * w_0 = (p - q) = pi (mod 2 pi) for integers p, q (w_0 = 1);
  - it stays fixed (no learned parameter), like the reference's, and it is the plain 4D
    sin-cos embedding for short-axis planes, so an SA-only model sees standard sin-cos.

With a plane subset (config.planes) each plane keeps its index and axis of the full
9-plane layout, so an SA-only model's planes are still short-axis 0-5 with the same rows
as in the 9-plane model, and its weights stay interchangeable with the all-planes
model. (The reference's single-view models instead drop the flag and index planes from
0 with width 8k; that variant is not reproduced here.)
"""

from __future__ import annotations

import numpy as np

from whmae.layout import SHORT_AXIS_PLANES, is_short_axis

POSEMBEDS = ("flag_sincos", "view_sincos")


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


def check_width(width: int, kind: str = "flag_sincos") -> None:
    """Raise ValueError unless `width` suits the positional embedding `kind`."""
    if kind == "flag_sincos":
        if (width - 1) % 8 or width < 9:
            raise ValueError(
                f"flag_sincos positional embedding width must be 1 + 4 * (even) "
                f"([axis flag | plane | t | h | w]: 1 + 4 sin-cos blocks, e.g. 33, 513, 1025), "
                f"got {width}; posembed='view_sincos' takes multiples of 8"
            )
    elif kind == "view_sincos":
        if width % 8 or width < 8:
            raise ValueError(
                f"view_sincos positional embedding width must be a multiple of 8 "
                f"(4 sin-cos blocks of even width: plane, t, h, w, e.g. 512, 1024), got {width}"
            )
    else:
        raise ValueError(f"unknown positional embedding {kind!r}; expected one of {POSEMBEDS}")


def positional_embedding(
    width: int,
    planes: tuple[int, ...],
    grid_thw: tuple[int, int, int],
    kind: str = "flag_sincos",
) -> np.ndarray:
    """[1 + N, width] float32, N = len(planes) * t * h * w in (plane, t, h, w) row-major order."""
    check_width(width, kind)
    flag_column = kind == "flag_sincos"
    block = (width - 1) // 4 if flag_column else width // 4
    t, h, w = grid_thw
    flag_index = np.array([plane_axis_and_index(p) for p in planes], np.float32)  # [S, 2]
    plane_pos, t_pos, h_pos, w_pos = np.meshgrid(
        flag_index[:, 1], np.arange(t), np.arange(h), np.arange(w), indexing="ij"
    )
    flag, *_ = np.meshgrid(
        flag_index[:, 0], np.arange(t), np.arange(h), np.arange(w), indexing="ij"
    )
    flag = flag.reshape(-1, 1).astype(np.float32)
    blocks = [sincos_1d(p, block) for p in (plane_pos, t_pos, h_pos, w_pos)]
    if flag_column:
        tokens = np.concatenate([flag] + blocks, axis=1)
    else:
        # Phase 0 for short-axis planes, pi for long-axis ones: the sign of the plane block.
        axis_sign = np.where(flag > 0, np.float32(1.0), np.float32(-1.0))
        tokens = np.concatenate([axis_sign * blocks[0]] + blocks[1:], axis=1)
    cls = np.zeros((1, width), np.float32)
    return np.concatenate([cls, tokens], axis=0)
