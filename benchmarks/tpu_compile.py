"""Does it fit on a TPU pod? The real train step compiled by the TPU compiler, on a CPU host.

    pip install -e ".[tpu-compile]"      # libtpu matching the jax pin
    python benchmarks/tpu_compile.py --out results/ [--quick]
        [--topologies v5e-256,v5p-128,v6e-256] [--configs paper,base,base-x4]
        [--layouts dp,fsdp,fsdp_tp] [--max-batch 256]

`jax.experimental.topologies.get_topology_desc` gives compile-only TPU devices for a
named slice (no TPU attached); the pretraining step of `whmae.train.step.make_train_step`
(the training loop's function, shardings and donation; state from `abstract_state`, so no
parameter is ever allocated) is lowered from abstract arguments and compiled for them.

Reported per chip: the compiler's memory analysis (arguments, outputs, temporaries,
aliased = donated state reused for the outputs, total = arguments + outputs + temporaries
- aliased) against the chip's HBM; parameter and optimizer bytes from the shard shapes;
fit (total <= 90 % of HBM); the largest per-replica batch that fits (doubling, then
bisection, up to --max-batch; "per replica" = per data x fsdp shard, i.e. per chip unless
the layout has a tensor axis); compiled FLOPs per chip (`cost_analysis`) against the
analytic count (`whmae.model.mae.flops_per_exam`, x 3 for forward + backward); result
bytes of the collectives in the compiled HLO (a loop body counted once); compile time;
MXU padding waste (`mxu_padding`: the share of matmul FLOPs spent on zero padding when
every feature dim (width, head dim, MLP, patch) is rounded up to a multiple of 128, the
MXU tile; computed from the config, not the compiler).
Results: OUT/tpu_compile.json and OUT/tpu_compile.md, written after every row.
`--padding` prints the MXU padding table of --configs and exits (no libtpu needed).

Environment: JAX_PLATFORMS=cpu keeps the CPU as the default backend (libtpu is only
used as a compiler); ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets several processes load libtpu
at once (otherwise the first one holds /tmp/libtpu_lockfile and the others abort).
"""

from __future__ import annotations

import os
import sys

# Before JAX starts: the host backend stays CPU; TPU devices are compile-only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_pretrain import load_config  # noqa: E402

from whmae.model.mae import MAEConfig, MaskedAutoencoder, flops_per_exam  # noqa: E402
from whmae.train.mesh import logical_rules, make_mesh, replicated  # noqa: E402
from whmae.train.optim import make_optimizer  # noqa: E402
from whmae.train.step import (  # noqa: E402
    abstract_state,
    batch_shardings_for,
    make_train_step,
    pretrain_loss,
)

GIB = 2**30
HEADROOM = 0.9
MXU = 128  # systolic array side of TPU v5e/v5p (v6e: 256); matmul dims pad to its multiples
FIELDS = ("images", "plane_mask")
# name: (topology name for libtpu, HBM bytes per chip). v5p-128 is 64 chips (128 cores).
TOPOLOGIES = {
    "v5e-4": ("v5e:2x2", 16 * GIB),
    "v5e-256": ("v5e:16x16", 16 * GIB),
    "v5p-128": ("v5p:4x4x4", 95 * GIB),
    "v6e-256": ("v6e:16x16", 32 * GIB),
}
# name: (config variant, model overrides).
CONFIGS = {
    "paper": ("paper", {}),
    # base: widths 1024 / 512, head dims 128 / 64 (posembed view_sincos, no flag column).
    "base": ("base", {}),
    # ~3.4x base's parameters: 24 encoder blocks instead of 6 (a ViT-L encoder); wider
    # widths with 128-dims heads and head counts divisible by 8 would jump to 2048.
    "base-x4": ("base", {"depth": 24}),
    "tiny": ("tiny", {}),
    # The CI test's model: tiny's token grid with most parameters in the MLP dims, which
    # FSDP can split (widths 1 + 4k cannot be), and matmuls that dwarf the elementwise
    # work (tanh GELU), so the compiled FLOPs can be held to the analytic count.
    "tiny-wide": (
        "tiny",
        dict(
            width=257,
            num_heads=1,
            mlp_dim=16384,
            decoder_width=257,
            decoder_num_heads=1,
            decoder_mlp_dim=16384,
            gelu_approximate=True,
        ),
    ),
    # tiny-wide with matrix-unit shapes (view_sincos): widths 256, head dim 128.
    "tiny-base": (
        "tiny",
        dict(
            posembed="view_sincos",
            width=256,
            num_heads=2,
            mlp_dim=16384,
            decoder_width=256,
            decoder_num_heads=2,
            decoder_mlp_dim=16384,
            gelu_approximate=True,
        ),
    ),
}
LAYOUTS = {
    "dp": (dict(data=-1, fsdp=1, tensor=1), "dp"),
    "fsdp": (dict(data=1, fsdp=-1, tensor=1), "fsdp"),
    "fsdp_tp": (dict(data=1, fsdp=-1, tensor=4), "fsdp_tp"),
}
_COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)


