"""Representation evaluation: t-SNE by phenotype quintiles, and missing-plane robustness
measured by subject re-identification.

  python -m whmae.evaluate representation --model mae=runs/mae --data DIR --out DIR \\
      [--control random_init=runs/mae] [--tsne-splits train,val,test] [--pairs 10] \\
      [--regression runs/finetune]

t-SNE (scikit-learn) of the exams' embeddings (cls by default), one panel per phenotype,
points coloured by the phenotype's quintile (as the paper's Fig. 2). As a number to go
with the picture, `neighbour_spearman`: Spearman correlation between an exam's phenotype
and the mean phenotype of its k nearest neighbours (cosine, in the embedding itself).

Robustness: every single plane of the model and `pairs` sampled plane pairs are removed
through the availability mask (`plane_mask` False, `whmae.embed.embed_dataset`'s
absent_planes). Over the exams that had the removed planes:
  - re-identification (`reidentify`), for the cls and the mean-pooled embedding: each
    exam's reduced embedding is looked up among the FULL-plane embeddings of all N exams
    of the split by Euclidean distance in the embedding as the encoder outputs it; a hit
    when its own full embedding is strictly the nearest (ties count as misses, so a
    constant embedding scores 0). top1 = hits / queries; chance = 1/N.
  - within-subject shift: Euclidean distance from the reduced to the own full embedding,
    and shift_fraction = its mean / the median between-subject distance (Euclidean
    distance between the full embeddings of two different exams, over all pairs, or the
    pairs of MAX_BETWEEN_EXAMS exams sampled with `seed` when N is larger). Cosine
    similarity alone says little here: two different exams' embeddings already have
    cosine ~0.99, so the scale that matters is how far apart subjects are.
  - cosine similarity of the reduced to the full embedding (kept for comparison).
  - with a regression model (`--regression`, `whmae.tasks.predict.predict_phenotypes`):
    the absolute shift of its phenotype predictions, and phenotype_shift_fraction = mean
    shift / the model's own full-plane test MAE per phenotype (the paper: LVM moves
    0.3 g at 4.3 g MAE, ~7 %), and the model's learning check (its prediction spread,
    `whmae.evaluate.phenotypes.learning_checks`; a constant predictor never moves).
Controls (`--control NAME=CHECKPOINT`, `controls=`): an untrained MAE of the
checkpoint's config (`whmae.embed.random_init_model`: seeded with the checkpoint's
train.seed, the pretraining's own starting point) gets the same robustness entry (no
t-SNE, no regression shift), so every figure has what an encoder that learned nothing
scores beside it.

metrics.json (schema_version 2; 2 added re-identification, shift fractions, controls):
  task "representation", split (robustness split), data_dir, regression, models:
    {name: {"control": null | {"init": "random", "config_from": str, "seed": int},
            "tsne": {"splits": [str], "embedding": "cls"|"mean_pooled", "num_exams": int,
                     "perplexity": float, "kl_divergence": float, "neighbours": int,
                     "neighbour_spearman": {column: float}, "plot": file},   (not controls)
            "robustness": {
              "distance": "euclidean", "num_exams": N, "chance_top1": 1/N,
              "between_subject": {"cls": BETWEEN, "mean_pooled": BETWEEN},
              "regression": {column: {"mae": float, "sd_ratio": float, "learned": bool}},
                                                                    (with --regression)
              "removals": [{"planes": [plane names], "num_exams": int,
                            "cosine_cls": SUMMARY, "cosine_mean_pooled": SUMMARY,
                            "reid_cls": REID, "reid_mean_pooled": REID,
                            "phenotype_shift": {column: SUMMARY},           (--regression)
                            "phenotype_shift_fraction": {column: float}}],  (--regression)
              "single_plane": {cosine_*, reid_*, phenotype_shift*}  pooled over removals,
              "plane_pairs":  (as single_plane)}}}
  SUMMARY {"mean", "sd", "n", "n_undefined", "n_infinite"} over (exam, removal) pairs;
  REID {"top1": float, "hits": int, "n": int (queries), "chance": 1/N,
        "shift": SUMMARY (Euclidean, embedding units), "shift_fraction": float};
  BETWEEN {"median": float, "num_pairs": int, "num_exams": int};
  phenotype_shift is |prediction without the planes - prediction with all| in the
  column's unit. Undefined values (no exam, zero between-subject distance) are null.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from whmae import layout
from whmae.data.dataset.pipeline import make_pipeline
from whmae.embed import embed_dataset
from whmae.evaluate import plots
from whmae.evaluate.metrics import summary
from whmae.evaluate.phenotypes import learning_checks, parse_models, training_record
from whmae.evaluate.results import format_table, jsonable, write_metrics

__all__ = [
    "SCHEMA_VERSION",
    "between_subject_distance",
    "cosine_similarity",
    "euclidean_distances",
    "main",
    "plane_removals",
    "reid_summary",
    "phenotype_shift_table",
    "reid_table",
    "reidentify",
    "representation_table",
    "robustness",
    "tsne",
    "tsne_table",
]

SCHEMA_VERSION = 2
EMBEDDINGS = ("cls", "mean_pooled")
# The between-subject median over all pairs of at most this many exams (sampled beyond):
# 2000 exams are 2 million pairs, a stable median at a few MB of distances per row block.
MAX_BETWEEN_EXAMS = 2000
_BLOCK = 1024  # query rows per distance block


def cosine_similarity(a, b) -> np.ndarray:
    """Row-wise cosine similarity of [N, D] arrays -> [N]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)


