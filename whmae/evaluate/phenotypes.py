"""Phenotype regression evaluation: several models side by side, plus the mean guess.

  python -m whmae.evaluate phenotypes --data DIR --split test --out runs/eval/phenotypes \\
      --model mae_probe=runs/probe --model mae_finetuned=runs/ft --model resnet50=preds.npz

Each `--model NAME=PATH` is a fine-tuning workdir (`whmae.tasks.predict.predict_phenotypes`)
or an .npz holding the same arrays (eid, columns, pred, target, train_mean), so
predictions made elsewhere compare on equal terms.

Learning checks (`learning_checks`): a model "did not learn" a phenotype when
  - spread: the SD of its predictions is < SPREAD_RATIO_MIN (0.3) x the SD of the targets
    (test exams with a known target). A calibrated least-squares predictor has
    sd(pred) = r sd(target), so below 0.3 it explains < 9 % of the variance; a model
    stuck at (or near) a constant lands here whatever its MAE;
  - or training: its smoothed training loss (moving mean over LOSS_WINDOW logged rows of
    the run's `metrics.jsonl`) never fell below the mean guess's loss. Targets are
    standardised with the train split's mean and population SD, so the mean guess
    predicts 0 and its loss is the mean over the train split's known entries of loss(z):
    exactly 1 for mse by construction, computed from the data for huber
    (`mean_guess_loss`). The loss is per batch and noisy: a constant predictor can dip
    below the mean guess by chance, which is why the spread check is there.
  The training check needs a fine-tuning workdir (an .npz or a model object has no
  training log: `training` is null and only the spread decides).

metrics.json (schema_version 3; 2 added `learning`, 3 `paired`):
  task "phenotypes", split, data_dir,
  columns      [str]                 every phenotype column evaluated (UK Biobank names)
  models       {name: {"num_exams": int, "columns": {column: STATS}, "learning": LEARNING}}
               with name "mean_guess" added: the train-split mean predicted for everyone
               (no "learning": it is the constant reference)
  STATS        {"n", "mae", "mae_sd", "rmse", "pearson_r", "bias", "sd", "loa_low",
                "loa_high"}: n pairs with a known target; MAE +- SD of |error|;
                Bland-Altman bias = mean(pred - true), sd, limits bias -+ 1.96 sd;
                null where undefined (e.g. pearson_r of a constant prediction)
  LEARNING     {"learned": bool (every column learned), "did_not_learn": [column],
                "columns": {column: {"pred_sd", "target_sd", "sd_ratio", "spread_ok",
                                     "learned"}},
                "training": {"loss": "mse"|"huber", "huber_delta", "rows", "window",
                             "min_smoothed_loss", "final_loss", "mean_guess_loss",
                             "fell_below": bool} | null}
               learned = spread_ok and training.fell_below (when there is a log)
  plots        {name: {"scatter": file, "bland_altman": file}}  (PNGs beside the JSON)
  paired       {a: {b: {column: {"n", "mae_diff", "ci95": [lo, hi]}}}} for every pair of
               models a before b (in the order given): MAE(a) - MAE(b) over the exams both
               predicted with a known target, and its 95 % paired bootstrap interval
               (PAIRED_RESAMPLES resamples of those exams, seed 0): a difference whose
               interval holds 0 is a tie at this test set's size (`paired_difference`
               reads either order)
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

from whmae.evaluate import plots
from whmae.evaluate.metrics import regression_stats
from whmae.evaluate.results import format_table, jsonable, write_metrics

__all__ = [
    "MEAN_GUESS",
    "SCHEMA_VERSION",
    "SPREAD_RATIO_MIN",
    "PAIRED_RESAMPLES",
    "evaluate_phenotypes",
    "paired_difference",
    "learning_checks",
    "learning_summary",
    "learning_table",
    "load_predictions",
    "main",
    "mean_guess_loss",
    "phenotype_table",
    "prediction_spread",
    "training_check",
    "training_record",
]

SCHEMA_VERSION = 3
MEAN_GUESS = "mean_guess"
# A model whose predictions spread less than this fraction of the targets' SD did not
# learn the phenotype: calibrated, that is r < 0.3 (< 9 % of the variance explained).
SPREAD_RATIO_MIN = 0.3
# Logged training losses are single batches: a moving mean over this many rows damps
# the batch noise before comparing with the mean guess's loss.
LOSS_WINDOW = 5


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


# ------------------------------------------------------------------ learning checks
def prediction_spread(pred, target) -> dict[str, float]:
    """{"pred_sd", "target_sd", "sd_ratio"} of one column over the exams with a known
    target and a finite prediction (population SDs; ratio NaN without target spread)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    keep = np.isfinite(pred) & np.isfinite(target)
    if not keep.any():
        return {"pred_sd": math.nan, "target_sd": math.nan, "sd_ratio": math.nan}
    pred_sd, target_sd = float(pred[keep].std()), float(target[keep].std())
    ratio = pred_sd / target_sd if target_sd > 0 else math.nan
    return {"pred_sd": pred_sd, "target_sd": target_sd, "sd_ratio": ratio}


