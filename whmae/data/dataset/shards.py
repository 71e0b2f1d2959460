"""Writing a dataset: shards of exam records (`whmae.data.dataset.records`) and dataset_info.json.

A shard becomes visible only when complete: its files are written under temporary names,
flushed to disk, renamed, and then its JSON marker (eids, phenotypes, image shape, and each
file's record count, size and CRC32) is written. `finalize_dataset` merges the markers
into dataset_info.json once every shard exists, so hosts write shards in any order and an
interrupted job reruns only the missing ones.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from whmae.data.dataset.records import (
    EXAM_FIELDS,
    INFO_FILE,
    SCHEMA_VERSION,
    RecordError,
    decode_exam,
    encode_exam,
    shard_file,
    shard_marker,
)
from whmae.data.dataset.splits import SPLITS, check_split
from whmae.data.dataset.splits import split_of as _hash_split
from whmae.files import write_text_atomic
from whmae.layout import NUM_PHENOTYPES, PHENOTYPE_COLUMNS

# What a shard marker (and dataset_info.json's "file_info") records of each finished file:
# its record count, and (markers written since issue 17; older ones lack them) its size in
# bytes and the CRC32 of its contents. Checked by `whmae.data.dataset.verify`; the size also by
# `records.read_dataset_info` whenever a dataset is opened.
FILE_CHECKS = ("num_examples", "bytes", "crc32")

# Per-record groups give per-exam random access; zstd:1 decodes at GB/s.
RECORD_OPTIONS = "group_size:1,zstd:1"
FLUSH_ENV = "WHMAE_WRITE_FLUSH_MB"  # MiB written between flushes of a shard file; 0: never


class _FlushedFile:
    """Flushes a file being written to disk and drops its pages from the page cache every
    `every` bytes and at `close` (fdatasync + POSIX_FADV_DONTNEED).

    Why: a prepare run writes hundreds of GB that are not read back soon. Left as dirty
    page cache they crowd out the input files' cache, and on some machines the kernel bills
    the writer for it: measured with benchmarks/bench_prepare.py on this project's 2-core
    ext4 VM, 0.04-0.07 kernel CPU-s per exam without flushing, ~0.01 with. A shard is
    also on disk before its marker says it is complete.
    """

    def __init__(self, path: Path, every: int):
        self.fd, self.every, self.flushed = os.open(path, os.O_RDONLY), every, 0
        self.crc32 = 0  # of bytes [0, self.flushed), read back while still in the page cache

    def wrote(self) -> None:
        if self.every and os.fstat(self.fd).st_size - self.flushed >= self.every:
            self.flush()

    def flush(self) -> None:
        size = os.fstat(self.fd).st_size
        # Checksum the new bytes before they leave the page cache (the writer only appends).
        for start in range(self.flushed, size, 1 << 20):
            chunk = os.pread(self.fd, min(1 << 20, size - start), start)
            self.crc32 = zlib.crc32(chunk, self.crc32)
        os.fdatasync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.flushed = size

    def close(self) -> dict:
        """Flush the rest; returns the file's {"bytes": size, "crc32": 8 hex digits}."""
        try:
            self.flush()
        finally:
            os.close(self.fd)
        return {"bytes": self.flushed, "crc32": f"{self.crc32:08x}"}


def _flush_every() -> int:
    """Bytes between flushes of a shard file being written (env WHMAE_WRITE_FLUSH_MB)."""
    value = os.environ.get(FLUSH_ENV, "8")
    try:
        return max(0, int(float(value) * (1 << 20)))
    except ValueError:
        raise ValueError(f"{FLUSH_ENV}={value!r}: expected a number of MiB") from None


