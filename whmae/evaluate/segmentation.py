"""Segmentation evaluation: Dice and HD95 (mm) per view and class, and the phenotypes
derived from predicted vs true segmentations.

  python -m whmae.evaluate segmentation --model all_planes=runs/seg --data DIR --out DIR \\
      [--model nnunet=nnunet_test.npz]

A model is a fine-tuning workdir (`whmae.tasks.predict.predict_segmentation`) or an
.npz with that function's arrays (segmentations made elsewhere compare on equal terms).

Views and their classes: short_axis (planes sa_0..sa_5: LV blood pool, LV myocardium,
RV blood pool), la_2ch (LA), la_4ch (LA, RA); la_3ch has no labels. Only the (plane,
frame) images that are acquired and labelled in the truth (plane_mask & label_mask [9, T];
ACDC / M&Ms: ED and ES) count; a per-plane label_mask [N, 9] (predictions made elsewhere,
schema-1 data) means every frame.
  Dice   per exam, view and class over all its labelled planes and frames (one volume);
         undefined (null) when the class is absent from truth and prediction, and then
         left out of the means (never counted as 1.0).
  HD95   per (plane, frame) image in mm (row, col pixel spacing), averaged over the
         images where both truth and prediction hold the class -> one value per exam;
         an exam where the class is on one side only has +inf (counted in
         n_infinite, left out of the mean); absent on both sides: undefined.
Phenotypes: `whmae.phenotypes.phenotypes_from_exam` on the predicted and on the true
labels of each exam, both over the truth's labelled frames; where those are not every
frame, the predicted ventricles are measured at the truth's ED and ES frames
(`phenotypes.cardiac_phases`). An exam whose prediction gives no phenotype (e.g. no LV at
ED) counts in `phenotype_failures` and is left out of that column.

metrics.json (schema_version 1):
  task "segmentation", split, data_dir, models:
    {name: {"num_exams": int,
            "dice":    {view: {class_name: SUMMARY}},
            "hd95_mm": {view: {class_name: SUMMARY}},
            "mean_dice": {class_name: float}   the mean over views of each class's mean
            "phenotypes": {column: STATS}       (as in whmae.evaluate.phenotypes), predicted
                                                segmentation's value vs the truth's
            "phenotype_failures": int,
            "plots": [file],                    overlay PNGs beside the JSON
            "checkpoint_step": int}}            the step of a workdir evaluated (by
                                                default the best val step, else the newest)
  SUMMARY {"mean", "sd", "n", "n_undefined", "n_infinite"} over exams.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from whmae import layout
from whmae.evaluate import plots
from whmae.evaluate.metrics import dice, dice_from_counts, hd95, regression_stats, summary
from whmae.evaluate.phenotypes import parse_models
from whmae.evaluate.results import SCHEMA_VERSION, format_table, jsonable, write_metrics
from whmae.layout import frame_label_mask
from whmae.phenotypes import cardiac_phases, phenotype_vector, phenotypes_from_exam

__all__ = [
    "VIEWS",
    "evaluate_segmentation",
    "exam_scores",
    "load_segmentations",
    "main",
    "segmentation_phenotype_table",
    "segmentation_table",
    "validation",
]

VIEWS = {
    "short_axis": (layout.SHORT_AXIS_PLANES, layout.SHORT_AXIS_CLASSES),
    "la_2ch": ((layout.LA_2CH,), (layout.LA,)),
    "la_4ch": ((layout.LA_4CH,), (layout.LA, layout.RA)),
}
EXAM_FIELDS = ("pixel_spacing", "plane_mask", "label_mask", "slice_spacing", "frame_duration")


def _exam_hd95(pred: np.ndarray, truth: np.ndarray, spacings, label: int) -> float:
    """Mean HD95 over the [K, H, W] images of one exam's view, spacings [K, 2] (see
    module docstring)."""
    values = np.asarray([hd95(p, t, s, label) for p, t, s in zip(pred, truth, spacings,
                                                                  strict=True)])  # fmt: skip
    finite = values[np.isfinite(values)]
    if len(finite):
        return float(finite.mean())
    return math.inf if np.isinf(values).any() else math.nan


def exam_scores(pred, truth, labelled, pixel_spacing) -> dict[str, dict[str, dict[str, float]]]:
    """Dice and HD95 of one exam: {"dice"|"hd95_mm": {view: {class_name: value}}}.

    pred, truth: [9, T, H, W] labels; labelled: bool [9, T] (or [9]: every frame), the
    (plane, frame) images to score; pixel_spacing [9, 2] mm. Views without a labelled
    image are left out."""
    labelled = frame_label_mask(labelled, truth.shape[:2])
    scores = {"dice": {}, "hd95_mm": {}}
    for view, (planes, classes) in VIEWS.items():
        planes = list(planes)
        images = np.nonzero(labelled[planes])  # (plane index, frame) of the labelled images
        if not len(images[0]):
            continue
        p, t = pred[planes][images], truth[planes][images]  # [K, H, W]
        spacings = np.asarray(pixel_spacing)[planes][images[0]]
        names = [layout.CLASS_NAMES[c] for c in classes]
        scores["dice"][view] = {n: dice(p, t, c) for n, c in zip(names, classes, strict=True)}
        scores["hd95_mm"][view] = {n: _exam_hd95(p, t, spacings, c)
                                   for n, c in zip(names, classes, strict=True)}  # fmt: skip
    return scores


def validation(planes):
    """Val metrics of a segmentation model on `planes` during training
    (`whmae.train.validation`; `whmae.tasks.segmentation` is the task):

      dice_<class>  Dice of the argmax prediction, per foreground class the planes can
                    hold, over all labelled and acquired planes and frames of the subset
                    (one volume per class; null when absent from truth and prediction)
      dice_mean     the mean over those classes
    """
    import jax.numpy as jnp

    from whmae.tasks.segmentation import plane_weights
    from whmae.train.validation import Validation, mean_finite

    allowed = np.asarray(layout.plane_class_mask(tuple(planes)), bool)
    classes = [c for c in range(1, layout.NUM_CLASSES) if allowed[:, c].any()]

    def fn(model, batch, key):
        del key
        pred = model(batch["images"], batch["plane_mask"]).argmax(axis=-1)  # [B, S, T, H, W]
        truth = batch["labels"][:, np.asarray(model.planes)]
        weight = plane_weights(batch, model.planes)  # [B, S, T] (or [B, S])
        weight = weight.reshape(weight.shape + (1,) * (5 - weight.ndim))
        intersection, total = [], []
        for c in range(layout.NUM_CLASSES):  # one class at a time: no one-hot volume
            p = (pred == c).astype(jnp.float32) * weight
            t = (truth == c).astype(jnp.float32) * weight
            intersection.append(jnp.sum(p * t, axis=(1, 2, 3, 4)))
            total.append(jnp.sum(p + t, axis=(1, 2, 3, 4)))
        return {"intersection": jnp.stack(intersection, -1), "total": jnp.stack(total, -1)}

    def summarise(values):
        scores = dice_from_counts(values["intersection"].sum(0), values["total"].sum(0))
        out = {f"dice_{layout.CLASS_NAMES[c]}": float(scores[c]) for c in classes}
        out["dice_mean"] = mean_finite(scores[c] for c in classes)
        return out

    return Validation(fn=fn, summarise=summarise)


def _phenotypes(exam: dict, labels: np.ndarray, phases=None) -> np.ndarray | None:
    try:
        return phenotype_vector(phenotypes_from_exam({**exam, "labels": labels}, phases=phases))
    except ValueError:
        return None


def evaluate_segmentation(result: Mapping) -> dict:
    """Metrics of one model's `predict_segmentation` result (module docstring, one entry
    of `models`). result: pred, labels uint8 [N, 9, T, H, W], label_mask [N, 9, T] (or
    [N, 9]: every frame), plane_mask [N, 9], pixel_spacing [N, 9, 2], slice_spacing [N],
    frame_duration [N], eid [N]."""
    missing = [k for k in ("pred", "labels", *EXAM_FIELDS) if k not in result]
    if missing:
        raise ValueError(f"segmentation result lacks {missing}")
    pred, truth = np.asarray(result["pred"]), np.asarray(result["labels"])
    if pred.shape != truth.shape or pred.ndim != 5 or pred.shape[1] != layout.NUM_PLANES:
        raise ValueError(f"pred {pred.shape} and labels {truth.shape} must both be [N, 9, T, H, W]")
    n = len(pred)
    eids = np.asarray(result.get("eid", np.arange(n))).astype(str)
    label_mask = frame_label_mask(result["label_mask"], truth.shape[:3])
    labelled = np.asarray(result["plane_mask"], bool)[:, :, None] & label_mask
    per_exam = [exam_scores(pred[i], truth[i], labelled[i], result["pixel_spacing"][i])
                for i in range(n)]  # fmt: skip
    out = {"num_exams": n}
    for metric in ("dice", "hd95_mm"):
        out[metric] = {}
        for view, (_, classes) in VIEWS.items():
            for name in (layout.CLASS_NAMES[c] for c in classes):
                values = [s[metric][view][name] for s in per_exam if view in s[metric]]
                if values:
                    out[metric].setdefault(view, {})[name] = summary(values)
    out["mean_dice"] = {}
    for name in layout.CLASS_NAMES[1:]:
        means = [v[name]["mean"] for v in out["dice"].values() if name in v]
        means = [m for m in means if math.isfinite(m)]
        out["mean_dice"][name] = float(np.mean(means)) if means else math.nan

    predicted, true = [], []
    failures = 0
    for i in range(n):
        exam = {"eid": eids[i], **{k: np.asarray(result[k][i]) for k in EXAM_FIELDS}}
        exam["label_mask"] = label_mask[i]
        from_truth = _phenotypes(exam, truth[i])
        from_pred = _phenotypes(exam, pred[i], cardiac_phases({**exam, "labels": truth[i]}))
        nan_row = np.full(layout.NUM_PHENOTYPES, np.nan, np.float32)
        failures += from_pred is None and from_truth is not None
        true.append(nan_row if from_truth is None else from_truth)
        predicted.append(nan_row if from_pred is None else from_pred)
    predicted, true = np.stack(predicted), np.stack(true)
    out["phenotypes"] = {c: regression_stats(predicted[:, k], true[:, k])
                         for k, c in enumerate(layout.PHENOTYPE_COLUMNS)}  # fmt: skip
    out["phenotype_failures"] = int(failures)
    return out


def segmentation_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, view, class, Dice mean +- SD, HD95 mean +- SD, n, undefined)."""
    metrics = jsonable(metrics)
    rows = []
    for name, model in metrics["models"].items():
        for view, classes in model["dice"].items():
            for cls, d in classes.items():
                h = model["hd95_mm"][view][cls]
                rows.append([name, view, cls, _pm(d), _pm(h), d["n"], d["n_undefined"],
                             h["n_infinite"]])  # fmt: skip
    header = ["model", "view", "class", "Dice", "HD95 mm", "n", "undefined", "HD95 inf"]
    return format_table(header, rows, markdown=markdown)


