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


# ------------------------------------------------ view_sincos: matrix-shaped widths
VIEW = "view_sincos"
VIEW_WIDTH = 64  # 4 blocks of 16 = 8 sin + 8 cos
SHORT_AXIS = np.array([False] * 3 + [True] * 6)


def view_spec_row(width, short_axis, plane, t, h, w):
    """[plane | t | h | w] blocks of width D/4; the plane block's phase is 0 (short axis)
    or pi (long axis): [sin(p w_i + phase), cos(p w_i + phase)]."""
    half = width // 8
    freqs = [1.0 / 10000 ** (i / half) for i in range(half)]
    row = []
    for p, phase in ((plane, 0.0 if short_axis else math.pi), (t, 0.0), (h, 0.0), (w, 0.0)):
        row += [math.sin(p * f + phase) for f in freqs] + [math.cos(p * f + phase) for f in freqs]
    return np.array(row)


@pytest.fixture(scope="module")
def view_table():
    return positional_embedding(VIEW_WIDTH, ALL_PLANES, GRID_THW, VIEW)


def test_view_sincos_tokens_match_formula(view_table):
    # Plane 1 = la_3ch (long axis, index 1); plane 7 = sa_4 (short axis, index 4).
    np.testing.assert_allclose(
        view_table[token_row(1, 1, 2, 3)], view_spec_row(VIEW_WIDTH, False, 1, 1, 2, 3), atol=1e-6
    )
    np.testing.assert_allclose(
        view_table[token_row(7, 0, 3, 1)], view_spec_row(VIEW_WIDTH, True, 4, 0, 3, 1), atol=1e-6
    )


@pytest.mark.parametrize("width", [8, 16, 64, 512, 1024])
def test_view_sincos_shape_dtype_cls_and_determinism(width):
    table = positional_embedding(width, ALL_PLANES, GRID_THW, VIEW)
    assert table.shape == (1 + 9 * 32, width) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)
    again = positional_embedding(width, ALL_PLANES, GRID_THW, VIEW)
    assert again.tobytes() == table.tobytes()


@pytest.mark.parametrize("width", [0, 4, 12, 33, 1020, 1025])
def test_view_sincos_rejects_widths_not_a_multiple_of_8(width):
    with pytest.raises(ValueError, match="multiple of 8"):
        positional_embedding(width, ALL_PLANES, GRID_THW, VIEW)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown positional embedding"):
        positional_embedding(64, ALL_PLANES, GRID_THW, "learned")


@pytest.mark.parametrize(
    "width, grid_thw", [(8, GRID_THW), (VIEW_WIDTH, GRID_THW), (1024, (2, 16, 16))]
)
def test_view_sincos_every_token_position_is_distinct(width, grid_thw):
    tokens = positional_embedding(width, ALL_PLANES, grid_thw, VIEW)[1:].astype(np.float64)
    sq = np.sum(tokens**2, axis=1)
    dist2 = sq[:, None] + sq[None, :] - 2 * tokens @ tokens.T
    np.fill_diagonal(dist2, np.inf)
    # The closest pair of different tokens is well apart (not float noise): at width 8 the
    # nearest are la_2ch index 0 (-[0, 1]) vs sa_3 ([sin 3, cos 3]), |sin 3| ~ 0.14 apart.
    assert np.sqrt(dist2.min()) > 0.1


def test_view_sincos_same_in_axis_index_differs_only_by_the_axis_sign(view_table):
    block = VIEW_WIDTH // 4
    full = view_table[1:].reshape(9, 32, VIEW_WIDTH)
    for index in range(3):  # la_2ch/sa_0, la_3ch/sa_1, la_4ch/sa_2 share in-axis indices
        long_axis, short_axis = full[index], full[3 + index]
        np.testing.assert_array_equal(long_axis[:, :block], -short_axis[:, :block])
        np.testing.assert_array_equal(long_axis[:, block:], short_axis[:, block:])
        assert np.linalg.norm(long_axis - short_axis, axis=1).min() > 1.0


def test_view_sincos_axis_is_linearly_recoverable():
    """One fixed read-out (the low-frequency cos columns of the plane block) gives the
    axis of every token; a least-squares probe fitted on half the tokens of the paper
    grid classifies the other half perfectly."""
    width, grid_thw = 1024, (2, 16, 16)
    tokens = positional_embedding(width, ALL_PLANES, grid_thw, VIEW)[1:]
    per_plane = len(tokens) // 9
    short_axis = np.repeat(SHORT_AXIS, per_plane)
    half = width // 8
    freqs = 1.0 / 10000 ** (np.arange(half) / half)
    low = half + np.flatnonzero(5 * freqs < 0.45)  # cos columns with p * w_i < 0.45 for p <= 5
    assert len(low) > 80
    readout = tokens[:, low].mean(axis=1)
    assert np.all(readout[short_axis] > 0.9) and np.all(readout[~short_axis] < -0.9)

    rng = np.random.default_rng(0)
    order = rng.permutation(len(tokens))
    fit, held_out = order[::2], order[1::2]
    features = np.concatenate([tokens, np.ones((len(tokens), 1), np.float32)], axis=1)
    labels = np.where(short_axis, 1.0, -1.0)
    probe, *_ = np.linalg.lstsq(features[fit], labels[fit], rcond=None)
    predicted = features[held_out] @ probe
    assert np.all(np.sign(predicted) == labels[held_out])


def test_view_sincos_in_axis_geometry_is_the_same_for_both_axes(view_table):
    block = VIEW_WIDTH // 4
    plane_blocks = view_table[1:].reshape(9, 32, VIEW_WIDTH)[:, 0, :block].astype(np.float64)
    long_gram = plane_blocks[:3] @ plane_blocks[:3].T
    short_gram = plane_blocks[3:6] @ plane_blocks[3:6].T
    np.testing.assert_allclose(long_gram, short_gram, atol=1e-5)
    # Across the axes, same index: anti-parallel (phase pi), not merely different.
    cross = np.sum(plane_blocks[:3] * plane_blocks[3:6], axis=1)
    np.testing.assert_allclose(cross, -np.diag(short_gram), atol=1e-5)


def test_view_sincos_plane_subsets_keep_full_layout_rows(view_table):
    short_axis = positional_embedding(VIEW_WIDTH, (3, 4, 5, 6, 7, 8), GRID_THW, VIEW)
    np.testing.assert_array_equal(short_axis[0], 0.0)
    np.testing.assert_array_equal(short_axis[1:], view_table[1 + 3 * 32 :])
    subset = positional_embedding(VIEW_WIDTH, (0, 4), GRID_THW, VIEW)
    np.testing.assert_array_equal(subset[1:33], view_table[1:33])
    np.testing.assert_array_equal(subset[33:], view_table[1 + 4 * 32 : 1 + 5 * 32])


def test_view_sincos_at_1024_holds_the_reference_blocks():
    """At D = 4 x 256 the blocks are the reference's (D = 1 + 4 x 256) without the flag
    column, the plane block signed by the axis: no frequency of the paper model is lost."""
    grid_thw = (2, 16, 16)
    paper = positional_embedding(1025, ALL_PLANES, grid_thw)
    view = positional_embedding(1024, ALL_PLANES, grid_thw, VIEW)
    np.testing.assert_array_equal(view[:, 256:], paper[:, 257:])
    sign = np.where(np.repeat(SHORT_AXIS, 512), 1.0, -1.0).astype(np.float32)
    np.testing.assert_array_equal(view[1:, :256], sign[:, None] * paper[1:, 1:257])