def tpu_devices(name: str) -> list:
    """Compile-only devices of a TPU slice (TOPOLOGIES key or a libtpu name like v5e:2x2)."""
    from jax.experimental import topologies

    topology_name = TOPOLOGIES[name][0] if name in TOPOLOGIES else name
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices)


def _bytes_per_chip(tree) -> int:
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in ("token", "tuple"):
            continue
        try:
            itemsize = np.dtype(dtype.replace("bf16", "bfloat16")).itemsize
        except TypeError:
            itemsize = {"pred": 1, "bf16": 2, "s4": 1, "u4": 1}.get(dtype, 4)
        total += math.prod(int(d) for d in dims.split(",") if d) * itemsize
    return total


def collective_bytes(hlo: str) -> dict[str, int]:
    """Result bytes per collective kind in compiled HLO text (async pairs counted at
    their `-done`, a while-loop body once)."""
    out = dict.fromkeys(_COLLECTIVES, 0)
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.+?)\s+([a-z\-]+)\(", line)
        if not match:
            continue
        shape, op = match.groups()
        kind = op.removesuffix("-done")
        if kind in out and not op.endswith("-start"):
            out[kind] += _shape_bytes(shape)
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def mxu_padding(c: MAEConfig, multiple: int = MXU) -> dict:
    """Feature dims of the model's matmuls, each rounded up to `multiple`, and `waste`:
    1 - analytic FLOPs / FLOPs of the padded matmuls (`flops_per_exam`'s count with
    every width, head dim, MLP dim and the patch dim padded; sequence lengths are left
    as they are, the same for every config of a grid)."""
    dims = dict(
        width=c.width,
        head_dim=c.width // c.num_heads,
        mlp_dim=c.mlp_dim,
        decoder_width=c.decoder_width,
        decoder_head_dim=c.decoder_width // c.decoder_num_heads,
        decoder_mlp_dim=c.decoder_mlp_dim,
        patch_dim=c.patch_dim,
    )

    def flops(r) -> float:
        d, hd, m, dd, dhd, dm, p = (r(v) for v in dims.values())
        h, dh = c.num_heads, c.decoder_num_heads

        def block(length, width, heads, head_dim, mlp):
            inner = heads * head_dim
            dense = 2 * length * (width * 3 * inner + inner * width + 2 * width * mlp)
            return dense + 2 * 2 * length * length * inner

        n, k = c.num_tokens, c.num_kept
        encoder = 2 * k * p * d + c.depth * block(1 + k, d, h, hd, m)
        decoder = (
            2 * (1 + k) * d * dd + c.decoder_depth * block(1 + n, dd, dh, dhd, dm) + 2 * n * dd * p
        )
        return float(encoder + decoder)

    actual = flops(lambda v: v)
    assert math.isclose(actual, flops_per_exam(c), rel_tol=1e-9), (actual, flops_per_exam(c))
    padded = flops(lambda v: _round_up(v, multiple))
    return dict(
        multiple=multiple,
        dims={k: [v, _round_up(v, multiple)] for k, v in dims.items()},
        waste=1.0 - actual / padded,
    )


def padding_markdown(config_names: list[str]) -> str:
    lines = [
        f"MXU padding (feature dims rounded up to multiples of {MXU}; waste = share of the "
        "padded matmul FLOPs that is zero padding):",
        "",
        "| config | posembed | width | head dim | MLP | decoder width | decoder head dim "
        "| decoder MLP | patch | waste % |",
        "|---|---|---|---|---|---|---|---|---|---:|",
    ]
    for name in config_names:
        c = model_config_of(name)
        pad = mxu_padding(c)
        cells = [f"{v}" if v == r else f"{v} -> {r}" for v, r in pad["dims"].values()]
        lines.append(
            f"| {name} | {c.posembed} | " + " | ".join(cells) + f" | {100 * pad['waste']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def model_config_of(config_name: str) -> MAEConfig:
    variant, overrides = CONFIGS[config_name]
    config = load_config(variant)
    config.model.update(overrides)
    return MAEConfig(**config.model.to_dict())


def compile_step(
    config_name: str, devices: list, layout: str, per_replica_batch: int, hlo: bool = False
) -> dict:
    """Compile the pretraining train step for `devices`; per-chip measurements."""
    variant, overrides = CONFIGS[config_name]
    config = load_config(variant)
    config.model.update(overrides)
    mesh_sizes, rules = LAYOUTS[layout]
    config.mesh.update(mesh_sizes)
    config.mesh.rules = rules
    model_config = MAEConfig(**config.model.to_dict())
    mesh = make_mesh(config.mesh, devices=devices)
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    graphdef, state, shardings = abstract_state(
        lambda rngs: MaskedAutoencoder(model_config, rngs=rngs),
        tx,
        mesh,
        logical_rules(config.mesh.rules),
        int(config.train.seed),
    )
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = per_replica_batch * replicas
    batch_shardings = batch_shardings_for(mesh, FIELDS)
    c = model_config
    shapes = {
        "images": ((global_batch, 9, c.frames, c.image_size, c.image_size), np.uint8),
        "plane_mask": ((global_batch, 9), np.bool_),
    }
    batch = {
        k: jax.ShapeDtypeStruct(s, d, sharding=batch_shardings[k]) for k, (s, d) in shapes.items()
    }
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
    step = make_train_step(graphdef, pretrain_loss, tx, mesh, shardings, batch_shardings, schedule)
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    chips = len(devices)
    analytic = 3.0 * flops_per_exam(model_config) * global_batch / chips
    row = dict(
        config=config_name,
        layout=layout,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        chips=chips,
        device_kind=devices[0].device_kind,
        per_replica_batch=per_replica_batch,
        global_batch=global_batch,
        dtype=c.dtype,
        parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        params_bytes=_bytes_per_chip(state.params),
        optimizer_bytes=_bytes_per_chip(state.opt_state),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        total_bytes=int(total),
        flops_per_chip=float(cost.get("flops", float("nan"))),
        analytic_flops_per_chip=analytic,
        compile_s=round(compile_s, 2),
        mxu_pad_waste=mxu_padding(c)["waste"],
    )
    row["compiled_over_analytic"] = row["flops_per_chip"] / analytic
    if hlo:
        row["collective_bytes"] = collective_bytes(compiled.as_text())
    return row


def _fits(config_name: str, devices: list, layout: str, hbm: int, batch: int) -> bool:
    row = compile_step(config_name, devices, layout, batch)
    return row["total_bytes"] <= HEADROOM * hbm


def largest_batch(fits, first: int, first_fits: bool, limit: int) -> tuple[int, int]:
    """(largest b <= limit with fits(b), compiles spent); fits is monotone in b."""
    if not first_fits:
        return 0, 0
    good, bad, spent = first, None, 0
    while bad is None and good < limit:
        b = min(2 * good, limit)
        spent += 1
        if fits(b):
            good = b
        else:
            bad = b
    while bad is not None and bad - good > 1:
        b = (good + bad) // 2
        spent += 1
        if fits(b):
            good = b
        else:
            bad = b
    return good, spent


def markdown(result: dict) -> str:
    lines = [
        "# TPU compile: the pretraining step, per chip (real TPU compiler, AOT from a CPU host)",
        "",
        f"libtpu {result['libtpu']}, jax {result['jax']}. Bytes per chip from the compiled "
        "step's memory analysis; total = arguments + outputs + temporaries - aliased "
        f"(donated state); fits: total <= {int(HEADROOM * 100)} % of HBM. Batch: "
        f"{result['per_replica_batch']} per data x fsdp replica; max batch: the largest "
        f"per-replica batch that fits (searched up to {result['max_batch']}). FLOPs: "
        "compiled cost analysis per chip vs 3 x the analytic forward count.",
        "",
        "| topology | config | params (M) | layout | mesh (d,f,t) | params+opt GiB | args GiB "
        "| out GiB | temp GiB | alias GiB | total GiB | HBM GiB | fits | max batch "
        "| TFLOP/chip | vs analytic | collectives GiB | compile s | MXU pad % |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['topology']} | {r['config']} | | {r['layout']} | {r['error']} |")
            continue
        m = r["mesh"]
        coll = sum(r.get("collective_bytes", {}).values())
        lines.append(
            f"| {r['topology']} | {r['config']} | {r['parameters'] / 1e6:.0f} | {r['layout']} "
            f"| {m['data']},{m['fsdp']},{m['tensor']} "
            f"| {(r['params_bytes'] + r['optimizer_bytes']) / GIB:.3f} "
            f"| {r['argument_bytes'] / GIB:.2f} | {r['output_bytes'] / GIB:.2f} "
            f"| {r['temp_bytes'] / GIB:.2f} | {r['alias_bytes'] / GIB:.2f} "
            f"| {r['total_bytes'] / GIB:.2f} | {r['hbm_bytes'] / GIB:.0f} "
            f"| {'yes' if r['fits'] else 'no'} | {r.get('max_batch', '')} "
            f"| {r['flops_per_chip'] / 1e12:.3f} | {r['compiled_over_analytic']:.3f} "
            f"| {coll / GIB:.2f} | {r['compile_s']:.1f} | {100 * r['mxu_pad_waste']:.1f} |"
        )
    configs = list(dict.fromkeys(r["config"] for r in result["rows"]))
    return "\n".join(lines) + "\n\n" + padding_markdown(configs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for tpu_compile.json/.md")
    parser.add_argument("--topologies", default="v5e-256,v5p-128,v6e-256")
    parser.add_argument("--configs", default="paper,base,base-x4")
    parser.add_argument("--layouts", default="dp,fsdp,fsdp_tp")
    parser.add_argument("--batch", type=int, default=1, help="per-replica batch of each row")
    parser.add_argument("--max-batch", type=int, default=256, help="bound of the search")
    parser.add_argument(
        "--quick", action="store_true", help="v5e-256, paper and base, dp and fsdp, no search"
    )
    parser.add_argument("--no-search", action="store_true", help="skip the max-batch search")
    parser.add_argument(
        "--padding", action="store_true", help="print the MXU padding table of --configs, exit"
    )
    args = parser.parse_args(argv)
    if args.padding:
        print(padding_markdown(args.configs.split(",")))
        return {"padding": {n: mxu_padding(model_config_of(n)) for n in args.configs.split(",")}}
    if args.quick:
        args.topologies, args.configs, args.layouts = "v5e-256", "paper,base", "dp,fsdp"
        args.no_search = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    result = {
        "jax": jax.__version__,
        "libtpu": version("libtpu"),
        "host_backend": jax.default_backend(),
        "per_replica_batch": args.batch,
        "max_batch": None if args.no_search else args.max_batch,
        "headroom": HEADROOM,
        "rows": [],
    }
    for topology in args.topologies.split(","):
        devices = tpu_devices(topology)
        hbm = TOPOLOGIES[topology][1]
        for config_name in args.configs.split(","):
            for layout in args.layouts.split(","):
                print(f"== {topology}: {config_name}, {layout}", flush=True)
                try:
                    row = compile_step(config_name, devices, layout, args.batch, hlo=True)
                except Exception as error:  # e.g. a mesh the topology cannot form
                    row = dict(config=config_name, layout=layout, error=str(error)[:300])
                    print(f"failed: {row['error']}", flush=True)
                else:
                    row.update(hbm_bytes=hbm, fits=row["total_bytes"] <= HEADROOM * hbm)
                    if not args.no_search:
                        fits = functools.partial(_fits, config_name, devices, layout, hbm)
                        row["max_batch"], row["search_compiles"] = largest_batch(
                            fits, args.batch, row["fits"], args.max_batch
                        )
                row["topology"] = topology
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
                (out / "tpu_compile.json").write_text(json.dumps(result, indent=1))
                (out / "tpu_compile.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
