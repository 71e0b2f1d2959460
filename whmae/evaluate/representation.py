"""Representation evaluation: t-SNE by phenotype quintiles, and missing-plane robustness.

  python -m whmae.evaluate representation --model mae=runs/mae --data DIR --out DIR \\
      [--tsne-splits train,val,test] [--pairs 10] [--regression runs/finetune]

t-SNE (scikit-learn) of the exams' embeddings (cls by default), one panel per phenotype,
points coloured by the phenotype's quintile (as the paper's Fig. 2). As a number to go
with the picture, `neighbour_spearman`: Spearman correlation between an exam's phenotype
and the mean phenotype of its k nearest neighbours (cosine, in the embedding itself).

Robustness: every single plane of the model and `pairs` sampled plane pairs are removed
through the availability mask (`plane_mask` False, `whmae.embed.embed_dataset`'s
absent_planes). Over the exams that had the removed planes: cosine similarity of the
cls and mean-pooled representations to the full exam's; with a regression workdir
(`--regression`, `whmae.tasks.predict.predict_phenotypes`), the absolute shift of its
phenotype predictions.

metrics.json (schema_version 1):
  task "representation", split (robustness split), data_dir, models:
    {name: {"tsne": {"splits": [str], "embedding": "cls"|"mean_pooled", "num_exams": int,
                     "perplexity": float, "kl_divergence": float, "neighbours": int,
                     "neighbour_spearman": {column: float}, "plot": file},
            "robustness": {
              "removals": [{"planes": [plane names], "num_exams": int,
                            "cosine_cls": SUMMARY, "cosine_mean_pooled": SUMMARY,
                            "phenotype_shift": {column: SUMMARY}}],   (with --regression)
              "single_plane": {"cosine_cls": SUMMARY, "cosine_mean_pooled": SUMMARY,
                               "phenotype_shift": {column: SUMMARY}},  pooled over removals
              "plane_pairs":  (as single_plane)}}}
  SUMMARY {"mean", "sd", "n", "n_undefined", "n_infinite"} over (exam, removal) pairs;
  phenotype_shift is |prediction without the planes - prediction with all| in the
  column's unit.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from whmae import layout
from whmae.data.pipeline import make_pipeline
from whmae.embed import embed_dataset
from whmae.evaluate import plots
from whmae.evaluate.metrics import summary
from whmae.evaluate.phenotypes import parse_models
from whmae.evaluate.results import SCHEMA_VERSION, format_table, jsonable, write_metrics

__all__ = [
    "cosine_similarity",
    "main",
    "plane_removals",
    "representation_table",
    "robustness",
    "tsne",
    "tsne_table",
]


def cosine_similarity(a, b) -> np.ndarray:
    """Row-wise cosine similarity of [N, D] arrays -> [N]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)


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
    predict = None
    if regression is not None:
        from whmae.tasks.predict import predict_phenotypes

        def predict(absent=()):
            return predict_phenotypes(regression, data_dir, split, absent_planes=absent)

        full_pred = predict()
        if not np.array_equal(np.asarray(full_pred["eid"]).astype(str), full["eid"]):
            raise ValueError("phenotype predictions are not in the dataset's exam order")
    removals = []
    for removed in plane_removals(model.config.planes, pairs, seed):
        had = full["plane_mask"][:, list(removed)].all(axis=1)  # exams that lose something
        entry = {"planes": [layout.PLANE_NAMES[p] for p in removed], "num_exams": int(had.sum()),
                 "cosine_cls": np.array([]), "cosine_mean_pooled": np.array([])}  # fmt: skip
        left = full["plane_mask"].copy()
        left[:, list(removed)] = False
        if not left.any(axis=1).all():
            entry["skipped"] = "some exams would have no plane left"
        elif had.any():
            part = embed_dataset(model, data_dir, (split,), batch_size=batch_size,
                                 absent_planes=removed, progress=False)  # fmt: skip
            for k in ("cls", "mean_pooled"):
                entry[f"cosine_{k}"] = cosine_similarity(part[k][had], full[k][had])
            if predict is not None:
                moved = np.asarray(predict(removed)["pred"], np.float64)
                shift = np.abs(moved - np.asarray(full_pred["pred"], np.float64))[had]
                columns = [str(c) for c in full_pred["columns"]]
                entry["phenotype_shift"] = {c: shift[:, k] for k, c in enumerate(columns)}
        removals.append(entry)
    return {"removals": [_summarise(r) for r in removals],
            "single_plane": _pool([r for r in removals if len(r["planes"]) == 1]),
            "plane_pairs": _pool([r for r in removals if len(r["planes"]) == 2])}  # fmt: skip


