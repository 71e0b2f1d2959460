"""Training runs side by side: validation curves and final / best val values.

  whmae-evaluate report --out report/report.md report/ \\
      --runs pretraining all=runs/mae_all_planes sa=runs/mae_sa_only la=runs/mae_la_only \\
      --runs phenotypes probe=runs/mae_probe finetuned=runs/mae_finetuned

Each `--runs TITLE NAME=WORKDIR ...` is one group of training workdirs (their
`metrics.jsonl` val rows, `whmae.train.validation`). Per group the report shows one PNG
per val metric with every run's curve (a star on its best value) and a table: per metric
and run, the final value and the best one (min for losses, MSE and MAE; max for Dice and
PSNR) with its step, and the checkpoint step evaluation reads by default (the best step
by the run's `train.best_metric`; `whmae.train.checkpoint.checkpoint_step`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from whmae.evaluate import plots
from whmae.evaluate.results import format_table

__all__ = ["best_value", "metric_mode", "parse_runs", "runs_section", "val_curves"]

HIGHER_IS_BETTER = ("dice", "psnr")
BOOKKEEPING = ("step", "split", "eval_s", "eval_fraction")


def metric_mode(metric: str) -> str:
    """'max' for Dice and PSNR, 'min' for losses, MSE and MAE."""
    return "max" if metric.startswith(HIGHER_IS_BETTER) else "min"


def val_curves(workdir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps int [N], values float [N])} of a training workdir's val rows."""
    from whmae.train.metrics import read_metrics

    curves: dict[str, tuple[list, list]] = {}
    for row in read_metrics(str(workdir), split="val"):
        for name, value in row.items():
            if name in BOOKKEEPING:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            steps, values = curves.setdefault(name, ([], []))
            steps.append(int(row["step"]))
            values.append(value)
    return {k: (np.asarray(s, int), np.asarray(v, np.float64)) for k, (s, v) in curves.items()}


def best_value(steps, values, mode: str) -> tuple[int, float] | None:
    """(step, value) of the best finite value (the first of ties); None if none."""
    values = np.asarray(values, np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    if not finite.size:
        return None
    pick = finite[np.argmax(values[finite]) if mode == "max" else np.argmin(values[finite])]
    return int(np.asarray(steps)[pick]), float(values[pick])


def _checkpoint(workdir) -> str:
    """The step evaluation reads by default, and why."""
    from whmae.train.checkpoint import CHECKPOINT_DIR, best_criterion, checkpoint_step

    try:
        step = checkpoint_step(workdir, "best")
    except (FileNotFoundError, ValueError):
        return "no checkpoint"
    directory = Path(workdir) / CHECKPOINT_DIR
    criterion = best_criterion(str(directory), checkpoint_step(workdir, "latest"))
    if criterion is None:
        return f"step {step} (newest; no val metric ranks steps)"
    return f"step {step} (best val {criterion[0]}, {criterion[1]})"


def _cell(final, best) -> str:
    def number(v):
        return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"

    if final is None:
        return "-"
    text = f"{number(final[1])} @ {final[0]}"
    if best is not None and best != final:
        text += f"; best {number(best[1])} @ {best[0]}"
    return text


def runs_section(title: str, runs: Mapping[str, str | os.PathLike], figure_dir, report_dir) -> str:
    """The markdown of one group of runs: checkpoints, the final / best table, curve PNGs
    (written to `figure_dir`, linked relative to `report_dir`)."""
    from whmae.train.validation import slug

    figure_dir, report_dir = Path(figure_dir), Path(report_dir).absolute()
    curves = {name: val_curves(path) for name, path in runs.items()}
    metrics: list[str] = []
    for run_curves in curves.values():
        metrics += [m for m in run_curves if m not in metrics]
    lines = [f"### {title}: validation during training", ""]
    if not metrics:
        return "\n".join(lines + ["No val rows in these runs' metrics.jsonl.", ""])
    used = "; ".join(f"{name} {_checkpoint(path)}" for name, path in runs.items())
    lines += [
        f"Checkpoint each evaluation reads (`--checkpoint-step best`, the default): {used}.",
        "",
        "Val metrics, final value @ step (and the best one when earlier):",
        "",
    ]
    rows = []
    for metric in metrics:
        mode = metric_mode(metric)
        row = [f"{metric} ({mode})"]
        for name in runs:
            steps, values = curves[name].get(metric, ([], []))
            final = (int(steps[-1]), float(values[-1])) if len(steps) else None
            row.append(_cell(final, best_value(steps, values, mode) if len(steps) else None))
        rows.append(row)
    lines += [format_table(["metric", *runs], rows, markdown=True), ""]
    for metric in metrics:
        mode = metric_mode(metric)
        shown = {}
        for name in runs:
            if metric in curves[name]:
                steps, values = curves[name][metric]
                shown[name] = (steps, values, best_value(steps, values, mode))
        png = plots.val_curves(figure_dir / f"val_{slug(title)}_{slug(metric)}.png", metric,
                               shown, title=f"{title}: val {metric} ({mode} is best)")  # fmt: skip
        lines += [f"![val {metric}]({os.path.relpath(png.absolute(), report_dir)})", ""]
    return "\n".join(lines)


def parse_runs(groups: Sequence[Sequence[str]]) -> dict[str, dict[str, str]]:
    """`--runs TITLE NAME=WORKDIR ...` groups -> {title: {name: workdir}}."""
    from whmae.evaluate.phenotypes import parse_models

    parsed = {}
    for group in groups:
        if len(group) < 2:
            raise ValueError(f"--runs expects TITLE NAME=WORKDIR [...], got {list(group)}")
        title, items = group[0], list(group[1:])
        runs = parse_models(items)
        for name, path in runs.items():
            if not Path(path).is_dir():
                raise FileNotFoundError(f"run {name!r}: {path} is not a training workdir")
        parsed[title] = runs
    return parsed
