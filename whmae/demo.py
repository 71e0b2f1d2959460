"""The main job on the built-in synthetic phantom, end to end.

`whmae-demo --workdir runs/demo` runs every stage of the paper's pipeline on a laptop CPU
(profile `cpu`; `--profile gpu`: the paper's resolution on one big GPU, see
`whmae.demo_profiles`) and writes `runs/demo/report/report.md` (with `claims.json`, every
task's metrics.json and PNGs):

  generate   the phantom dataset (the profile's resolution and field of view)
  pretrain   the MAE on all 9 planes, and SA-only / LA-only MAEs for the ablation
  phenotype  MAE linear probe, the same probe on an untrained encoder (the control),
             MAE fine-tuned, ViT from scratch, ResNet50 baseline
  segment    UNETR on the pretrained encoder, and the same network from scratch (UNETR+)
  evaluate   reconstruction, phenotypes (with learning checks), segmentation,
             representation (t-SNE, missing-plane robustness as subject re-identification,
             beside an untrained encoder of the same config), then the markdown report and
             the paper's claims checked on the numbers against their controls
             (`whmae.evaluate.claims`: held, not held or void, never tuned to hold)

Every run validates on the val split EVALS_PER_RUN times (`whmae.train.validation`) and
keeps its best checkpoint by its config's val metric; the test-split evaluations read
that best step (`--checkpoint-step best`), and the report names it per run beside the
runs' val curves side by side (pretraining all / SA-only / LA-only, the phenotype
models, the segmentation models; `whmae.evaluate.runs`).

The runs and evaluations that do not need each other go side by side (`--jobs`, default
one per core: `whmae.demo_jobs`), each in its own process pinned to its own cores, its
output in `runs/demo/logs/<stage>_<run>.log`; the console shows each job's start and end
and, every minute, each running job's newest progress line. The tiny models leave a
2-core machine a third idle when one run has both cores, so on 2 cores two runs at a time
finish sooner than one. What needs what: the fine-tuned, probed and UNETR runs on the
pretrained encoder wait for the all-planes MAE; the baselines from scratch and the
random-init probe need only the data; each evaluation waits for the runs it reads
(`demo_jobs()` below). A job that fails stops the others and names its log.

Every training stage resumes from its checkpoint, so rerunning an interrupted demo
continues where it stopped; finished stages are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# (workdir name, config file, variant) of every training run.
PRETRAIN_RUNS = {
    "mae_all_planes": "tiny",
    "mae_sa_only": "tiny,sa_only",
    "mae_la_only": "tiny,la_only",
}
PHENOTYPE_RUNS = {
    "mae_probe": "tiny,probe",
    "random_probe": "tiny,probe",  # the control: init.pretrained False (RUN_OVERRIDES)
    "mae_finetuned": "tiny,finetune",
    "vit_scratch": "tiny,vit_scratch",
    "resnet50": "tiny,resnet50",
}
# The demo's settings on top of the tiny configs (recorded in demo_summary.json). At
# 32x32 a 33-wide encoder's cls / mean-pooled tokens hold little of where things are
# (a ridge probe on them stays near the mean guess for volumes), so the phenotype heads
# read every token in grid order; the from-scratch ViT gets the same head.
VIT_PHENOTYPE_OVERRIDES = {"model.pool": "tokens", "optim.lr": 5e-4, "optim.probe_lr": 1e-3}
# Per run: the random-init probe is mae_probe's run with an untrained encoder (the same
# seed policy as every run: train.seed, so its encoder is the pretraining's step 0).
RUN_OVERRIDES = {"random_probe": {"init.pretrained": False}}
# The representation evaluation's control: an untrained MAE of mae_all_planes' config.
REPRESENTATION_CONTROL = "random_init"
SEGMENTATION_RUNS = {
    "unetr_mae": "tiny,finetune",
    "unetr_scratch": "tiny,unetr_scratch",
}
# Validation: this many evaluations per run, on this many val exams (fixed subset).
EVALS_PER_RUN = 10
EVAL_EXAMS = 64
# The report's groups of runs side by side (val curves, final and best values).
RUN_GROUPS = {
    "Pretraining (all planes, SA only, LA only)": PRETRAIN_RUNS,
    "Phenotype models": PHENOTYPE_RUNS,
    "Segmentation models": SEGMENTATION_RUNS,
}


def _config(name: str, variant: str):
    from whmae.tasks.config import load_config_file

    path = CONFIGS / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the demo from a source checkout")
    return load_config_file(path, variant)


def _pretrain_config(variant: str, profile=None):
    from whmae.demo_profiles import CPU, apply_model
    from whmae.layout import LONG_AXIS_PLANES, SHORT_AXIS_PLANES

    profile = profile or CPU
    config = _config("pretrain", "tiny")
    config.model = apply_model(config.model.to_dict(), profile)
    _override(config, profile.pretrain)
    if "sa_only" in variant:
        config.model.planes = SHORT_AXIS_PLANES
    elif "la_only" in variant:
        config.model.planes = LONG_AXIS_PLANES
    return config


def _train(config, workdir: Path, steps: int, data_dir: Path, task_fn) -> dict:
    from whmae.train.loop import train

    config.data.dir = str(data_dir)
    config.train.steps = steps
    config.train.log_every = max(steps // 20, 1)
    config.train.checkpoint_every = max(steps // 2, 1)
    config.train.keep_checkpoints = 1
    _validation(config, steps)
    config.mesh.data = -1
    return train(config, str(workdir), task_fn(config))


def _validation(config, steps: int) -> None:
    """The demo's validation: EVALS_PER_RUN evaluations on EVAL_EXAMS val exams (runs of
    fewer steps than that: one, at the end)."""
    config.train.eval_every = steps // EVALS_PER_RUN or steps
    config.train.eval_exams = EVAL_EXAMS


def _override(config, overrides: dict) -> None:
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value


def use_compilation_cache(directory: Path) -> str:
    """Keep XLA's compiled programs in `directory` (JAX's persistent compilation cache)
    unless JAX_COMPILATION_CACHE_DIR already names one: the demo's pairs of runs that
    train the same network (pretrained / from scratch, probe / random-init probe) compile
    it once, and a rerun of the demo compiles nothing. Returns the directory used."""
    import jax

    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(directory)
    jax.config.update("jax_compilation_cache_dir", chosen)
    return chosen


class _Timer:
    def __init__(self, report: dict, name: str):
        self.report, self.name = report, name

    def __enter__(self):
        print(f"\n== {self.name} ==", file=sys.stderr, flush=True)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        seconds = round(time.perf_counter() - self.start, 1)
        self.report.setdefault("stage_seconds", {})[self.name] = seconds


def phenotype_overrides(name: str, config) -> dict:
    """The demo's settings of phenotype run `name` on top of its config file."""
    overrides = {}
    if config.model.arch == "vit":
        overrides.update(VIT_PHENOTYPE_OVERRIDES)
    overrides.update(RUN_OVERRIDES.get(name, {}))
    return overrides