def _summarise(entry: dict) -> dict:
    out = {k: entry[k] for k in ("planes", "num_exams", "skipped") if k in entry}
    out["cosine_cls"] = summary(entry["cosine_cls"])
    out["cosine_mean_pooled"] = summary(entry["cosine_mean_pooled"])
    if "phenotype_shift" in entry:
        out["phenotype_shift"] = {c: summary(v) for c, v in entry["phenotype_shift"].items()}
    return out


def _pool(entries: list[dict]) -> dict:
    out = {k: summary(np.concatenate([e[k] for e in entries] or [np.array([])]))
           for k in ("cosine_cls", "cosine_mean_pooled")}  # fmt: skip
    shifted = [e["phenotype_shift"] for e in entries if "phenotype_shift" in e]
    if shifted:
        out["phenotype_shift"] = {c: summary(np.concatenate([s[c] for s in shifted]))
                                  for c in shifted[0]}  # fmt: skip
    return out


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


def tsne_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, phenotype, neighbour Spearman r) of the t-SNE entries."""
    metrics = jsonable(metrics)
    rows = [[name, column, r]
            for name, entry in metrics["models"].items() if entry.get("tsne")
            for column, r in entry["tsne"]["neighbour_spearman"].items()]  # fmt: skip
    return format_table(["model", "phenotype", "neighbour Spearman r"], rows, markdown=markdown)


def run(models: Mapping[str, str], data_dir, split: str, out_dir, *, tsne_splits=None,
        embedding: str = "cls", columns=layout.PAPER_PHENOTYPES, pairs: int = 10,
        regression=None, batch_size: int = 32, seed: int = 0,
        skip_tsne: bool = False, skip_robustness: bool = False,
        progress: bool = True) -> dict:  # fmt: skip
    """t-SNE and robustness of every (name -> MAE checkpoint); writes metrics.json + PNGs."""
    from whmae.model.io import load_model

    out = Path(out_dir)
    entries = {}
    for name, path in models.items():
        model, _ = load_model(path)
        entry = {}
        if not skip_tsne:
            entry["tsne"] = tsne(model, data_dir, tsne_splits or (split,), out / f"tsne_{name}.png",
                                 columns=columns, embedding=embedding, seed=seed,
                                 batch_size=batch_size, progress=progress)  # fmt: skip
        if not skip_robustness:
            entry["robustness"] = robustness(model, data_dir, split, pairs=pairs, seed=seed,
                                             regression=regression, batch_size=batch_size,
                                             progress=progress)  # fmt: skip
        entries[name] = entry
    metrics = {"task": "representation", "schema_version": SCHEMA_VERSION, "split": split,
               "data_dir": str(data_dir), "regression": _describe(regression),
               "models": entries}  # fmt: skip
    write_metrics(out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from whmae.data.splits import SPLITS

    parser = argparse.ArgumentParser(prog="whmae-evaluate representation",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT")
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
                      tsne_splits=tsne_splits, embedding=args.embedding,
                      columns=columns, pairs=args.pairs, regression=args.regression,
                      batch_size=args.batch_size, seed=args.seed, skip_tsne=args.skip_tsne,
                      skip_robustness=args.skip_robustness,
                      progress=not args.no_progress)  # fmt: skip
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"whmae-evaluate representation: {e}", file=sys.stderr)
        return 2
    if not args.skip_tsne:
        print(tsne_table(metrics))
    if not args.skip_robustness:
        print(representation_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
