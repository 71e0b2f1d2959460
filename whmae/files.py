"""Files that appear whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file beside it and a rename.

    A reader, or a rerun after a crash, sees the old file or the new one, never part of
    one. The temporary name holds the process id: hosts writing the same file at once
    (e.g. the same arguments record) do not trip over each other's temporary files.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