def euclidean_distances(a, b) -> np.ndarray:
    """[M, N] Euclidean distances between the rows of [M, D] `a` and [N, D] `b` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    squared = (
        np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T)
    )  # fmt: skip
    return np.sqrt(np.maximum(squared, 0.0))


def reidentify(query, gallery, own) -> tuple[np.ndarray, np.ndarray]:
    """(hits bool [M], shift float [M]): query row i (a reduced embedding) is a hit when
    gallery row own[i] (its full embedding) is strictly nearer (Euclidean) than every
    other gallery row; shift = distance to gallery row own[i]."""
    query = np.asarray(query, np.float64)
    gallery = np.asarray(gallery, np.float64)
    own = np.asarray(own, np.int64)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {query.shape} and gallery {gallery.shape} must be [M, D], [N, D]")
    if own.shape != (len(query),):
        raise ValueError(f"own has shape {own.shape}, expected ({len(query)},)")
    shift = np.linalg.norm(query - gallery[own], axis=1)  # direct: exact for tiny shifts
    hits = np.zeros(len(query), bool)
    for start in range(0, len(query), _BLOCK):
        rows = slice(start, start + _BLOCK)
        d = euclidean_distances(query[rows], gallery)
        d[np.arange(len(d)), own[rows]] = np.inf
        nearest_other = d.min(axis=1) if gallery.shape[0] > 1 else np.full(len(d), np.inf)
        hits[rows] = shift[rows] < nearest_other
    return hits, shift


def between_subject_distance(gallery, *, max_exams: int = MAX_BETWEEN_EXAMS,
                             seed: int = 0) -> dict:  # fmt: skip
    """BETWEEN (module docstring): the median Euclidean distance between the rows of
    [N, D] `gallery` over all pairs of different rows (of `max_exams` sampled rows)."""
    x = np.asarray(gallery, np.float64)
    if len(x) > max_exams:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_exams, replace=False))]
    n = len(x)
    if n < 2:
        return {"median": math.nan, "num_pairs": 0, "num_exams": n}
    upper = [euclidean_distances(x[i : i + _BLOCK], x) for i in range(0, n, _BLOCK)]
    d = np.concatenate(upper)
    i, j = np.triu_indices(n, k=1)
    return {"median": float(np.median(d[i, j])), "num_pairs": int(len(i)), "num_exams": n}


def reid_summary(hits, shift, between_median: float, gallery_size: int) -> dict:
    """REID (module docstring) of pooled hits and shifts against one gallery."""
    hits = np.asarray(hits, bool)
    shift = np.asarray(shift, np.float64)
    n = int(hits.size)
    mean_shift = float(shift.mean()) if shift.size else math.nan
    fraction = mean_shift / between_median if between_median > 0 else math.nan
    return {"top1": float(hits.mean()) if n else math.nan, "hits": int(hits.sum()), "n": n,
            "chance": 1.0 / gallery_size if gallery_size else math.nan,
            "shift": summary(shift), "shift_fraction": fraction}  # fmt: skip


def dataset_phenotypes(data_dir, splits: Sequence[str]) -> dict[str, np.ndarray]:
    """{eid: phenotypes float32 [18]} of the given splits."""
    out = {}
    for split in splits:
        for batch in make_pipeline(data_dir, split, batch_size=64, fields=("eid", "phenotypes"),
                                   shuffle=False, num_epochs=1, drop_remainder=False,
                                   process_index=0, process_count=1):  # fmt: skip
            out.update(zip(batch["eid"].astype(str), batch["phenotypes"], strict=True))
    return out


def neighbour_spearman(embedding, values, k: int = 5) -> float:
    """Spearman r between each exam's value and its k nearest (cosine) neighbours' mean."""
    values = np.asarray(values, np.float64)
    known = np.isfinite(values)
    x, v = np.asarray(embedding, np.float64)[known], values[known]
    if len(v) <= k + 1 or np.ptp(v) == 0:
        return float("nan")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argsort(-similarity, axis=1)[:, :k]
    return float(stats.spearmanr(v, v[neighbours].mean(axis=1)).statistic)


def tsne(model, data_dir, splits: Sequence[str], out_png, *, columns=layout.PAPER_PHENOTYPES,
         embedding: str = "cls", perplexity: float = 30.0, neighbours: int = 5, seed: int = 0,
         batch_size: int = 32, progress: bool = True) -> dict:  # fmt: skip
    """t-SNE entry (module docstring) of the exams of `splits`; draws `out_png`."""
    from sklearn.manifold import TSNE

    if embedding not in ("cls", "mean_pooled"):
        raise ValueError(f"embedding must be 'cls' or 'mean_pooled', got {embedding!r}")
    columns = list(columns)
    index = [layout.phenotype_index(c) for c in columns]
    embedded = embed_dataset(model, data_dir, splits, batch_size=batch_size, progress=progress)
    phenotypes = dataset_phenotypes(data_dir, splits)
    table = np.stack([phenotypes[e] for e in embedded["eid"]])[:, index]  # [N, K]
    x = embedded[embedding]
    n = len(x)
    if n < 5:
        raise ValueError(f"{data_dir} splits {list(splits)}: t-SNE needs >= 5 exams, got {n}")
    perplexity = float(min(perplexity, (n - 1) / 3))  # scikit-learn requires perplexity < n
    fitted = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    coords = fitted.fit_transform(x)
    png = plots.tsne_panels(out_png, coords, dict(zip(columns, table.T, strict=True)),
                            title=f"t-SNE of {embedding} embeddings")  # fmt: skip
    return {
        "splits": list(splits),
        "embedding": embedding,
        "num_exams": n,
        "perplexity": perplexity,
        "kl_divergence": float(fitted.kl_divergence_),
        "neighbours": neighbours,
        "neighbour_spearman": {
            c: neighbour_spearman(x, table[:, k], neighbours) for k, c in enumerate(columns)
        },  # fmt: skip
        "plot": Path(png).name,
    }


def plane_removals(planes: Sequence[int], pairs: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Every single plane, then `pairs` distinct pairs sampled without replacement."""
    singles = [(p,) for p in planes]
    all_pairs = list(itertools.combinations(planes, 2))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(all_pairs), size=min(pairs, len(all_pairs)), replace=False)
    return singles + [all_pairs[i] for i in sorted(chosen)]


