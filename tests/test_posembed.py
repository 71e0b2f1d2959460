"""The fixed positional embedding equals the SPEC formula, computed here independently."""

import math

import numpy as np
import pytest

from whmae.model.posembed import positional_embedding

WIDTH = 33  # 1 + 4 * 8: blocks of 8 = 4 sin + 4 cos
GRID_THW = (2, 4, 4)
ALL_PLANES = tuple(range(9))


def spec_row(width, axis_flag, plane, t, h, w):
    """SPEC: [flag | plane | t | h | w], block [sin(p w_i), cos(p w_i)], w_i = 1e4**-(i/(B/2))."""
    block = (width - 1) // 4
    half = block // 2
    row = [float(axis_flag)]
    for p in (plane, t, h, w):
        freqs = [1.0 / 10000 ** (i / half) for i in range(half)]
        row += [math.sin(p * f) for f in freqs] + [math.cos(p * f) for f in freqs]
    return np.array(row)


def token_row(plane_slot, t, h, w, grid_thw=GRID_THW):
    """Row of token (slot, t, h, w) in the [1 + N, D] table (row 0 = cls)."""
    gt, gh, gw = grid_thw
    return 1 + ((plane_slot * gt + t) * gh + h) * gw + w


@pytest.fixture(scope="module")
def table():
    return positional_embedding(WIDTH, ALL_PLANES, GRID_THW)


def test_long_axis_token_matches_spec(table):
    # Plane 1 = la_3ch: long axis, index 1.
    np.testing.assert_allclose(
        table[token_row(1, 1, 2, 3)], spec_row(WIDTH, 0, 1, 1, 2, 3), atol=1e-6
    )


def test_short_axis_token_matches_spec(table):
    # Plane 7 = sa_4: short axis, index restarts -> 4.
    np.testing.assert_allclose(
        table[token_row(7, 0, 3, 1)], spec_row(WIDTH, 1, 4, 0, 3, 1), atol=1e-6
    )


def test_cls_row_is_zero_and_flag_column_marks_axis(table):
    assert table.shape == (1 + 9 * 32, WIDTH) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)
    flags = table[1:, 0].reshape(9, 32)
    np.testing.assert_array_equal(flags[:3], 0.0)
    np.testing.assert_array_equal(flags[3:], 1.0)


def test_plane_index_restarts_per_axis(table):
    plane_block = slice(1, 1 + (WIDTH - 1) // 4)
    rows = table[1:].reshape(9, 32, WIDTH)[:, 5, plane_block]
    np.testing.assert_array_equal(rows[0], rows[3])  # la_2ch and sa_0 are both index 0
    np.testing.assert_array_equal(rows[2], rows[5])  # la_4ch and sa_2 are both index 2
    assert not np.allclose(rows[3], rows[4])
    # Everything but the flag is equal between la_2ch and sa_0 tokens.
    full = table[1:].reshape(9, 32, WIDTH)
    np.testing.assert_array_equal(full[0, :, 1:], full[3, :, 1:])


def test_short_axis_subset_keeps_full_layout_indices(table):
    short_axis = positional_embedding(WIDTH, (3, 4, 5, 6, 7, 8), GRID_THW)
    np.testing.assert_array_equal(short_axis[0], 0.0)
    np.testing.assert_array_equal(short_axis[1:], table[1 + 3 * 32 :])
    subset = positional_embedding(WIDTH, (0, 4), GRID_THW)
    np.testing.assert_array_equal(subset[1:33], table[1:33])
    np.testing.assert_array_equal(subset[33:], table[1 + 4 * 32 : 1 + 5 * 32])


def test_reference_size_and_bad_width():
    paper = positional_embedding(1025, ALL_PLANES, (2, 16, 16))
    assert paper.shape == (4609, 1025)
    np.testing.assert_allclose(
        paper[token_row(8, 1, 15, 9, (2, 16, 16))], spec_row(1025, 1, 5, 1, 15, 9), atol=2e-6
    )
    with pytest.raises(ValueError, match="1 \\+ 4"):
        positional_embedding(1024, ALL_PLANES, (2, 16, 16))
