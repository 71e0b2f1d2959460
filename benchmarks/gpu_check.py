"""One GPU, measured: correctness, the matmul peak, the train step swept, the training loop.

    bash benchmarks/gpu_check.sh --out DIR          # a machine with one NVIDIA GPU
    python benchmarks/gpu_check.py --cpu --out DIR  # the rehearsal on the CPU (tiny shapes)
    python benchmarks/gpu_check.py --dry-run        # the plan; nothing is run

Sections, in this order, each guarded (an exception is recorded with its traceback and the
next section runs; a process that dies is restarted by gpu_check.sh with --resume, which
keeps what was done, marks the point it died in "crashed" and goes on after it), each with
a time budget (a sweep point or loop that would overrun it is not started: "skipped: time
budget"), under one overall deadline (a watchdog writes the report and exits past it):

  correctness  the tiny config's first 20 losses on the accelerator against the same run
               on one CPU device (same init, same batches of phantom exams with 0-2 planes
               dropped, same masks): fp32 (matmul precision "highest") within --fp32-rtol,
               bf16 within --bf16-rtol (max relative difference over the steps). On a GPU
               also bf16 with cuDNN attention (padded head dim) within --bf16-rtol, and
               fp32 at the default matmul precision (information only).
  peak         the measured bf16 matmul peak (bench_pretrain.measured_peak).
  step         the train step (bench_pretrain.bench_one) of `paper` and `base` in bf16:
               attention cudnn vs xla, remat off vs on, per-device batch up a ladder until
               a combination fails (OOM, compile failure: caught, recorded). Round by round
               (every combination at one batch, then the next batch; remat from the ladder's
               second batch up, where memory starts to matter), so a budget cut keeps the
               comparisons. exams/s; MFU = exams/s x FLOPs per exam / peak, by the model's
               analytic FLOPs (padding counts as waste) and by the compiled program's;
               compile time; memory: the compiled step's (arguments + outputs +
               temporaries) and the device's peak_bytes_in_use (a process-wide running
               peak, marked "*" where an earlier point set it).
  loop         whmae.train.loop.train over the Grain pipeline reading ArrayRecord shards
               of phantom exams (paper resolution on a GPU) with the host's cores as Grain
               workers, against the step alone at the same settings (the sweep's best point
               with per-device batch <= --loop-max-batch). Measured over the logged
               intervals after compilation and after the prefetch buffers (filled while
               compiling) drain. Passes at >= 90 % of the step-only exams/s; the pipeline
               alone and the host-to-device copy are measured to say where the time goes.

--cpu runs every section on the CPU with the tiny config, a small batch ladder, few steps
and a small dataset at the tiny shape; the correctness run then compares all CPU devices
(2 emulated ones unless XLA_FLAGS says, data parallel) with one; XLA's CPU backend compiles at
optimisation level 0 without fusion emitters (compile time dominates a rehearsal).
Compiled programs go to a persistent cache (JAX_COMPILATION_CACHE_DIR, default
WORK/jax_cache): the loop reuses the sweep's step where the programs are the same.
DIR/gpu_check.json and DIR/gpu_check.md are rewritten after every section and sweep point;
the markdown table is printed last.
--fail SECTION (or WHMAE_GPU_CHECK_FAIL=SECTION) makes that section fail on purpose.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

SECTIONS = ("correctness", "peak", "step", "loop")
TITLES = {
    "correctness": "(a) correctness: accelerator vs CPU losses",
    "peak": "(b) bf16 matmul peak",
    "step": "(c) train step sweep (bf16)",
    "loop": "(d) training loop over Grain/ArrayRecord vs the step alone",
}
FAIL_ENV = "WHMAE_GPU_CHECK_FAIL"
# Tests of the restart: the process aborts in this section (in a step sweep: at its first
# point) unless it is a resumed one.
CRASH_ENV = "WHMAE_GPU_CHECK_CRASH"
LOOP_TARGET = 0.9
# MFU targets (issue 15) on one H100/H200, against the measured bf16 matmul peak.
MFU_TARGETS = {"paper": 0.45, "base": 0.55}
SKIPPED_BUDGET = "skipped: time budget"
CRASHED = "crashed: the process died here (restarted with --resume)"
# Past the deadline, this long for the point in flight before the watchdog reports and exits.
WATCHDOG_GRACE_S = 45.0
EXIT_WATCHDOG = 3
_RESUMED = False  # this process goes on from a report that a dead one left


@dataclasses.dataclass
class Plan:
    """Everything a run will do; `--dry-run` prints it."""

    mode: str  # "gpu" | "cpu"
    sections: tuple[str, ...]
    budgets: dict[str, float]
    deadline_at: float  # time.time() after which nothing new starts
    # (a)
    correctness_steps: int = 20
    fp32_rtol: float = 1e-3
    bf16_rtol: float = 2e-2
    # (b)
    peak_size: int = 8192
    # (c)
    step_configs: tuple[str, ...] = ("paper", "base")
    attentions: tuple[str, ...] = ("cudnn", "xla")
    remats: tuple[bool, ...] = (False, True)
    batches_per_device: tuple[int, ...] = (8, 32, 128)
    step_steps: int = 5
    step_warmup: int = 2
    # (d)
    loop_configs: tuple[str, ...] = ("paper", "base")
    loop_exams: int = 128
    loop_workers: int = 8
    loop_max_batch_per_device: int = 32
    loop_window_s: float = 8.0
    loop_min_steps: int = 20
    loop_steps: int | None = None  # None: from the step time (window + buffers)
    # The sweep also gets what earlier sections left unused (keeping the later ones' budgets).
    step_takes_leftover: bool = True
    work: str = "/tmp/whmae_gpu_check"
    fail: tuple[str, ...] = ()


def make_plan(args) -> Plan:
    cpu = args.cpu
    budgets = (
        {"correctness": 40.0, "peak": 10.0, "step": 40.0, "loop": 40.0}
        if cpu
        else {"correctness": 60.0, "peak": 20.0, "step": 250.0, "loop": 130.0}
    )
    for item in args.budget or []:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not seconds:
            raise SystemExit(f"--budget {item!r}: expected SECTION=SECONDS, SECTION in {SECTIONS}")
        budgets[name] = float(seconds)
    fail = tuple(s for s in (args.fail or os.environ.get(FAIL_ENV, "")).split(",") if s)
    only = tuple(s for s in (args.only or ",".join(SECTIONS)).split(",") if s)
    for name in fail + only:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; sections: {SECTIONS}")
    deadline_s = args.deadline_s or (150.0 if cpu else 470.0)
    plan = Plan(
        mode="cpu" if cpu else "gpu",
        sections=tuple(s for s in SECTIONS if s in only),
        budgets=budgets,
        deadline_at=args.deadline_at or time.time() + deadline_s,
        fail=fail,
        work=args.work,
    )
    if cpu:
        plan.peak_size = 512
        plan.step_configs = ("tiny",)
        plan.batches_per_device = (2, 4)
        plan.step_steps, plan.step_warmup = 2, 1
        plan.loop_configs = ("tiny",)
        plan.loop_exams, plan.loop_workers = 16, 0
        plan.loop_max_batch_per_device = 4
        # The tiny config's own 20 steps: the optimizer schedule, and so the compiled step,
        # is then the sweep's (a compilation-cache hit).
        plan.loop_steps = 20
    else:
        plan.loop_workers = max(1, min(12, (os.cpu_count() or 1) - 4))
    if args.configs:
        plan.step_configs = tuple(args.configs.split(","))
    if args.loop_configs is not None:
        plan.loop_configs = tuple(c for c in args.loop_configs.split(",") if c)
    if args.batches:
        plan.batches_per_device = tuple(int(b) for b in args.batches.split(","))
    if args.attentions:
        plan.attentions = tuple(args.attentions.split(","))
    for field in ("loop_workers", "loop_exams", "loop_steps", "fp32_rtol", "bf16_rtol"):
        if getattr(args, field) is not None:
            setattr(plan, field, getattr(args, field))
    if args.loop_max_batch is not None:
        plan.loop_max_batch_per_device = args.loop_max_batch
    if args.steps is not None:
        plan.step_steps = args.steps
    plan.step_takes_leftover = not any(b.startswith("step=") for b in args.budget or [])
    return plan


def describe_plan(plan: Plan) -> str:
    b = plan.budgets
    ladder = ", ".join(map(str, plan.batches_per_device))
    left = plan.deadline_at - time.time()
    leftover = " + what (a), (b) leave" if plan.step_takes_leftover else ""
    lines = [
        f"whmae GPU check, {plan.mode} mode: sections {', '.join(plan.sections)}; "
        f"overall deadline in {left:.0f} s",
        f"  (a) correctness [{b['correctness']:.0f} s]: tiny config, first "
        f"{plan.correctness_steps} losses, accelerator vs 1 CPU device; fp32 (precision "
        f"highest) max rel diff <= {plan.fp32_rtol:g}, bf16 <= {plan.bf16_rtol:g}",
        f"  (b) peak [{b['peak']:.0f} s]: bf16 matmul {plan.peak_size}^3, best of 10",
        f"  (c) step [{b['step']:.0f} s{leftover}]: configs {', '.join(plan.step_configs)} "
        "in bf16 x "
        f"attention {'/'.join(plan.attentions)} x remat "
        f"{'/'.join('on' if r else 'off' for r in plan.remats)} x per-device batch {ladder} "
        "(round by round, remat from the second batch; a combination stops at its first "
        f"failure); {plan.step_warmup} warm-up + {plan.step_steps} timed steps per point",
        f"  (d) loop [{b['loop']:.0f} s]: configs {', '.join(plan.loop_configs) or 'none'}; "
        f"{plan.loop_exams} phantom exams in ArrayRecord shards under {plan.work}, "
        f"{plan.loop_workers} Grain workers (this host: {os.cpu_count()} cores), "
        f"per-device batch <= {plan.loop_max_batch_per_device} (the best step point), "
        + (
            f"{plan.loop_steps} steps"
            if plan.loop_steps
            else f">= {plan.loop_min_steps} steps / {plan.loop_window_s:g} s measured after the "
            "prefetch buffers drain"
        )
        + f"; passes at loop >= {LOOP_TARGET:.0%} of the step alone",
    ]
    if plan.fail:
        lines.append(f"  failing on purpose: {', '.join(plan.fail)}")
    return "\n".join(lines)


class Budget:
    """A section's time budget inside the run's overall deadline (wall-clock seconds)."""

    def __init__(self, seconds: float, deadline_at: float):
        self.end = min(time.time() + seconds, deadline_at)

    def left(self) -> float:
        return self.end - time.time()

    def allows(self, estimate_s: float = 0.0) -> bool:
        return self.left() > estimate_s


def _error_status(error: BaseException) -> str:
    text = " ".join(str(error).split())
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return f"{'oom' if oom else 'failed'}: {type(error).__name__}: {text[:300]}"


def _maybe_crash(section: str) -> None:
    if os.environ.get(CRASH_ENV) == section and not _RESUMED:
        print(f"{CRASH_ENV}={section}: aborting on purpose", flush=True)
        os.abort()


def _release() -> None:
    """Drop what a failed or finished point left behind (buffers, executables)."""
    import jax

    gc.collect()
    jax.clear_caches()


# ---------------------------------------------------------------------------- environment


def environment(mode: str) -> dict:
    import importlib.metadata

    import jax

    versions = {}
    for name in (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array-record",
        "numpy",
        "ml-collections",
        "tensorboardX",
    ):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    env = {
        "mode": mode,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "backend": jax.default_backend(),
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache": getattr(jax.config, "jax_compilation_cache_dir", None),
    }
    if mode == "gpu":
        try:
            query = "name,memory.total,driver_version,clocks.max.sm"
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception as error:  # noqa: BLE001 - information only
            env["nvidia_smi"] = f"unavailable: {error}"
    return env


# ---------------------------------------------------------------------------- (a) correctness


def correctness_batches(steps: int, batch: int, size: int, frames: int) -> list[dict]:
    """`steps` host batches of phantom exams (16 distinct, cycled), each exam missing
    0-2 planes at random (fixed seed): the variable-length attention path is exercised."""
    import numpy as np

    from whmae.data.synthetic.phantom import PhantomConfig, make_exam

    config = PhantomConfig(size=size, frames=frames, seed=0)
    exams = [make_exam(config, i) for i in range(16)]
    rng = np.random.default_rng(0)
    batches = []
    for step in range(steps):
        picked = [exams[(step * batch + j) % len(exams)] for j in range(batch)]
        mask = np.ones((batch, 9), bool)
        for row in range(batch):
            mask[row, rng.choice(9, rng.integers(0, 3), replace=False)] = False
        batches.append({"images": np.stack([e["images"] for e in picked]), "plane_mask": mask})
    return batches


def tiny_losses(
    devices,
    dtype: str,
    batches: list[dict],
    precision: str | None = None,
    attention_impl: str | None = None,
) -> list[float]:
    """The tiny config's losses, one per batch, trained on `devices` (data parallel)."""
    import jax
    from bench_pretrain import FIELDS, load_config

    from whmae.model.mae import MAEConfig, MaskedAutoencoder
    from whmae.train.mesh import logical_rules, make_mesh
    from whmae.train.optim import make_optimizer
    from whmae.train.step import (
        batch_shardings_for,
        global_batch,
        init_train_state,
        make_train_step,
        pretrain_loss,
    )

    config = load_config("tiny")
    config.model.dtype = dtype
    config.model.attention_impl = attention_impl
    model_config = MAEConfig(**config.model.to_dict())
    mesh = make_mesh(config.mesh, devices)
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    with jax.default_matmul_precision(precision or "default"):
        graphdef, state, shardings = init_train_state(
            lambda rngs: MaskedAutoencoder(model_config, rngs=rngs),
            tx,
            mesh,
            logical_rules(config.mesh.rules),
            seed=0,
        )
        batch_shardings = batch_shardings_for(mesh, FIELDS)
        step_fn = make_train_step(
            graphdef, pretrain_loss, tx, mesh, shardings, batch_shardings, schedule
        )
        key = jax.random.key(0)
        losses = []
        for host in batches:
            state, metrics = step_fn(state, global_batch(host, mesh, batch_shardings), key)
            losses.append(metrics["loss"])
    return [float(x) for x in jax.device_get(losses)]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not all(map(math.isfinite, a)):
        return math.inf
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def run_correctness(plan: Plan, budget: Budget, save) -> dict:
    import jax
    from bench_pretrain import load_config

    config = load_config("tiny")
    accel, cpu = jax.devices(), jax.devices("cpu")[:1]
    batches = correctness_batches(
        plan.correctness_steps,
        int(config.data.batch_size),
        config.model.image_size,
        config.model.frames,
    )
    gpu = jax.default_backend() == "gpu"
    result = {
        "accelerator": f"{len(accel)} x {accel[0].device_kind} ({jax.default_backend()})",
        "reference": f"1 x {cpu[0].device_kind} (cpu), float32, precision highest",
        "steps": plan.correctness_steps,
        "rows": [],
    }
    result["reference_losses"] = tiny_losses(cpu, "float32", batches, "highest")
    cases = [  # dtype, matmul precision, attention, bound, decides the verdict
        ("float32", "highest", None, plan.fp32_rtol, True),
        ("bfloat16", None, None, plan.bf16_rtol, True),
        ("bfloat16", None, "cudnn", plan.bf16_rtol, True),
        ("float32", "default", None, plan.bf16_rtol, False),
    ]
    for dtype, precision, attention, rtol, decides in cases:
        row = dict(
            dtype=dtype,
            precision=precision or "default",
            attention=attention or "auto",
            rtol=rtol,
            decides=decides,
        )
        if not gpu and (attention == "cudnn" or precision == "default"):
            row["status"] = "skipped: GPU only"
        elif not budget.allows():
            row["status"] = SKIPPED_BUDGET
        else:
            try:
                losses = tiny_losses(accel, dtype, batches, precision, attention)
                diff = max_rel_diff(losses, result["reference_losses"])
                row.update(status="ok", max_rel_diff=diff, passed=diff <= rtol, losses=losses)
            except Exception as error:  # noqa: BLE001 - a case that fails is a result
                traceback.print_exc()
                row.update(status=_error_status(error), passed=False)
        result["rows"].append(row)
        save(result)
        print(
            f"  {dtype} precision {row['precision']} attention {row['attention']}: "
            f"{row['status']} {row.get('max_rel_diff', '')}",
            flush=True,
        )
    deciding = [r for r in result["rows"] if r["decides"] and r["status"] != "skipped: GPU only"]
    result["passed"] = bool(deciding) and all(r.get("passed") for r in deciding)
    return result