def robustness(model, data_dir, split: str = "test", *, pairs: int = 10, seed: int = 0,
               regression=None, batch_size: int = 32,
               progress: bool = True) -> dict:  # fmt: skip
    """Robustness entry (module docstring): representations and predictions with planes
    removed against the full exam's. `regression`: a phenotype fine-tuning workdir or
    model (`whmae.tasks.predict.predict_phenotypes`), or None."""
    full = embed_dataset(model, data_dir, (split,), batch_size=batch_size, progress=progress)
    n = len(full["eid"])
    between = {k: between_subject_distance(full[k], seed=seed) for k in EMBEDDINGS}
    predict, regression_entry, mae = None, None, None
    if regression is not None:
        from whmae.tasks.predict import finetuned_model, predict_phenotypes

        regression_model, _ = finetuned_model(regression, "phenotype")  # loaded once

        def predict(absent=()):
            return predict_phenotypes(regression_model, data_dir, split, absent_planes=absent)

        full_pred = predict()
        if not np.array_equal(np.asarray(full_pred["eid"]).astype(str), full["eid"]):
            raise ValueError("phenotype predictions are not in the dataset's exam order")
        columns = [str(c) for c in full_pred["columns"]]
        error = np.abs(np.asarray(full_pred["pred"], np.float64)
                       - np.asarray(full_pred["target"], np.float64))  # fmt: skip
        mae = {c: _nanmean(error[:, k]) for k, c in enumerate(columns)}
        record = None
        if isinstance(regression, str | os.PathLike):
            record = training_record(regression, data_dir)
        learning = learning_checks(full_pred, record)["columns"]
        regression_entry = {c: {"mae": mae[c], "sd_ratio": learning[c]["sd_ratio"],
                                "learned": learning[c]["learned"]} for c in columns}  # fmt: skip
    removals = []
    for removed in plane_removals(model.config.planes, pairs, seed):
        had = full["plane_mask"][:, list(removed)].all(axis=1)  # exams that lose something
        entry = {"planes": [layout.PLANE_NAMES[p] for p in removed], "num_exams": int(had.sum())}
        for k in EMBEDDINGS:
            entry[f"cosine_{k}"] = np.array([])
            entry[f"reid_{k}"] = (np.zeros(0, bool), np.array([]))
        left = full["plane_mask"].copy()
        left[:, list(removed)] = False
        if not left.any(axis=1).all():
            entry["skipped"] = "some exams would have no plane left"
        elif had.any():
            part = embed_dataset(model, data_dir, (split,), batch_size=batch_size,
                                 absent_planes=removed, progress=False)  # fmt: skip
            for k in EMBEDDINGS:
                entry[f"cosine_{k}"] = cosine_similarity(part[k][had], full[k][had])
                entry[f"reid_{k}"] = reidentify(part[k][had], full[k], np.flatnonzero(had))
            if predict is not None:
                moved = np.asarray(predict(removed)["pred"], np.float64)
                shift = np.abs(moved - np.asarray(full_pred["pred"], np.float64))[had]
                entry["phenotype_shift"] = {c: shift[:, k] for k, c in enumerate(columns)}
        removals.append(entry)
    context = {"between": between, "n": n, "mae": mae}
    out = {"distance": "euclidean", "num_exams": n, "chance_top1": 1.0 / n,
           "between_subject": between}  # fmt: skip
    if regression_entry is not None:
        out["regression"] = regression_entry
    out["removals"] = [_summarise(r, context) for r in removals]
    out["single_plane"] = _pool([r for r in removals if len(r["planes"]) == 1], context)
    out["plane_pairs"] = _pool([r for r in removals if len(r["planes"]) == 2], context)
    return out