def write_shard(
    exams: Iterable[dict],
    out_dir: str | os.PathLike,
    shard: int,
    num_shards: int,
    *,
    on_exam: Callable[[dict], None] | None = None,
    options: str = RECORD_OPTIONS,
    split_of: Callable[[str], str] | None = None,
) -> dict[str, int]:
    """Write one shard of exams (each to its split's file); returns per-split counts.

    exams: exam dicts, or records already made by `encode_exam` (bytes: encoded in worker
    processes, so the writer only compresses and writes). split_of: eid -> split
    (default `splits.split_of`, the hash of the eid); on_exam gets the exam dict (for
    bytes, a zero-copy decode of eid, images and phenotypes).

    Files are written under temporary names and renamed when complete; the shard's JSON
    marker (eids, phenotypes, image shape) is written last, so an interrupted shard is
    simply absent. Shards are independent: hosts may write them in any order. The files
    are flushed to disk as they grow (`_FlushedFile`; every WHMAE_WRITE_FLUSH_MB, default
    8 MiB, about one exam; 0 flushes only when complete).
    """
    from array_record.python import array_record_module  # C++ extension, loaded on use

    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / shard_marker(shard, num_shards)
    marker.unlink(missing_ok=True)  # a rewrite is incomplete until it finishes
    for split in SPLITS:  # stale files of an earlier attempt
        (out_dir / shard_file(split, shard, num_shards)).unlink(missing_ok=True)
    writers, tmp_paths, entries = {}, {}, {s: {"eids": [], "phenotypes": []} for s in SPLITS}
    flushed, flush_every = {}, _flush_every()
    image_shape, seen = None, {}
    assign = _hash_split if split_of is None else split_of
    try:
        for position, exam in enumerate(exams):
            where = f"shard {shard}/{num_shards} exam #{position}"
            if isinstance(exam, (bytes, bytearray, memoryview)):
                record = bytes(exam)
                exam = decode_exam(record, ("eid", "images", "phenotypes"), where)
            else:
                record = encode_exam(exam, where)
            eid, shape = exam["eid"], list(np.shape(exam["images"]))
            if image_shape is None:
                image_shape = shape
            elif shape != image_shape:
                raise RecordError(f"{where} (eid {eid!r}): images {shape}, shard has {image_shape}")
            if eid in seen:
                raise RecordError(f"{where}: duplicate eid {eid!r} (also exam #{seen[eid]})")
            seen[eid] = position
            split = check_split(assign(eid))
            if split not in writers:
                tmp_paths[split] = out_dir / f".{shard_file(split, shard, num_shards)}.tmp"
                writers[split] = array_record_module.ArrayRecordWriter(
                    str(tmp_paths[split]), options
                )
                flushed[split] = _FlushedFile(tmp_paths[split], flush_every)
            writers[split].write(record)
            flushed[split].wrote()
            phenotypes = np.asarray(exam["phenotypes"], np.float64)
            entries[split]["eids"].append(eid)
            entries[split]["phenotypes"].append(
                [None if np.isnan(v) else float(v) for v in phenotypes]
            )
            if on_exam is not None:
                on_exam(exam)
        for split, writer in writers.items():
            writer.close()
            # On disk before the rename and the marker; its size and checksum go in the marker.
            entries[split].update(flushed.pop(split).close())
        for split, tmp in tmp_paths.items():
            os.replace(tmp, out_dir / shard_file(split, shard, num_shards))
    except BaseException:
        for split, writer in writers.items():
            writer.close()
            tmp_paths[split].unlink(missing_ok=True)
        for file in flushed.values():
            os.close(file.fd)
        raise
    splits = {
        s: {"file": shard_file(s, shard, num_shards), "num_examples": len(e["eids"]), **e}
        for s, e in entries.items()
        if e["eids"]
    }  # each: file, num_examples, eids, phenotypes, bytes, crc32 (of the whole file)
    marker_fields = {
        "schema_version": SCHEMA_VERSION,
        "shard": shard,
        "num_shards": num_shards,
        "image_shape": image_shape,
        "splits": splits,
    }
    write_text_atomic(marker, json.dumps(marker_fields, indent=1))
    return {s: len(entries[s]["eids"]) for s in SPLITS}