def mean_guess_loss(standardised, kind: str = "mse", delta: float = 1.0) -> float:
    """The training loss of the mean guess (0 in standardised units) over the known
    entries of `standardised` [N, K] (train targets minus train mean, over train SD),
    pooled over entries as the phenotype loss pools them."""
    z = np.asarray(standardised, np.float64)
    z = np.abs(z[np.isfinite(z)])
    if not z.size:
        return math.nan
    if kind == "mse":
        per = z**2
    elif kind == "huber":
        per = np.where(z <= delta, 0.5 * z**2, delta * (z - 0.5 * delta))
    else:
        raise ValueError(f"loss must be 'mse' or 'huber', got {kind!r}")
    return float(per.mean())


def training_check(losses, mean_guess: float, *, window: int = LOSS_WINDOW) -> dict:
    """Did the smoothed training loss ever fall below the mean guess's? `losses`: the
    logged losses in step order; the moving mean runs over `window` rows (fewer if the
    log is shorter). fell_below None when there is no loss or no mean-guess loss."""
    values = np.asarray([float(v) for v in losses], np.float64)
    values = values[np.isfinite(values)]
    out = {"rows": int(values.size), "window": 0, "min_smoothed_loss": math.nan,
           "final_loss": math.nan, "mean_guess_loss": float(mean_guess),
           "fell_below": None}  # fmt: skip
    if not values.size:
        return out
    w = max(1, min(int(window), values.size))
    smoothed = np.convolve(values, np.ones(w) / w, mode="valid")
    out.update(window=w, min_smoothed_loss=float(smoothed.min()), final_loss=float(values[-1]))
    if math.isfinite(mean_guess):
        out["fell_below"] = bool(smoothed.min() < mean_guess)
    return out


def _split_phenotypes(data_dir, split: str) -> np.ndarray:
    from whmae.data.dataset.pipeline import make_pipeline

    batches = [b["phenotypes"] for b in make_pipeline(
        data_dir, split, batch_size=256, fields=("phenotypes",), shuffle=False, num_epochs=1,
        drop_remainder=False, process_index=0, process_count=1)]  # fmt: skip
    return np.concatenate(batches) if batches else np.zeros((0, 18), np.float32)


def _run_workdir(source) -> Path | None:
    """The training workdir of a fine-tuning source (workdir, checkpoints or step dir)."""
    from whmae.train.checkpoint import CHECKPOINT_DIR

    path = Path(source).absolute()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / CHECKPOINT_DIR).is_dir() or (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def training_record(source, data_dir=None) -> dict | None:
    """{"loss", "huber_delta", "losses", "mean_guess_loss"} of a fine-tuning run: its
    logged losses (`metrics.jsonl`) and the mean guess's loss on its own train split
    (the run's `data.dir`, else `data_dir`); None when `source` has no training log."""
    import orbax.checkpoint as ocp

    from whmae import layout
    from whmae.model.io import resolve_checkpoint
    from whmae.tasks.phenotype import train_stats
    from whmae.train.metrics import read_metrics

    workdir = _run_workdir(source)
    if workdir is None:
        return None
    rows = read_metrics(str(workdir))
    if not rows:
        return None
    directory, step = resolve_checkpoint(workdir)
    config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        directory / str(step) / "config", args=ocp.args.JsonRestore()
    )
    kind = str(config.get("loss", "mse"))
    delta = float(config.get("huber_delta", 1.0))
    columns = list(config["phenotypes"])
    train_dir = (config.get("data") or {}).get("dir") or data_dir
    if not train_dir or not Path(train_dir).is_dir():
        guess = math.nan
    else:
        mean, std = train_stats(str(train_dir), columns)
        values = _split_phenotypes(train_dir, "train")
        index = [layout.phenotype_index(c) for c in columns]
        guess = mean_guess_loss((values[:, index] - mean) / std, kind, delta)
    losses = [float(r["loss"]) for r in rows if "loss" in r]
    return {"loss": kind, "huber_delta": delta, "losses": losses, "mean_guess_loss": guess}


