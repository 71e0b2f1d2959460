"""The benchmark suite, one command: train-step speed side by side, the input pipeline
against it, compile times; results as DIR/suite.json and DIR/suite.md.

    python benchmarks/suite.py --out DIR [--quick]

Step cases (bench_pretrain.bench_one, the real sharded train step on all local devices):
for each config (tiny, paper) and dtype (float32, bfloat16), a baseline and one change
at a time: attention implementation (xla, cudnn), a narrower decoder, remat on, a larger
batch. Each case reports compile s, step s, exams/s, MFU (compiled FLOPs / step time /
a matmul peak measured in the same run) and the compiled step's memory per device.
A case that cannot run here (cuDNN attention on CPU, a shape cuDNN rejects) is reported
with the reason instead of numbers.

Input pipeline (bench_input.grain_throughput): Grain exams/s at paper resolution
(9 x 50 x 128 x 128 uint8), single-threaded (exams per CPU second = per core) and with
reader threads, compared with the exams/s each step case consumes, and the cores the
pipeline needs to keep up: step exams/s / per-core pipeline exams/s.

--quick (CPU-sized, a few minutes): the tiny grid, the paper config at batch 1 in
float32 only (no warm-up, 1 timed step), 8 paper-resolution exams for the pipeline.
Without it on CPU the paper config runs at batch 1 in both dtypes for 2 steps; on a GPU
the full grid (batches 1, 8, 32) runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import jax
from bench_input import grain_throughput, phantom_records
from bench_pretrain import bench_one, measured_peak, peak_size

# SPEC: one H100 at 50 % MFU runs the paper config at ~190 exams/s.
H100_PAPER_EXAMS_PER_S = 190.0
# Narrower decoders of each config (width 1 + 8k, heads dividing it).
NARROW_DECODER = {"tiny": dict(decoder_width=17, decoder_num_heads=1),
                  "paper": dict(decoder_width=513, decoder_num_heads=9)}  # fmt: skip


def step_cases(quick: bool, gpu: bool) -> list[dict]:
    """The step cases: a baseline per (config, dtype) and one change at a time."""
    cases = []

    def add(config, dtype, batch, steps, warmup, change="baseline", **overrides):
        cases.append(dict(config=config, dtype=dtype, batch=batch, steps=steps,
                          warmup=warmup, change=change, overrides=overrides))  # fmt: skip

    for dtype in ("float32", "bfloat16"):
        add("tiny", dtype, 8, 5, 1, attention_impl="xla")
        add("tiny", dtype, 8, 5, 1, "attention cudnn", attention_impl="cudnn")
        add(
            "tiny", dtype, 8, 5, 1, "narrow decoder", attention_impl="xla", **NARROW_DECODER["tiny"]
        )
        add("tiny", dtype, 8, 5, 1, "remat", attention_impl="xla", remat=True)
        add("tiny", dtype, 32, 5, 1, "batch 32", attention_impl="xla")
    if gpu:
        for dtype in ("float32", "bfloat16"):
            add("paper", dtype, 8, 10, 2, attention_impl="xla")
            add("paper", dtype, 8, 10, 2, "attention cudnn", attention_impl="cudnn")
            add("paper", dtype, 8, 10, 2, "narrow decoder", attention_impl="xla",
                **NARROW_DECODER["paper"])  # fmt: skip
            add("paper", dtype, 8, 10, 2, "remat", attention_impl="xla", remat=True)
            add("paper", dtype, 1, 10, 2, "batch 1", attention_impl="xla")
            add("paper", dtype, 32, 10, 2, "batch 32", attention_impl="xla")
            add("paper", dtype, 32, 10, 2, "batch 32 + remat", attention_impl="xla", remat=True)
    else:  # ~45 s per paper step on a 2-core CPU: batch 1, one or two steps
        for dtype in ("float32",) if quick else ("float32", "bfloat16"):
            add("paper", dtype, 1, 1 if quick else 2, 0, attention_impl="xla")
            add("paper", dtype, 1, 1, 0, "attention cudnn", attention_impl="cudnn")
    return cases


def run_case(case: dict, backend: str) -> dict:
    """One step case: bench_one's record, or the reason it cannot run here."""
    base = {k: case[k] for k in ("config", "dtype", "batch", "change")}
    base["overrides"] = case["overrides"]
    if case["overrides"].get("attention_impl") == "cudnn" and backend != "gpu":
        return {**base, "status": f"not available on {backend.upper()} (cuDNN needs a GPU)"}
    print(f"== {case['config']} {case['dtype']} batch {case['batch']}: {case['change']}",
          flush=True)  # fmt: skip
    try:
        record = bench_one(case["config"], case["dtype"], case["steps"], case["batch"],
                           case["overrides"], warmup=case["warmup"])  # fmt: skip
    except Exception as error:  # a case that fails is a result (e.g. cuDNN head_dim 205)
        traceback.print_exc()
        return {**base, "status": f"failed: {type(error).__name__}: {str(error)[:400]}"}
    return {**base, **record, "status": "ok"}


