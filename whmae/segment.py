"""Segment UK Biobank exam folders with a fine-tuned segmentation model.

  whmae-segment --checkpoint runs/segmentation --root data/ukbb --out segs [--eids a,b]

For each exam folder ROOT/<eid> (sa.nii.gz, la_{2,3,4}ch.nii.gz), the exam is
preprocessed as for training (`nifti_exam.preprocess_exam`, frames and size from the
model), segmented, and the predicted labels are written back in each input's original
grid and geometry (crop, slice selection, temporal resampling and the canonical
in-plane orientation undone by `nifti_exam.restore_labels` from the exam's geometry, so
each label map has its input file's own voxel order; UK Biobank file labels):

  OUT/<eid>/seg_sa.nii.gz, seg_la_2ch.nii.gz, seg_la_4ch.nii.gz  (affine + header of the
      corresponding input image; voxels outside the model's window are 0)
  OUT/phenotypes.csv       eid + `layout.PHENOTYPE_COLUMNS`, computed from the predictions
      on the preprocessed exam (`phenotypes.phenotypes_from_exam`: the six short-axis
      slices of the model's window only, so ventricular volumes cover that window)
  OUT/segment_summary.json exams found / written / failed (with the reason)

A bad exam is reported and skipped; it never stops the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from whmae import layout
from whmae.data.ingest.nifti_exam import ExamError, nifti_name, preprocess_exam, restore_labels
from whmae.phenotypes import phenotypes_from_exam
from whmae.tasks.predict import input_geometry, load_finetuned
from whmae.train.checkpoint import CHECKPOINT_STEP_HELP, parse_checkpoint_step

__all__ = ["main", "segment_exams", "write_label_nifti"]

# Views with a UK Biobank segmentation file: input image stem -> output stem.
OUTPUT_VIEWS = {"sa": "seg_sa", "la_2ch": "seg_la_2ch", "la_4ch": "seg_la_4ch"}


def write_label_nifti(path: Path, labels: np.ndarray, image_path: Path) -> None:
    """uint8 labels (X, Y, Z, T) -> NIfTI with the affine and header geometry of image_path."""
    image = nib.load(str(image_path))
    if tuple(image.shape) != labels.shape:
        raise ExamError(f"{image_path.name}: shape {image.shape} but labels are {labels.shape}")
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(labels.astype(np.uint8), image.affine, header)
    out.header.set_slope_inter(1.0, 0.0)  # labels are stored verbatim, not rescaled
    nib.save(out, str(path))


def _exam_folders(root: Path, eids: list[str] | None) -> list[Path]:
    if eids is not None:
        return [root / eid for eid in eids]
    return sorted(p for p in root.iterdir() if p.is_dir())


def segment_exams(
    checkpoint: str | os.PathLike,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    eids: list[str] | None = None,
    batch_size: int = 4,
    progress: bool = True,
    checkpoint_step: int | str | None = "best",
) -> dict:
    """Segment the exam folders under root (all, or `eids`) and write OUT (see module
    docstring) with the model of `checkpoint_step` (best | latest | N; default the best
    val step, else the newest). Returns the summary dict also written to
    OUT/segment_summary.json (its `checkpoint_step` says which step)."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory of exam folders")
    task, model, config = load_finetuned(checkpoint, checkpoint_step)
    if task != "segmentation":
        raise ValueError(f"{checkpoint} holds a {task} model, not a segmentation model")
    (_, frames, size, _), _ = input_geometry(model)
    segmented = np.zeros(layout.NUM_PLANES, bool)
    segmented[np.asarray(model.planes)] = True
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images, plane_mask):
        """uint8 [B, 9, T, H, W], bool [B, 9] -> argmax classes uint8 [B, S, T, H, W]."""
        return nnx.merge(graphdef, state)(images, plane_mask).argmax(axis=-1).astype(np.uint8)

    folders = _exam_folders(root, eids)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"found": len(folders), "written": [], "failed": {},
               "checkpoint_step": int(config.checkpoint_step)}  # fmt: skip
    rows: dict[str, list[float]] = {}
    pending: list[tuple[Path, dict, dict]] = []

    def flush():
        # Pad to batch_size with the last exam so the jitted function compiles once.
        batch = pending + [pending[-1]] * (batch_size - len(pending))
        images = np.stack([exam["images"] for _, exam, _ in batch])
        plane_mask = np.stack([exam["plane_mask"] for _, exam, _ in batch])
        pred = np.asarray(run(state, images, plane_mask))
        for (folder, exam, geometry), planes_pred in zip(pending, pred, strict=False):
            try:
                rows[exam["eid"]] = _write_exam(folder, exam, geometry, planes_pred, segmented, out)
                summary["written"].append(exam["eid"])
            except (ExamError, ValueError, OSError) as e:
                summary["failed"][exam["eid"]] = f"{type(e).__name__}: {e}"
        pending.clear()

    for folder in tqdm(folders, desc="segment", unit="exam", disable=not progress):
        try:
            if not folder.is_dir():
                raise ExamError(f"{folder}: no such exam folder")
            exam, geometry = preprocess_exam(folder, frames=frames, size=size)
        except (ExamError, ValueError, OSError) as e:
            summary["failed"][folder.name] = f"{type(e).__name__}: {e}"
            continue
        pending.append((folder, exam, geometry))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()

    with (out / "phenotypes.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["eid", *layout.PHENOTYPE_COLUMNS])
        for eid, values in rows.items():
            writer.writerow([eid, *("" if math.isnan(v) else f"{v:.6g}" for v in values)])
    (out / "segment_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_exam(folder, exam, geometry, planes_pred, segmented, out: Path) -> list[float]:
    """Write one exam's label NIfTIs; returns its phenotypes in PHENOTYPE_COLUMNS order.

    planes_pred: uint8 [S, T, H, W] for the model's planes (`segmented`)."""
    pred = np.zeros(exam["labels"].shape, np.uint8)  # [9, T, H, W]
    pred[segmented] = planes_pred
    views = {k: v for k, v in geometry["views"].items() if k in OUTPUT_VIEWS}
    restored = restore_labels(pred, dict(geometry, views=views))
    target = out / exam["eid"]
    target.mkdir(parents=True, exist_ok=True)
    for stem, labels in restored.items():
        name = nifti_name(OUTPUT_VIEWS[stem])
        write_label_nifti(target / name, labels, folder / geometry["views"][stem]["file"])
    # Every frame of each segmented plane is "labelled" by the prediction.
    label_mask = np.repeat((exam["plane_mask"] & segmented)[:, None], pred.shape[1], axis=1)
    predicted = dict(exam, labels=pred, label_mask=label_mask)
    values = phenotypes_from_exam(predicted, subject=exam["eid"])
    return [float(values[c]) for c in layout.PHENOTYPE_COLUMNS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-segment", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="whmae-finetune segmentation workdir")
    parser.add_argument("--root", required=True, help="folder of UK Biobank exam folders")
    parser.add_argument("--eids", help="comma-separated exam folder names (default: all)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint-step", type=parse_checkpoint_step, default="best",
                        help=CHECKPOINT_STEP_HELP)  # fmt: skip
    args = parser.parse_args(argv)
    eids = [e for e in args.eids.split(",") if e] if args.eids else None
    summary = segment_exams(
        args.checkpoint, args.root, args.out, eids=eids, batch_size=args.batch_size,
        checkpoint_step=args.checkpoint_step,
    )  # fmt: skip
    print(
        f"{summary['found']} exams found, {len(summary['written'])} written, "
        f"{len(summary['failed'])} failed (checkpoint step {summary['checkpoint_step']})"
    )
    for eid, reason in summary["failed"].items():
        print(f"  {eid}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