def learning_checks(result: Mapping, training: Mapping | None = None) -> dict:
    """LEARNING (module docstring) of one model's predictions (`predict_phenotypes` dict)
    and its `training_record` (None: spread check alone)."""
    columns = [str(c) for c in result["columns"]]
    pred = np.asarray(result["pred"], np.float64)
    target = np.asarray(result["target"], np.float64)
    check = None
    if training is not None:
        check = training_check(training["losses"], training["mean_guess_loss"])
        check = {"loss": training["loss"], "huber_delta": training["huber_delta"], **check}
    per = {}
    for k, column in enumerate(columns):
        spread = prediction_spread(pred[:, k], target[:, k])
        ok = bool(spread["sd_ratio"] >= SPREAD_RATIO_MIN)  # NaN -> False
        learned = ok and (check is None or check["fell_below"] is not False)
        per[column] = {**spread, "spread_ok": ok, "learned": learned}
    failed = [c for c, v in per.items() if not v["learned"]]
    return {"learned": not failed, "did_not_learn": failed, "columns": per, "training": check}


def learning_summary(metrics: Mapping) -> list[str]:
    """One plain sentence per model that did not learn some phenotype (markdown)."""
    metrics = jsonable(metrics)
    lines = []
    for name, model in metrics["models"].items():
        learning = model.get("learning")
        if not learning or learning["learned"]:
            continue
        why = []
        flat = [c for c in learning["did_not_learn"] if not learning["columns"][c]["spread_ok"]]
        if flat:
            ratios = ", ".join(f"{c} {_fmt(learning['columns'][c]['sd_ratio'])}x" for c in flat)
            why.append(f"its predictions barely vary (SD < {SPREAD_RATIO_MIN}x the targets': "
                       f"{ratios})")  # fmt: skip
        training = learning.get("training")
        if training and training["fell_below"] is False:
            low, guess = training["min_smoothed_loss"], training["mean_guess_loss"]
            why.append(f"its training loss (smoothed min {_fmt(low)}) never fell below the "
                       f"mean guess's ({_fmt(guess)})")  # fmt: skip
        every = len(learning["did_not_learn"]) == len(learning["columns"])
        which = "any phenotype" if every else ", ".join(learning["did_not_learn"])
        lines.append(f"**{name} did not learn {which}**: {'; '.join(why)}.")
    return lines


def _fmt(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3g}"


