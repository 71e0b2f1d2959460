"""The demo's train steps side by side: one run of `whmae-demo`, several variants of it.

    python benchmarks/bench_demo_steps.py --run segmentation/unetr_scratch \\
        [--variant 'refine 4={"model.unetr.refine_channels": 4}' ...] [--data DIR] \\
        [--profile cpu] [--rounds 6] [--steps 3] [--out bench_demo_steps.json]

Every variant is the profile's config of `--run` (`pretrain/mae_all_planes`,
`phenotype/mae_finetuned`, `segmentation/unetr_scratch`, ...: the demo's own configs,
`whmae.demo`) with dotted overrides on top; the first variant is the profile itself.
All variants are compiled in one process and their real jitted train steps (the
training loop's `make_train_step`, same shardings and donation) run in alternating
rounds on the same batches of phantom exams, so the ratios are measured side by side
and a machine that speeds up or slows down during the run moves every variant alike.
Without `--variant` (and with `--profile cpu`): the cpu profile, the same with XLA's
attention instead of the chunked one, and the cpu-fast profile's cuts (one attention
head, no per-plane segmentation refinement) one at a time and together. Prints median
s/step and the ratio to the profile; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def default_variants(stage: str) -> dict[str, dict]:
    """The cpu profile, its chunked attention reverted, then the cpu-fast profile's two
    cuts (`whmae.demo_profiles.CPU_FAST`, read from it) one at a time and together."""
    from whmae.demo_profiles import CPU, CPU_FAST

    model = "model." if stage == "pretrain" else "model.encoder."
    one_head = {model + k: v for k, v in CPU_FAST.model.items() if CPU.model.get(k) != v}
    variants = {"profile": {}, "attention xla": {f"{model}attention_impl": None},
                "one head": one_head}  # fmt: skip
    if stage == "segmentation":
        no_refine = {k: v for k, v in CPU_FAST.segmentation.items()
                     if CPU.segmentation.get(k) != v}  # fmt: skip
        variants["no refine"] = no_refine
        variants["cpu-fast"] = one_head | no_refine
    return variants


def run_config(run: str, profile, data_dir: str):
    """The demo's config of `stage/name` under `profile`, and its stage."""
    from whmae import demo

    stage, name = run.split("/")
    if stage == "pretrain":
        if name not in demo.PRETRAIN_RUNS:
            raise SystemExit(f"unknown pretraining run {name!r}: {sorted(demo.PRETRAIN_RUNS)}")
        config = demo._pretrain_config(demo.PRETRAIN_RUNS[name], profile)
        config.data.dir = data_dir
        return stage, config
    runs = dict(demo.finetune_configs(stage, profile, profile.steps, data_dir, ""))
    if name not in runs:
        raise SystemExit(f"unknown {stage} run {name!r}: {sorted(runs)}")
    config = runs[name]
    config.init.pretrained = False  # the step's cost does not depend on the init
    return stage, config


def build_step(stage: str, config, data_dir: str, num_batches: int = 4):
    """(step, state, batches, batch size, parameter count) of `config`'s real train step."""
    import jax

    from whmae.data.dataset.pipeline import make_pipeline
    from whmae.finetune import finetune_task
    from whmae.pretrain import pretrain_task
    from whmae.tasks.config import resolve
    from whmae.train.mesh import logical_rules, make_mesh
    from whmae.train.optim import make_optimizer
    from whmae.train.step import (
        batch_shardings_for,
        global_batch,
        init_train_state,
        make_train_step,
    )

    config.mesh.data = -1
    if stage == "pretrain":
        task = pretrain_task(config)
    else:
        config = resolve(config)
        task = finetune_task(config)
    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh.rules)
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    shardings = batch_shardings_for(mesh, tuple(task.fields))
    graphdef, state, state_shardings = init_train_state(task.model_fn, tx, mesh, rules, 0)
    step = make_train_step(graphdef, task.loss_fn, tx, mesh, state_shardings, shardings, schedule)
    pipeline = make_pipeline(
        data_dir, "train", batch_size=int(config.data.batch_size), fields=tuple(task.fields),
        process_index=0, process_count=1,
    )  # fmt: skip
    batches = [
        global_batch({k: v for k, v in next(pipeline).items() if k in task.fields}, mesh, shardings)
        for _ in range(num_batches)
    ]
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return step, state, batches, int(config.data.batch_size), params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="segmentation/unetr_scratch",
                        help="stage/name of a demo run")  # fmt: skip
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON dotted overrides (repeat)")  # fmt: skip
    parser.add_argument("--data", help="a phantom dataset at the profile's size "
                        "(default: 64 exams generated into a temporary folder)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args(argv)

    import jax

    from whmae.data.synthetic.generate import generate_dataset
    from whmae.demo_profiles import get_profile

    profile = get_profile(args.profile)
    stage = args.run.split("/")[0]
    variants = {"profile": {}}
    for item in args.variant:
        name, _, overrides = item.partition("=")
        try:
            variants[name.strip()] = json.loads(overrides)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--variant {item!r}: not NAME=JSON ({error})") from None
    if len(variants) == 1:
        variants = default_variants(stage)

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data
        if data_dir is None:
            data_dir = str(Path(scratch) / "phantom")
            generate_dataset(data_dir, 64, size=profile.image_size, frames=profile.frames,
                             seed=0, num_shards=2, workers=1, progress=False,
                             figure=False)  # fmt: skip
        from whmae import demo

        compiled = []
        for name, overrides in variants.items():
            _, config = run_config(args.run, profile, data_dir)
            demo._override(config, overrides)
            step, state, batches, batch_size, params = build_step(stage, config, data_dir)
            key = jax.random.key(0)
            start = time.perf_counter()
            state, metrics = step(state, batches[0], key)
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - start
            print(f"{name}: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
            compiled.append({"name": name, "overrides": overrides, "step": step,
                             "state": state, "batches": batches, "times": [],
                             "compile_s": compile_s, "params": params})  # fmt: skip

        for round_index in range(args.rounds):
            order = compiled if round_index % 2 == 0 else compiled[::-1]
            for entry in order:
                state = entry["state"]
                for i in range(args.steps):
                    start = time.perf_counter()
                    state, metrics = entry["step"](state, entry["batches"][i % 4], key)
                    jax.block_until_ready(metrics)
                    entry["times"].append(time.perf_counter() - start)
                entry["state"] = state

    base = float(np.median(compiled[0]["times"]))
    rows = []
    for entry in compiled:
        median = float(np.median(entry["times"]))
        rows.append({"variant": entry["name"], "overrides": entry["overrides"],
                     "s_per_step": median, "ratio_to_profile": median / base,
                     "exams_per_s": batch_size / median, "compile_s": entry["compile_s"],
                     "steps_timed": len(entry["times"]), "params": entry["params"]})  # fmt: skip
    result = {"run": args.run, "profile": profile.name, "batch_size": batch_size,
              "rounds": args.rounds, "steps_per_round": args.steps,
              "devices": jax.device_count(), "variants": rows}  # fmt: skip
    print(f"\n{args.run} (profile {profile.name}, batch {batch_size}, {args.rounds} "
          f"alternating rounds of {args.steps} steps)\n")  # fmt: skip
    print("| variant | s/step | vs profile | exams/s | compile s | parameters |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['s_per_step']:.3f} | {row['ratio_to_profile']:.2f}x "
              f"| {row['exams_per_s']:.1f} | {row['compile_s']:.1f} "
              f"| {row['params']} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