def _nanmean(values) -> float:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _figures(cosine: dict, reid: dict, shifts: dict | None, context: dict) -> dict:
    """The summarised figures of pooled arrays (one removal or a pool of them)."""
    out = {f"cosine_{k}": summary(cosine[k]) for k in EMBEDDINGS}
    for k in EMBEDDINGS:
        hits, shift = reid[k]
        out[f"reid_{k}"] = reid_summary(hits, shift, context["between"][k]["median"], context["n"])
    if shifts:
        out["phenotype_shift"] = {c: summary(v) for c, v in shifts.items()}
        mae = context["mae"] or {}
        out["phenotype_shift_fraction"] = {
            c: (_nanmean(v) / mae[c] if mae.get(c) else math.nan) for c, v in shifts.items()
        }  # fmt: skip
    return out


def _summarise(entry: dict, context: dict) -> dict:
    out = {k: entry[k] for k in ("planes", "num_exams", "skipped") if k in entry}
    cosine = {k: entry[f"cosine_{k}"] for k in EMBEDDINGS}
    reid = {k: entry[f"reid_{k}"] for k in EMBEDDINGS}
    out.update(_figures(cosine, reid, entry.get("phenotype_shift"), context))
    return out


def _pool(entries: list[dict], context: dict) -> dict:
    def joined(arrays, dtype):
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype)

    cosine = {k: joined([e[f"cosine_{k}"] for e in entries], float) for k in EMBEDDINGS}
    reid = {k: (joined([e[f"reid_{k}"][0] for e in entries], bool),
                joined([e[f"reid_{k}"][1] for e in entries], float))
            for k in EMBEDDINGS}  # fmt: skip
    shifted = [e["phenotype_shift"] for e in entries if "phenotype_shift" in e]
    shifts = {c: np.concatenate([s[c] for s in shifted]) for c in shifted[0]} if shifted else None
    return _figures(cosine, reid, shifts, context)


