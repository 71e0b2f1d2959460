"""Dataset checks: `whmae-dataset verify DIR` checks every shard file against its marker.

Every shard file is compared with what was recorded when it was written, and every record
is decoded.

For each shard file (from the shard markers, and dataset_info.json when the dataset is
finalized): the file exists; its size and CRC32 match the marker (markers written before
issue 17 record neither: those checks are skipped and said so); it opens as ArrayRecord and
holds the recorded number of records; every record decodes as an exam and holds the eid the
marker lists at its position. Prints one line per bad file naming the file and what is
wrong, then a summary; exit status 1 if anything is bad, 2 for a usage error.

Cost: the whole dataset is read once (CRC32 ~0.5 GB/s on one core, decompression
more); `--quick` checks sizes, record counts and checksums without decoding records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from whmae.data.dataset.records import INFO_FILE, READABLE_SCHEMAS, RecordError, decode_exam

_READ_BATCH = 8  # records read at once (exams of 128x128x50 are ~15 MB decoded)


@dataclass
class Report:
    """What `verify_dataset` found: `problems` maps a file (or marker) path to its faults."""

    data_dir: Path
    files: int = 0
    records: int = 0
    bytes: int = 0
    unchecked: list[str] = field(default_factory=list)  # files whose marker lacks size/CRC
    problems: dict[str, list[str]] = field(default_factory=dict)

    def bad(self, path, reason: str) -> None:
        self.problems.setdefault(str(path), []).append(reason)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per bad file, then the summary."""
        out = [f"{path}: {'; '.join(reasons)}" for path, reasons in self.problems.items()]
        what = (
            f"{self.files} shard files, {self.records} records, {self.bytes / 1e6:.1f} MB checked"
        )
        if self.unchecked:
            what += (
                f" ({len(self.unchecked)} files without a recorded size and checksum: "
                "written before these were recorded)"
            )
        if self.ok:
            out.append(f"{self.data_dir}: OK, {what}")
        else:
            out.append(f"{self.data_dir}: {len(self.problems)} bad, {what}")
        return out