def read_shard_markers(out_dir: str | os.PathLike) -> dict[int, dict]:
    """Complete shards in `out_dir`: shard index -> marker, for every marker whose files exist.

    Raises if markers disagree on the number of shards (two datasets in one directory).
    """
    out_dir = Path(out_dir)
    markers = {}
    for path in sorted(out_dir.glob("shard-*-of-*.json")):
        try:
            marker = json.loads(path.read_text())
            shard, num_shards = int(marker["shard"]), int(marker["num_shards"])
        except (ValueError, KeyError, TypeError) as e:
            raise RecordError(f"{path}: unreadable shard marker ({e})") from None
        if markers and num_shards != next(iter(markers.values()))["num_shards"]:
            raise RecordError(
                f"{out_dir}: shard markers disagree on the number of shards "
                f"({num_shards} in {path.name}); is this two datasets in one directory?"
            )
        if all((out_dir / s["file"]).is_file() for s in marker["splits"].values()):
            markers[shard] = marker
    return markers


def _phenotype_stats(rows: list[list]) -> dict:
    values = np.array(rows, np.float64).reshape(-1, NUM_PHENOTYPES)  # None -> nan
    stats = {}
    for j, column in enumerate(PHENOTYPE_COLUMNS):
        col = values[:, j][~np.isnan(values[:, j])]
        stats[column] = {
            "count": int(col.size),
            **{
                k: (float(f(col)) if col.size else None)
                for k, f in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))
            },
        }
    return stats


def finalize_dataset(out_dir: str | os.PathLike, provenance: dict) -> dict:
    """Merge the shard markers of `out_dir` into dataset_info.json (written last, atomically).

    All shards 0..n-1 must be complete. `provenance` records how the data were made
    (generator arguments, source paths). Returns the info dict.
    """
    out_dir = Path(out_dir)
    markers = read_shard_markers(out_dir)
    if not markers:
        raise FileNotFoundError(f"{out_dir}: no complete shards to finalize")
    num_shards = next(iter(markers.values()))["num_shards"]
    missing = sorted(set(range(num_shards)) - set(markers))
    if missing:
        raise RecordError(f"{out_dir}: shards {missing} of {num_shards} are missing or incomplete")
    shapes = {tuple(m["image_shape"]) for m in markers.values() if m["image_shape"]}
    if len(shapes) > 1:
        raise RecordError(f"{out_dir}: shards hold different image shapes {sorted(shapes)}")
    owner, splits = {}, {}
    for split in SPLITS:
        files, rows, count, file_info = [], [], 0, {}
        for shard in range(num_shards):
            entry = markers[shard]["splits"].get(split)
            if entry is None:
                continue
            file_info[entry["file"]] = {k: entry[k] for k in FILE_CHECKS if k in entry}
            for eid in entry["eids"]:
                if eid in owner:
                    raise RecordError(f"{out_dir}: eid {eid!r} in shards {owner[eid]} and {shard}")
                owner[eid] = shard
            files.append(entry["file"])
            rows += entry["phenotypes"]
            count += entry["num_examples"]
        splits[split] = {
            "num_examples": count,
            "files": files,
            "file_info": file_info,
            "phenotype_stats": _phenotype_stats(rows),
        }
    info = {
        "format": "whmae exam ArrayRecord",
        "schema_version": SCHEMA_VERSION,
        "image_shape": list(shapes.pop()) if shapes else None,
        "fields": {name: str(dtype) for name, dtype in EXAM_FIELDS.items()},
        "phenotype_columns": list(PHENOTYPE_COLUMNS),
        "num_shards": num_shards,
        "num_examples": sum(s["num_examples"] for s in splits.values()),
        "bytes": sum((out_dir / f).stat().st_size for s in splits.values() for f in s["files"]),
        "splits": splits,
        "provenance": provenance,
    }
    write_text_atomic(out_dir / INFO_FILE, json.dumps(info, indent=1))
    return info
