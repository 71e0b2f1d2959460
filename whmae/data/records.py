"""Exam records: the on-disk dataset format (ArrayRecord shards of self-describing exams).

Why ArrayRecord written directly, not a TFDS builder:
  * Multi-host sharded writing with resume. Each host writes `--shard i/n` of one subject
    list on its own; a shard becomes visible only when complete (temporary name, then
    rename, then a per-shard JSON marker), so an interrupted job reruns just the missing
    shards. `finalize_dataset` merges whatever shards exist into `dataset_info.json`.
    A TFDS builder wants one process to own the whole build (or Beam).
  * No builder machinery: no registered builder class, version directories, feature
    specs or download manager; a dataset is a directory of shards plus one JSON file.
  * Zero-copy decode. A record is a small JSON header (field -> dtype, shape, offset;
    schema version; eid) followed by the raw C-order array buffers, so decoding is one
    `np.frombuffer` per field, no protobuf parsing, no float conversion on the host, and
    fields not asked for (labels during pretraining) are never touched.
  Records are read back with `grain.sources.ArrayRecordDataSource`, written with
  `group_size:1` so that reading one exam decompresses one exam (true random access).

Images are uint8: `whmae.data.quantize` (its precision cost is measured there).

Dataset layout (a directory):
  {split}-{shard:05d}-of-{num_shards:05d}.array_record   one file per split per shard
  shard-{shard:05d}-of-{num_shards:05d}.json             shard complete marker + eids
  dataset_info.json                                      written last by finalize_dataset
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from whmae.data.splits import SPLITS, check_split
from whmae.data.splits import split_of as _hash_split
from whmae.layout import NUM_CLASSES, NUM_PHENOTYPES, NUM_PLANES, PHENOTYPE_COLUMNS

SCHEMA_VERSION = 1
MAGIC = b"WHEX"
_PREFIX = struct.Struct("<4sI")  # magic, header length
_ALIGN = 64
# Per-record groups give per-exam random access; zstd:1 decodes at GB/s.
RECORD_OPTIONS = "group_size:1,zstd:1"
FLUSH_ENV = "WHMAE_WRITE_FLUSH_MB"  # MiB written between flushes of a shard file; 0: never
INFO_FILE = "dataset_info.json"

# Field -> dtype; shapes are checked in `check_exam` (T, H, W vary between datasets).
EXAM_FIELDS = {
    "images": np.dtype(np.uint8),
    "labels": np.dtype(np.uint8),
    "phenotypes": np.dtype(np.float32),
    "plane_mask": np.dtype(np.bool_),
    "label_mask": np.dtype(np.bool_),
    "pixel_spacing": np.dtype(np.float32),
    "slice_spacing": np.dtype(np.float32),
    "frame_duration": np.dtype(np.float32),
}
ALL_FIELDS = ("eid", *EXAM_FIELDS)


class RecordError(ValueError):
    """A record or exam that does not follow the exam schema."""


def shard_file(split: str, shard: int, num_shards: int) -> str:
    return f"{check_split(split)}-{shard:05d}-of-{num_shards:05d}.array_record"


def shard_marker(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.json"


def check_exam(exam: dict, where: str = "exam") -> dict:
    """Validate an exam dict against the schema of `whmae.layout`; returns it with
    float fields cast to float32. Raises RecordError naming `where` and the eid."""
    eid = exam.get("eid")
    who = f"{where} (eid {eid!r})"
    if not isinstance(eid, str) or not eid:
        raise RecordError(f"{who}: 'eid' must be a non-empty str, got {type(eid).__name__}")
    missing = [f for f in EXAM_FIELDS if f not in exam]
    unknown = [f for f in exam if f not in ALL_FIELDS]
    if missing or unknown:
        raise RecordError(f"{who}: missing fields {missing}, unknown fields {unknown}")
    out = {"eid": eid}
    for name, dtype in EXAM_FIELDS.items():
        value = np.asarray(exam[name])
        if dtype == np.float32 and np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float32, copy=False)
        if value.dtype != dtype:
            raise RecordError(f"{who}: {name} must be {dtype}, got {value.dtype}")
        out[name] = value
    images, labels = out["images"], out["labels"]
    if images.ndim != 4 or images.shape[0] != NUM_PLANES or 0 in images.shape:
        raise RecordError(f"{who}: images must be [9, T, H, W], got shape {images.shape}")
    if labels.shape != images.shape:
        raise RecordError(f"{who}: labels shape {labels.shape} != images shape {images.shape}")
    expected = {
        "phenotypes": (NUM_PHENOTYPES,),
        "plane_mask": (NUM_PLANES,),
        "label_mask": (NUM_PLANES,),
        "pixel_spacing": (NUM_PLANES, 2),
        "slice_spacing": (),
        "frame_duration": (),
    }
    for name, shape in expected.items():
        if out[name].shape != shape:
            raise RecordError(f"{who}: {name} must have shape {shape}, got {out[name].shape}")
    if labels.max() >= NUM_CLASSES:
        raise RecordError(f"{who}: label value {labels.max()} outside classes 0..{NUM_CLASSES - 1}")
    return out


def encode_exam(exam: dict, where: str = "exam") -> bytes:
    """Exam dict -> record bytes: prefix, JSON header, 64-byte aligned raw buffers."""
    exam = check_exam(exam, where)
    fields, offset = {}, 0
    for name in EXAM_FIELDS:
        value = exam[name]
        fields[name] = {
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "offset": offset,
            "nbytes": value.nbytes,
        }
        offset += -(-value.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"schema": SCHEMA_VERSION, "eid": exam["eid"], "fields": fields}).encode()
    header += b" " * (-(_PREFIX.size + len(header)) % _ALIGN)
    parts = [_PREFIX.pack(MAGIC, len(header)), header]
    for name, spec in fields.items():  # one copy of each buffer, by the join
        parts.append(memoryview(np.ascontiguousarray(exam[name])).cast("B"))
        parts.append(bytes(-spec["nbytes"] % _ALIGN))
    return b"".join(parts)


def decode_header(record: bytes, where: str = "record") -> tuple[dict, int]:
    """Parse a record's header; returns (header, start of the data area)."""
    if len(record) < _PREFIX.size:
        raise RecordError(
            f"{where}: corrupt exam record, {len(record)} bytes is too short (truncated)"
        )
    magic, header_len = _PREFIX.unpack_from(record, 0)
    if magic != MAGIC:
        raise RecordError(f"{where}: corrupt exam record, bad magic {magic!r} (want {MAGIC!r})")
    start = _PREFIX.size + header_len
    if start > len(record):
        raise RecordError(f"{where}: corrupt exam record, header of {header_len} bytes truncated")
    try:
        header = json.loads(bytes(record[_PREFIX.size : start]))
        version, fields = header["schema"], header["fields"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"{where}: corrupt exam record, unreadable header ({e})") from None
    if version != SCHEMA_VERSION:
        raise RecordError(
            f"{where}: exam schema version {version}, this code reads {SCHEMA_VERSION}"
        )
    if not isinstance(fields, dict):
        raise RecordError(f"{where}: corrupt exam record, header has no field table")
    return header, start