def file_crc32(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """CRC32 of a file's contents as 8 hex digits (as `shards.write_shard` records it)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expected_files(data_dir: Path, report: Report) -> dict[str, dict]:
    """file name -> what was recorded of it (num_examples, bytes, crc32, eids, source)."""
    markers, num_shards = {}, set()
    for path in sorted(data_dir.glob("shard-*-of-*.json")):
        try:
            marker = json.loads(path.read_text())
            markers[int(marker["shard"])] = marker
            num_shards.add(int(marker["num_shards"]))
            for entry in marker["splits"].values():
                entry["file"], int(entry["num_examples"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            report.bad(path, f"unreadable shard marker ({_one_line(e)})")
    info, info_path = None, data_dir / INFO_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            if info["schema_version"] not in READABLE_SCHEMAS:
                report.bad(
                    info_path,
                    f"schema version {info['schema_version']}, this code reads {READABLE_SCHEMAS}",
                )
            num_shards.add(int(info["num_shards"]))
            info["splits"].items()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            report.bad(info_path, f"unreadable dataset info ({_one_line(e)})")
            info = None
    else:
        report.bad(info_path, "missing: the dataset was never finalized (rerun its writer)")
    if not markers and info is None:
        raise FileNotFoundError(f"{data_dir}: no shard markers and no {INFO_FILE}: not a dataset")
    if len(num_shards) > 1:
        report.bad(data_dir, f"markers and {INFO_FILE} disagree on the shard count {num_shards}")
    for shard in range(max(num_shards)):
        if shard not in markers:
            report.bad(
                data_dir / f"shard-{shard:05d}-of-{max(num_shards):05d}.json",
                "missing: this shard was never completed (or its marker was deleted)",
            )
    expected = {}
    for shard, marker in sorted(markers.items()):
        for entry in marker["splits"].values():
            expected[entry["file"]] = {**entry, "source": f"shard marker {shard}"}
    for entry in (info or {}).get("splits", {}).values():
        recorded = entry.get("file_info", {})
        for name in entry.get("files", []):
            mine = recorded.get(name, {})
            if name not in expected:
                expected[name] = {**mine, "source": INFO_FILE}
                continue
            for key, value in mine.items():
                if key in expected[name] and expected[name][key] != value:
                    report.bad(
                        data_dir / name,
                        f"{INFO_FILE} records {key} {value!r}, its shard marker "
                        f"{expected[name][key]!r} (dataset_info.json is stale? refinalize)",
                    )
    return expected


def _open(path: Path, report: Report):
    """An ArrayRecordReader of `path`, or None with the reason reported."""
    from array_record.python import array_record_module

    try:
        reader = array_record_module.ArrayRecordReader(str(path))
        if not reader.ok():  # e.g. a damaged footer: it says why when closed
            reader.close()
            raise RuntimeError("the reader failed without a reason")
    except Exception as e:  # noqa: BLE001 - any failure: not a readable shard
        report.bad(path, f"not a readable ArrayRecord file ({_one_line(e)})")
        return None
    return reader


def _check_records(path: Path, expected: dict, report: Report) -> None:

    reader = _open(path, report)
    if reader is None:
        return
    try:
        count = reader.num_records()
        want = expected.get("num_examples")
        if want is not None and count != int(want):
            report.bad(path, f"{count} records, {expected['source']} records {want}")
        eids, bad, first = expected.get("eids"), 0, None
        for start in range(0, count, _READ_BATCH):
            stop = min(start + _READ_BATCH, count)
            try:
                batch = list(enumerate(reader.read(start, stop), start))
            except Exception:  # noqa: BLE001 - find the unreadable records one by one
                batch = []
                for i in range(start, stop):
                    try:
                        batch.append((i, reader.read([i])[0]))
                    except Exception as e:  # noqa: BLE001
                        bad += 1
                        first = first or f"record {i} unreadable ({_one_line(e)})"
            for i, record in batch:
                try:
                    eid = decode_exam(record, where=f"record {i}")["eid"]
                except RecordError as e:
                    bad += 1
                    first = first or _one_line(e)
                    continue
                if eids is not None and i < len(eids) and eid != eids[i]:
                    bad += 1
                    first = first or f"record {i} holds eid {eid!r}, the marker lists {eids[i]!r}"
            report.records += stop - start
        if bad:
            report.bad(path, f"{bad} of {count} records bad, first: {first}")
    except Exception as e:  # noqa: BLE001 - e.g. the footer: the file as a whole is damaged
        report.bad(path, f"not a readable ArrayRecord file ({_one_line(e)})")
    finally:
        try:
            reader.close()
        except Exception as e:  # noqa: BLE001 - reported unless already said
            if str(path) not in report.problems:
                report.bad(path, f"not a readable ArrayRecord file ({_one_line(e)})")


def verify_dataset(
    data_dir: str | os.PathLike, *, records: bool = True, progress: bool = False
) -> Report:
    """Check every shard file of `data_dir` (see the module docstring); never raises for a
    damaged file, only when `data_dir` is not a dataset at all."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} does not exist or is not a directory")
    report = Report(data_dir)
    expected = _expected_files(data_dir, report)
    names = sorted(expected)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="verify", unit="file", file=sys.stderr, disable=None)
    for name in names:
        path, want = data_dir / name, expected[name]
        report.files += 1
        if not path.is_file():
            report.bad(path, f"missing (listed in {want['source']})")
            continue
        size = path.stat().st_size
        report.bytes += size
        if "bytes" not in want and "crc32" not in want:
            report.unchecked.append(name)
        if "bytes" in want and size != want["bytes"]:
            change = "truncated" if size < want["bytes"] else "grown"
            report.bad(path, f"{size} bytes, {want['source']} records {want['bytes']} ({change})")
        elif "crc32" in want:
            crc = file_crc32(path)
            if crc != want["crc32"]:
                report.bad(
                    path,
                    f"checksum crc32 {crc}, {want['source']} records {want['crc32']} "
                    "(bytes changed on disk)",
                )
        if records:
            _check_records(path, want, report)
        else:
            _count_only(path, want, report)
    return report


def _count_only(path: Path, expected: dict, report: Report) -> None:
    """--quick: the file opens and holds the recorded number of records (no decoding)."""
    reader = _open(path, report)
    if reader is None:
        return
    count = reader.num_records()
    reader.close()
    if "num_examples" in expected and count != int(expected["num_examples"]):
        report.bad(
            path, f"{count} records, {expected['source']} records {expected['num_examples']}"
        )
    report.records += count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-dataset", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify", help="check every shard file and record against the markers"
    )
    verify.add_argument("data_dir", help="a dataset directory (whmae-generate / whmae-prepare)")
    verify.add_argument(
        "--quick",
        action="store_true",
        help="sizes, checksums and record counts only; do not decode the records",
    )
    args = parser.parse_args(argv)
    try:
        report = verify_dataset(args.data_dir, records=not args.quick, progress=True)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"whmae-dataset: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
