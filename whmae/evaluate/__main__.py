"""`python -m whmae.evaluate TASK ...` / `whmae-evaluate TASK ...`: one entry, five tasks."""

from __future__ import annotations

import importlib
import sys

TASKS = ("reconstruction", "phenotypes", "segmentation", "representation", "report")
USAGE = (
    "usage: whmae-evaluate {" + ",".join(TASKS) + "} [options]\n"
    "  reconstruction  MSE/PSNR/SSIM per plane type of MAE checkpoints, PNG grids\n"
    "  phenotypes      MAE/RMSE/r/Bland-Altman per phenotype and model, with the mean guess\n"
    "  segmentation    Dice/HD95 per view and class, phenotypes from the predicted labels\n"
    "  representation  t-SNE by phenotype quintiles, missing-plane robustness\n"
    "  report          merge metrics.json files into one markdown report\n"
    "Run `whmae-evaluate TASK --help` for a task's options."
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"whmae-evaluate: unknown task {task!r}\n{USAGE}", file=sys.stderr)
        return 2
    return importlib.import_module(f"whmae.evaluate.{task}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