def decode_exam(record: bytes, fields: Iterable[str] | None = None, where: str = "record") -> dict:
    """Record bytes -> exam dict of read-only numpy views into `record` (zero copy).

    fields: names to decode (default all, see ALL_FIELDS); "eid" gives a str.
    """
    header, start = decode_header(record, where)
    who = f"{where} (eid {header.get('eid')!r})"
    names = ALL_FIELDS if fields is None else tuple(fields)
    out = {}
    for name in names:
        if name == "eid":
            out["eid"] = str(header.get("eid"))
            continue
        spec = header["fields"].get(name)
        if spec is None:
            raise RecordError(f"{who}: no field {name!r}; record has {sorted(header['fields'])}")
        try:
            dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
            offset, nbytes = start + int(spec["offset"]), int(spec["nbytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"{who}: corrupt header entry for {name!r} ({e})") from None
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise RecordError(f"{who}: {name} has {nbytes} bytes, shape {shape} {dtype} needs more")
        if offset + nbytes > len(record):
            raise RecordError(
                f"{who}: corrupt exam record, {name} needs bytes up to {offset + nbytes} "
                f"but the record has {len(record)} (truncated)"
            )
        out[name] = np.frombuffer(record, dtype, math.prod(shape), offset).reshape(shape)
    return out


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


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

    def wrote(self) -> None:
        if self.every and os.fstat(self.fd).st_size - self.flushed >= self.every:
            self.flush()

    def flush(self) -> None:
        os.fdatasync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.flushed = os.fstat(self.fd).st_size

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self.fd)


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
            flushed.pop(split).close()  # on disk before the rename and the marker
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
    }
    _atomic_write_json(
        marker,
        {
            "schema_version": SCHEMA_VERSION,
            "shard": shard,
            "num_shards": num_shards,
            "image_shape": image_shape,
            "splits": splits,
        },
    )
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
        files, rows, count = [], [], 0
        for shard in range(num_shards):
            entry = markers[shard]["splits"].get(split)
            if entry is None:
                continue
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
    _atomic_write_json(out_dir / INFO_FILE, info)
    return info


def read_dataset_info(data_dir: str | os.PathLike) -> dict:
    """Load and check dataset_info.json; every listed shard file must exist."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist (or is not a directory)")
    path = data_dir / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {data_dir} is not a finished whmae dataset "
            "(its writing was interrupted? rerun whmae-generate / prepare to resume)"
        )
    try:
        info = json.loads(path.read_text())
        version, splits = info["schema_version"], info["splits"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"{path}: unreadable dataset info ({e})") from None
    if version != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema version {version}, this code reads {SCHEMA_VERSION}")
    for split, entry in splits.items():
        for name in entry["files"]:
            if not (data_dir / name).is_file():
                raise FileNotFoundError(
                    f"{data_dir / name} is listed in {path} (split {split!r}) but is missing"
                )
    return info


def split_paths(data_dir: str | os.PathLike, split: str, info: dict | None = None) -> list[str]:
    """Shard files of one split, in shard order."""
    check_split(split)
    info = read_dataset_info(data_dir) if info is None else info
    return [str(Path(data_dir) / name) for name in info["splits"][split]["files"]]