def _describe(regression) -> str | None:
    """The regression model as JSON: its workdir, or its class for a model object."""
    if regression is None or isinstance(regression, str | os.PathLike):
        return None if regression is None else os.fspath(regression)
    return type(regression).__name__


def representation_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, removal, n, cosine cls, cosine mean-pooled, mean phenotype shifts)."""
    metrics = jsonable(metrics)
    rows = []
    for name, entry in metrics["models"].items():
        robust = entry.get("robustness")
        if not robust:
            continue
        for removal in robust["removals"]:
            shifts = removal.get("phenotype_shift", {})
            shift = ", ".join(f"{c} {s['mean']:.3g}" for c, s in shifts.items()
                              if s["mean"] is not None)  # fmt: skip
            rows.append([name, "-".join(removal["planes"]), removal["num_exams"],
                         removal["cosine_cls"]["mean"], removal["cosine_mean_pooled"]["mean"],
                         shift or "-"])  # fmt: skip
    header = ["model", "removed", "n", "cos cls", "cos mean", "mean abs shift"]
    return format_table(header, rows, digits=4, markdown=markdown)


def reid_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, removed, embedding, n, top-1, chance, shift / between-subject median,
    cosine): the pooled re-identification figures, controls marked."""
    metrics = jsonable(metrics)
    rows = []
    for name, entry in metrics["models"].items():
        robust = entry.get("robustness")
        if not robust:
            continue
        label = f"{name} (random init)" if entry.get("control") else name
        for removal in ("single_plane", "plane_pairs"):
            for k in EMBEDDINGS:
                r = robust[removal][f"reid_{k}"]
                if not r["n"]:
                    continue
                cosine = robust[removal][f"cosine_{k}"]["mean"]
                rows.append([label, removal.replace("_", " "), k, r["n"], r["top1"], r["chance"],
                             r["shift_fraction"], cosine])  # fmt: skip
    header = ["model", "removed", "embedding", "n", "re-ID top-1", "chance",
              "shift / between-subject", "cosine"]  # fmt: skip
    return format_table(header, rows, digits=3, markdown=markdown)


def phenotype_shift_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, removed, phenotype, mean shift, regression MAE, shift / MAE)."""
    metrics = jsonable(metrics)
    rows = []
    for name, entry in metrics["models"].items():
        robust = entry.get("robustness") or {}
        regression = robust.get("regression")
        if not regression:
            continue
        for removal in ("single_plane", "plane_pairs"):
            shifts = robust[removal].get("phenotype_shift", {})
            fractions = robust[removal].get("phenotype_shift_fraction", {})
            for column, s in shifts.items():
                rows.append([name, removal.replace("_", " "), column, s["mean"],
                             regression[column]["mae"], fractions.get(column),
                             "yes" if regression[column]["learned"] else "NO"])  # fmt: skip
    header = ["model", "removed", "phenotype", "mean abs shift", "regression MAE", "shift / MAE",
              "regression learned"]  # fmt: skip
    return format_table(header, rows, markdown=markdown)


def tsne_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, phenotype, neighbour Spearman r) of the t-SNE entries."""
    metrics = jsonable(metrics)
    rows = [[name, column, r]
            for name, entry in metrics["models"].items() if entry.get("tsne")
            for column, r in entry["tsne"]["neighbour_spearman"].items()]  # fmt: skip
    return format_table(["model", "phenotype", "neighbour Spearman r"], rows, markdown=markdown)


