"""Masked-reconstruction evaluation of one or more MAEs (e.g. all-view, SA-only, LA-only).

  python -m whmae.evaluate reconstruction --data DIR --out DIR \\
      --model all_planes=runs/mae --model sa_only=runs/mae_sa --model la_only=runs/mae_la

Each exam is masked as in pretraining (the model's mask ratio, or --mask-ratio; one
fixed seed, so reruns agree) and the decoder's output for every token is the
reconstruction (norm-pix models: de-normalised with each true patch's mean and
variance, as the MAE paper visualises them, and clipped to [0, 1]). Per exam and
acquired plane of the model's planes: MSE and PSNR (pixels in [0, 1]) and SSIM (per
frame, `whmae.evaluate.metrics.ssim`) on the whole reconstructed image; mse_masked
only over the pixels of masked tokens.

metrics.json (schema_version 1):
  task "reconstruction", split, data_dir, seed, models:
    {name: {"planes": [plane names the model sees], "mask_ratio": float, "num_exams": int,
            "plane_types": {"long_axis"|"short_axis": {metric: SUMMARY}},
            "per_plane":   {plane_name: {metric: SUMMARY}},
            "plots": [file]}}                (ground truth / masked input / reconstruction)
  metric in ("mse", "psnr", "ssim", "mse_masked"); SUMMARY {"mean", "sd", "n",
  "n_undefined", "n_infinite"} over (exam, plane) pairs; a plane type the model does not
  see is absent.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from whmae import layout
from whmae.data.pipeline import make_pipeline, num_examples
from whmae.evaluate import plots
from whmae.evaluate.metrics import mse, psnr, ssim, summary
from whmae.evaluate.phenotypes import parse_models
from whmae.evaluate.results import SCHEMA_VERSION, format_table, jsonable, write_metrics
from whmae.model.masking import restore_ids
from whmae.model.patches import patchify, unpatchify

__all__ = ["METRICS", "evaluate_reconstruction", "main", "reconstruct", "reconstruction_table"]

METRICS = ("mse", "psnr", "ssim", "mse_masked")
NORM_PIX_EPS = 1e-6


def make_reconstruct_fn(model, mask_ratio: float):
    """jitted (images uint8 [B, 9, T, H, W], plane_mask [B, 9], key) ->
    (target, reconstruction [B, S, T, H, W] in [0, 1], masked bool [B, S, T, H, W],
    available [B, S]) over the model's S planes."""
    c = model.config
    graphdef, state = nnx.split(model)

    @jax.jit
    def reconstruct(state, images, plane_mask, key):
        m = nnx.merge(graphdef, state)
        selected, available = m.select_planes(images, plane_mask)
        encoded = m.encode(images, plane_mask, key, mask_ratio=mask_ratio)
        pred = m.decode(encoded)  # [B, N, P]
        patches = patchify(selected, c.patch_size)
        if c.norm_pix_loss:
            mean = patches.mean(-1, keepdims=True)
            std = jax.numpy.sqrt(patches.var(-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
            pred = pred * std + mean
        masked = restore_ids(encoded["ids_shuffle"]) >= encoded["num_kept"][:, None]  # [B, N]
        masked = jax.numpy.broadcast_to(masked[..., None], pred.shape).astype(jax.numpy.float32)
        recon = jax.numpy.clip(unpatchify(pred, c.grid, c.patch_size), 0.0, 1.0)
        return selected, recon, unpatchify(masked, c.grid, c.patch_size) > 0.5, available

    return lambda images, plane_mask, key: jax.device_get(
        reconstruct(state, images, plane_mask, key)
    )


def reconstruct(model, data_dir, split: str = "test", *, batch_size: int = 8,
                mask_ratio: float | None = None, seed: int = 0, progress: bool = True):  # fmt: skip
    """Yield (eid [B], target, reconstruction, masked, available) batches (numpy; as
    `make_reconstruct_fn`), with a fixed key per batch."""
    ratio = model.config.mask_ratio if mask_ratio is None else float(mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
    fn = make_reconstruct_fn(model, ratio)
    key = jax.random.key(seed)
    bar = tqdm(total=num_examples(data_dir, split), desc="reconstruct", unit="exam",
               disable=not progress)  # fmt: skip
    batches = make_pipeline(data_dir, split, batch_size=batch_size,
                            fields=("eid", "images", "plane_mask"), shuffle=False, num_epochs=1,
                            drop_remainder=False, process_index=0, process_count=1)  # fmt: skip
    for i, batch in enumerate(batches):
        yield (batch["eid"].astype(str),
               *fn(batch["images"], batch["plane_mask"], jax.random.fold_in(key, i)))  # fmt: skip
        bar.update(len(batch["eid"]))
    bar.close()


def plane_scores(target, recon, masked) -> dict[str, float]:
    """MSE, PSNR, SSIM and masked-pixel MSE of one plane [T, H, W]."""
    return {
        "mse": mse(recon, target),
        "psnr": psnr(recon, target),
        "ssim": ssim(recon, target),
        "mse_masked": mse(recon[masked], target[masked]) if masked.any() else float("nan"),
    }


def default_plot_planes(planes: Sequence[int]) -> list[int]:
    """The 4ch (or first long-axis) plane and a mid short-axis slice, where the model has them."""
    long_axis = [p for p in planes if not layout.is_short_axis(p)]
    short_axis = [p for p in planes if layout.is_short_axis(p)]
    chosen = [layout.LA_4CH if layout.LA_4CH in long_axis else long_axis[0]] if long_axis else []
    return chosen + ([short_axis[len(short_axis) // 2]] if short_axis else [])


def evaluate_reconstruction(model, data_dir, split: str = "test", *, batch_size: int = 8,
                            mask_ratio: float | None = None, seed: int = 0,
                            plot_path=None, plot_planes: Sequence[int] | None = None,
                            plot_frames: Sequence[int] | None = None,
                            progress: bool = True) -> dict:  # fmt: skip
    """One model's entry of `models` (module docstring); draws the first exam's grid
    to `plot_path` when given (plot_planes: dataset plane indices; frames default ED
    and mid-cycle)."""
    planes = model.config.planes
    scores = {p: {m: [] for m in METRICS} for p in planes}
    num_exams = 0
    grid_rows = None
    for eids, target, recon, masked, available in reconstruct(
        model, data_dir, split, batch_size=batch_size, mask_ratio=mask_ratio, seed=seed,
        progress=progress,
    ):  # fmt: skip
        for b in range(len(eids)):
            for s, plane in enumerate(planes):
                if available[b, s]:
                    for m, v in plane_scores(target[b, s], recon[b, s], masked[b, s]).items():
                        scores[plane][m].append(v)
            if plot_path is not None and grid_rows is None:
                grid_rows = _grid_rows(eids[b], planes, target[b], recon[b], masked[b],
                                       available[b], plot_planes, plot_frames)  # fmt: skip
        num_exams += len(eids)
    entry = {
        "planes": [layout.PLANE_NAMES[p] for p in planes],
        "mask_ratio": model.config.mask_ratio if mask_ratio is None else float(mask_ratio),
        "num_exams": num_exams,
        "plane_types": {},
        "per_plane": {
            layout.PLANE_NAMES[p]: {m: summary(v) for m, v in scores[p].items()} for p in planes
        },  # fmt: skip
        "plots": [],
    }
    for plane_type, members in (("long_axis", layout.LONG_AXIS_PLANES),
                                ("short_axis", layout.SHORT_AXIS_PLANES)):  # fmt: skip
        chosen = [p for p in planes if p in members]
        if chosen:
            entry["plane_types"][plane_type] = {
                m: summary(sum((scores[p][m] for p in chosen), [])) for m in METRICS
            }
    if grid_rows:
        entry["plots"].append(
            plots.reconstruction_grid(plot_path, grid_rows[1], title=f"exam {grid_rows[0]}").name
        )
    return entry


def _grid_rows(eid, planes, target, recon, masked, available, plot_planes, plot_frames):
    chosen = default_plot_planes(planes) if plot_planes is None else list(plot_planes)
    frames = [0, target.shape[1] // 2] if plot_frames is None else list(plot_frames)
    rows = []
    for plane in chosen:
        if plane not in planes:
            raise ValueError(
                f"plot plane {layout.PLANE_NAMES[plane]} is not one of the "
                f"model's planes {[layout.PLANE_NAMES[p] for p in planes]}"
            )
        s = planes.index(plane)
        if not available[s]:
            continue
        for frame in frames:
            if not 0 <= frame < target.shape[1]:
                raise ValueError(f"plot frame {frame} outside 0..{target.shape[1] - 1}")
            shown = np.where(masked[s, frame], 0.0, target[s, frame])  # masked patches black
            rows.append((f"{layout.PLANE_NAMES[plane]} t={frame}", target[s, frame], shown,
                         recon[s, frame]))  # fmt: skip
    return (eid, rows) if rows else None


def reconstruction_table(metrics: Mapping, *, markdown: bool = False) -> str:
    """Rows of (model, plane type, n, mean MSE, PSNR, SSIM, masked MSE)."""
    metrics = jsonable(metrics)
    rows = []
    for name, entry in metrics["models"].items():
        for plane_type, s in entry["plane_types"].items():
            rows.append([name, plane_type, s["mse"]["n"],
                         *(s[m]["mean"] for m in METRICS)])  # fmt: skip
    header = ["model", "planes", "n", "MSE", "PSNR dB", "SSIM", "MSE masked"]
    return format_table(header, rows, digits=4, markdown=markdown)


def run(models: Mapping[str, str], data_dir, split: str, out_dir, *, batch_size: int = 8,
        mask_ratio: float | None = None, seed: int = 0, plot_planes=None, plot_frames=None,
        progress: bool = True) -> dict:  # fmt: skip
    """Evaluate every (name -> MAE checkpoint) and write metrics.json and the grids."""
    from whmae.model.io import load_model

    out = Path(out_dir)
    entries = {}
    for name, path in models.items():
        model, _ = load_model(path)
        entries[name] = evaluate_reconstruction(
            model, data_dir, split, batch_size=batch_size, mask_ratio=mask_ratio, seed=seed,
            plot_path=out / f"reconstruction_{name}.png", plot_planes=plot_planes,
            plot_frames=plot_frames, progress=progress,
        )  # fmt: skip
    metrics = {"task": "reconstruction", "schema_version": SCHEMA_VERSION, "split": split,
               "data_dir": str(data_dir), "seed": seed, "models": entries}  # fmt: skip
    write_metrics(out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from whmae.embed import parse_planes

    parser = argparse.ArgumentParser(prog="whmae-evaluate reconstruction",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT")
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, help="default: each model's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-planes", help="planes of the PNG grid, e.g. la_4ch,sa_2")
    parser.add_argument("--plot-frames", help="frames of the PNG grid, e.g. 0,25")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        metrics = run(
            parse_models(args.model), args.data, args.split, args.out,
            batch_size=args.batch_size, mask_ratio=args.mask_ratio, seed=args.seed,
            plot_planes=parse_planes(args.plot_planes) if args.plot_planes else None,
            plot_frames=[int(f) for f in args.plot_frames.split(",")] if args.plot_frames
            else None,
            progress=not args.no_progress,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"whmae-evaluate reconstruction: {e}", file=sys.stderr)
        return 2
    print(reconstruction_table(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
