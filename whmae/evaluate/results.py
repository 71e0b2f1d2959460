"""metrics.json I/O shared by every evaluation: JSON-safe values and plain-text tables.

Every metrics.json has the top level
  {"task": str, "schema_version": 1, "split": str, "data_dir": str, "models": {...}, ...}
(the per-task content is documented in each task's module). NaN and +-inf become
null, numpy scalars and arrays plain JSON numbers and lists, so any JSON reader
takes the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from whmae.files import write_text_atomic

__all__ = ["SCHEMA_VERSION", "format_table", "jsonable", "read_metrics", "write_metrics"]

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"


def jsonable(value):
    """`value` with NaN/inf -> None, numpy -> Python, tuples -> lists, Paths -> str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_metrics(out_dir: str | os.PathLike, metrics: Mapping) -> Path:
    """Write `<out_dir>/metrics.json` atomically (strict JSON: no NaN tokens)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(out_dir / METRICS_FILE, text)


def read_metrics(path: str | os.PathLike, schema_version: int | None = SCHEMA_VERSION) -> dict:
    """A metrics.json (or the directory holding one), checked for the common keys and,
    unless `schema_version` is None, for that schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run a whmae-evaluate task first")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("task", "schema_version", "models") if k not in metrics]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing} of a whmae metrics.json")
    if schema_version is not None and metrics["schema_version"] != schema_version:
        raise ValueError(
            f"{path} ({metrics['task']}) has schema_version {metrics['schema_version']}, this "
            f"code reads {schema_version}: rerun `whmae-evaluate {metrics['task']}`"
        )
    return metrics


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None or math.isnan(value) else "inf"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(
    header: Sequence[str], rows: Sequence[Sequence], *, digits: int = 3, markdown: bool = False
) -> str:
    """Rows of values as an aligned text table (or a markdown table); None/NaN print '-'."""
    cells = [list(header)] + [[_cell(v, digits) for v in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