# ---------------------------------------------------------------------------- (b) peak


def run_peak(plan: Plan, budget: Budget, save) -> dict:
    from bench_pretrain import measured_peak

    start = time.perf_counter()
    peak = measured_peak("bfloat16", plan.peak_size)
    return {
        "dtype": "bfloat16",
        "size": plan.peak_size,
        "flops_per_s": peak,
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------- (c) step


def _device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def step_point(
    config: str, attention: str, remat: bool, per_device: int, plan: Plan, peak: float | None
) -> dict:
    """One sweep point: bench_one's record plus MFU against `peak` and device memory."""
    import jax
    from bench_pretrain import bench_one

    before = _device_peak_bytes()
    record = bench_one(
        config,
        "bfloat16",
        plan.step_steps,
        per_device * jax.device_count(),
        {"attention_impl": attention, "remat": remat},
        warmup=plan.step_warmup,
        measure_peak=False,
    )
    after = _device_peak_bytes()
    rate = record["exams_per_s"]
    record.update(
        status="ok",
        mfu=rate * record["flops_per_exam_analytic"] / peak if peak else None,
        mfu_compiled=rate * record["flops_per_exam_compiled"] / peak if peak else None,
        device_peak_bytes=after,
        device_peak_is_this_point=None if after is None else before is None or after > before,
    )
    for key in ("peak_flops_measured", "mfu_analytic", "model_overrides"):
        record.pop(key, None)
    return record


def sweep_points(plan: Plan, devices: int) -> list[dict]:
    """The sweep in run order: per config, round by round up the batch ladder."""
    points = []
    ladder = plan.batches_per_device
    for config in plan.step_configs:
        for i, per_device in enumerate(ladder):
            for attention in plan.attentions:
                for remat in plan.remats:
                    if remat and i == 0 and len(ladder) > 1 and False in plan.remats:
                        continue  # remat is for memory: from the second batch up
                    points.append(
                        dict(
                            config=config,
                            dtype="bfloat16",
                            attention=attention,
                            remat=remat,
                            batch_per_device=per_device,
                            batch=per_device * devices,
                        )
                    )
    return points


def _key(point: dict) -> tuple:
    return point["config"], point["attention"], point["remat"], point["batch_per_device"]


def run_step(plan: Plan, budget: Budget, save, peak: float | None, prior: dict | None) -> dict:
    """The sweep; `prior`: what a process that died in this section left (resume)."""
    import jax

    gpu = jax.default_backend() == "gpu"
    result = {"peak_flops_per_s": peak, "points": [], "best": {}}
    done = {_key(p): p for p in (prior or {}).get("points", [])}
    crashed = (prior or {}).get("current")
    if crashed is not None:
        done[_key(crashed)] = {**crashed, "status": CRASHED}
    dead: dict[tuple, str] = {}
    planned = sweep_points(plan, jax.device_count())
    last_s: dict[str, float] = {}
    config_ends: dict[str, float] = {}
    for point in planned:
        config, combo = point["config"], (point["config"], point["attention"], point["remat"])
        if config not in config_ends:  # the budget left, shared by the configs still to run
            remaining = len(plan.step_configs) - plan.step_configs.index(config)
            config_ends[config] = time.time() + budget.left() / remaining
        if _key(point) in done:
            record = done[_key(point)]
        elif point["attention"] == "cudnn" and not gpu:
            record = {**point, "status": "skipped: cuDNN attention needs a GPU"}
        elif combo in dead:
            record = {**point, "status": f"skipped: {dead[combo]}"}
        elif min(config_ends[config], budget.end) - time.time() <= last_s.get(config, 0.0):
            record = {**point, "status": SKIPPED_BUDGET}  # a larger batch costs at least as much
        else:
            name = (
                f"{config} {point['attention']} remat {'on' if point['remat'] else 'off'} "
                f"x{point['batch_per_device']}/device"
            )
            print(f"== step {name}", flush=True)
            result["current"] = point
            save(result)
            _maybe_crash("step")
            start = time.perf_counter()
            try:
                record = {
                    **point,
                    **step_point(
                        config,
                        point["attention"],
                        point["remat"],
                        point["batch_per_device"],
                        plan,
                        peak,
                    ),
                }
            except (Exception, SystemExit) as error:  # OOM, compile failure: a result
                traceback.print_exc()
                record = {**point, "status": _error_status(error)}
            record["seconds"] = time.perf_counter() - start
            last_s[config] = record["seconds"]
            result.pop("current")
            _release()
            print(
                f"   {record['status']}: {record.get('exams_per_s', 0):.4g} exams/s, "
                f"{record['seconds']:.1f} s",
                flush=True,
            )
        if not record["status"].startswith(("ok", "skipped")):
            kind = record["status"].split(":")[0]
            dead[combo] = f"{kind} at {record['batch_per_device']}/device"
        result["points"].append(record)
        save(result)
    for config in plan.step_configs:
        ok = [p for p in result["points"] if p["config"] == config and p["status"] == "ok"]
        if ok:
            top = max(ok, key=lambda p: p["exams_per_s"])
            target = MFU_TARGETS.get(config) if gpu else None
            keys = (
                "attention",
                "remat",
                "batch_per_device",
                "batch",
                "exams_per_s",
                "mfu",
                "mfu_compiled",
            )
            result["best"][config] = dict(
                {k: top[k] for k in keys},
                mfu_target=target,
                meets_target=None if target is None or top["mfu"] is None else top["mfu"] >= target,
            )
    return result


# ---------------------------------------------------------------------------- (d) loop


def _loop_setting(config: str, plan: Plan, steps: dict | None) -> dict:
    """The (attention, remat, per-device batch) of the loop: the best measured step point
    with per-device batch <= loop_max_batch_per_device, else xla / off / the largest
    ladder batch within that limit."""
    ok = [
        p
        for p in (steps or {}).get("points", [])
        if p["config"] == config
        and p["status"] == "ok"
        and p["batch_per_device"] <= plan.loop_max_batch_per_device
    ]
    if ok:
        top = max(ok, key=lambda p: p["exams_per_s"])
        return {
            "attention": top["attention"],
            "remat": top["remat"],
            "batch_per_device": top["batch_per_device"],
            "step_record": top,
        }
    fits = [b for b in plan.batches_per_device if b <= plan.loop_max_batch_per_device]
    return {
        "attention": "xla",
        "remat": False,
        "batch_per_device": max(fits) if fits else 1,
        "step_record": None,
    }


def _loop_config(
    variant: str, setting: dict, data_dir, batch: int, workers: int, steps: int, log_every: int
):
    from bench_pretrain import load_config

    config = load_config(variant)
    config.model.dtype = "bfloat16"
    config.model.attention_impl = setting["attention"]
    config.model.remat = setting["remat"]
    config.data.dir = str(data_dir)
    config.data.batch_size = batch
    config.data.worker_count = workers
    config.train.update(
        steps=steps,
        log_every=log_every,
        checkpoint_every=steps,
        eval_every=0,
        best_metric="",
        distributed="off",
    )
    return config


def loop_schedule(plan: Plan, step_s: float) -> tuple[int, int, int]:
    """(total steps, log_every, first step measured): one logged interval for the compile
    and the workers' start, then the prefetch buffers (batches made ahead while
    compiling: workers x (4 read-ahead + 1)), then the measured window."""
    buffered = plan.loop_workers * 5 if plan.loop_workers else 4
    if plan.loop_steps:
        log_every = max(1, plan.loop_steps // 5)
        skip = log_every * (1 + math.ceil(buffered / log_every))
        skip = min(skip, plan.loop_steps - 2 * log_every)
        return plan.loop_steps, log_every, skip
    window = max(plan.loop_min_steps, math.ceil(plan.loop_window_s / step_s))
    log_every = max(2, min(window // 4, 25))
    skip = log_every * (1 + math.ceil(buffered / log_every))
    return skip + log_every * math.ceil(window / log_every), log_every, skip


def _loop_rate(workdir: Path, first_step: int, batch: int) -> tuple[float, int]:
    """exams/s of the loop over its logged train intervals starting at or after
    `first_step` (each row's step_time_s is its interval's mean)."""
    rows = [
        json.loads(line)
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    steps, seconds, previous = 0, 0.0, 0
    for row in rows:
        if row.get("split", "train") != "train":
            continue
        if previous >= first_step:
            steps += row["step"] - previous
            seconds += row["step_time_s"] * (row["step"] - previous)
        previous = row["step"]
    if not steps:
        raise RuntimeError(f"no logged interval after step {first_step} in {workdir}")
    return steps * batch / seconds, steps


def _pipeline_alone(data_dir, batch: int, workers: int, buffered: int) -> tuple[dict, dict]:
    """The loop's own pipeline without the model: exams/s over max(8, buffered) batches
    after the first `buffered` (made ahead while the workers start), and one host batch
    for the copy measurement."""
    from whmae.data.dataset.pipeline import make_pipeline

    it = make_pipeline(
        data_dir,
        "train",
        batch_size=batch,
        seed=0,
        shuffle=True,
        num_epochs=None,
        process_index=0,
        process_count=1,
        worker_count=workers,
    )
    timed = max(8, buffered)
    try:
        start = time.perf_counter()
        first = next(it)
        first_s = time.perf_counter() - start
        for _ in range(buffered):
            next(it)
        start = time.perf_counter()
        for _ in range(timed):
            next(it)
        seconds = time.perf_counter() - start
    finally:
        closer = getattr(it, "close", None)
        if closer is not None:
            closer()
    return {
        "exams_per_s": timed * batch / seconds,
        "first_batch_s": first_s,
        "batches_untimed": 1 + buffered,
        "batches_timed": timed,
    }, first


def _copy_time(host: dict, repeats: int = 5) -> dict:
    """Host-to-device copy of one batch as the loop makes it (global_batch), blocked on."""
    import jax
    from bench_pretrain import FIELDS

    from whmae.train.mesh import make_mesh
    from whmae.train.step import batch_shardings_for, global_batch

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    shardings = batch_shardings_for(mesh, FIELDS)
    host = {k: host[k] for k in FIELDS}
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(global_batch(host, mesh, shardings))
        times.append(time.perf_counter() - start)
    seconds = min(times[1:])
    nbytes = sum(v.nbytes for v in host.values())
    return {"s_per_batch": seconds, "bytes_per_batch": nbytes, "gb_per_s": nbytes / seconds / 1e9}


def diagnose(
    loop: float, step: float, pipeline: dict | None, copy: dict | None, batch: int
) -> list[str]:
    """Where the time goes between the step alone and the loop."""
    ratio = loop / step
    step_s, loop_s = batch / step, batch / loop
    notes = [
        f"loop {loop_s * 1e3:.1f} ms/step vs the step alone {step_s * 1e3:.1f} ms/step "
        f"({ratio:.0%})"
    ]
    if pipeline is not None:
        p = pipeline["exams_per_s"]
        if p < step:
            notes.append(
                f"input-bound: the pipeline alone delivers {p:.4g} exams/s < the "
                f"step's {step:.4g}: more Grain workers (cores) or cheaper decoding"
            )
        else:
            notes.append(f"the pipeline alone delivers {p:.4g} exams/s ({p / step:.1f}x the step)")
    if copy is not None:
        c = copy["s_per_batch"]
        notes.append(
            f"host-to-device copy {c * 1e3:.1f} ms/batch ({copy['gb_per_s']:.1f} GB/s),"
            f" {c / step_s:.0%} of a step"
        )
        if ratio < LOOP_TARGET and c > 0.05 * step_s:
            notes.append(
                "the loop copies each batch (global_batch) before dispatching its "
                "step: a device_put of the next batch ahead of the step would hide it"
            )
    if ratio < LOOP_TARGET:
        unexplained = loop_s - step_s - (copy["s_per_batch"] if copy else 0.0)
        if unexplained > 0:
            notes.append(
                f"{unexplained * 1e3:.1f} ms/step not explained by step + copy: "
                "host-side loop work (next(), logging, dispatch)"
            )
    return notes


def loop_one(variant: str, plan: Plan, budget: Budget, steps_result: dict | None) -> dict:
    import jax
    from bench_input import phantom_records, warm
    from bench_pretrain import load_config

    from whmae.pretrain import pretrain_task
    from whmae.train.loop import train

    model = load_config(variant).model
    size, frames = int(model.image_size), int(model.frames)
    setting = _loop_setting(variant, plan, steps_result)
    per_device = setting["batch_per_device"]
    batch = per_device * jax.device_count()
    out = {
        "config": variant,
        "dtype": "bfloat16",
        "attention": setting["attention"],
        "remat": setting["remat"],
        "batch_per_device": per_device,
        "batch": batch,
        "workers": plan.loop_workers,
        "exam_shape": [9, frames, size, size],
    }

    start = time.perf_counter()
    work = Path(plan.work)
    data_dir = phantom_records(
        work, plan.loop_exams, size, frames, workers=max(1, min(16, os.cpu_count() or 1))
    )
    files = sorted(data_dir.glob("*.array_record"))
    out["dataset"] = {
        "dir": str(data_dir),
        "exams": plan.loop_exams,
        "bytes": warm(files),
        "seconds": time.perf_counter() - start,
    }

    record = setting["step_record"]  # the step alone: the sweep's point, or measured now
    if record is None:
        print(f"== loop {variant}: the step alone at batch {batch}", flush=True)
        record = step_point(variant, setting["attention"], setting["remat"], per_device, plan, None)
        _release()
    step_rate = record["exams_per_s"]
    out["step_alone_exams_per_s"] = step_rate

    total, log_every, first = loop_schedule(plan, batch / step_rate)
    out.update(steps=total, log_every=log_every, measured_from_step=first)
    if not budget.allows(0.5 * (total * batch / step_rate + record.get("compile_s", 0.0))):
        out["status"] = SKIPPED_BUDGET
        return out
    workdir = work / f"loop-{variant}-{os.getpid()}-{time.time_ns()}"
    config = _loop_config(variant, setting, data_dir, batch, plan.loop_workers, total, log_every)
    print(
        f"== loop {variant}: {total} steps of batch {batch}, {plan.loop_workers} workers",
        flush=True,
    )
    start = time.perf_counter()
    summary = train(config, str(workdir), pretrain_task(config), distributed_mode="off")
    out["loop_seconds"] = time.perf_counter() - start
    out["loop_compile_s"] = summary["compile_s"]
    out["final_loss"] = summary["final_loss"]
    loop_rate, measured = _loop_rate(workdir, first, batch)
    out.update(
        loop_exams_per_s=loop_rate,
        measured_steps=measured,
        ratio=loop_rate / step_rate,
        passed=loop_rate >= LOOP_TARGET * step_rate,
    )
    _release()

    pipeline = copy = None
    if budget.allows(5):
        try:
            buffered = plan.loop_workers * 5 if plan.loop_workers else 4
            pipeline, host = _pipeline_alone(data_dir, batch, plan.loop_workers, buffered)
            out["pipeline_alone"] = pipeline
            copy = _copy_time(host)
            out["host_to_device"] = copy
        except Exception as error:  # noqa: BLE001 - diagnostics only
            traceback.print_exc()
            out["diagnostics_status"] = _error_status(error)
    else:
        out["diagnostics_status"] = SKIPPED_BUDGET
    out["where_time_goes"] = diagnose(loop_rate, step_rate, pipeline, copy, batch)
    out["status"] = "ok"
    return out


def run_loop(
    plan: Plan, budget: Budget, save, steps_result: dict | None, prior: dict | None
) -> dict:
    result = {"rows": [], "target_ratio": LOOP_TARGET}
    done = {r["config"]: r for r in (prior or {}).get("rows", [])}
    if (prior or {}).get("current"):
        done[prior["current"]] = {"config": prior["current"], "status": CRASHED}
    for variant in plan.loop_configs:
        if variant in done:
            row = done[variant]
        elif not budget.allows(10):
            row = {"config": variant, "status": SKIPPED_BUDGET}
        else:
            result["current"] = variant
            save(result)
            start = time.perf_counter()
            try:
                row = loop_one(variant, plan, budget, steps_result)
            except (Exception, SystemExit) as error:
                traceback.print_exc()
                row = {"config": variant, "status": _error_status(error)}
            row["seconds"] = time.perf_counter() - start
            result.pop("current")
        result["rows"].append(row)
        save(result)
    ran = [r for r in result["rows"] if r["status"] == "ok"]
    result["passed"] = bool(ran) and all(r["passed"] for r in ran)
    return result


# ---------------------------------------------------------------------------- report


def _f(value, fmt: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value * scale, fmt)


def _verdict(passed) -> str:
    return "—" if passed is None else ("**PASS**" if passed else "**FAIL**")


def summary_cell(name: str, result: dict | None) -> str:
    if not result:
        return ""
    if name == "correctness":
        parts = [
            f"{r['dtype']}/{r['precision']}/{r['attention']}: "
            + (
                f"{r['max_rel_diff']:.2e} <= {r['rtol']:g} {_verdict(r['passed'])}"
                if r["status"] == "ok"
                else r["status"]
            )
            for r in result.get("rows", [])
            if r["status"] != "skipped: GPU only"
        ]
        return f"{_verdict(result.get('passed'))}; " + "; ".join(parts)
    if name == "peak":
        return f"{result['flops_per_s'] / 1e12:.4g} TFLOP/s (bf16 {result['size']}^3)"
    if name == "step":
        points = result.get("points", [])
        ok = sum(p["status"] == "ok" for p in points)
        parts = [f"{len(points)} points, {ok} ok"]
        for config, b in result.get("best", {}).items():
            target = (
                f" (target {b['mfu_target']:.0%}: {_verdict(b['meets_target'])})"
                if b["mfu_target"]
                else ""
            )
            parts.append(
                f"{config} best {b['exams_per_s']:.4g} exams/s, MFU "
                f"{_f(b['mfu'], '.1f', 100)} %{target} at {b['attention']}, remat "
                f"{'on' if b['remat'] else 'off'}, {b['batch_per_device']}/device"
            )
        return "; ".join(parts)
    if name == "loop":
        parts = []
        for r in result.get("rows", []):
            if r["status"] == "ok":
                parts.append(
                    f"{r['config']}: loop {r['loop_exams_per_s']:.4g} vs step "
                    f"{r['step_alone_exams_per_s']:.4g} exams/s = {r['ratio']:.2f} "
                    f"(>= {LOOP_TARGET}) {_verdict(r['passed'])}"
                )
            else:
                parts.append(f"{r['config']}: {r['status']}")
        return "; ".join(parts)
    return ""


def _correctness_md(c: dict) -> list[str]:
    lines = [
        "",
        f"## {TITLES['correctness']}",
        "",
        f"Accelerator {c['accelerator']} vs reference {c['reference']}; {c['steps']} "
        "steps of the tiny config (batches of phantom exams, 0-2 planes dropped per "
        "exam). Max relative loss difference over the steps:",
        "",
        "| dtype | matmul precision | attention | max rel diff | bound | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in c.get("rows", []):
        verdict = _verdict(r.get("passed")) if r["status"] == "ok" else r["status"]
        if r["status"] == "ok" and not r["decides"]:
            verdict += " (information only)"
        lines.append(
            f"| {r['dtype']} | {r['precision']} | {r['attention']} "
            f"| {_f(r.get('max_rel_diff'), '.2e')} | {r['rtol']:g} | {verdict} |"
        )
    return lines


def _step_md(s: dict) -> list[str]:
    lines = [
        "",
        f"## {TITLES['step']}",
        "",
        "MFU = exams/s x FLOPs per exam / the measured bf16 peak (analytic: the model's "
        "3 x forward count; compiled: XLA's cost analysis, which may not count cuDNN's "
        "fused attention). Memory: compiled = the step's arguments + outputs + "
        "temporaries; device = peak_bytes_in_use (* = set by an earlier point).",
        "",
        "| config | attention | remat | batch/device | compile s | step s | exams/s "
        "| MFU % | MFU compiled % | compiled GiB | device peak GiB | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in s.get("points", []):
        dev = p.get("device_peak_bytes")
        mark = "" if dev is None or p.get("device_peak_is_this_point") else "*"
        lines.append(
            f"| {p['config']} | {p['attention']} | {'on' if p['remat'] else 'off'} "
            f"| {p['batch_per_device']} | {_f(p.get('compile_s'), '.1f')} "
            f"| {_f(p.get('step_s'), '.4f')} | {_f(p.get('exams_per_s'), '.4g')} "
            f"| {_f(p.get('mfu'), '.1f', 100)} | {_f(p.get('mfu_compiled'), '.1f', 100)} "
            f"| {_f(p.get('memory_peak_bytes_per_device'), '.2f', 2**-30)} "
            f"| {_f(dev, '.2f', 2**-30)}{mark} | {p['status']} |"
        )
    return lines


def _loop_md(d: dict) -> list[str]:
    lines = [
        "",
        f"## {TITLES['loop']}",
        "",
        "| config | batch | workers | attention / remat | loop exams/s | step alone "
        "exams/s | ratio | pipeline alone exams/s | copy ms/batch | verdict |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in d.get("rows", []):
        if r["status"] != "ok":
            lines.append(
                f"| {r['config']} | {r.get('batch', '—')} | {r.get('workers', '—')} "
                f"| | | | | | | {r['status']} |"
            )
            continue
        pipe = (r.get("pipeline_alone") or {}).get("exams_per_s")
        copy = (r.get("host_to_device") or {}).get("s_per_batch")
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['workers']} | {r['attention']} / "
            f"{'on' if r['remat'] else 'off'} | {r['loop_exams_per_s']:.4g} "
            f"| {r['step_alone_exams_per_s']:.4g} | {r['ratio']:.2f} | {_f(pipe, '.4g')} "
            f"| {_f(copy, '.1f', 1e3)} | {_verdict(r['passed'])} |"
        )
    for r in d.get("rows", []):
        if r["status"] == "ok":
            lines += ["", f"{r['config']}, where the time goes: {'; '.join(r['where_time_goes'])}."]
    return lines


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    lines = [f"# whmae GPU check ({report['mode']} mode)", ""]
    if env:
        v = env["versions"]
        lines.append(
            f"{env['devices']} x {env['device_kind']} ({env['backend']}), "
            f"{env['cpu_cores']} CPU cores, jax {v.get('jax')}, flax {v.get('flax')}, "
            f"grain {v.get('grain')}; {env['date_utc']} UTC. "
            f"Command: `{report['command']}`."
        )
        if env.get("nvidia_smi"):
            lines.append(f"nvidia-smi: {env['nvidia_smi']}.")
        lines.append("")
    lines += ["## Summary", "", "| step | status | result | s / budget s |", "|---|---|---|---|"]
    sections = report["sections"]
    for name in SECTIONS:
        s = sections.get(name)
        if s is not None:
            lines.append(
                f"| {TITLES[name]} | {s['status']} "
                f"| {summary_cell(name, s.get('result'))} "
                f"| {_f(s.get('seconds'), '.0f')} / {s['budget_s']:.0f} |"
            )
    for name, part in (("correctness", _correctness_md), ("step", _step_md), ("loop", _loop_md)):
        result = (sections.get(name) or {}).get("result")
        if result:
            lines += part(result)
    return "\n".join(lines) + "\n"


class Report:
    """gpu_check.json + gpu_check.md in `out`, rewritten at every change."""

    def __init__(self, out: Path, plan: Plan, command: str, resume: bool):
        self.out = out
        self.lock = threading.Lock()
        path = out / "gpu_check.json"
        if resume and path.is_file():
            self.data = json.loads(path.read_text())
            self.data.setdefault("restarts", 0)
            self.data["restarts"] += 1
        else:
            self.data = {"mode": plan.mode, "command": command, "environment": None, "sections": {}}
        self.data["plan"] = dataclasses.asdict(plan)

    def write(self) -> None:
        with self.lock:
            self.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.data, indent=1, default=str)
            (self.out / "gpu_check.json").write_text(text)
            (self.out / "gpu_check.md").write_text(markdown(self.data))

    def result(self, name: str) -> dict | None:
        return (self.data["sections"].get(name) or {}).get("result")

    def section(self, name: str, plan: Plan, fn) -> None:
        """Run one section guarded; its record (status, seconds, result) is kept and written.
        A section found "running" (resume) died with its process: `fn` gets its partial
        result to go on from, or it is marked crashed."""
        old = self.data["sections"].get(name)
        if old is not None and old["status"] != "running":
            print(f"\n######## {TITLES[name]}: kept from before the restart ({old['status']})")
            return
        prior = old.get("result") if old else None
        seconds = plan.budgets[name]
        if name == "step" and plan.step_takes_leftover:
            later = sum(plan.budgets[s] for s in plan.sections[plan.sections.index(name) + 1 :])
            seconds = max(seconds, plan.deadline_at - time.time() - later)
        record = {"status": "running", "budget_s": seconds}
        self.data["sections"][name] = record
        print(f"\n######## {TITLES[name]} (budget {record['budget_s']:.0f} s)", flush=True)
        start = time.perf_counter()

        def save(partial: dict) -> None:
            record["result"] = partial
            self.write()

        try:
            if name in plan.fail:
                raise RuntimeError(f"failure injected on purpose in section {name!r}")
            if time.time() >= plan.deadline_at:
                record["status"] = SKIPPED_BUDGET + " (overall deadline)"
            elif old is not None and name not in ("step", "loop"):
                record.update(status=CRASHED, result=prior)
            else:
                self.write()
                if name != "step":
                    _maybe_crash(name)
                record["result"] = fn(Budget(record["budget_s"], plan.deadline_at), save, prior)
                record["status"] = "ok"
        except (Exception, SystemExit) as error:
            traceback.print_exc()
            record.update(status=_error_status(error), traceback=traceback.format_exc())
        record["seconds"] = time.perf_counter() - start + (old or {}).get("seconds", 0.0)
        gc.collect()
        self.write()


def _watchdog(report: Report, plan: Plan) -> None:
    """Past the deadline (+ grace for the point in flight): report what is done and exit."""

    def fire():
        for record in report.data["sections"].values():
            if record["status"] == "running":
                record["status"] = "killed: overall deadline passed"
        report.data["watchdog"] = "fired"
        report.write()
        print(f"\nwatchdog: the overall deadline passed; wrote {report.out}\n", flush=True)
        print(markdown(report.data), flush=True)
        os._exit(EXIT_WATCHDOG)

    timer = threading.Timer(max(1.0, plan.deadline_at - time.time() + WATCHDOG_GRACE_S), fire)
    timer.daemon = True
    timer.start()


def _prepare_jax(plan: Plan) -> None:
    """Before jax is imported: the CPU rehearsal's platform and compile flags."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if plan.mode == "gpu" and platforms and "cpu" not in platforms.split(","):
        os.environ["JAX_PLATFORMS"] = f"{platforms},cpu"  # the correctness reference
    if plan.mode == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # 2 devices unless set: the correctness run compares data parallel with 1 device.
        # Compile time dominates a rehearsal: the others halve and halve again the tiny
        # step's compile time.
        flags = os.environ.get("XLA_FLAGS", "")
        for flag in (
            "--xla_force_host_platform_device_count=2",
            "--xla_backend_optimization_level=0",
            "--xla_cpu_use_fusion_emitters=false",
        ):
            if flag.split("=")[0] not in flags:
                flags = f"{flags} {flag}".strip()
        os.environ["XLA_FLAGS"] = flags
    import jax

    if not getattr(jax.config, "jax_compilation_cache_dir", None):
        jax.config.update("jax_compilation_cache_dir", str(Path(plan.work) / "jax_cache"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for the JSON and table")
    parser.add_argument("--cpu", action="store_true", help="rehearsal on the CPU, tiny shapes")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--resume", action="store_true", help="go on from OUT's gpu_check.json")
    parser.add_argument("--only", help="comma-separated sections (default: all)")
    parser.add_argument("--fail", help=f"sections to fail on purpose (also ${FAIL_ENV})")
    parser.add_argument("--budget", action="append", help="SECTION=SECONDS (repeatable)")
    parser.add_argument("--deadline-s", type=float, help="overall limit from now (s)")
    parser.add_argument("--deadline-at", type=float, help="overall limit, Unix time")
    parser.add_argument("--configs", help="step-sweep configs (default paper,base)")
    parser.add_argument("--batches", help="per-device batch ladder, e.g. 8,32,128")
    parser.add_argument("--attentions", help="attention impls to sweep (default cudnn,xla)")
    parser.add_argument("--steps", type=int, help="timed steps per sweep point")
    parser.add_argument("--loop-configs", help="loop configs (default paper,base; '' none)")
    parser.add_argument("--loop-workers", type=int, help="Grain worker processes in the loop")
    parser.add_argument("--loop-exams", type=int, help="phantom exams written for the loop")
    parser.add_argument("--loop-steps", type=int, help="loop steps (default: from step time)")
    parser.add_argument("--loop-max-batch", type=int, help="largest per-device loop batch")
    parser.add_argument("--fp32-rtol", type=float)
    parser.add_argument("--bf16-rtol", type=float)
    parser.add_argument("--work", default="/tmp/whmae_gpu_check", help="dataset and run scratch")
    args = parser.parse_args(argv)
    plan = make_plan(args)
    print(describe_plan(plan), flush=True)
    if args.dry_run:
        return 0

    started = time.perf_counter()
    _prepare_jax(plan)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax

    if plan.mode == "gpu" and jax.default_backend() != "gpu":
        print(
            f"no GPU: jax's backend is {jax.default_backend()!r} ({jax.devices()}); "
            "run with --cpu for the rehearsal",
            file=sys.stderr,
        )
        return 2
    command = " ".join(["gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    report = Report(Path(args.out), plan, command, args.resume)
    global _RESUMED
    _RESUMED = bool(report.data.get("restarts"))
    report.data["environment"] = environment(plan.mode)
    report.write()
    print(json.dumps(report.data["environment"]), flush=True)
    _watchdog(report, plan)

    def peak():
        return (report.result("peak") or {}).get("flops_per_s")

    runners = {
        "correctness": lambda budget, save, prior: run_correctness(plan, budget, save),
        "peak": lambda budget, save, prior: run_peak(plan, budget, save),
        "step": lambda budget, save, prior: run_step(plan, budget, save, peak(), prior),
        "loop": lambda budget, save, prior: run_loop(
            plan, budget, save, report.result("step"), prior
        ),
    }
    for name in plan.sections:
        report.section(name, plan, runners[name])
    report.data["seconds"] = time.perf_counter() - started + report.data.get("seconds", 0.0)
    report.write()
    print(
        f"\nwrote {report.out / 'gpu_check.json'} and {report.out / 'gpu_check.md'} "
        f"in {report.data['seconds']:.0f} s\n"
    )
    print(markdown(report.data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
