"""`whmae-prepare`: UK Biobank-layout NIfTI or DICOM exams + phenotype CSV -> an exam dataset.

    whmae-prepare --root /data/ukbb --phenotypes pheno.csv --out /data/whmae \
        --workers 16 [--shard i/n] [--exams-per-shard 128] [--split-file splits.csv]

Input: each `<root>/<eid>/` folder holds NIfTI files (sa.nii.gz, la_*.nii.gz, seg_*) or
DICOM (UK Biobank's field 20208 / 20209 zips, or .dcm series; `whmae.data.ingest.dicom_exam`),
told apart per folder (`--input auto`, the default) or forced (`--input nifti|dicom`).
`--dicom-views FILE`: JSON list of [regular expression, view or null] pairs tried on
SeriesDescription before the UK Biobank defaults.

Subjects are the union of the `<root>/<eid>/` folders and the CSV's eids, sorted; the
sorted list is cut into shards of `--exams-per-shard` (the unit of work and of resume).
With `--shard i/n`, host i writes shards i, i + n, i + 2n, ... of that one global
layout, so hosts that see the same root and CSV split the work without talking and
their files form one dataset. A shard is complete when its marker (shards.py) and its
manifest sidecar exist; a rerun skips complete shards. When every shard is complete
(whoever finishes last, or `--finalize-only`), dataset_info.json, manifest.jsonl and
prepare_summary.json are written.

Beside the ArrayRecord shards (same schema as the phantom's) each shard writes geometry
and manifest sidecars (`whmae.data.ingest.manifest`): every subject is written or rejected with
its reason.
A folder without a CSV row is written with all-NaN phenotypes and flagged (pretraining
needs no phenotypes, and missing values are masked in the loss), or rejected with
`--require-phenotypes`. A CSV row without a folder is rejected.

Orientation: every view is stored in one canonical in-plane orientation derived from its
affine (`nifti_exam.ORIENTATION_VERSION`; the geometry sidecar holds each view's
transform, which `restore_labels` and `whmae-segment` undo). dataset_info.json's
provenance records the version; datasets without it keep each file's orientation, and a
rerun into such a directory is refused rather than mixing the two.

Labels per frame (record schema 2): with --label-convention acdc / mnms (ED and ES only) a
frame is labelled only where the view's segmentation holds foreground
(`label_maps.labelled_frames`); the manifest's "labelled_frames" gives, for views labelled
on some frames only, how many of the record's frames are labelled. A rerun into a directory
of an earlier schema is refused.

Short stacks: a short-axis stack of `nifti_exam.MIN_SHORT_AXIS_SLICES` (3) to 5 slices is
written with the planes it does not reach absent (manifest "absent", counted by kind on
the console); fewer slices reject the exam.

Splits: by default the hash of the eid (`whmae.data.dataset.splits`). `--split-file` (CSV with
columns eid,split; split one of train/val/test) fixes them instead (e.g. the paper's
lists). A written subject missing from that file falls back to the hash split and is
flagged (manifest: split_source "hash" and a warning; summary: split_sources), so a
partial list never silently drops exams; `--strict-split` rejects such subjects instead.

Speed: with --workers > 1 and at least as many shards to write, each worker prepares and
writes whole shards (records never travel through this process; a worker that dies
hands its shard back to be redone one exam at a time, which finds the culprit); with
fewer shards the exams of each shard are spread over the workers and written here.
gzip inflate is most of the CPU: `pip install whmae[fast]` (libdeflate, python-isal)
makes it ~2.2x faster than zlib (benchmarks/bench_prepare.py measures exams/s and CPU
seconds per exam).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from whmae.data.dataset import records
from whmae.data.ingest.dicom_exam import INPUTS, check_series_views, open_exam
from whmae.data.ingest.label_maps import CONVENTIONS
from whmae.data.ingest.manifest import (
    MANIFEST_FILE,
    SUMMARY_FILE,
    complete_shards,
    finalize_prepared,
    flags_by_kind,
    format_flags,
    write_prepared_shard,
)
from whmae.data.ingest.nifti_exam import (
    LA_CROPS,
    ORIENTATION_VERSION,
    SLICE_RULES,
    ExamError,
    preprocess_exam,
)
from whmae.data.ingest.nifti_io import prefetch_files
from whmae.data.ingest.split_file import SplitAssignment, read_split_file
from whmae.data.ingest.subjects import list_subjects, read_phenotype_csv
from whmae.data.worker_pool import (
    WorkerPool,
    count_done,
    keep_freed_memory,
    ordered_results,
    whole_shard_results,
)
from whmae.files import write_text_atomic

ARGS_FILE = "prepare_args.json"


def parse_host_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return index, count


def _prepare_one(job: dict) -> dict:
    """Worker: preprocess one exam folder; never raises (a failure is a rejection)."""
    start = time.perf_counter()
    entry = {"eid": job["eid"], "shard": job["shard"]}
    try:
        source = open_exam(job["folder"], **job.get("input", {}))
        exam, geometry = preprocess_exam(
            source, eid=job["eid"], phenotype_row=job["phenotypes"], **job["options"]
        )
        # Encoded here, not in the writer process: that one only compresses and writes.
        record = records.encode_exam(exam, f"exam folder {job['folder']}")
    except ExamError as e:
        return {**entry, "status": "rejected", "reason": str(e)}
    except Exception as e:  # one bad exam never stops the run
        return {**entry, "status": "rejected", "reason": f"unexpected {type(e).__name__}: {e}"}
    entry.update(
        status="written",
        split=job["split"],
        split_source=job["split_source"],
        absent=geometry["absent"],
        warnings=geometry["warnings"] + job["flags"],
        slices=geometry["views"]["sa"]["slices"],
        seconds=round(time.perf_counter() - start, 4),
    )
    if geometry.get("input", "nifti") != "nifti":
        entry["input"] = geometry["input"]
    repaired = {
        s: v["repaired_voxels"] for s, v in geometry["views"].items() if "repaired_voxels" in v
    }
    if repaired:
        entry["repaired_voxels"] = repaired
    partial = {  # views labelled on some frames only: how many of the record's frames
        stem: int(exam["label_mask"][view["planes"][0]].sum())
        for stem, view in geometry["views"].items()
        if "labelled_frames" in view and len(view["labelled_frames"]) < view["frames"]
    }
    if partial:
        entry["labelled_frames"] = partial
    return {**entry, "record": record, "geometry": geometry}


def _check_arguments(out_dir: Path, arguments: dict) -> None:
    """Record the run's arguments once; refuse a directory holding another dataset."""
    path = out_dir / ARGS_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != arguments:
            changed = {
                k: (previous.get(k), v) for k, v in arguments.items() if previous.get(k) != v
            }
            raise ValueError(
                f"{out_dir} holds a dataset prepared with other arguments or another subject "
                f"list ((on disk, now): {changed}); use another --out"
            )
        return
    if out_dir.is_dir() and any(p for p in out_dir.iterdir() if not p.name.startswith(".")):
        raise ValueError(f"{out_dir} is not empty and has no {ARGS_FILE}; use another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(arguments, indent=1))  # hosts may race: same content


def prepare_dataset(
    root,
    phenotype_csv,
    out_dir,
    *,
    eid_column: str = "eid",
    frames: int = 50,
    size: int = 128,
    slice_rule: str = "reference",
    label_convention: str = "ukbb",
    la_crop: str = "centre",
    exams_per_shard: int = 128,
    workers: int = 1,
    host_shard: tuple[int, int] = (0, 1),
    require_phenotypes: bool = False,
    split_file=None,
    strict_split: bool = False,
    finalize: bool = True,
    progress: bool = True,
    stop_after_shards: int | None = None,
    prefetch: int = 1,
    input_format: str = "auto",
    series_views=None,
) -> dict:
    """Write this host's shards of the dataset (resuming), then finalize if all are done.

    Returns this host's run summary; summary["dataset"] holds the whole dataset's summary
    (`finalize_prepared`) when this call finalized it. stop_after_shards: write at most that
    many shards (tests of interruption / resume). split_file: CSV eid,split (see module
    docstring); strict_split: reject subjects it does not list instead of hash-splitting.
    prefetch: exams ahead whose files each worker asks the disk for (0: none).
    input_format: "auto" | "nifti" | "dicom" per folder; series_views: [pattern, view or
    None] pairs for DICOM series descriptions (`dicom_exam.open_exam`). summary["note"]
    says why this host wrote nothing, when it did not.
    """
    from tqdm import tqdm

    if prefetch < 0:
        raise ValueError(f"--prefetch must be >= 0 (exams read ahead), got {prefetch}")
    if input_format not in INPUTS:
        raise ValueError(f"--input must be one of {INPUTS}, got {input_format!r}")
    series_views = check_series_views(series_views)
    out_dir = Path(out_dir)
    phenotypes, cell_warnings, csv_warnings = read_phenotype_csv(phenotype_csv, eid_column)
    eids, folders = list_subjects(root, phenotypes)
    assignment = SplitAssignment(None if split_file is None else read_split_file(split_file))
    if not eids:
        raise ValueError(f"no exam folders under {root} and no rows in {phenotype_csv}")
    num_shards = math.ceil(len(eids) / exams_per_shard)
    options = {
        "frames": frames,
        "size": size,
        "slice_rule": slice_rule,
        "label_convention": label_convention,
        "la_crop": la_crop,
    }
    digest = hashlib.sha256("\n".join(eids).encode()).hexdigest()[:16]
    arguments = {
        "preprocessing": options,
        "exams_per_shard": exams_per_shard,
        "num_shards": num_shards,
        "num_subjects": len(eids),
        "subjects_sha256": digest,
        "require_phenotypes": require_phenotypes,
        "eid_column": eid_column,
        # Records of this run are in the canonical orientation (`nifti_exam`): a directory
        # holding an earlier run's (each file's own orientation) is refused, not mixed.
        "orientation": ORIENTATION_VERSION,
        # Schema 2 marks labels per frame (acdc / mnms: ED and ES only); an earlier run's
        # records (every frame of a segmented plane labelled) are not mixed with them.
        "schema_version": records.SCHEMA_VERSION,
    }
    source = {"input_format": input_format, "series_views": series_views}
    if input_format != "auto" or series_views:  # recorded only when set: older runs resume
        arguments["input"] = {**source, "series_views": [list(p) for p in series_views]}
    if split_file is not None:  # a resume must use the same split lists
        arguments["split_file_sha256"] = hashlib.sha256(Path(split_file).read_bytes()).hexdigest()
        arguments["strict_split"] = strict_split
    _check_arguments(out_dir, arguments)
    host, hosts = host_shard
    done = complete_shards(out_dir, num_shards)
    mine = list(range(host, num_shards, hosts))
    todo = [s for s in mine if s not in done]
    if stop_after_shards is not None:
        todo = todo[:stop_after_shards]
    note = None
    if not mine:
        note = (
            f"host {host}/{hosts} has no shards to write: {len(eids)} subjects make "
            f"{num_shards} shard(s) of --exams-per-shard {exams_per_shard}, and host i "
            f"writes shards i, i + {hosts}, ...; use at most {num_shards} host(s) or a "
            "smaller --exams-per-shard"
        )
    elif not todo:
        note = (
            f"host {host}/{hosts}: its {len(mine)} shard(s) are already complete in "
            f"{out_dir}: nothing to write"
        )

    def shard_jobs(shard):
        jobs = []
        for eid in eids[shard * exams_per_shard : (shard + 1) * exams_per_shard]:
            job = _job(eid, shard, root, folders, phenotypes, require_phenotypes)
            if "status" not in job:
                job = _assign_split(job, assignment, split_file, strict_split)
            if "status" not in job:
                job.update(options=options, flags=job["flags"] + cell_warnings.get(eid, []))
                job["input"] = source
            jobs.append(job)
        return jobs

    tasks = [(slot, shard, shard_jobs(shard)) for slot, shard in enumerate(todo)]
    total = sum(len(jobs) for _, _, jobs in tasks)
    start, counts, entries_here = time.perf_counter(), collections.Counter(), []
    pool = WorkerPool(workers, len(tasks)) if workers > 1 and total > 1 else None
    if pool is None:
        keep_freed_memory()  # what the pool's workers do (see its docstring)
    try:
        with tqdm(total=total, unit="exam", desc="prepare", disable=not progress) as bar:

            def in_this_process(shard, jobs):
                """Exams prepared one by one (in workers when there is a pool), written here."""
                ahead = 0 if pool is None else 2 * pool.workers  # bounded: exams in memory
                jobs = ((shard, job) for job in _prefetched(jobs, prefetch))
                results = ordered_results(jobs, pool, lookahead=ahead, work=_prepare_one)
                return write_prepared_shard(out_dir, shard, num_shards, results, bar.update)

            if pool is not None and len(tasks) >= workers:
                # Whole shards in workers: records never travel through this process.
                work = functools.partial(
                    _prepare_shard, out_dir=out_dir, num_shards=num_shards, prefetch=prefetch
                )
                done = whole_shard_results(tasks, pool, work, in_this_process, bar.update)
            else:  # too few shards to keep the workers busy: spread their exams instead
                done = ((shard, in_this_process(shard, jobs)) for _, shard, jobs in tasks)
            for _, entries in done:
                counts.update(e["status"] for e in entries)
                entries_here += entries
    finally:
        if pool is not None:
            pool.shutdown()
    seconds = time.perf_counter() - start
    summary = {
        "host_shard": f"{host}/{hosts}",
        "shards_written": len(todo),
        "exams_processed": total,
        "written": counts["written"],
        "rejected": counts["rejected"],
        "seconds": round(seconds, 3),
        "exams_per_second": round(total / seconds, 3) if total and seconds > 0 else None,
        "workers": workers,
        "csv_warnings": csv_warnings,
        "flags_by_kind": flags_by_kind(entries_here),
        "note": note,
    }
    if finalize and len(complete_shards(out_dir, num_shards)) == num_shards:
        summary["dataset"] = finalize_prepared(
            out_dir,
            {
                **arguments,
                "root": str(root),
                "phenotypes": str(phenotype_csv),
                "split_file": None if split_file is None else str(split_file),
                "csv_warnings": csv_warnings,
            },
        )
    return summary


def _job(eid, shard, root, folders, phenotypes, require_phenotypes) -> dict:
    """A worker's job for one subject, or its rejection when no files need reading."""
    entry = {"eid": eid, "shard": shard}
    if eid not in folders:
        reason = f"no exam folder {Path(root) / eid} (CSV row only)"
        return {**entry, "status": "rejected", "reason": reason}
    flags = []
    if eid not in phenotypes:
        if require_phenotypes:
            reason = "no phenotype CSV row (--require-phenotypes)"
            return {**entry, "status": "rejected", "reason": reason}
        flags.append("no phenotype CSV row: phenotypes all NaN")
    folder = str(Path(root) / eid)
    return {**entry, "folder": folder, "phenotypes": phenotypes.get(eid), "flags": flags}


def _assign_split(job: dict, assignment: SplitAssignment, split_file, strict: bool) -> dict:
    """The job with its split decided (or its rejection under --strict-split)."""
    eid, source = job["eid"], assignment.source(job["eid"])
    if source == "hash" and split_file is not None:
        if strict:
            reason = f"not listed in split file {split_file} (--strict-split)"
            return {"eid": eid, "shard": job["shard"], "status": "rejected", "reason": reason}
        job["flags"] = [*job["flags"], f"not in split file {Path(split_file).name}: hash split"]
    return {**job, "split": assignment(eid), "split_source": source}


def _prefetched(jobs: list[dict], depth: int):
    """The jobs in order; when job i comes out, the files of jobs i..i + depth (those with
    a folder to read) have been asked for (`nifti_io.prefetch_files`): the disk reads the
    next exams while this one is computed. depth 0: nothing asked."""
    asked = 0
    for index, job in enumerate(jobs):
        while depth > 0 and asked <= min(index + depth, len(jobs) - 1):
            if "folder" in jobs[asked] and "status" not in jobs[asked]:
                prefetch_files(jobs[asked]["folder"])
            asked += 1
        yield job


def _prepare_shard(
    slot: int, shard: int, jobs: list[dict], out_dir, num_shards, prefetch: int
) -> list[dict]:
    """Worker: prepare and write one whole shard; returns its manifest entries."""

    def results():
        for job in _prefetched(jobs, prefetch):
            yield shard, job if "status" in job else _prepare_one(job)
            count_done(slot)

    return write_prepared_shard(Path(out_dir), shard, num_shards, results())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder of <eid>/ exam folders")
    parser.add_argument("--phenotypes", required=True, help="phenotype CSV keyed by eid")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--eid-column", default="eid")
    parser.add_argument("--frames", type=int, default=50, help="frames per cycle (resampled)")
    parser.add_argument("--size", type=int, default=128, help="crop rows = cols")
    parser.add_argument("--slice-rule", default="reference", choices=SLICE_RULES)
    parser.add_argument("--label-convention", default="ukbb", choices=CONVENTIONS)
    parser.add_argument("--la-crop", default="centre", choices=LA_CROPS)
    parser.add_argument("--exams-per-shard", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--prefetch",
        type=int,
        default=1,
        help="exams ahead whose files each worker has the disk read in the background "
        "(0: off; more for network file systems)",
    )
    parser.add_argument("--shard", default="0/1", help="this host's part i/n of the subjects")
    parser.add_argument(
        "--require-phenotypes",
        action="store_true",
        help="reject folders without a CSV row (default: write, NaN, flag)",
    )
    parser.add_argument(
        "--split-file",
        default=None,
        help="CSV eid,split (train/val/test); unlisted subjects get the hash split, flagged",
    )
    parser.add_argument(
        "--strict-split",
        action="store_true",
        help="with --split-file: reject subjects it does not list",
    )
    parser.add_argument("--no-finalize", action="store_true", help="leave merging to another host")
    parser.add_argument(
        "--input",
        default="auto",
        choices=INPUTS,
        help="exam folders of NIfTI or DICOM (zips / .dcm series); auto: told apart per folder",
    )
    parser.add_argument(
        "--dicom-views",
        default=None,
        help="JSON file: [[regular expression, view or null], ...] matched on DICOM "
        "SeriesDescription before the UK Biobank defaults (views: sa, la_2ch, la_3ch, la_4ch)",
    )
    args = parser.parse_args(argv)
    try:
        series_views = None
        if args.dicom_views is not None:
            try:
                series_views = json.loads(Path(args.dicom_views).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"--dicom-views {args.dicom_views}: not JSON ({e})") from None
        summary = prepare_dataset(
            args.root,
            args.phenotypes,
            args.out,
            eid_column=args.eid_column,
            frames=args.frames,
            size=args.size,
            slice_rule=args.slice_rule,
            label_convention=args.label_convention,
            la_crop=args.la_crop,
            exams_per_shard=args.exams_per_shard,
            prefetch=args.prefetch,
            workers=args.workers,
            host_shard=parse_host_shard(args.shard),
            require_phenotypes=args.require_phenotypes,
            split_file=args.split_file,
            strict_split=args.strict_split,
            finalize=not args.no_finalize,
            input_format=args.input,
            series_views=series_views,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"whmae-prepare: {e}", file=sys.stderr)
        return 2
    for warning in summary["csv_warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    rate = summary["exams_per_second"]
    if summary["note"]:
        print(summary["note"])
    print(
        f"host {summary['host_shard']}: {summary['exams_processed']} exams in "
        f"{summary['seconds']:.1f} s ({rate or 0:.2f} exams/s): written {summary['written']}"
        f" + rejected {summary['rejected']}"
    )
    dataset = summary.get("dataset")
    if dataset is None:
        for line in format_flags(summary["flags_by_kind"]):  # this host's exams
            print(line)
        print("dataset not finalized yet (other hosts' shards missing); rerun to finalize")
        return 0
    print(dataset["line"])
    for eid, reason in dataset["rejections"].items():
        print(f"  rejected {eid}: {reason}")
    for line in format_flags(dataset["flags_by_kind"]):
        print(line)
    print(f"wrote {Path(args.out) / MANIFEST_FILE} and {Path(args.out) / SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
