"""Exam records: the on-disk dataset format (ArrayRecord shards of self-describing exams).

Why ArrayRecord written directly, not a TFDS builder:
  * Multi-host sharded writing with resume. Each host writes `--shard i/n` of one subject
    list on its own; a shard becomes visible only when complete (temporary name, then
    rename, then a per-shard JSON marker), so an interrupted job reruns just the missing
    shards. `shards.finalize_dataset` merges the shards into `dataset_info.json`.
    A TFDS builder wants one process to own the whole build (or Beam).
  * No builder machinery: no registered builder class, version directories, feature
    specs or download manager; a dataset is a directory of shards plus one JSON file.
  * Zero-copy decode. A record is a small JSON header (field -> dtype, shape, offset;
    schema version; eid) followed by the raw C-order array buffers, so decoding is one
    `np.frombuffer` per field, no protobuf parsing, no float conversion on the host, and
    fields not asked for (labels during pretraining) are never touched.
  Records are read back with `grain.sources.ArrayRecordDataSource`, written with
  `group_size:1` so that reading one exam decompresses one exam (true random access).
  Writing shards and merging them into a dataset: `whmae.data.dataset.shards`.

Images are uint8: `whmae.data.quantize` (its precision cost is measured there).

Schema 2 (`SCHEMA_VERSION`) stores label_mask per plane and frame, [9, T] (see
`whmae.layout`); schema 1 stored it per plane, [9]. Schema-1 records decode with it
broadcast to every frame, [9, T] (a read-only view), so datasets written before still
train and evaluate unchanged.

Dataset layout (a directory):
  {split}-{shard:05d}-of-{num_shards:05d}.array_record   one file per split per shard
  shard-{shard:05d}-of-{num_shards:05d}.json             shard complete marker + eids,
                                                         each file's records, bytes, CRC32
  dataset_info.json                                      written last (finalize_dataset)

Opening a dataset (`read_dataset_info`) compares each shard file's size with the one
recorded when it was written (a stat, no reading): a truncated or grown shard fails at once,
named. `whmae-dataset verify DIR` (whmae.data.dataset.verify) also checks checksums and decodes
every record.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from whmae.data.dataset.splits import check_split
from whmae.layout import NUM_CLASSES, NUM_PHENOTYPES, NUM_PLANES

# 2: label_mask is per plane and frame, [9, T] (1: per plane, [9]). Schema-1 records and
# datasets are still read: their label_mask is broadcast to every frame on decode.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
MAGIC = b"WHEX"
_PREFIX = struct.Struct("<4sI")  # magic, header length
_ALIGN = 64
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
    float fields cast to float32, and a per-plane label_mask [9] (as schema 1 held it) taken
    as every frame, [9, T]. Raises RecordError naming `where` and the eid."""
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
    if out["label_mask"].shape == (NUM_PLANES,):
        out["label_mask"] = np.repeat(out["label_mask"][:, None], images.shape[1], axis=1)
    expected = {
        "phenotypes": (NUM_PHENOTYPES,),
        "plane_mask": (NUM_PLANES,),
        "label_mask": images.shape[:2],
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
    if version not in READABLE_SCHEMAS:
        raise RecordError(
            f"{where}: exam schema version {version}, this code reads {READABLE_SCHEMAS}"
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
        if name == "label_mask" and header["schema"] == 1:  # per plane: every frame
            out[name] = np.broadcast_to(out[name][:, None], _frames_shape(header, who))
    return out


def _frames_shape(header: dict, who: str) -> tuple[int, int]:
    """[9, T] of a record, T from its images' shape in the header."""
    try:
        return NUM_PLANES, int(header["fields"]["images"]["shape"][1])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise RecordError(f"{who}: corrupt header, no images shape ({e})") from None


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
    if version not in READABLE_SCHEMAS:
        raise RecordError(f"{path}: schema version {version}, this code reads {READABLE_SCHEMAS}")
    for split, entry in splits.items():
        recorded = entry.get("file_info", {})  # absent in datasets made before issue 17
        for name in entry["files"]:
            file = data_dir / name
            try:
                size = file.stat().st_size if file.is_file() else None
            except OSError:
                size = None
            if size is None:
                raise FileNotFoundError(
                    f"{file} is listed in {path} (split {split!r}) but is missing"
                )
            expected = recorded.get(name, {}).get("bytes")
            if expected is not None and size != expected:
                raise RecordError(
                    f"{file}: {size} bytes, but {INFO_FILE} records {expected}: the shard is "
                    f"damaged (truncated or overwritten?). `whmae-dataset verify {data_dir}` "
                    "checks every shard; regenerate the dataset, or rewrite this shard"
                )
    return info


def split_paths(data_dir: str | os.PathLike, split: str, info: dict | None = None) -> list[str]:
    """Shard files of one split, in shard order."""
    check_split(split)
    info = read_dataset_info(data_dir) if info is None else info
    return [str(Path(data_dir) / name) for name in info["splits"][split]["files"]]
