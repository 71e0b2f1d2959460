"""Lookup tables applied to large integer arrays: `apply_table(table, values)` = table[values].

Used for label remapping (`label_maps`) and uint8 quantisation of NIfTI integers
(`quantize`). np.take converts its indices to intp before gathering; over a whole exam
that is a copy 8x the size of uint8 labels, out of cache. Done a block of ~128 k values at
a time the copy stays in cache: 2-3x faster (an exam's 7.4 M image pixels: 6.7 vs 18.7 ms).
"""

from __future__ import annotations

import math

import numpy as np

CHUNK = 1 << 17  # values per np.take call (their intp copy: 1 MiB)


def apply_table(table: np.ndarray, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """table[values] for an array of non-negative integers below len(table) (any layout).

    out: where to write (values' shape, table's dtype), or None for a new array. Indices
    are not checked (np.take mode "wrap"): callers guarantee the range.
    """
    values = np.asarray(values)
    if out is None:
        out = np.empty(values.shape, table.dtype)
    if values.ndim == 0:
        out[...] = table[values]
        return out
    inner = math.prod(values.shape[1:])
    if values.ndim > 1 and inner > CHUNK:  # blocks of the next axis down
        for part, part_out in zip(values, out, strict=True):
            apply_table(table, part, part_out)
        return out
    step = max(1, CHUNK // max(inner, 1))
    for start in range(0, values.shape[0], step):
        block = slice(start, start + step)
        np.take(table, values[block], out=out[block], mode="wrap")
    return out