def learning_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, phenotype, pred SD / target SD, training loss check, learned)."""
    metrics = jsonable(metrics)
    rows = []
    for name, model in metrics["models"].items():
        learning = model.get("learning")
        if not learning:
            continue
        training = learning.get("training")
        if training is None or training["fell_below"] is None:
            loss = "no log"
        else:
            loss = (f"{_fmt(training['min_smoothed_loss'])} vs {_fmt(training['mean_guess_loss'])}"
                    f" ({'below' if training['fell_below'] else 'NEVER below'})")  # fmt: skip
        for column, c in learning["columns"].items():
            rows.append([name, column, c["sd_ratio"], loss, "yes" if c["learned"] else "NO"])
    header = ["model", "phenotype", "pred SD / target SD", "train loss vs mean guess", "learned"]
    return format_table(header, rows, digits=2, markdown=markdown)


# Bootstrap resamples of the test exams for the paired MAE differences' 95 % intervals.
PAIRED_RESAMPLES = 2000


def paired_mae_differences(models: Mapping[str, dict]) -> dict:
    """`paired` of metrics.json (module docstring) for `_check`ed models."""
    names = list(models)
    rng = np.random.default_rng(0)
    out: dict = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ma, mb = models[a], models[b]
            _, ia, ib = np.intersect1d(ma["eid"], mb["eid"], return_indices=True)
            per = {}
            for ka, column in enumerate(ma["columns"]):
                if column not in mb["columns"]:
                    continue
                kb = mb["columns"].index(column)
                pa, ta = ma["pred"][ia, ka], ma["target"][ia, ka]
                pb, tb = mb["pred"][ib, kb], mb["target"][ib, kb]
                ok = np.isfinite(pa) & np.isfinite(ta) & np.isfinite(pb) & np.isfinite(tb)
                diff = (np.abs(pa - ta) - np.abs(pb - tb))[ok]
                if len(diff) < 2:
                    per[column] = {"n": int(len(diff)), "mae_diff": None, "ci95": None}
                    continue
                draws = rng.integers(0, len(diff), (PAIRED_RESAMPLES, len(diff)))
                lo, hi = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
                per[column] = {"n": int(len(diff)), "mae_diff": float(diff.mean()),
                               "ci95": [float(lo), float(hi)]}  # fmt: skip
            out.setdefault(a, {})[b] = per
    return out


def paired_difference(metrics: Mapping, a: str, b: str, column: str) -> dict | None:
    """MAE(a) - MAE(b) on `column` with its 95 % interval, from metrics.json's `paired`
    in either order; None when it was not computed."""
    paired = metrics.get("paired") or {}
    entry = (paired.get(a) or {}).get(b, {}).get(column)
    if entry is not None:
        return entry
    entry = (paired.get(b) or {}).get(a, {}).get(column)
    if entry is None or entry["mae_diff"] is None:
        return entry
    lo, hi = entry["ci95"]
    return {"n": entry["n"], "mae_diff": -entry["mae_diff"], "ci95": [-hi, -lo]}


def evaluate_phenotypes(
    results: Mapping[str, Mapping], training: Mapping[str, Mapping | None] | None = None
) -> dict:
    """Per model and phenotype regression statistics and learning checks (module
    docstring, `models`), the mean guess included; `results` maps model name ->
    predict_phenotypes dict, `training` model name -> `training_record` (or None)."""
    training = training or {}
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
            "learning": learning_checks(m, training.get(name)),
        }
    guess = _mean_guess(models)
    out[MEAN_GUESS] = {
        "num_exams": max(len(m["pred"]) for m in models.values()),
        "columns": {
            c: regression_stats(p, t)
            for c, p, t in zip(guess["columns"], guess["pred"], guess["target"], strict=True)
        },  # fmt: skip
    }
    return {"columns": guess["columns"], "models": out, "paired": paired_mae_differences(models)}


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


def load_predictions(source, *, data_dir: str, split: str, batch_size: int,
                     checkpoint_step: str | int = "best") -> dict:  # fmt: skip
    """Predictions of one model: `source` is an .npz of them, a fine-tuning workdir (at
    `checkpoint_step`) or a phenotype model object (both through
    `whmae.tasks.predict.predict_phenotypes`), or a result dict itself."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, str | os.PathLike) and str(source).endswith(".npz"):
        if not Path(source).is_file():
            raise FileNotFoundError(f"prediction file {source} does not exist")
        with np.load(source, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    from whmae.tasks.predict import predict_phenotypes

    return predict_phenotypes(source, data_dir, split, batch_size=batch_size,
                              checkpoint_step=checkpoint_step)  # fmt: skip


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
        batch_size: int = 16, checkpoint_step: str | int = "best") -> dict:  # fmt: skip
    """Predict with every model (name -> `load_predictions` source; workdirs at
    `checkpoint_step`), evaluate, write metrics.json and the PNGs into out_dir."""
    results = {
        name: load_predictions(
            path,
            data_dir=data_dir,
            split=split,
            batch_size=batch_size,
            checkpoint_step=checkpoint_step,
        )  # fmt: skip
        for name, path in models.items()
    }
    training = {
        name: training_record(path, data_dir)
        for name, path in models.items()
        if isinstance(path, str | os.PathLike) and not str(path).endswith(".npz")
    }
    metrics = evaluate_phenotypes(results, training)
    for name, r in results.items():
        if "checkpoint_step" in r:
            metrics["models"][name]["checkpoint_step"] = int(np.asarray(r["checkpoint_step"]))
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
    from whmae.train.checkpoint import CHECKPOINT_STEP_HELP, parse_checkpoint_step

    parser = argparse.ArgumentParser(prog="whmae-evaluate phenotypes",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--model", action="append", required=True, help="NAME=WORKDIR or .npz")
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint-step", type=parse_checkpoint_step, default="best",
                        help=CHECKPOINT_STEP_HELP)  # fmt: skip
    args = parser.parse_args(argv)
    try:
        metrics = run(parse_models(args.model), args.data, args.split, args.out,
                      batch_size=args.batch_size,
                      checkpoint_step=args.checkpoint_step)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"whmae-evaluate phenotypes: {e}", file=sys.stderr)
        return 2
    print(phenotype_table(metrics))
    print(learning_table(metrics))
    for line in learning_summary(metrics):
        print(line.replace("**", ""))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