def segmentation_phenotype_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, phenotype, n, MAE, r, bias) of predicted- vs true-label phenotypes
    (columns no exam could give are left out)."""
    metrics = jsonable(metrics)
    rows = [[name, column, s["n"], s["mae"], s["pearson_r"], s["bias"]]
            for name, model in metrics["models"].items()
            for column, s in model["phenotypes"].items() if s["n"]]  # fmt: skip
    return format_table(["model", "phenotype", "n", "MAE", "r", "bias"], rows, markdown=markdown)


def _pm(s: Mapping) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.3f} +- {s['sd']:.3f}" if s["sd"] is not None else f"{s['mean']:.3f}"


def overlay_rows(result: Mapping, index: int, images=None) -> list[tuple]:
    """(label, image, truth, pred) rows of exam `index` at ED and ES (frame 0 and the
    truth's minimum LV blood pool frame; with labels on some frames only, the truth's
    labelled ED and ES, `phenotypes.cardiac_phases`): la_2ch, la_4ch and the middle
    short-axis slice, where labelled at that frame."""
    truth, pred = result["labels"][index], result["pred"][index]
    plane_mask = np.asarray(result["plane_mask"][index], bool)
    label_mask = frame_label_mask(result["label_mask"][index], truth.shape[:2])
    phases = cardiac_phases({"labels": truth, "label_mask": label_mask, "plane_mask": plane_mask})
    if phases is None:  # every frame labelled (or no short axis): ED is frame 0
        lv = np.count_nonzero(truth[list(layout.SHORT_AXIS_PLANES)] == layout.LV_BLOOD_POOL,
                              axis=(0, 2, 3))  # fmt: skip
        es = int(np.argmin(np.where(lv > 0, lv, np.iinfo(np.int64).max))) if lv.any() else 0
        phases = (0, es)
    labelled = plane_mask[:, None] & label_mask
    rows = []
    for plane in (layout.LA_2CH, layout.LA_4CH, layout.SHORT_AXIS_PLANES[2]):
        for frame, phase in zip(phases, ("ED", "ES"), strict=True):
            if not labelled[plane, frame]:
                continue
            image = None if images is None else images[plane, frame] / 255.0
            rows.append((f"{layout.PLANE_NAMES[plane]} {phase}", image, truth[plane, frame],
                         pred[plane, frame]))  # fmt: skip
    return rows


def _dataset_images(data_dir, split: str, eids) -> dict[str, np.ndarray]:
    from whmae.data.dataset.pipeline import make_pipeline

    wanted, found = set(eids), {}
    for batch in make_pipeline(data_dir, split, batch_size=8, fields=("eid", "images"),
                               shuffle=False, num_epochs=1, drop_remainder=False,
                               process_index=0, process_count=1):  # fmt: skip
        for eid, images in zip(batch["eid"].astype(str), batch["images"], strict=True):
            if eid in wanted:
                found[eid] = images
    return found


def load_segmentations(source, *, data_dir, split: str, batch_size: int,
                       checkpoint_step: str | int = "best") -> dict:  # fmt: skip
    """One model's segmentations: `source` is a result dict, an .npz of one (e.g. another
    method's predictions, same keys), a fine-tuning workdir or a segmentation model (both
    through `whmae.tasks.predict.predict_segmentation`)."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, str | os.PathLike) and str(source).endswith(".npz"):
        if not Path(source).is_file():
            raise FileNotFoundError(f"segmentation file {source} does not exist")
        with np.load(source, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    from whmae.tasks.predict import predict_segmentation

    return predict_segmentation(source, data_dir, split, batch_size=batch_size,
                                checkpoint_step=checkpoint_step)  # fmt: skip


def run(models: Mapping[str, Any], data_dir, split: str, out_dir, *, batch_size: int = 4,
        overlays: int = 2, checkpoint_step: str | int = "best") -> dict:  # fmt: skip
    """Segment with each model (name -> `load_segmentations` source), evaluate, write
    metrics.json and the overlays into out_dir."""
    out = Path(out_dir)
    entries = {}
    for name, source in models.items():
        result = load_segmentations(source, data_dir=data_dir, split=split,
                                    batch_size=batch_size,
                                    checkpoint_step=checkpoint_step)  # fmt: skip
        try:
            entry = evaluate_segmentation(result)
        except ValueError as e:
            raise ValueError(f"model {name!r}: {e}") from None
        eids = np.asarray(result["eid"]).astype(str)[:overlays]
        images = _dataset_images(data_dir, split, eids) if len(eids) else {}
        entry["plots"] = []
        if "checkpoint_step" in result:
            entry["checkpoint_step"] = int(np.asarray(result["checkpoint_step"]))
        for i, eid in enumerate(eids):
            rows = overlay_rows(result, i, images.get(eid))
            if rows:
                png = plots.segmentation_overlay(out / f"overlay_{name}_{eid}.png", rows,
                                                 title=f"{name}: exam {eid}")  # fmt: skip
                entry["plots"].append(png.name)
        entries[name] = entry
    metrics = {"task": "segmentation", "schema_version": SCHEMA_VERSION, "split": split,
               "data_dir": str(data_dir), "models": entries}  # fmt: skip
    write_metrics(out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from whmae.train.checkpoint import CHECKPOINT_STEP_HELP, parse_checkpoint_step

    parser = argparse.ArgumentParser(prog="whmae-evaluate segmentation",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--model", action="append", required=True,
                        help="NAME=WORKDIR (fine-tuned) or NAME=FILE.npz")  # fmt: skip
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--overlays", type=int, default=2, help="exams to draw")
    parser.add_argument("--checkpoint-step", type=parse_checkpoint_step, default="best",
                        help=CHECKPOINT_STEP_HELP)  # fmt: skip
    args = parser.parse_args(argv)
    try:
        metrics = run(parse_models(args.model), args.data, args.split, args.out,
                      batch_size=args.batch_size, overlays=args.overlays,
                      checkpoint_step=args.checkpoint_step)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"whmae-evaluate segmentation: {e}", file=sys.stderr)
        return 2
    print(segmentation_table(metrics))
    print(segmentation_phenotype_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
