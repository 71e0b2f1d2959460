"""whmae.data.lookup.apply_table: table[values] in cache-sized blocks, any array layout."""

import numpy as np
import pytest

from whmae.data import lookup


@pytest.mark.parametrize("chunk", [None, 7, 64, 150])
def test_apply_table_equals_fancy_indexing_for_every_layout(chunk, monkeypatch):
    """Blocks along the first axis, recursion into lower axes when one row is larger than a
    block, strided views (a NIfTI array seen as [Z, T, H, W]), 1-D and 0-D values."""
    if chunk is not None:
        monkeypatch.setattr(lookup, "CHUNK", chunk)
    rng = np.random.default_rng(0)
    table = rng.permutation(256).astype(np.uint8)
    nifti = rng.integers(0, 256, (12, 10, 5, 7), np.uint8).reshape((12, 10, 5, 7), order="F")
    cases = {
        "contiguous": rng.integers(0, 256, (3, 4, 5, 6), np.uint8),
        "nifti view": nifti.transpose(2, 3, 1, 0)[1:4],  # [Z, T, H, W], slices 1..3
        "reversed": rng.integers(0, 256, (9, 11), np.uint16)[::-1, ::2],
        "1-D": rng.integers(0, 256, 1000, np.int64),
        "0-D": np.uint8(17),
    }
    for name, values in cases.items():
        expected = table[np.asarray(values)]
        got = lookup.apply_table(table, values)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        assert got.dtype == table.dtype
        out = np.full(np.shape(values), 0, np.uint8)
        assert lookup.apply_table(table, values, out) is out
        np.testing.assert_array_equal(out, expected, err_msg=f"{name} (out)")
