"""whmae's pretraining train step against the authors' PyTorch model, side by side.

    python benchmarks/bench_vs_torch.py --configs tiny,small --rounds 3 --steps 20 \\
        --out /tmp/vs_torch            # needs the torch extra: pip install -e ".[torch]"

The same MAE on both sides: `tests/torch_reference.py` (faithful to the authors' model:
timm blocks, mlp ratio 4, sigmoid head, MSE over every patch as the reference's
`loss_on="all"`) and whmae's real jitted train step (`benchmarks/bench_pretrain.bench_one`:
sharded over the local devices, AdamW with clipping as configs/pretrain.py sets it), with
the same widths, depths, heads, mlp width (4 x width), patch size, mask ratio 0.7, batch,
float32, and the same thread count (torch.set_num_threads = cores; XLA:CPU uses every
core). AdamW with gradient clipping at 1.0 on the torch side too.

Every (config, side) runs in its own process, so each side's peak RSS
(`ru_maxrss`) is its own; the sides alternate within each round (whmae, torch, whmae,
...), so a load change on a shared machine hits both. Per process: `--warmup` untimed
steps after compiling, then `--steps` timed; the figure is the median over the rounds of
each process's median s/step. Output: DIR/vs_torch.json and DIR/vs_torch.md, the ratio
whmae / PyTorch (< 1: whmae faster) beside each side's figures.

whmae runs once per `--attention` value (default both: "xla", jax.nn.dot_product_attention,
and "chunked", whmae.model.chunked_attention), each its own side.

Configs (9 planes each):
  tiny   10 x 32 x 32, patch 5 x 8 x 8, width 33, 3 heads, 2 + 1 blocks (the demo's MAE)
  small  50 x 64 x 64, patch 25 x 8 x 8, width 129, 3 heads, 4 + 2 blocks
  paper  50 x 128 x 128, patch 25 x 8 x 8, width 1025, 5 heads, 6 + 2 blocks, decoder
         1025, 5 heads (SPEC); few steps: ~25 s/step on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "tiny": dict(image_size=32, frames=10, patch_size=(5, 8, 8), width=33, depth=2,
                 num_heads=3, decoder_width=33, decoder_depth=1, decoder_num_heads=3),
    "small": dict(image_size=64, frames=50, patch_size=(25, 8, 8), width=129, depth=4,
                  num_heads=3, decoder_width=129, decoder_depth=2, decoder_num_heads=3),
    "paper": dict(image_size=128, frames=50, patch_size=(25, 8, 8), width=1025, depth=6,
                  num_heads=5, decoder_width=1025, decoder_depth=2, decoder_num_heads=5),
}  # fmt: skip
MASK_RATIO = 0.7
CLIP_NORM = 1.0


def model_fields(name: str) -> dict:
    """MAEConfig fields of a benchmark config: the torch reference's mlp ratio 4, the
    reference's loss over every patch, float32, no remat."""
    fields = dict(CONFIGS[name])
    fields.update(mlp_dim=4 * fields["width"], decoder_mlp_dim=4 * fields["decoder_width"],
                  mask_ratio=MASK_RATIO, loss_on="all", norm_pix_loss=False,
                  dtype="float32", remat=False, attention_impl="xla")  # fmt: skip
    return fields


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_whmae(name: str, batch: int, steps: int, warmup: int, attention: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_pretrain import bench_one

    fields = dict(model_fields(name), attention_impl=attention)
    record = bench_one("tiny", "float32", steps, batch, fields, warmup=warmup,
                       measure_peak=False)  # fmt: skip
    return dict(step_s=record["step_s"], compile_s=record["compile_s"], loss=record["loss"])


def run_torch(name: str, batch: int, steps: int, warmup: int, attention: str) -> dict:
    del attention  # the reference's own attention
    import math

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from torch_reference import ReconMAE

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    f = model_fields(name)
    shape = (9, f["frames"], f["image_size"], f["image_size"])
    model = ReconMAE(shape, f["patch_size"], f["width"], f["depth"], f["num_heads"],
                     f["decoder_width"], f["decoder_depth"], f["decoder_num_heads"],
                     mask_ratio=MASK_RATIO)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    pt, ph, pw = f["patch_size"]
    grid = (9, shape[1] // pt, shape[2] // ph, shape[3] // pw)
    n = math.prod(grid)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, generator=generator)

    def patchify(x):  # [B, S, T, H, W] -> [B, N, P] in (S, t, h, w) token order
        b = x.shape[0]
        x = x.reshape(b, grid[0], grid[1], pt, grid[2], ph, grid[3], pw)
        return x.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, n, pt * ph * pw)

    def step():
        imgs = images.float() / 255.0
        ids_shuffle = torch.argsort(torch.rand(batch, n), dim=1)
        _, pred = model(imgs, ids_shuffle)
        loss = torch.mean((pred - patchify(imgs)) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()
        return float(loss)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return dict(step_s=statistics.median(times), compile_s=0.0, loss=loss)


def child(args) -> None:
    side, _, attention = args.side.partition(":")
    run = run_whmae if side == "whmae" else run_torch
    result = run(args.config, args.batch, args.steps, args.warmup, attention or "xla")
    result.update(side=args.side, config=args.config, peak_rss_gib=peak_rss_gib())
    print("RESULT " + json.dumps(result), flush=True)


def markdown(rows: list[dict]) -> str:
    lines = ["| config | whmae attention | PyTorch s/step | whmae s/step | whmae / PyTorch "
             "| peak RSS PyTorch / whmae (GiB) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['config']} | {r['attention']} | {r['torch_s']:.4g} | "
                     f"{r['whmae_s']:.4g} | **{r['ratio']:.2f}x** | {r['torch_rss_gib']:.2f} / "
                     f"{r['whmae_rss_gib']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,small", help=f"of {sorted(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process")
    parser.add_argument("--paper-steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="directory for vs_torch.json / .md")
    parser.add_argument(
        "--attention",
        default="xla,chunked",
        help="whmae attention_impl values, each timed as its own side",
    )
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        child(args)
        return 0
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    results: dict = {}
    for round_ in range(args.rounds):
        for config in configs:
            steps = args.paper_steps if config == "paper" else args.steps
            warmup = 1 if config == "paper" else args.warmup
            sides = [f"whmae:{a}" for a in args.attention.split(",") if a] + ["torch"]
            sides = sides if round_ % 2 == 0 else sides[::-1]
            for side in sides:
                cmd = [sys.executable, __file__, "--side", side, "--config", config,
                       "--steps", str(steps), "--warmup", str(warmup),
                       "--batch", str(args.batch)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
                    raise SystemExit(f"{side} {config} failed ({out.returncode}): {tail}")
                result = json.loads(line[0][len("RESULT ") :])
                results.setdefault(config, {}).setdefault(side, []).append(result)
                print(f"round {round_ + 1}/{args.rounds} {config:6s} {side:6s} "
                      f"{result['step_s']:.4f} s/step, peak RSS {result['peak_rss_gib']:.2f} "
                      f"GiB", file=sys.stderr, flush=True)  # fmt: skip
    rows = []
    for config in configs:
        med = {s: statistics.median(r["step_s"] for r in v) for s, v in results[config].items()}
        rss = {s: max(r["peak_rss_gib"] for r in v) for s, v in results[config].items()}
        for side in (s for s in med if s != "torch"):
            rows.append(dict(config=config, attention=side.partition(":")[2],
                             whmae_s=med[side], torch_s=med["torch"],
                             ratio=med[side] / med["torch"], whmae_rss_gib=rss[side],
                             torch_rss_gib=rss["torch"], rounds=results[config][side],
                             torch_rounds=results[config]["torch"]))  # fmt: skip
    import platform

    report = dict(machine=platform.processor() or platform.machine(), cores=os.cpu_count(),
                  date=time.strftime("%Y-%m-%d"), batch=args.batch, rows=rows)  # fmt: skip
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vs_torch.json").write_text(json.dumps(report, indent=2))
        (out / "vs_torch.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
