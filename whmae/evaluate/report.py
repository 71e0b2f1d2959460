"""Merge evaluation results into one markdown report.

  python -m whmae.evaluate report --out runs/eval/report.md runs/eval/*

Each argument is a task's output directory (holding metrics.json) or a folder of such
directories. The report has one section per task: a compact paper-style table
(phenotype MAE per model, Dice per class and model, ...), the task's full table, and
links to its PNGs, relative to the report so the folder can be moved as a whole. The
phenotype section says in plain words which model did not learn which phenotype
(`whmae.evaluate.phenotypes.learning_summary`).

With `--runs TITLE NAME=WORKDIR [NAME=WORKDIR ...]` (repeatable: one group each) the
report also puts training runs side by side (`whmae.evaluate.runs`): one PNG of val
curves per metric (in `val_curves/` beside the report) and a table of each run's final
and best val values, with the checkpoint step the evaluations read.

Each task writes its own metrics.json version (its module's `SCHEMA_VERSION`);
`read_task_metrics` checks a file against the version of its task.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from whmae.evaluate import phenotypes, reconstruction, representation, segmentation
from whmae.evaluate.results import format_table, jsonable, read_metrics

__all__ = [
    "find_metrics",
    "main",
    "read_task_metrics",
    "render_report",
    "render_runs",
    "write_report",
]

TASK_ORDER = ("reconstruction", "phenotypes", "segmentation", "representation")
TASK_MODULES = {
    "reconstruction": reconstruction,
    "phenotypes": phenotypes,
    "segmentation": segmentation,
    "representation": representation,
}


def read_task_metrics(path: str | os.PathLike) -> dict:
    """A metrics.json (or the directory holding one), checked for the common keys and for
    the schema version its task's module writes."""
    metrics = read_metrics(path, schema_version=None)
    module = TASK_MODULES.get(metrics["task"])
    if module is None:
        raise ValueError(f"{path}: unknown task {metrics['task']!r}")
    return read_metrics(path, schema_version=module.SCHEMA_VERSION)