def finetune_configs(stage: str, profile, steps: dict, data_dir, pretrained: str):
    """(name, config) of every run of a fine-tuning `stage` (phenotype | segmentation),
    resized to `profile` (`whmae.demo_profiles`)."""
    from whmae.demo_profiles import apply_model

    runs = {"phenotype": PHENOTYPE_RUNS, "segmentation": SEGMENTATION_RUNS}[stage]
    for name, variant in runs.items():
        config = _config(stage, variant)
        config.model.encoder = apply_model(config.model.encoder.to_dict(), profile)
        _override(config, getattr(profile, stage))
        if stage == "phenotype":
            _override(config, phenotype_overrides(name, config))
        config.data.dir = str(data_dir)
        config.train.steps = steps[stage]
        config.train.log_every = max(steps[stage] // 20, 1)
        config.train.checkpoint_every = max(steps[stage] // 2, 1)
        _validation(config, steps[stage])
        config.mesh.data = -1
        if config.init.pretrained:
            config.init.checkpoint = pretrained
        yield name, config


def _job_setup(cache: str) -> None:
    use_compilation_cache(Path(cache))
    from whmae.train.loop import quiet_library_logs

    quiet_library_logs()


def pretrain_job(name: str, profile, steps: int, data_dir: str, workdir: str, cache: str) -> None:
    """One pretraining run of the demo (a `demo_jobs` target)."""
    from whmae.pretrain import pretrain_task

    _job_setup(cache)
    config = _pretrain_config(PRETRAIN_RUNS[name], profile)
    _train(config, Path(workdir), steps, Path(data_dir), pretrain_task)


def finetune_job(
    stage: str, name: str, profile, steps: dict, data_dir: str, pretrained: str, workdir: str,
    cache: str,
) -> None:  # fmt: skip
    """One fine-tuning run of the demo (a `demo_jobs` target)."""
    from whmae.finetune import finetune

    _job_setup(cache)
    configs = dict(finetune_configs(stage, profile, steps, data_dir, pretrained))
    finetune(configs[name], workdir)


def evaluate_job(task: str, runs: str, data_dir: str, out_dir: str, cache: str) -> None:
    """One of the demo's test-split evaluations (a `demo_jobs` target)."""
    from whmae.evaluate import phenotypes, reconstruction, representation, segmentation

    _job_setup(cache)
    runs_dir, split, out = Path(runs), "test", Path(out_dir) / task
    if task == "reconstruction":
        models = {name: str(runs_dir / name) for name in PRETRAIN_RUNS}
        reconstruction.run(models, data_dir, split, out, progress=False)
    elif task == "phenotypes":
        phenotypes.run({name: str(runs_dir / name) for name in PHENOTYPE_RUNS}, data_dir,
                       split, out)  # fmt: skip
    elif task == "segmentation":
        segmentation.run({name: str(runs_dir / name) for name in SEGMENTATION_RUNS}, data_dir,
                         split, out)  # fmt: skip
    elif task == "representation":
        pretrained = str(runs_dir / "mae_all_planes")
        representation.run(
            {"mae_all_planes": pretrained}, data_dir, split, out,
            controls={REPRESENTATION_CONTROL: pretrained},
            tsne_splits=("train", "val", "test"), regression=str(runs_dir / "mae_finetuned"),
            progress=False,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown demo evaluation {task!r}")


# What each evaluation reads.
EVALUATION_INPUTS = {
    "reconstruction": [f"pretrain/{name}" for name in PRETRAIN_RUNS],
    "phenotypes": [f"phenotype/{name}" for name in PHENOTYPE_RUNS],
    "segmentation": [f"segmentation/{name}" for name in SEGMENTATION_RUNS],
    "representation": ["pretrain/mae_all_planes", "phenotype/mae_finetuned"],
}
# The order jobs start in when several are ready (longest first, and the all-planes MAE
# early: three fine-tuning runs wait for it).
JOB_ORDER = (
    "pretrain/mae_all_planes", "segmentation/unetr_scratch", "segmentation/unetr_mae",
    "phenotype/mae_finetuned", "phenotype/vit_scratch", "phenotype/resnet50",
    "phenotype/mae_probe", "phenotype/random_probe", "pretrain/mae_sa_only",
    "pretrain/mae_la_only", "evaluate/representation", "evaluate/reconstruction",
    "evaluate/phenotypes", "evaluate/segmentation",
)  # fmt: skip


def demo_jobs(profile, steps: dict, data_dir: Path, runs: Path, eval_dir: Path, cache: str):
    """Every training run and evaluation of the demo as `demo_jobs.Job`s, with what each
    needs finished first, in JOB_ORDER."""
    from whmae.demo_jobs import Job

    pretrained = str(runs / "mae_all_planes")
    jobs = {}
    for name in PRETRAIN_RUNS:
        jobs[f"pretrain/{name}"] = Job(f"pretrain/{name}", "whmae.demo:pretrain_job", dict(
            name=name, profile=profile, steps=steps["pretrain"], data_dir=str(data_dir),
            workdir=str(runs / name), cache=cache))  # fmt: skip
    for stage in ("phenotype", "segmentation"):
        for name, config in finetune_configs(stage, profile, steps, data_dir, pretrained):
            after = ("pretrain/mae_all_planes",) if config.init.pretrained else ()
            kwargs = dict(stage=stage, name=name, profile=profile, steps=steps,
                          data_dir=str(data_dir), pretrained=pretrained,
                          workdir=str(runs / name), cache=cache)  # fmt: skip
            jobs[f"{stage}/{name}"] = Job(f"{stage}/{name}", "whmae.demo:finetune_job",
                                          kwargs, after)  # fmt: skip
    for task, inputs in EVALUATION_INPUTS.items():
        kwargs = dict(task=task, runs=str(runs), data_dir=str(data_dir),
                      out_dir=str(eval_dir), cache=cache)  # fmt: skip
        jobs[f"evaluate/{task}"] = Job(f"evaluate/{task}", "whmae.demo:evaluate_job", kwargs,
                                       tuple(inputs))  # fmt: skip
    missing = set(jobs) ^ set(JOB_ORDER)
    if missing:
        raise AssertionError(f"JOB_ORDER and the demo's runs differ: {sorted(missing)}")
    return [jobs[name] for name in JOB_ORDER]


def _stage_spans(times: dict) -> dict:
    """Per stage: seconds from its first job's start to its last job's end (stages overlap
    when jobs run side by side)."""
    spans: dict = {}
    for name, t in times.items():
        stage = name.split("/")[0]
        lo, hi = spans.get(stage, (t["start_s"], t["end_s"]))
        spans[stage] = (min(lo, t["start_s"]), max(hi, t["end_s"]))
    return {stage: round(hi - lo, 1) for stage, (lo, hi) in spans.items()}


def run_demo(
    workdir, *, profile="cpu", num_exams: int | None = None, steps: dict | None = None,
    workers: int | None = None, jobs: int | None = None,
) -> dict:  # fmt: skip
    """Every stage of the demo under `profile` (a name or a `demo_profiles.Profile`);
    num_exams / steps / workers override the profile's; `jobs`: runs side by side (None:
    the profile's `max_jobs`, else one per core, `demo_jobs.default_slots`). Returns
    demo_summary.json's dict."""
    from whmae.data.synthetic.generate import generate_dataset
    from whmae.demo_jobs import default_slots, run_jobs
    from whmae.demo_profiles import get_profile
    from whmae.evaluate import claims as paper
    from whmae.evaluate import report
    from whmae.train.loop import quiet_library_logs

    profile = get_profile(profile) if isinstance(profile, str) else profile
    num_exams = profile.num_exams if num_exams is None else num_exams
    steps = {**profile.steps, **(steps or {})}
    if workers is None:
        workers = profile.generate_workers or min(os.cpu_count() or 1, 16)
    if jobs is None:
        jobs = profile.max_jobs or default_slots()
    workdir = Path(workdir)
    data_dir, runs, eval_dir = workdir / "data", workdir / "runs", workdir / "report"
    eval_dir.mkdir(parents=True, exist_ok=True)
    compilation_cache = use_compilation_cache(workdir / "xla_cache")
    summary: dict = {"workdir": str(workdir), "profile": profile.name, "steps": steps,
                     "num_exams": num_exams, "image_size": profile.image_size,
                     "frames": profile.frames, "model": profile.model,
                     "compilation_cache": compilation_cache, "jobs": jobs}  # fmt: skip
    quiet_library_logs()
    start = time.perf_counter()
    with _Timer(summary, "generate"):
        generate_dataset(
            data_dir, num_exams, size=profile.image_size, frames=profile.frames,
            seed=0, num_shards=max(4, workers), workers=workers,
            short_axis_fov_mm=profile.short_axis_fov_mm,
            long_axis_fov_mm=profile.long_axis_fov_mm,
        )  # fmt: skip

    pretrained = str(runs / "mae_all_planes")
    for name, config in finetune_configs("phenotype", profile, steps, data_dir, pretrained):
        summary.setdefault("overrides", {})[name] = phenotype_overrides(name, config)
    print(f"\n== training and evaluation: {jobs} job(s) side by side ==", file=sys.stderr,
          flush=True)  # fmt: skip
    times = run_jobs(demo_jobs(profile, steps, data_dir, runs, eval_dir, compilation_cache),
                     slots=jobs, log_dir=workdir / "logs")  # fmt: skip
    summary["stage_seconds"].update(_stage_spans(times))
    summary["run_seconds"] = {name: round(t["seconds"], 1) for name, t in times.items()}

    from whmae.train.checkpoint import checkpoint_step

    # The step every test-split evaluation reads: the best val step of each run.
    summary["checkpoint_steps"] = {
        name: checkpoint_step(runs / name) for group in RUN_GROUPS.values() for name in group
    }
    claims = paper.paper_claims(eval_dir)
    (eval_dir / "claims.json").write_text(json.dumps(claims, indent=2))
    groups = {title: {name: runs / name for name in group}
              for title, group in RUN_GROUPS.items()}  # fmt: skip
    markdown = report.render_report([eval_dir], eval_dir, runs=groups)
    ratios = paper.phenotype_ratio_markdown(report.read_task_metrics(eval_dir / "phenotypes"))
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    (eval_dir / "report.md").write_text(
        markdown + "\n" + paper.claims_markdown(claims) + "\n" + ratios + "\n"
        + stages_markdown(summary)
    )  # fmt: skip

    summary["claims_held"] = sum(c["holds"] for c in claims)
    summary["claims_void"] = sum(c["status"] == "void" for c in claims)
    summary["claims"] = len(claims)
    (eval_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(paper.claims_markdown(claims))
    print(ratios)
    print(f"\nreport: {eval_dir / 'report.md'} ({summary['total_seconds']:.0f} s in all)")
    return summary


def stages_markdown(summary: dict) -> str:
    lines = ["## Run", "", f"Profile {summary['profile']}: {summary['num_exams']} exams at "
             f"{summary['image_size']}x{summary['image_size']}x{summary['frames']}; "
             f"steps: {summary['steps']}", ""]  # fmt: skip
    lines += [f"- {stage}: {seconds} s" for stage, seconds in summary["stage_seconds"].items()]
    if summary.get("run_seconds"):
        lines += ["", f"{summary.get('jobs', 1)} job(s) side by side (stages overlap); each "
                  f"run's and evaluation's seconds: "
                  + ", ".join(f"{n} {s}" for n, s in summary["run_seconds"].items())
                  + f". In all: {summary.get('total_seconds')} s."]  # fmt: skip
    if summary.get("checkpoint_steps"):
        lines += ["", "Test figures come from each run's best val checkpoint: "
                  + ", ".join(f"{name} step {step}"
                              for name, step in summary["checkpoint_steps"].items())
                  + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from whmae.demo_profiles import PROFILES

    parser = argparse.ArgumentParser(
        prog="whmae-demo",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="profiles: "
        + "; ".join(
            f"{p.name}: {p.num_exams} exams at {p.image_size}x{p.image_size}x{p.frames}, "
            f"steps {p.steps}"
            for p in PROFILES.values()
        ),
    )
    parser.add_argument("--workdir", default="runs/demo", help="data, runs and report go here")
    parser.add_argument(
        "--profile", default="cpu", choices=sorted(PROFILES),
        help="cpu: ~13-15 min on 2 cores (measured); cpu-fast: a cheaper model that learns less "
        "(measured); gpu: paper resolution, one H100/H200",
    )  # fmt: skip
    parser.add_argument("--num-exams", type=int, default=None, help="default: the profile's")
    parser.add_argument(
        "--jobs", type=int, default=None,
        help="training runs and evaluations side by side, each in its own process on its "
        "own cores (default: the profile's, else one per core, at most 4; 1: one after "
        "another in this process)",
    )  # fmt: skip
    for stage in ("pretrain", "phenotype", "segmentation"):
        parser.add_argument(f"--{stage}-steps", type=int, default=None,
                            help="default: the profile's")  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None,
        help="phantom generation processes (default: the profile's, else min(cores, 16))",
    )  # fmt: skip
    args = parser.parse_args(argv)
    steps = {
        stage: value
        for stage in ("pretrain", "phenotype", "segmentation")
        if (value := getattr(args, f"{stage}_steps")) is not None
    }
    from whmae.demo_jobs import JobFailed

    try:
        run_demo(
            args.workdir, profile=args.profile, num_exams=args.num_exams, steps=steps,
            workers=args.workers, jobs=args.jobs,
        )  # fmt: skip
    except JobFailed as error:
        print(f"whmae-demo: {error}; finished runs and checkpoints are kept, rerunning the "
              "same command continues from them", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
