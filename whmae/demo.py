"""The main job on the built-in synthetic phantom, end to end on a laptop CPU.

`whmae-demo --workdir runs/demo` runs each stage once and writes its results under
the work directory; rerunning skips the stages whose outputs exist (each stage is
itself resumable), so an interrupted demo continues where it stopped.

Stages: generate the phantom dataset -> pretrain the tiny MAE -> write
`report/summary.json` (dataset summary, pretraining losses, timings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from whmae.data.generate import generate_dataset


def load_experiment_config(name: str, variant: str):
    """`configs/<name>.py:get_config(variant)` from the repository's configs folder."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found (run from a source checkout)")
    spec = importlib.util.spec_from_file_location(f"whmae_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _stage(report: dict, name: str):
    """Context for timing one stage and printing a banner."""

    class _Timer:
        def __enter__(self):
            print(f"\n== {name} ==", file=sys.stderr, flush=True)
            self.start = time.perf_counter()
            return self

        def __exit__(self, *exc):
            report.setdefault("stage_seconds", {})[name] = round(
                time.perf_counter() - self.start, 1
            )

    return _Timer()


def run_demo(workdir: str, *, num_exams: int, pretrain_steps: int, workers: int) -> dict:
    from whmae.pretrain import pretrain_task
    from whmae.train.loop import quiet_library_logs, train
    from whmae.train.metrics import read_metrics

    workdir = Path(workdir)
    report_dir = workdir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    report: dict = {"workdir": str(workdir)}
    quiet_library_logs()

    with _stage(report, "generate"):
        config = load_experiment_config("pretrain", "tiny")
        size, frames = config.model.image_size, config.model.frames
        summary = generate_dataset(
            data_dir, num_exams, size=size, frames=frames, seed=0, num_shards=4, workers=workers
        )
        report["dataset"] = {
            k: summary.get(k) for k in ("status", "num_examples", "splits", "image_shape")
        }

    with _stage(report, "pretrain"):
        config.data.dir = str(data_dir)
        config.train.steps = pretrain_steps
        config.train.log_every = 25
        config.train.checkpoint_every = max(pretrain_steps // 4, 1)
        config.mesh.data = -1
        result = train(config, str(workdir / "pretrain"), pretrain_task(config))
        losses = [row["loss"] for row in read_metrics(workdir / "pretrain")]
        report["pretrain"] = {
            "steps": result["step"],
            "first_loss": losses[0] if losses else None,
            "final_loss": result["final_loss"],
            "exams_per_s": result.get("exams_per_s"),
        }

    (report_dir / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where data, runs and report go")
    parser.add_argument("--num-exams", type=int, default=256)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    run_demo(
        args.workdir,
        num_exams=args.num_exams,
        pretrain_steps=args.pretrain_steps,
        workers=args.workers,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