def run(models: Mapping[str, str], data_dir, split: str, out_dir, *, controls=None,
        tsne_splits=None, embedding: str = "cls", columns=layout.PAPER_PHENOTYPES,
        pairs: int = 10, regression=None, batch_size: int = 32, seed: int = 0,
        skip_tsne: bool = False, skip_robustness: bool = False,
        progress: bool = True, checkpoint_step: str | int = "best") -> dict:  # fmt: skip
    """t-SNE and robustness of every (name -> MAE checkpoint), and robustness of every
    control (name -> checkpoint whose config an untrained MAE takes,
    `whmae.embed.random_init_model`); writes metrics.json + PNGs."""
    from whmae.embed import random_init_model
    from whmae.model.io import load_model
    from whmae.train.checkpoint import checkpoint_step as resolve_step

    controls = dict(controls or {})
    clash = sorted(set(models) & set(controls))
    if clash:
        raise ValueError(f"model names {clash} are given both as model and as control")
    out = Path(out_dir)
    entries = {}
    for name, path in models.items():
        step = resolve_step(path, checkpoint_step)
        model, _ = load_model(path, step)
        entry = {"control": None, "checkpoint_step": step}
        if not skip_tsne:
            entry["tsne"] = tsne(model, data_dir, tsne_splits or (split,), out / f"tsne_{name}.png",
                                 columns=columns, embedding=embedding, seed=seed,
                                 batch_size=batch_size, progress=progress)  # fmt: skip
        if not skip_robustness:
            entry["robustness"] = robustness(model, data_dir, split, pairs=pairs, seed=seed,
                                             regression=regression, batch_size=batch_size,
                                             progress=progress)  # fmt: skip
        entries[name] = entry
    for name, path in controls.items():
        model, _, init = random_init_model(path)
        entry = {"control": {"init": "random", "config_from": os.fspath(path), "seed": init}}
        if not skip_robustness:
            entry["robustness"] = robustness(model, data_dir, split, pairs=pairs, seed=seed,
                                             batch_size=batch_size, progress=progress)  # fmt: skip
        entries[name] = entry
    metrics = {"task": "representation", "schema_version": SCHEMA_VERSION, "split": split,
               "data_dir": str(data_dir), "regression": _describe(regression),
               "models": entries}  # fmt: skip
    write_metrics(out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from whmae.data.dataset.splits import SPLITS
    from whmae.train.checkpoint import CHECKPOINT_STEP_HELP, parse_checkpoint_step

    parser = argparse.ArgumentParser(prog="whmae-evaluate representation",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT")
    parser.add_argument(
        "--control",
        action="append",
        default=[],
        help="NAME=CHECKPOINT: an untrained MAE of that checkpoint's config (robustness only)",
    )
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", default="test", help="split of the robustness evaluation")
    parser.add_argument("--tsne-splits", help="comma-separated splits or 'all' (default: --split)")
    parser.add_argument("--embedding", default="cls", choices=("cls", "mean_pooled"))
    parser.add_argument(
        "--phenotypes",
        default=",".join(layout.PAPER_PHENOTYPES),
        help="t-SNE panels: UK Biobank columns, ';'- or ','-separated",
    )
    parser.add_argument("--pairs", type=int, default=10, help="plane pairs to remove")
    parser.add_argument("--regression", help="phenotype fine-tuning workdir (prediction shift)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-tsne", action="store_true")
    parser.add_argument("--skip-robustness", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--checkpoint-step", type=parse_checkpoint_step, default="best",
                        help=CHECKPOINT_STEP_HELP)  # fmt: skip
    args = parser.parse_args(argv)
    try:
        tsne_splits = None
        if args.tsne_splits:
            tsne_splits = (
                SPLITS if args.tsne_splits == "all" else tuple(args.tsne_splits.split(","))
            )
        separator = ";" if ";" in args.phenotypes else ","
        columns = [c.strip() for c in args.phenotypes.split(separator) if c.strip()]
        for column in columns:
            layout.phenotype_index(column)
        metrics = run(parse_models(args.model), args.data, args.split, args.out,
                      controls=parse_models(args.control), tsne_splits=tsne_splits,
                      embedding=args.embedding,
                      columns=columns, pairs=args.pairs, regression=args.regression,
                      batch_size=args.batch_size, seed=args.seed, skip_tsne=args.skip_tsne,
                      skip_robustness=args.skip_robustness,
                      progress=not args.no_progress,
                      checkpoint_step=args.checkpoint_step)  # fmt: skip
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"whmae-evaluate representation: {e}", file=sys.stderr)
        return 2
    if not args.skip_tsne:
        print(tsne_table(metrics))
    if not args.skip_robustness:
        print(representation_table(metrics))
        print(reid_table(metrics))
        if metrics["regression"]:
            print(phenotype_shift_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
