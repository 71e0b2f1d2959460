"""The subjects of a UK Biobank-layout exam root: its `<eid>/` folders and the phenotype
CSV's rows (by exact UK Biobank column names), shared by `whmae-prepare` and `whmae-qc`."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import numpy as np

from whmae.layout import PHENOTYPE_COLUMNS

_MISSING = {"", "na", "nan", "n/a", "none", "null"}


def read_phenotype_csv(path, eid_column: str = "eid") -> tuple[dict, dict, list[str]]:
    """CSV -> ({eid: float32 [18] NaN = missing}, {eid: [cell warnings]}, [file warnings]).

    Columns are matched by their exact UK Biobank names (`layout.PHENOTYPE_COLUMNS`); an
    absent column stays NaN for everyone. Empty/NA cells are NaN, never 0.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if eid_column not in header:
            raise ValueError(f"{path}: no eid column {eid_column!r} (columns: {header[:10]}...)")
        absent = [c for c in PHENOTYPE_COLUMNS if c not in header]
        warnings = [f"{path.name}: no column {c!r} (all NaN)" for c in absent]
        rows, cell_warnings = {}, collections.defaultdict(list)
        for line, row in enumerate(reader, start=2):
            eid = (row.get(eid_column) or "").strip()
            if not eid:
                warnings.append(f"{path.name} line {line}: empty eid, row ignored")
                continue
            if eid in rows:
                warnings.append(f"{path.name} line {line}: duplicate eid {eid}, row ignored")
                continue
            values = np.full(len(PHENOTYPE_COLUMNS), np.nan, np.float32)
            for j, column in enumerate(PHENOTYPE_COLUMNS):
                cell = (row.get(column) or "").strip()
                if cell.lower() in _MISSING:
                    continue
                try:
                    values[j] = float(cell)
                except ValueError:
                    cell_warnings[eid].append(f"{column}: not a number {cell!r} (NaN)")
            rows[eid] = values
    return rows, dict(cell_warnings), warnings


def list_subjects(root, phenotypes: dict) -> tuple[list[str], set[str]]:
    """Sorted union of folder names under root and CSV eids; and the set of folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"exam root {root} is not a directory")
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return sorted(folders | set(phenotypes)), folders