def find_metrics(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """metrics.json files of the given directories (or of their direct subdirectories)."""
    found = []
    for path in map(Path, paths):
        if path.is_file() and path.name == "metrics.json":
            found.append(path)
        elif (path / "metrics.json").is_file():
            found.append(path / "metrics.json")
        elif path.is_dir():
            found.extend(sorted(path.glob("*/metrics.json")))
        else:
            raise FileNotFoundError(f"{path} is neither a metrics.json nor a directory")
    if not found:
        raise FileNotFoundError(f"no metrics.json under {[str(p) for p in paths]}")
    return found


def _mae_matrix(metrics: Mapping) -> str:
    names = list(metrics["models"])
    rows = [[c, *(metrics["models"][n]["columns"].get(c, {}).get("mae") for n in names)]
            for c in metrics["columns"]]  # fmt: skip
    return format_table(["MAE", *names], rows, markdown=True)


def _dice_matrix(metrics: Mapping) -> str:
    names = list(metrics["models"])
    classes = list(next(iter(metrics["models"].values()))["mean_dice"])
    rows = [[c, *(metrics["models"][n]["mean_dice"].get(c) for n in names)] for c in classes]
    return format_table(["mean Dice", *names], rows, markdown=True)


def _images(metrics: Mapping) -> list[str]:
    task, models = metrics["task"], metrics["models"]
    if task == "phenotypes":
        return [f for p in metrics.get("plots", {}).values() for f in p.values()]
    if task == "representation":
        return [e["tsne"]["plot"] for e in models.values() if e.get("tsne")]
    # Reconstruction: the three MAEs side by side on one exam first, then each model's.
    comparison = (metrics.get("figure") or {}).get("comparison")
    return [comparison] * bool(comparison) + [
        f for e in models.values() for f in e.get("plots", [])
    ]


def render_section(metrics_path: Path, report_dir: Path) -> str:
    """The markdown section of one metrics.json."""
    metrics = jsonable(read_task_metrics(metrics_path))
    task = metrics["task"]
    lines = [f"## {task.capitalize()}", "",
             f"Split `{metrics.get('split')}` of `{metrics.get('data_dir')}`; "
             f"results in `{os.path.relpath(metrics_path, report_dir)}`.", ""]  # fmt: skip
    if task == "reconstruction":
        lines.append(reconstruction.reconstruction_table(metrics, markdown=True))
    elif task == "phenotypes":
        lines += [_mae_matrix(metrics), ""]
        if any(m.get("learning") for m in metrics["models"].values()):
            failed = phenotypes.learning_summary(metrics)
            lines += [
                "Learning checks (a model did not learn a phenotype when its predictions' SD "
                f"is < {phenotypes.SPREAD_RATIO_MIN}x the targets' or its training loss never "
                "fell below the mean guess's):",
                "",
                *(f"- {line}" for line in failed or ["every model learned every phenotype."]),
                "",
                phenotypes.learning_table(metrics, markdown=True),
                "",
            ]
        lines.append(phenotypes.phenotype_table(metrics, markdown=True))
    elif task == "segmentation":
        lines += [_dice_matrix(metrics), "",
                  segmentation.segmentation_table(metrics, markdown=True), "",
                  "Phenotypes from the predicted vs the true labels:", "",
                  segmentation.segmentation_phenotype_table(metrics, markdown=True)]  # fmt: skip
    elif task == "representation":
        if any(e.get("tsne") for e in metrics["models"].values()):
            lines += [representation.tsne_table(metrics, markdown=True), ""]
        if any(e.get("robustness") for e in metrics["models"].values()):
            lines += [
                "Missing-plane robustness as subject re-identification (Euclidean, each "
                "reduced exam among the full-plane embeddings of all exams; shift = distance "
                "to its own full embedding over the median between-subject distance):",
                "",
                representation.reid_table(metrics, markdown=True),
                "",
            ]
            if metrics.get("regression"):
                lines += [representation.phenotype_shift_table(metrics, markdown=True), ""]
            lines.append(representation.representation_table(metrics, markdown=True))
    else:
        raise ValueError(f"{metrics_path}: unknown task {task!r}")
    lines.append("")
    for image in _images(metrics):
        target = os.path.relpath(metrics_path.parent / image, report_dir)
        lines += [f"![{image}]({target})", ""]
    return "\n".join(lines)


CURVES_DIR = "val_curves"


def render_runs(runs: Mapping[str, Mapping[str, str | os.PathLike]], report_dir) -> str:
    """The "Training runs" section: each group {title: {name: workdir}} side by side."""
    from whmae.evaluate.runs import runs_section

    report_dir = Path(report_dir).absolute()
    body = [runs_section(title, group, report_dir / CURVES_DIR, report_dir)
            for title, group in runs.items()]  # fmt: skip
    return "\n".join(["## Training runs", "", *body])


def render_report(
    paths: Sequence[str | os.PathLike],
    report_dir: str | os.PathLike,
    runs: Mapping[str, Mapping[str, str | os.PathLike]] | None = None,
) -> str:
    """The whole markdown report of the metrics.json found under `paths`, and of the
    training `runs` ({group title: {name: workdir}}) side by side."""
    report_dir = Path(report_dir).absolute()
    found = [p.absolute() for p in find_metrics(paths)] if paths or not runs else []
    tasks = {p: read_task_metrics(p)["task"] for p in found}
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    found.sort(key=lambda p: (order.get(tasks[p], len(order)), str(p)))
    body = [render_section(p, report_dir) for p in found]
    if runs:
        body.append(render_runs(runs, report_dir))
    return "\n".join(["# whmae evaluation report", "", *body])


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike, runs=None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(paths, out.parent, runs))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-evaluate report",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("results", nargs="*", help="task output directories (metrics.json)")
    parser.add_argument("--out", default="report.md", help="markdown file to write")
    parser.add_argument(
        "--runs", nargs="+", action="append", default=[], metavar="TITLE NAME=WORKDIR",
        help="a group of training workdirs side by side: val curves and final / best "
        "values (repeatable, one group each)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.results and not args.runs:
        parser.error("give task output directories, --runs groups, or both")
    try:
        from whmae.evaluate.runs import parse_runs

        out = write_report(args.results, args.out, parse_runs(args.runs))
    except (ValueError, FileNotFoundError) as e:
        print(f"whmae-evaluate report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
