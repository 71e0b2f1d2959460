"""What a prepare run records beside the exam shards, and its end-of-run merge.

Per shard (written after the shard's records, the manifest last):
  geometry-{shard}-of-{n}.jsonl  one line per written exam: `nifti_exam` geometry, by eid
  manifest-{shard}-of-{n}.jsonl  one line per subject: written (split, absent planes,
                                 warnings) or rejected (reason naming the file)
A shard is complete when its marker (`whmae.data.dataset.shards`) and its manifest exist.
`finalize_prepared` merges them: dataset_info.json, manifest.jsonl (every subject) and
prepare_summary.json (exams found = written + rejected, each rejection with its reason,
the written exams' warnings and absent planes counted by kind with the first few eids:
`flags_by_kind`, which `whmae-prepare` prints).
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

from whmae.data.dataset import shards
from whmae.data.dataset.records import RecordError
from whmae.files import write_text_atomic

MANIFEST_FILE = "manifest.jsonl"
SUMMARY_FILE = "prepare_summary.json"
FLAG_EXAMPLES = 5  # eids listed per warning kind in the summary (all are in the manifest)


def manifest_file(shard: int, num_shards: int) -> str:
    return f"manifest-{shard:05d}-of-{num_shards:05d}.jsonl"


def geometry_file(shard: int, num_shards: int) -> str:
    return f"geometry-{shard:05d}-of-{num_shards:05d}.jsonl"


def _write_lines(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def complete_shards(out_dir: Path, num_shards: int) -> set[int]:
    """Shards with a marker, their files and a manifest sidecar."""
    markers = shards.read_shard_markers(out_dir) if out_dir.is_dir() else {}
    return {s for s in markers if (out_dir / manifest_file(s, num_shards)).is_file()}


def write_prepared_shard(out_dir: Path, shard: int, num_shards: int, results, on_exam=None):
    """Write one shard's records (results: (shard, `_prepare_one` result)), then its
    geometry and (last) its manifest sidecar; returns the manifest entries."""
    entries, geometry, splits = [], [], {}

    def exams():
        for _, result in results:
            if on_exam is not None:
                on_exam(1)
            record, exam_geometry = result.pop("record", None), result.pop("geometry", None)
            entries.append(result)
            if record is not None:
                geometry.append(exam_geometry)
                splits[result["eid"]] = result["split"]
                yield record

    (out_dir / manifest_file(shard, num_shards)).unlink(missing_ok=True)
    shards.write_shard(exams(), out_dir, shard, num_shards, split_of=splits.__getitem__)
    _write_lines(out_dir / geometry_file(shard, num_shards), geometry)
    _write_lines(out_dir / manifest_file(shard, num_shards), entries)
    return entries


def flag_kind(message: str) -> str:
    """A warning's kind: the message with its particulars blanked (quoted values -> '…',
    free-standing numbers -> #), so that e.g. every "sa.nii.gz: 30 frames resampled to 50"
    counts as one kind. Digits inside names (la_2ch, SAX_b1) are kept."""
    kind = re.sub(r"'[^']*'", "'…'", message)
    return re.sub(r"(?<![A-Za-z_\d])\d+(?:\.\d+)*", "#", kind)


def flags_by_kind(entries: list[dict]) -> dict:
    """{"warnings" | "absent": {kind: {"count": exams, "eids": the first FLAG_EXAMPLES}}} of
    the written entries, kinds by decreasing count (an exam counts once per kind)."""
    out = {}
    for field in ("warnings", "absent"):
        eids = collections.defaultdict(list)
        for entry in entries:
            if entry.get("status") != "written":
                continue
            for kind in dict.fromkeys(flag_kind(m) for m in entry.get(field, [])):
                eids[kind].append(entry["eid"])
        ranked = sorted(eids.items(), key=lambda item: (-len(item[1]), item[0]))
        out[field] = {k: {"count": len(v), "eids": v[:FLAG_EXAMPLES]} for k, v in ranked}
    return out


def format_flags(flags: dict) -> list[str]:
    """Console lines of `flags_by_kind`: per kind its count and first eids."""
    lines = []
    for field, title in (("warnings", "warnings"), ("absent", "absent planes")):
        if flags.get(field):
            lines.append(f"{title} by kind (exams; each one in {MANIFEST_FILE}):")
            for kind, item in flags[field].items():
                more = " ..." if item["count"] > len(item["eids"]) else ""
                lines.append(f"  {item['count']} x {kind}  [{', '.join(item['eids'])}{more}]")
    return lines


def finalize_prepared(out_dir, provenance: dict) -> dict:
    """Merge all shards: dataset_info.json, manifest.jsonl (every subject) and
    prepare_summary.json (found = written + rejected, rejections with reasons)."""
    out_dir = Path(out_dir)
    info = shards.finalize_dataset(out_dir, provenance)
    entries = []
    for shard in range(info["num_shards"]):
        lines = (out_dir / manifest_file(shard, info["num_shards"])).read_text().splitlines()
        entries += [json.loads(line) for line in lines if line]
    _write_lines(out_dir / MANIFEST_FILE, entries)
    written = [e for e in entries if e["status"] == "written"]
    rejected = [e for e in entries if e["status"] == "rejected"]
    summary = {
        "exams_found": len(entries),
        "written": len(written),
        "rejected": len(rejected),
        "line": f"exams found = {len(entries)} = written {len(written)} + rejected {len(rejected)}",
        "splits": {s: info["splits"][s]["num_examples"] for s in info["splits"]},
        "written_with_absent_planes": sum(bool(e["absent"]) for e in written),
        "written_with_warnings": sum(bool(e["warnings"]) for e in written),
        "split_sources": dict(collections.Counter(e.get("split_source", "hash") for e in written)),
        "rejections": {e["eid"]: e["reason"] for e in rejected},
        "flags_by_kind": flags_by_kind(entries),
        "image_shape": info["image_shape"],
        "bytes_on_disk": info["bytes"],
    }
    if len(written) != info["num_examples"]:
        raise RecordError(
            f"{out_dir}: manifests list {len(written)} written exams, shards hold "
            f"{info['num_examples']}"
        )
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary
