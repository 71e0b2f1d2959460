"""`--split-file` of whmae-prepare: fixed train/val/test lists (CSV eid,split) by subject.

Subjects the file does not list keep the hash split of `whmae.data.dataset.splits`; prepare.py
decides whether such a subject is flagged or rejected.
"""

from __future__ import annotations

import csv
from pathlib import Path

from whmae.data.dataset.splits import SPLITS, split_of


def read_split_file(path) -> dict[str, str]:
    """CSV with columns eid,split -> {eid: split}. Raises ValueError naming the file and
    line for a missing column, an empty eid, an unknown split or an eid listed twice with
    different splits."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        if "eid" not in header or "split" not in header:
            raise ValueError(f"{path}: split file needs columns eid,split (columns: {header})")
        reader.fieldnames = header
        splits, first_line = {}, {}
        for line, row in enumerate(reader, start=2):
            eid = (row.get("eid") or "").strip()
            split = (row.get("split") or "").strip().lower()
            if not eid:
                raise ValueError(f"{path} line {line}: empty eid")
            if split not in SPLITS:
                raise ValueError(
                    f"{path} line {line}: eid {eid}: unknown split {row.get('split')!r}; "
                    f"expected one of {SPLITS}"
                )
            if eid in splits and splits[eid] != split:
                raise ValueError(
                    f"{path} line {line}: eid {eid} is {split!r} here but {splits[eid]!r} "
                    f"on line {first_line[eid]}"
                )
            splits[eid] = split
            first_line.setdefault(eid, line)
    return splits


class SplitAssignment:
    """eid -> split: the split file's entry, else the hash of the eid (picklable)."""

    def __init__(self, listed: dict[str, str] | None = None):
        self.listed = listed or {}

    def __call__(self, eid: str) -> str:
        return self.listed.get(eid) or split_of(eid)

    def source(self, eid: str) -> str:
        return "file" if eid in self.listed else "hash"
