"""Does a model fit? Per-device memory of the compiled train step for a named target.

    python benchmarks/memory_fit.py --out DIR [--per-device-batch 1]

For each target (8x H100 80 GB; a v5e-256 slice, 16 GiB HBM per chip), model (the
`paper` config; a ~4x larger one) and layout (`dp`: parameters replicated, batch split;
`fsdp`: parameters and optimizer state split over all devices where a dim divides), the
real sharded train step is compiled ahead of time for N devices from abstract arguments
(`jax.jit(step).lower(ShapeDtypeStructs with shardings).compile().memory_analysis()`),
on N emulated CPU devices.

What is measured and what is calculated:
  measured  the SPMD partitioning for N devices and the per-device buffer sizes of the
            compiled step: arguments (parameters + optimizer state + batch), outputs,
            temporaries (activations, gradients, workspace), aliasing (donated state);
            parameter / optimizer bytes per device from the shard shapes.
  caveat    the program is compiled by the CPU backend: a GPU or TPU compiler fuses
            differently (cuDNN / Pallas attention never holds the [B, heads, N, N] scores
            that XLA:CPU keeps), so temporaries are an estimate, usually high. For TPU
            slices use benchmarks/tpu_compile.py (the real TPU compiler via libtpu, the
            `tpu-compile` extra); whether libtpu loads here is recorded in the JSON.
  fit       per-device total = arguments + outputs + temporaries - aliased, against 90 %
            of the device memory (runtime and fragmentation reserve).
Results: DIR/memory_fit.json and DIR/memory_fit.md.
"""

from __future__ import annotations

import os
import sys

TARGETS = {  # name: (devices, bytes per device)
    "8x H100 (80 GB)": (8, 80 * 2**30),
    "v5e-256 (16 GiB HBM per chip)": (256, 16 * 2**30),
}
HEADROOM = 0.9
# Before JAX starts: enough emulated CPU devices for the largest target.
if "jax" not in sys.modules:
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        _devices = max(n for n, _ in TARGETS.values())
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_pretrain import load_config  # noqa: E402

from whmae.model.mae import MAEConfig, MaskedAutoencoder  # noqa: E402
from whmae.train.mesh import batch_sharding, logical_rules, make_mesh, replicated  # noqa: E402
from whmae.train.optim import make_optimizer  # noqa: E402
from whmae.train.step import abstract_state, make_train_step, pretrain_loss  # noqa: E402

# ~4x the paper's parameters: width 2049 = 1 + 8 x 256 (positional embedding), 3 heads
# (the only small divisor of 2049), MLP 8192 = 4 x 2048 so FSDP can split it 256 ways.
LARGE = dict(width=2049, num_heads=3, mlp_dim=8192, decoder_width=2049,
             decoder_num_heads=3, decoder_mlp_dim=8192)  # fmt: skip
MODELS = {"paper": {}, "paper x4 (D 2049, MLP 8192)": LARGE}
LAYOUTS = {"dp": dict(data=-1, fsdp=1, tensor=1), "fsdp": dict(data=1, fsdp=-1, tensor=1)}


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    leaves = jax.tree.leaves(tree)
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves
    )


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def fit_one(model_name: str, layout: str, devices: int, per_device_batch: int) -> dict:
    """Compile the paper-variant train step for `devices` devices; per-device bytes."""
    config = load_config("paper")
    config.model.update(MODELS[model_name])
    config.mesh.update(LAYOUTS[layout])
    config.mesh.rules = layout
    model_config = MAEConfig(**config.model.to_dict())
    mesh = make_mesh(config.mesh, devices=jax.devices()[:devices])
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    graphdef, state, shardings = abstract_state(
        lambda rngs: MaskedAutoencoder(model_config, rngs=rngs),
        tx,
        mesh,
        logical_rules(config.mesh.rules),
    )
    c = model_config
    global_batch = per_device_batch * devices
    batch_shardings = {k: batch_sharding(mesh) for k in ("images", "plane_mask")}
    batch = {
        "images": jax.ShapeDtypeStruct(
            (global_batch, 9, c.frames, c.image_size, c.image_size),
            np.uint8,
            sharding=batch_shardings["images"],
        ),
        "plane_mask": jax.ShapeDtypeStruct(
            (global_batch, 9), np.bool_, sharding=batch_shardings["plane_mask"]
        ),
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
    step = make_train_step(graphdef, pretrain_loss, tx, mesh, shardings, batch_shardings, schedule)
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return dict(
        model=model_name,
        layout=layout,
        devices=devices,
        per_device_batch=per_device_batch,
        global_batch=global_batch,
        dtype=c.dtype,
        optimizer=str(config.optim.name),
        parameters=_count(state.params),
        params_bytes_per_device=_bytes_per_device(state.params),
        optimizer_bytes_per_device=_bytes_per_device(state.opt_state),
        batch_bytes_per_device=_bytes_per_device(batch),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        total_bytes_per_device=int(total),
        compile_s=round(compile_s, 1),
    )


def try_tpu_topology(name: str = "v5e:16x16") -> str:
    """Ahead-of-time compilation for a real TPU topology needs libtpu: try it, say what
    happened."""
    try:
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
        return f"available: {len(topology.devices)} devices"
    except Exception as error:  # no libtpu here: the reason is the result
        return f"unavailable ({type(error).__name__}: {str(error).splitlines()[0][:200]})"


def markdown(result: dict) -> str:
    gib = 2**30
    lines = [
        "# Memory fit of the pretraining step (per device)",
        "",
        f"Per-device batch {result['per_device_batch']}; float32 parameters, Adam (2 moments). "
        "Measured: the compiled step's memory analysis for N emulated CPU devices (real SPMD "
        "partitioning; temporaries from the CPU compiler, an estimate for GPU/TPU). Fit: "
        f"total <= {int(HEADROOM * 100)} % of device memory. TPU topology AOT: "
        f"{result['tpu_topology_aot']}.",
        "",
        "| target | model | params (M) | layout | params GiB | optimizer GiB | arguments GiB "
        "| temp GiB | total GiB | device GiB | fits |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['target']} | {r['model']} | {r['parameters'] / 1e6:.0f} | {r['layout']} "
            f"| {r['params_bytes_per_device'] / gib:.3f} "
            f"| {r['optimizer_bytes_per_device'] / gib:.3f} | {r['argument_bytes'] / gib:.2f} "
            f"| {r['temp_bytes'] / gib:.2f} | {r['total_bytes_per_device'] / gib:.2f} "
            f"| {r['device_bytes'] / gib:.0f} | {'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for memory_fit.json/.md")
    parser.add_argument("--per-device-batch", type=int, default=1)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated names")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "per_device_batch": args.per_device_batch,
        "headroom": HEADROOM,
        "backend_compiled_for": f"{jax.default_backend()} (emulated devices)",
        "tpu_topology_aot": try_tpu_topology(),
        "rows": [],
    }
    for target in args.targets.split(","):
        devices, capacity = TARGETS[target]
        if devices > jax.device_count():
            raise SystemExit(f"{target} needs {devices} devices; JAX sees {jax.device_count()}")
        for model_name in MODELS:
            for layout in LAYOUTS:
                print(f"== {target}: {model_name}, {layout}", flush=True)
                row = fit_one(model_name, layout, devices, args.per_device_batch)
                row.update(
                    target=target,
                    device_bytes=capacity,
                    fits=row["total_bytes_per_device"] <= HEADROOM * capacity,
                )
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
                # Written after every row: each compile takes minutes on a small CPU.
                (out / "memory_fit.json").write_text(json.dumps(result, indent=1))
                (out / "memory_fit.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
