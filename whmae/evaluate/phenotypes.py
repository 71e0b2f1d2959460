"""Phenotype regression evaluation: several models side by side, plus the mean guess.

  python -m whmae.evaluate phenotypes --data DIR --split test --out runs/eval/phenotypes \\
      --model mae_probe=runs/probe --model mae_finetuned=runs/ft --model resnet50=preds.npz

Each `--model NAME=PATH` is a fine-tuning workdir (`whmae.tasks.predict.predict_phenotypes`)
or an .npz holding the same arrays (eid, columns, pred, target, train_mean), so
predictions made elsewhere compare on equal terms.

metrics.json (schema_version 1):
  task "phenotypes", split, data_dir,
  columns      [str]                 every phenotype column evaluated (UK Biobank names)
  models       {name: {"num_exams": int, "columns": {column: STATS}}}
               with name "mean_guess" added: the train-split mean predicted for everyone
  STATS        {"n", "mae", "mae_sd", "rmse", "pearson_r", "bias", "sd", "loa_low",
                "loa_high"}: n pairs with a known target; MAE +- SD of |error|;
                Bland-Altman bias = mean(pred - true), sd, limits bias -+ 1.96 sd;
                null where undefined (e.g. pearson_r of a constant prediction)
  plots        {name: {"scatter": file, "bland_altman": file}}  (PNGs beside the JSON)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from whmae.evaluate import plots
from whmae.evaluate.metrics import regression_stats
from whmae.evaluate.results import SCHEMA_VERSION, format_table, jsonable, write_metrics

__all__ = ["MEAN_GUESS", "evaluate_phenotypes", "load_predictions", "main", "phenotype_table"]

MEAN_GUESS = "mean_guess"


def _check(name: str, result: Mapping) -> dict:
    missing = [k for k in ("columns", "pred", "target", "train_mean") if k not in result]
    if missing:
        raise ValueError(f"phenotype predictions of model {name!r} lack {missing}")
    columns = [str(c) for c in result["columns"]]
    pred = np.asarray(result["pred"], np.float64)
    target = np.asarray(result["target"], np.float64)
    train_mean = np.asarray(result["train_mean"], np.float64).reshape(-1)
    k = len(columns)
    if pred.ndim != 2 or pred.shape[1] != k or target.shape != pred.shape:
        raise ValueError(
            f"model {name!r}: pred {pred.shape} and target {target.shape} must both be "
            f"[N, {k}] for its {k} columns"
        )
    if train_mean.shape != (k,):
        raise ValueError(f"model {name!r}: train_mean has {train_mean.shape}, expected ({k},)")
    eid = np.asarray(result.get("eid", np.arange(len(pred)))).astype(str)
    return {"columns": columns, "pred": pred, "target": target, "train_mean": train_mean,
            "eid": eid}  # fmt: skip


def _mean_guess(models: Mapping[str, dict]) -> dict:
    """The mean-guess 'model': per column, the train mean of the first model with that
    column, predicted for every exam of that model's test set."""
    columns, pred, target, train_mean = [], [], [], []
    for model in models.values():
        for k, column in enumerate(model["columns"]):
            if column in columns:
                continue
            columns.append(column)
            target.append(model["target"][:, k])
            pred.append(np.full(len(model["target"]), model["train_mean"][k]))
            train_mean.append(model["train_mean"][k])
    return {"columns": columns, "pred": pred, "target": target, "train_mean": train_mean}


def evaluate_phenotypes(results: Mapping[str, Mapping]) -> dict:
    """Per model and phenotype regression statistics (module docstring, `models`),
    the mean guess included; `results` maps model name -> predict_phenotypes dict."""
    if not results:
        raise ValueError("no phenotype predictions to evaluate")
    if MEAN_GUESS in results:
        raise ValueError(f"model name {MEAN_GUESS!r} is reserved for the train-mean baseline")
    models = {name: _check(name, r) for name, r in results.items()}
    out = {}
    for name, m in models.items():
        out[name] = {
            "num_exams": len(m["pred"]),
            "columns": {
                c: regression_stats(m["pred"][:, k], m["target"][:, k])
                for k, c in enumerate(m["columns"])
            },  # fmt: skip
        }
    guess = _mean_guess(models)
    out[MEAN_GUESS] = {
        "num_exams": max(len(m["pred"]) for m in models.values()),
        "columns": {
            c: regression_stats(p, t)
            for c, p, t in zip(guess["columns"], guess["pred"], guess["target"], strict=True)
        },  # fmt: skip
    }
    return {"columns": guess["columns"], "models": out}


