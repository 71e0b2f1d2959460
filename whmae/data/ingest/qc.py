"""`whmae-qc`: recompute phenotypes from the segmentations and compare them with the CSV.

    whmae-qc --root /data/ukbb --phenotypes pheno.csv --out qc/ --workers 16

For every exam folder, the 18 phenotypes are recomputed with `whmae.phenotypes`
(ukbb_cardiac conventions) from the FULL short-axis stack (seg_sa.nii.gz: disc
summation over all slices, not the six-slice window of the dataset) and the long-axis
segmentations, with spacing and frame duration from the NIfTI headers. Each CSV value
is compared with its recomputed value; a pair is flagged when
|computed - csv| > max(relative tolerance x |csv|, the column's absolute floor).

Writes into --out:
  qc_pairs.csv       eid, column, csv, computed, difference, flagged (one row per pair)
  qc_summary.json    per column: pairs, MAE, bias (mean computed - csv), Pearson r,
                     flagged; subjects that could not be computed, with the reason;
                     exam folders without a CSV row (computed, nothing to compare) and
                     CSV eids without an exam folder (nothing to compute)
The console report counts both and names the first few of each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np

from whmae.data.ingest.label_maps import CONVENTIONS, labelled_frames
from whmae.data.ingest.nifti_exam import load_segmentation
from whmae.data.ingest.nifti_io import ExamError, frame_duration_seconds
from whmae.data.ingest.subjects import list_subjects, read_phenotype_csv
from whmae.files import write_text_atomic
from whmae.layout import PHENOTYPE_COLUMNS
from whmae.phenotypes import phenotypes_from_segmentations

PAIRS_FILE = "qc_pairs.csv"
SUMMARY_FILE = "qc_summary.json"
# Smallest disagreement worth flagging, by unit (a few voxels or a rounding of the CSV).
ABSOLUTE_FLOOR = {"(mL)": 3.0, "(%)": 3.0, "(g)": 3.0, "(L/min)": 0.3}
EXAMPLES = 5  # eids named on the console per kind of unmatched subject (all in the JSON)


def absolute_floor(column: str) -> float:
    return next(v for unit, v in ABSOLUTE_FLOOR.items() if column.endswith(unit))


def exam_phenotypes(folder, convention: str = "ukbb") -> dict[str, float]:
    """The 18 phenotypes of one exam folder from its segmentations (NaN where a view is
    missing), read at the labelled frames (`label_maps.labelled_frames`: ED and ES for
    acdc / mnms). Raises ExamError (naming the file) if seg_sa cannot be used."""
    folder = Path(folder)
    if not (folder / "seg_sa.nii.gz").is_file():
        raise ExamError("seg_sa.nii.gz: missing (ventricular phenotypes need it)")
    seg_sa, info = load_segmentation(folder, "sa", None, convention)
    zooms = info["zooms"]
    long_axis, spacing = {}, {}
    frames = {"sa": labelled_frames(seg_sa, convention)}
    for view in ("la_2ch", "la_4ch"):
        if (folder / f"seg_{view}.nii.gz").is_file():
            seg, la_info = load_segmentation(folder, view, None, convention)
            if seg.shape[0] != 1:
                raise ExamError(f"seg_{view}.nii.gz: expected one slice, got {seg.shape[0]}")
            long_axis[view] = seg[0]
            frames[view] = labelled_frames(seg, convention)
            spacing[view] = (la_info["zooms"][1], la_info["zooms"][0])
    frame_duration = frame_duration_seconds(info)
    try:
        return phenotypes_from_segmentations(
            seg_sa,
            long_axis.get("la_2ch"),
            long_axis.get("la_4ch"),
            sa_pixel_spacing=(zooms[1], zooms[0]),
            slice_spacing=zooms[2],
            la_2ch_pixel_spacing=spacing.get("la_2ch"),
            la_4ch_pixel_spacing=spacing.get("la_4ch"),
            frame_duration=None if math.isnan(frame_duration) else frame_duration,
            labelled_frames=frames,
            subject=folder.name,
        )
    except ValueError as e:
        raise ExamError(f"seg_sa.nii.gz: {e}") from None


def _qc_one(job: tuple[str, str]) -> tuple[dict | None, str | None]:
    folder, convention = job
    try:
        return exam_phenotypes(folder, convention), None
    except ExamError as e:
        return None, str(e)
    except Exception as e:  # one bad exam never stops the run
        return None, f"unexpected {type(e).__name__}: {e}"


def compare(
    computed: dict[str, dict], csv_rows: dict[str, np.ndarray], tolerance: float
) -> tuple[list[dict], dict]:
    """Pairs (eid, column) present in both, and per-column agreement statistics."""
    pairs = []
    for eid in sorted(computed):
        if eid not in csv_rows:
            continue
        for j, column in enumerate(PHENOTYPE_COLUMNS):
            reported, mine = float(csv_rows[eid][j]), computed[eid][column]
            if math.isnan(reported) or math.isnan(mine):
                continue
            difference = mine - reported
            limit = max(tolerance * abs(reported), absolute_floor(column))
            pairs.append(
                {
                    "eid": eid,
                    "column": column,
                    "csv": reported,
                    "computed": mine,
                    "difference": difference,
                    "flagged": abs(difference) > limit,
                }
            )
    columns = {}
    for column in PHENOTYPE_COLUMNS:
        rows = [p for p in pairs if p["column"] == column]
        if not rows:
            columns[column] = {"pairs": 0}
            continue
        reported = np.array([p["csv"] for p in rows])
        mine = np.array([p["computed"] for p in rows])
        varied = len(rows) > 2 and reported.std() > 0 and mine.std() > 0
        columns[column] = {
            "pairs": len(rows),
            "mae": float(np.abs(mine - reported).mean()),
            "bias": float((mine - reported).mean()),
            "pearson_r": float(np.corrcoef(reported, mine)[0, 1]) if varied else None,
            "flagged": sum(p["flagged"] for p in rows),
        }
    return pairs, columns


def run_qc(
    root,
    phenotype_csv,
    out_dir,
    *,
    eid_column: str = "eid",
    convention: str = "ukbb",
    tolerance: float = 0.1,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Recompute, compare and write qc_pairs.csv + qc_summary.json; returns the summary."""
    from tqdm import tqdm

    csv_rows, _, csv_warnings = read_phenotype_csv(phenotype_csv, eid_column)
    _, folders = list_subjects(root, csv_rows)
    eids = sorted(folders)
    csv_only = sorted(set(csv_rows) - folders)
    jobs = [(str(Path(root) / eid), convention) for eid in eids]
    results = []
    with tqdm(total=len(jobs), unit="exam", desc="qc", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                for result in pool.map(_qc_one, jobs, chunksize=4):
                    results.append(result)
                    bar.update(1)
        else:
            for job in jobs:
                results.append(_qc_one(job))
                bar.update(1)
    computed = {eid: r for eid, (r, _) in zip(eids, results, strict=True) if r is not None}
    failed = {eid: reason for eid, (_, reason) in zip(eids, results, strict=True) if reason}
    pairs, columns = compare(computed, csv_rows, tolerance)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / PAIRS_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, ["eid", "column", "csv", "computed", "difference", "flagged"])
        writer.writeheader()
        writer.writerows(pairs)
    flagged = sorted({p["eid"] for p in pairs if p["flagged"]})
    summary = {
        "exams": len(eids),
        "computed": len(computed),
        "failed": failed,
        "without_csv_row": sorted(set(computed) - set(csv_rows)),  # computed ones only
        "folders_without_csv_row": [e for e in eids if e not in csv_rows],
        "csv_rows_without_folder": csv_only,
        "tolerance": {"relative": tolerance, "absolute_floor": ABSOLUTE_FLOOR},
        "columns": columns,
        "pairs": len(pairs),
        "pairs_flagged": sum(p["flagged"] for p in pairs),
        "subjects_flagged": flagged,
        "csv_warnings": csv_warnings,
    }
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"qc: {summary['computed']} of {summary['exams']} exams computed, "
        f"{summary['pairs_flagged']} of {summary['pairs']} (eid, phenotype) pairs flagged "
        f"in {len(summary['subjects_flagged'])} subjects",
        f"  {'phenotype':<14} {'pairs':>5} {'MAE':>8} {'bias':>8} {'r':>6} {'flagged':>7}",
    ]
    for column, s in summary["columns"].items():
        if s["pairs"]:
            r = "-" if s["pearson_r"] is None else f"{s['pearson_r']:.3f}"
            lines.append(
                f"  {column:<14} {s['pairs']:>5} {s['mae']:8.2f} {s['bias']:8.2f} "
                f"{r:>6} {s['flagged']:>7}"
            )
    for eid, reason in summary["failed"].items():
        lines.append(f"  not computed {eid}: {reason}")
    for key, text in (
        ("folders_without_csv_row", "exam folders without a CSV row (not compared)"),
        ("csv_rows_without_folder", "CSV eids without an exam folder (not computed)"),
    ):
        eids = summary.get(key, [])
        if eids:
            more = " ..." if len(eids) > EXAMPLES else ""
            lines.append(f"  {len(eids)} {text}: {', '.join(eids[:EXAMPLES])}{more}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-qc", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder of <eid>/ exam folders")
    parser.add_argument("--phenotypes", required=True, help="phenotype CSV keyed by eid")
    parser.add_argument("--out", required=True, help="directory for the QC report")
    parser.add_argument("--eid-column", default="eid")
    parser.add_argument("--label-convention", default="ukbb", choices=CONVENTIONS)
    parser.add_argument("--tolerance", type=float, default=0.1, help="relative, e.g. 0.1")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        summary = run_qc(
            args.root,
            args.phenotypes,
            args.out,
            eid_column=args.eid_column,
            convention=args.label_convention,
            tolerance=args.tolerance,
            workers=args.workers,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"whmae-qc: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / PAIRS_FILE} and {Path(args.out) / SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