def pipeline_figures(work: Path, quick: bool, threads: int) -> dict:
    """Grain at paper resolution: per core (no reader threads) and with `threads`."""
    num_exams = 8 if quick else 32
    start = time.perf_counter()
    data_dir = phantom_records(work, num_exams, 128, 50, workers=min(2, os.cpu_count() or 1))
    made_s = time.perf_counter() - start
    repeats, epochs = (2, 1) if quick else (3, 2)
    single = grain_throughput(data_dir, 4, epochs, repeats, 0)
    threaded = grain_throughput(data_dir, 4, epochs, repeats, threads)
    return {
        "exam_shape": [9, 50, 128, 128],
        "dataset_exams": num_exams,
        "dataset_seconds_to_make": round(made_s, 1),
        "single_thread": single,
        f"{threads}_threads": threaded,
        "per_core_exams_per_s": single["exams_per_cpu_s"],
        "threads": threads,
    }


def keeps_up(pipeline: dict, steps: list[dict]) -> list[dict]:
    """Cores the pipeline needs for each consumer: consumer exams/s / per-core exams/s."""
    per_core = pipeline["per_core_exams_per_s"]
    rows = [
        dict(
            consumer=f"{r['config']} {r['dtype']} batch {r['batch']} ({r['change']}), this machine",
            step_exams_per_s=r["exams_per_s"],
        )  # fmt: skip
        for r in steps
        if r["status"] == "ok" and r["config"] == "paper"
    ]
    rows.append(dict(consumer="paper, one H100 at 50 % MFU (SPEC figure, not measured here)",
                     step_exams_per_s=H100_PAPER_EXAMS_PER_S))  # fmt: skip
    for row in rows:
        row["per_core_pipeline_exams_per_s"] = per_core
        row["cores_needed"] = row["step_exams_per_s"] / per_core
        row["cores_to_keep_up"] = max(1, math.ceil(row["cores_needed"]))
        row["calculation"] = (
            f"{row['step_exams_per_s']:.3g} / {per_core:.3g} = {row['cores_needed']:.3g} "
            f"-> {row['cores_to_keep_up']} core(s)"
        )
    return rows


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    """suite.md: the step table, the pipeline figures and the keep-up calculation."""
    env = result["environment"]
    lines = [
        f"# whmae benchmark suite ({'quick' if result['quick'] else 'full'})",
        "",
        f"{env['devices']} x {env['device_kind']} ({env['backend']}), {env['cpu_cores']} CPU "
        f"cores, jax {env['jax']}; measured matmul peak: "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in result["peak_flops"].items())
        + f". Command: `{result['command']}`.",
        "",
        "## Train step",
        "",
        "| config | dtype | batch | change | compile s | step s | exams/s | GFLOP/exam "
        "| MFU % | memory/device GiB | status |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["steps"]:
        ok = r["status"] == "ok"
        mem = r.get("memory_peak_bytes_per_device")
        lines.append(
            f"| {r['config']} | {r['dtype']} | {r['batch']} | {r['change']} "
            f"| {_cell(r.get('compile_s'), '.1f')} | {_cell(r.get('step_s'), '.3f')} "
            f"| {_cell(r.get('exams_per_s'), '.3g')} "
            f"| {_cell(r.get('flops_per_exam_compiled', 0) / 1e9 if ok else None, '.4g')} "
            f"| {_cell(100 * r['mfu'] if ok else None, '.1f')} "
            f"| {_cell(mem / 2**30 if mem is not None else None, '.2f')} | {r['status']} |"
        )
    p = result["pipeline"]
    threads = p["threads"]
    lines += [
        "",
        "## Input pipeline at paper resolution (Grain, uint8 [9, 50, 128, 128])",
        "",
        f"- single thread: {p['single_thread']['exams_per_s']:.1f} exams/s, "
        f"{p['per_core_exams_per_s']:.1f} exams per CPU second (per core)",
        f"- {threads} reader threads: {p[f'{threads}_threads']['exams_per_s']:.1f} exams/s "
        f"({p[f'{threads}_threads']['exams_per_cpu_s']:.1f} per CPU second)",
        "",
        "| consumer | step exams/s | cores needed = step exams/s / per-core exams/s |",
        "|---|---:|---|",
    ]
    for row in result["keeps_up"]:
        lines.append(
            f"| {row['consumer']} | {row['step_exams_per_s']:.3g} | {row['calculation']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for suite.json and suite.md")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: a few minutes")
    parser.add_argument("--work", default="/tmp/whmae_bench_input", help="pipeline scratch")
    parser.add_argument("--threads", type=int, default=4, help="Grain reader threads")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = jax.default_backend()
    started = time.perf_counter()
    peaks = {d: measured_peak(d, peak_size()) for d in ("float32", "bfloat16")}
    print("peak GFLOP/s:", {k: round(v / 1e9, 1) for k, v in peaks.items()}, flush=True)
    steps = [run_case(case, backend) for case in step_cases(args.quick, backend == "gpu")]
    print("== input pipeline at paper resolution", flush=True)
    pipeline = pipeline_figures(Path(args.work), args.quick, args.threads)
    result = {
        "quick": args.quick,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "environment": {
            "backend": backend,
            "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "cpu_cores": os.cpu_count(),
            "jax": jax.__version__,
            "python": platform.python_version(),
        },
        "peak_flops": peaks,
        "steps": steps,
        "pipeline": pipeline,
        "keeps_up": keeps_up(pipeline, steps),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "suite.json").write_text(json.dumps(result, indent=1))
    (out / "suite.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'} in {result['seconds']} s")


if __name__ == "__main__":
    main()
