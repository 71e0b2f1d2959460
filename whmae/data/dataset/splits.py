"""Deterministic train/val/test assignment by subject id.

A hash of the eid (not Python's salted `hash`) decides the split, so the same
subject lands in the same split on every machine, run and host, whatever order
exams are processed in.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def split_of(eid: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split of subject `eid` for the given (train, val, test) fractions."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1: {fractions}"
        )
    digest = hashlib.sha256(str(eid).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"