def phenotype_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (phenotype, model, n, MAE +- SD, RMSE, r, bias, limits of agreement)."""
    metrics = jsonable(metrics)  # NaN -> None, as read back from metrics.json
    rows = []
    for column in metrics["columns"]:
        for name, model in metrics["models"].items():
            s = model["columns"].get(column)
            if s is None:
                continue
            mae = "-" if s["mae"] is None else f"{s['mae']:.3g} +- {s['mae_sd'] or 0:.3g}"
            loa = "-" if s["loa_low"] is None else f"[{s['loa_low']:.3g}, {s['loa_high']:.3g}]"
            rows.append([column, name, s["n"], mae, s["rmse"], s["pearson_r"], s["bias"], loa])
    header = ["phenotype", "model", "n", "MAE +- SD", "RMSE", "r", "bias", "bias -+ 1.96 SD"]
    return format_table(header, rows, markdown=markdown)


def load_predictions(source, *, data_dir: str, split: str, batch_size: int) -> dict:
    """Predictions of one model: `source` is an .npz of them, a fine-tuning workdir or a
    phenotype model object (both through `whmae.tasks.predict.predict_phenotypes`), or
    a result dict itself."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, str | os.PathLike) and str(source).endswith(".npz"):
        if not Path(source).is_file():
            raise FileNotFoundError(f"prediction file {source} does not exist")
        with np.load(source, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    from whmae.tasks.predict import predict_phenotypes

    return predict_phenotypes(source, data_dir, split, batch_size=batch_size)


def parse_models(items: list[str]) -> dict[str, str]:
    """`NAME=PATH` items -> {name: path} (a bare PATH is named after its directory)."""
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).stem, item
        if not name or not path:
            raise ValueError(f"--model expects NAME=PATH, got {item!r}")
        if name in models:
            raise ValueError(f"model name {name!r} given twice")
        models[name] = path
    return models


def run(models: Mapping[str, Any], data_dir: str, split: str, out_dir: str, *,
        batch_size: int = 16) -> dict:  # fmt: skip
    """Predict with every model (name -> `load_predictions` source), evaluate, write
    metrics.json and the PNGs into out_dir."""
    results = {
        name: load_predictions(path, data_dir=data_dir, split=split, batch_size=batch_size)
        for name, path in models.items()
    }
    metrics = evaluate_phenotypes(results)
    metrics["plots"] = {}
    out = Path(out_dir)
    for name, r in results.items():
        columns = [str(c) for c in r["columns"]]
        scatter = plots.scatter_panels(out / f"scatter_{name}.png", columns, r["pred"],
                                       r["target"], title=name)  # fmt: skip
        bland = plots.bland_altman_panels(out / f"bland_altman_{name}.png", columns, r["pred"],
                                          r["target"], title=name)  # fmt: skip
        metrics["plots"][name] = {"scatter": scatter.name, "bland_altman": bland.name}
    full = {"task": "phenotypes", "schema_version": SCHEMA_VERSION, "split": split,
            "data_dir": str(data_dir), **metrics}  # fmt: skip
    write_metrics(out, full)
    return full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-evaluate phenotypes",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--model", action="append", required=True, help="NAME=WORKDIR or .npz")
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        metrics = run(parse_models(args.model), args.data, args.split, args.out,
                      batch_size=args.batch_size)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"whmae-evaluate phenotypes: {e}", file=sys.stderr)
        return 2
    print(phenotype_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
