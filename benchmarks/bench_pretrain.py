"""Pretraining step benchmark: FLOPs, compile time, step time, exams/s, MFU, memory.

  python benchmarks/bench_pretrain.py --configs tiny,paper --steps 3 --out results.json

For each config variant (configs/pretrain.py) and each compute dtype, the real sharded
train step is compiled on all local devices (mesh and rules from the config), run on a
synthetic uint8 batch, and timed. FLOPs come from the compiled program
(`cost_analysis`, per device, x devices) and are cross-checked against the model's
analytic count (3 x forward: backward ~ 2 x forward). MFU divides achieved FLOP/s by a
peak measured in the same run with a large matmul of the same dtype.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from whmae.model.mae import MAEConfig, MaskedAutoencoder, flops_per_exam
from whmae.train.mesh import logical_rules, make_mesh
from whmae.train.optim import make_optimizer
from whmae.train.step import (
    batch_shardings_for,
    global_batch,
    init_train_state,
    make_train_step,
    pretrain_loss,
)

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain.py")
FIELDS = ("images", "plane_mask")


def load_config(variant: str):
    spec = importlib.util.spec_from_file_location("pretrain_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


@functools.cache
def measured_peak(dtype: str, size: int) -> float:
    """FLOP/s of a [size, size] @ [size, size] matmul on all local devices: the best of
    10 runs (a peak is a best case; on a shared CPU the median drifts with the load).
    Random operands: constant ones toggle fewer bits and run faster on a GPU (an H200's
    8192^3 bf16 product: ~894 TFLOP/s on zeros, ~788 on random data), which would flatter
    the peak and understate MFU."""
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size * len(devices), size), np.float32).astype(dtype)
    a = jax.device_put(a, sharding)
    b = jnp.asarray(rng.standard_normal((size, size), np.float32).astype(dtype))
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))
    seconds = min(_timed(lambda: matmul(a, b), 10))
    return 2.0 * size**3 * len(devices) / seconds


def peak_size() -> int:
    return 8192 if jax.default_backend() != "cpu" else 2048


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost) or {}


def bench_one(
    variant: str,
    dtype: str,
    steps: int,
    batch_size: int | None,
    model_overrides: dict | None = None,
    warmup: int = 1,
    measure_peak: bool = True,
) -> dict:
    """Compile and time the train step of one config variant; returns one record.

    model_overrides: MAEConfig fields replacing the variant's (e.g. remat=True,
    attention_impl="cudnn", decoder_width=513); warmup: untimed steps after compiling;
    measure_peak False: no matmul peak (MFU fields NaN), e.g. to keep peak RSS the step's.
    """
    config = load_config(variant)
    config.model.dtype = dtype
    config.model.update(model_overrides or {})
    model_config = MAEConfig(**config.model.to_dict())
    batch_size = batch_size or int(config.data.batch_size)
    mesh = make_mesh(config.mesh)
    devices = mesh.devices.size
    if batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise SystemExit(f"--batch {batch_size} must divide over the {devices} devices' mesh")
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    rules = logical_rules(config.mesh.rules)

    start = time.perf_counter()
    graphdef, state, shardings = init_train_state(
        lambda rngs: MaskedAutoencoder(model_config, rngs=rngs), tx, mesh, rules, seed=0
    )
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start

    batch_shardings = batch_shardings_for(mesh, FIELDS)
    rng = np.random.default_rng(0)
    c = model_config
    host = {
        "images": rng.integers(
            0, 256, (batch_size, 9, c.frames, c.image_size, c.image_size), dtype=np.uint8
        ),
        "plane_mask": np.ones((batch_size, 9), bool),
    }
    batch = global_batch(host, mesh, batch_shardings)
    key = jax.random.key(0)
    step_fn = make_train_step(
        graphdef, pretrain_loss, tx, mesh, shardings, batch_shardings, schedule
    )

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    flops_per_device = float(_cost(compiled).get("flops", float("nan")))
    memory = compiled.memory_analysis()

    for _ in range(warmup):
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begin)
    step_s = statistics.median(times)

    compiled_flops = flops_per_device * devices
    analytic_flops = 3.0 * flops_per_exam(model_config) * batch_size
    peak = measured_peak(dtype, peak_size()) if measure_peak else float("nan")
    record = dict(
        config=variant,
        dtype=dtype,
        model_overrides=dict(model_overrides or {}),
        backend=jax.default_backend(),
        devices=devices,
        batch=batch_size,
        steps_timed=steps,
        init_s=init_s,
        compile_s=compile_s,
        step_s=step_s,
        step_s_all=times,
        exams_per_s=batch_size / step_s,
        flops_per_exam_compiled=compiled_flops / batch_size,
        flops_per_exam_analytic=analytic_flops / batch_size,
        compiled_over_analytic=compiled_flops / analytic_flops,
        peak_flops_measured=peak,
        mfu=compiled_flops / step_s / peak,
        mfu_analytic=analytic_flops / step_s / peak,
        loss=float(metrics["loss"]),
    )
    if memory is not None:
        record.update(
            memory_argument_bytes=int(memory.argument_size_in_bytes),
            memory_output_bytes=int(memory.output_size_in_bytes),
            memory_temp_bytes=int(memory.temp_size_in_bytes),
            memory_alias_bytes=int(memory.alias_size_in_bytes),
            memory_peak_bytes_per_device=int(
                memory.argument_size_in_bytes
                + memory.output_size_in_bytes
                + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes
            ),
        )
    return record


def print_table(records: list[dict]) -> None:
    header = (
        f"{'config':<7}{'dtype':<10}{'batch':>6}{'compile s':>10}{'step s':>9}{'exams/s':>9}"
        f"{'GFLOP/exam':>12}{'vs analytic':>12}{'peak GF/s':>11}{'MFU %':>7}{'mem GiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        mem = r.get("memory_peak_bytes_per_device", float("nan")) / 2**30
        print(
            f"{r['config']:<7}{r['dtype']:<10}{r['batch']:>6}{r['compile_s']:>10.1f}"
            f"{r['step_s']:>9.3f}{r['exams_per_s']:>9.2f}"
            f"{r['flops_per_exam_compiled'] / 1e9:>12.4g}{r['compiled_over_analytic']:>12.3f}"
            f"{r['peak_flops_measured'] / 1e9:>11.1f}{100 * r['mfu']:>7.1f}{mem:>9.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,paper", help="comma-separated variants")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: config)")
    parser.add_argument("--out", default=None, help="JSON file for the records")
    args = parser.parse_args(argv)
    # Peaks first, before the models fill memory and caches.
    for dtype in args.dtypes.split(","):
        print(f"peak {dtype}: {measured_peak(dtype, peak_size()) / 1e9:.1f} GFLOP/s")
    records = []
    for variant in args.configs.split(","):
        for dtype in args.dtypes.split(","):
            print(f"== {variant} {dtype} on {jax.device_count()} {jax.default_backend()} device(s)")
            records.append(bench_one(variant, dtype, args.steps, args.batch))
            print(json.dumps({k: v for k, v in records[-1].items() if k != "step_s_all"}))
    print_table(records)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
