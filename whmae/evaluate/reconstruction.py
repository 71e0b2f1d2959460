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

Figures (`reconstruction_<model>.png` per model, `reconstruction_comparison.png` for
all models side by side), as MAE papers show them: for ONE exam (the first of the split,
in dataset order, with every plane acquired; else the first), fixed frames (default ED
= 0 and mid-cycle T // 2) and fixed planes (default `default_plot_planes` of the models'
planes together: the 4ch long-axis plane and the middle short-axis slice), the rows
  input | masked input (masked patches grey) | reconstruction (the decoder's output on
  every patch) | reconstruction + visible (the input pasted back on the visible patches).
Each model shows the chosen planes it has (SA-only: the SA slice; LA-only: the 4ch).

The same mask for every model: the mask is drawn per exam, not per model. One key per
exam (`jax.random.fold_in(key(seed), crc32(eid))`) draws uniform noise over the full
9-plane token grid [9, t, h, w]; within each plane the tokens are ranked by it, and
every model keeps, on every plane it has, the same `kept_per_plane = int(n * (1 - r))`
lowest-ranked of the plane's n tokens (r: --mask-ratio, else the first model's ratio).
So a plane's visible patches are identical whether the model sees 9, 6 or 3 planes
(the effective ratio 1 - kept_per_plane / n, e.g. 1 - 9/32 = 0.72 for the tiny grid, is
recorded). This needs the models to share the token grid (frames, image size, patch
size); models that do not get no comparison figure (`figure.comparison` null). The
metrics above use the pretraining-style random masks (one key per batch), not this one.

Norm-pix models predict per-patch normalised pixels. The figures show visible patches
de-normalised with their own (known) mean and std, and masked patches with the mean of
the visible patches' means and of their stds on the same plane: the true statistics of
a masked patch would leak it (the metrics, as the MAE paper's visualisation, use each
true patch's statistics; see above). The figure's subtitle says which applies.

metrics.json (schema_version 1):
  task "reconstruction", split, data_dir, seed, models:
    {name: {"planes": [plane names the model sees], "mask_ratio": float, "num_exams": int,
            "plane_types": {"long_axis"|"short_axis": {metric: SUMMARY}},
            "per_plane":   {plane_name: {metric: SUMMARY}},
            "plots": [file],                 (the model's figure on the figure exam)
            "checkpoint_step": int,          (the step evaluated: by default the best val
                                              step, else the newest)
            "figure_mse_masked": {"<plane> t=<frame>": float}}},  (the figure's panels)
  figure: {"eid": str, "frames": [int], "planes": [plane names shown],
           "tokens_per_plane": int, "kept_per_plane": int, "mask_ratio": float
           (effective, 1 - kept/tokens), "seed": int, "comparison": file | null}
  metric in ("mse", "psnr", "ssim", "mse_masked"); SUMMARY {"mean", "sd", "n",
  "n_undefined", "n_infinite"} over (exam, plane) pairs; a plane type the model does not
  see is absent.
"""

from __future__ import annotations

import argparse
import functools
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from whmae import layout
from whmae.data.dataset.pipeline import make_pipeline, num_examples
from whmae.evaluate import plots
from whmae.evaluate.metrics import mse, psnr, ssim, summary
from whmae.evaluate.phenotypes import parse_models
from whmae.evaluate.results import SCHEMA_VERSION, format_table, jsonable, write_metrics
from whmae.model.config import kept_count
from whmae.model.masking import restore_ids
from whmae.model.patches import patchify, unpatchify

__all__ = [
    "METRICS",
    "draw_figures",
    "evaluate_reconstruction",
    "figure_exam",
    "main",
    "reconstruct",
    "reconstruct_exam",
    "reconstruction_images",
    "reconstruction_table",
]

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
        recon, masked = reconstruction_images(
            c, selected, pred, encoded["ids_shuffle"], encoded["num_kept"]
        )
        return selected, recon, masked, available

    return lambda images, plane_mask, key: jax.device_get(
        reconstruct(state, images, plane_mask, key)
    )


def reconstruction_images(config, selected, pred, ids_shuffle, num_kept):
    """(reconstruction float [B, S, T, H, W] in [0, 1], masked bool [B, S, T, H, W]) from
    the decoder's output pred [B, N, P] (original token order; norm-pix models
    de-normalised with each true patch's mean and variance) on the model's planes
    `selected` [B, S, T, H, W] (pixels in [0, 1]); jittable."""
    c = config
    patches = patchify(selected, c.patch_size)
    if c.norm_pix_loss:
        mean = patches.mean(-1, keepdims=True)
        std = jax.numpy.sqrt(patches.var(-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
        pred = pred * std + mean
    masked = restore_ids(ids_shuffle) >= num_kept[:, None]  # [B, N]
    masked = jax.numpy.broadcast_to(masked[..., None], pred.shape).astype(jax.numpy.float32)
    recon = jax.numpy.clip(unpatchify(pred, c.grid, c.patch_size), 0.0, 1.0)
    return recon, unpatchify(masked, c.grid, c.patch_size) > 0.5


PLANE_TYPES = {"long_axis": layout.LONG_AXIS_PLANES, "short_axis": layout.SHORT_AXIS_PLANES}


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
                            progress: bool = True,
                            exam: Mapping | None = None) -> dict:  # fmt: skip
    """One model's entry of `models` (module docstring); draws the model's figure to
    `plot_path` when given, on `exam` (default `figure_exam(data_dir, split)`) with the
    per-exam mask (plot_planes: dataset plane indices; frames default ED and mid-cycle)."""
    planes = model.config.planes
    scores = {p: {m: [] for m in METRICS} for p in planes}
    num_exams = 0
    for eids, target, recon, masked, available in reconstruct(
        model, data_dir, split, batch_size=batch_size, mask_ratio=mask_ratio, seed=seed,
        progress=progress,
    ):  # fmt: skip
        for b in range(len(eids)):
            for s, plane in enumerate(planes):
                if available[b, s]:
                    for m, v in plane_scores(target[b, s], recon[b, s], masked[b, s]).items():
                        scores[plane][m].append(v)
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
    for plane_type, members in PLANE_TYPES.items():
        chosen = [p for p in planes if p in members]
        if chosen:
            entry["plane_types"][plane_type] = {
                m: summary(sum((scores[p][m] for p in chosen), [])) for m in METRICS
            }
    if plot_path is not None:
        exam = figure_exam(data_dir, split) if exam is None else exam
        ratio = model.config.mask_ratio if mask_ratio is None else float(mask_ratio)
        result = reconstruct_exam(model, exam, ratio, seed)
        shown = figure_planes([planes], plot_planes)
        frames = figure_frames(model.config.frames, plot_frames)
        entry["plots"].append(model_figure(plot_path, result, shown, frames).name)
        entry["figure_mse_masked"] = panel_mse_masked(result, shown, frames)
    return entry


# ------------------------------------------------------------------------ figures
FIGURE_ROWS = ("input", "masked input", "reconstruction", "reconstruction + visible")
MASKED_GREY = 0.5  # the masked input's masked patches


def figure_exam(data_dir, split: str = "test") -> dict:
    """The figures' exam: the first of `split` in dataset order with every plane
    acquired, else the first. {"eid": str, "images": uint8 [9, T, H, W],
    "plane_mask": bool [9]}."""
    first = None
    batches = make_pipeline(data_dir, split, batch_size=8,
                            fields=("eid", "images", "plane_mask"), shuffle=False, num_epochs=1,
                            drop_remainder=False, process_index=0, process_count=1)  # fmt: skip
    for batch in batches:
        for b in range(len(batch["eid"])):
            exam = {"eid": str(batch["eid"][b]), "images": np.asarray(batch["images"][b]),
                    "plane_mask": np.asarray(batch["plane_mask"][b], bool)}  # fmt: skip
            if exam["plane_mask"].all():
                return exam
            first = exam if first is None else first
    if first is None:
        raise ValueError(f"split {split!r} of {data_dir} has no exam to draw")
    return first


def exam_key(eid: str, seed: int = 0) -> jax.Array:
    """The one key of an exam's figure mask: the same for every model."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(str(eid).encode()) & 0x7FFFFFFF)


def token_ranks(eid: str, seed: int, tokens_per_plane: int) -> np.ndarray:
    """int32 [9, n]: each token's rank within its plane (0 = kept first), from uniform
    noise over the full 9-plane grid drawn with `exam_key(eid, seed)`."""
    noise = np.asarray(
        jax.random.uniform(exam_key(eid, seed), (layout.NUM_PLANES, tokens_per_plane))
    )
    return np.argsort(np.argsort(noise, axis=1, kind="stable"), axis=1).astype(np.int32)


def figure_mask_spec(
    tokens_per_plane: int, num_planes: int, mask_ratio: float
) -> tuple[int, float]:
    """(kept_per_plane, the ratio to encode with): with that ratio a model keeps exactly
    kept_per_plane tokens per available plane, for any number of available planes."""
    kept = kept_count(tokens_per_plane, mask_ratio)
    if not 1 <= kept <= tokens_per_plane:
        raise ValueError(
            f"mask ratio {mask_ratio} keeps {kept} of a plane's {tokens_per_plane} tokens"
        )
    # int(a * n * (1 - r)) must be a * kept for a = 0..S: sit half a token per plane above.
    ratio = 1.0 - (kept + 0.5 / max(num_planes, 1)) / tokens_per_plane
    ratio = max(ratio, 0.0)
    for a in range(num_planes + 1):
        if kept_count(a * tokens_per_plane, ratio) != a * kept:
            raise AssertionError(f"figure mask ratio {ratio} does not keep {kept} per plane")
    return kept, ratio


def figure_ids_shuffle(ranks: np.ndarray, planes: Sequence[int], kept_per_plane: int) -> np.ndarray:
    """int32 [S * n]: the model's tokens ((plane, t, h, w) order) sorted by (rank, plane),
    so the first a * kept_per_plane are exactly the tokens ranked below kept_per_plane on
    each of the a available planes (absent planes' tokens move last in the model)."""
    n = ranks.shape[1]
    model_ranks = ranks[np.asarray(planes)]  # [S, n]
    index = np.arange(len(planes) * n).reshape(len(planes), n)
    order = np.lexsort((np.arange(len(planes))[:, None].repeat(n, 1).ravel(),
                        model_ranks.ravel()))  # fmt: skip
    return index.ravel()[order].astype(np.int32)


def reconstruct_exam(model, exam: Mapping, mask_ratio: float, seed: int = 0) -> dict:
    """The model on one exam with the per-exam mask (module docstring), numpy over the
    model's S planes: target, recon (clipped to [0, 1]), pasted (target on visible
    patches, recon on masked ones), masked bool [S, T, H, W]; available bool [S]; planes;
    kept_per_plane, mask_ratio (effective), tokens_per_plane, eid, seed, norm_pix (str
    or None: how masked patches were de-normalised)."""
    c = model.config
    n = c.tokens_per_plane
    kept, ratio = figure_mask_spec(n, len(c.planes), mask_ratio)
    ranks = token_ranks(exam["eid"], seed, n)
    ids = figure_ids_shuffle(ranks, c.planes, kept)
    images = np.asarray(exam["images"])[None]
    plane_mask = np.asarray(exam["plane_mask"], bool)[None]
    graphdef, state = nnx.split(model)
    available, pred, is_masked = (
        x[0] for x in jax.device_get(_encode_decode(graphdef, state, images, plane_mask,
                                                    ids[None], ratio))
    )  # fmt: skip
    # The input on the host, so that pasting back reproduces the dataset's pixels exactly.
    target = images[0, list(c.planes)].astype(np.float32)
    target = target / np.float32(255.0) if images.dtype == np.uint8 else target
    patches = np.asarray(patchify(target[None], c.patch_size))[0]  # [N, P]
    norm_pix = None
    if c.norm_pix_loss:
        pred = denormalise_with_visible(pred, patches, is_masked, len(c.planes))
        norm_pix = (
            "visible patches de-normalised with their own mean and std, masked ones "
            "with the mean of the same plane's visible patches' means and stds"
        )
    shape = c.grid, c.patch_size
    masked = np.asarray(unpatchify(np.broadcast_to(is_masked[:, None], pred.shape)[None].astype(
        np.float32), *shape))[0] > 0.5  # fmt: skip
    recon = np.clip(np.asarray(unpatchify(pred[None], *shape))[0], 0.0, 1.0)
    return {
        "eid": str(exam["eid"]), "planes": tuple(c.planes), "target": target, "recon": recon,
        "pasted": np.where(masked, recon, target), "masked": masked,
        "available": np.asarray(available), "kept_per_plane": kept, "tokens_per_plane": n,
        "mask_ratio": 1.0 - kept / n, "seed": seed, "norm_pix": norm_pix,
    }  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "ratio"))
def _encode_decode(graphdef, state, images, plane_mask, ids_shuffle, ratio: float):
    """(available [1, S], decoded patches [1, N, P], masked [1, N])."""
    model = nnx.merge(graphdef, state)
    _, available = model.select_planes(images, plane_mask)
    encoded = model.encode(images, plane_mask, mask_ratio=ratio, ids_shuffle=ids_shuffle)
    masked = restore_ids(encoded["ids_shuffle"]) >= encoded["num_kept"][:, None]
    return available, model.decode(encoded), masked


def denormalise_with_visible(pred, patches, is_masked, num_planes: int) -> np.ndarray:
    """Norm-pix predictions [N, P] -> pixels: each visible patch with its own mean and
    std, each masked patch with the mean over the same plane's visible patches."""
    mean = patches.mean(-1, keepdims=True)
    std = np.sqrt(patches.var(-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
    plane = np.arange(len(pred)) // (len(pred) // num_planes)
    for s in range(num_planes):
        visible = (plane == s) & ~is_masked
        hidden = (plane == s) & is_masked
        if visible.any() and hidden.any():
            mean[hidden] = mean[visible].mean()
            std[hidden] = std[visible].mean()
    return pred * std + mean


def figure_planes(model_planes: Sequence[Sequence[int]], plot_planes=None) -> list[int]:
    """The planes the figures show: `plot_planes`, or `default_plot_planes` of all the
    models' planes together; each must belong to some model."""
    union = sorted({p for planes in model_planes for p in planes})
    chosen = default_plot_planes(union) if plot_planes is None else list(plot_planes)
    for plane in chosen:
        if plane not in union:
            raise ValueError(
                f"plot plane {layout.PLANE_NAMES[plane]} is not one of the models' planes "
                f"{[layout.PLANE_NAMES[p] for p in union]}"
            )
    return chosen


def figure_frames(frames: int, plot_frames=None) -> list[int]:
    chosen = [0, frames // 2] if plot_frames is None else list(plot_frames)
    for frame in chosen:
        if not 0 <= frame < frames:
            raise ValueError(f"plot frame {frame} outside 0..{frames - 1}")
    return chosen


def _panel_label(plane: int, frame: int) -> str:
    return f"{layout.PLANE_NAMES[plane]} t={frame}"


def _panels_of(result: Mapping, planes: Sequence[int], frames: Sequence[int]):
    """(label, s, frame) of the shown (plane, frame) pairs the model has and the exam
    acquired; a model with none of `planes` shows its own default planes."""
    own = [p for p in planes if p in result["planes"]]
    own = own or default_plot_planes(result["planes"])
    return [(_panel_label(p, f), result["planes"].index(p), f) for p in own for f in frames
            if result["available"][result["planes"].index(p)]]  # fmt: skip


def masked_input(target: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """[H, W] image with its masked patches set to MASKED_GREY."""
    return np.where(masked, MASKED_GREY, target)


def panel_mse_masked(result: Mapping, planes, frames) -> dict[str, float]:
    out = {}
    for label, s, f in _panels_of(result, planes, frames):
        m = result["masked"][s, f]
        out[label] = (
            mse(result["recon"][s, f][m], result["target"][s, f][m]) if m.any() else float("nan")
        )
    return out


def _subtitle(result: Mapping) -> str:
    text = (
        f"exam {result['eid']}: {result['kept_per_plane']} of {result['tokens_per_plane']} "
        f"tokens kept on every plane (mask ratio {result['mask_ratio']:.2f}, one key per exam)"
    )
    if result["norm_pix"]:
        text += f"\nnorm-pix: {result['norm_pix']}"
    return text


def model_figure(path, result: Mapping, planes, frames, name: str = "") -> Path:
    """Rows FIGURE_ROWS x columns (plane, frame) of one model's `reconstruct_exam`."""
    columns, cells = [], []
    for label, s, f in _panels_of(result, planes, frames):
        t, m = result["target"][s, f], result["masked"][s, f]
        columns.append(label)
        cells.append([t, masked_input(t, m), result["recon"][s, f], result["pasted"][s, f]])
    if not cells:  # the exam acquired none of the model's shown planes
        columns, cells = ["-"], [["not acquired"] * len(FIGURE_ROWS)]
    images = [[col[r] for col in cells] for r in range(len(FIGURE_ROWS))]
    title = f"{name + ': ' if name else ''}{_subtitle(result)}"
    return plots.reconstruction_figure(path, list(FIGURE_ROWS), columns, images, title=title)


def comparison_figure(path, results: Mapping[str, Mapping], planes, frames) -> Path:
    """One row per shown (plane, frame); columns input, masked input, then each model's
    reconstruction + visible (blank where the model does not see the plane)."""
    first = next(iter(results.values()))
    rows, images = [], []
    for plane in planes:
        for f in frames:
            owners = [r for r in results.values() if plane in r["planes"]]
            ref = owners[0]
            s = ref["planes"].index(plane)
            if not ref["available"][s]:
                continue
            t, m = ref["target"][s, f], ref["masked"][s, f]
            row = [t, masked_input(t, m)]
            for name, r in results.items():
                if plane not in r["planes"]:
                    row.append(f"{name}\ndoes not see\n{layout.PLANE_NAMES[plane]}")
                    continue
                k = r["planes"].index(plane)
                err = mse(r["recon"][k, f][m], t[m]) if m.any() else float("nan")
                row.append((r["pasted"][k, f], f"masked MSE {err:.4f}"))
            rows.append(_panel_label(plane, f))
            images.append(row)
    columns = ["input", "masked input", *(f"{n}\nrecon + visible" for n in results)]
    if not rows:  # the exam acquired none of the shown planes
        rows, images = ["-"], [["not acquired"] * len(columns)]
    notes = sorted({r["norm_pix"] for r in results.values() if r["norm_pix"]})
    title = _subtitle({**first, "norm_pix": "; ".join(notes) or None})
    return plots.reconstruction_figure(path, rows, columns, images, title=title)


def draw_figures(models: Mapping[str, object], exam: Mapping, out_dir, *,
                 mask_ratio: float | None = None, seed: int = 0, plot_planes=None,
                 plot_frames=None) -> tuple[dict, dict[str, dict]]:  # fmt: skip
    """Every model's figure and the comparison on `exam`, with the same mask for all.
    Returns (the metrics' `figure` entry, {name: reconstruct_exam result})."""
    out_dir = Path(out_dir)
    configs = [m.config for m in models.values()]
    ratio = configs[0].mask_ratio if mask_ratio is None else float(mask_ratio)
    planes = figure_planes([c.planes for c in configs], plot_planes)
    frames = figure_frames(configs[0].frames, plot_frames)
    results = {n: reconstruct_exam(m, exam, ratio, seed) for n, m in models.items()}
    first = next(iter(results.values()))
    figure = {"eid": first["eid"], "frames": frames,
              "planes": [layout.PLANE_NAMES[p] for p in planes],
              "tokens_per_plane": first["tokens_per_plane"],
              "kept_per_plane": first["kept_per_plane"], "mask_ratio": first["mask_ratio"],
              "seed": seed, "comparison": None}  # fmt: skip
    grids = {(c.frames, c.image_size, c.patch_size) for c in configs}
    if len(grids) == 1:
        figure["comparison"] = comparison_figure(
            out_dir / "reconstruction_comparison.png", results, planes, frames
        ).name
    return figure, results


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
        progress: bool = True, checkpoint_step: str | int = "best") -> dict:  # fmt: skip
    """Evaluate every (name -> MAE checkpoint, at `checkpoint_step`: best | latest | N);
    write metrics.json, each model's figure and the comparison figure (the same exam,
    frames, planes and mask for all)."""
    from whmae.model.io import load_model
    from whmae.train.checkpoint import checkpoint_step as resolve_step

    out = Path(out_dir)
    steps = {name: resolve_step(path, checkpoint_step) for name, path in models.items()}
    loaded = {name: load_model(path, steps[name])[0] for name, path in models.items()}
    exam = figure_exam(data_dir, split)
    figure, results = draw_figures(loaded, exam, out, mask_ratio=mask_ratio, seed=seed,
                                   plot_planes=plot_planes, plot_frames=plot_frames)  # fmt: skip
    planes = figure_planes([m.config.planes for m in loaded.values()], plot_planes)
    entries = {}
    for name, model in loaded.items():
        entries[name] = evaluate_reconstruction(
            model, data_dir, split, batch_size=batch_size, mask_ratio=mask_ratio, seed=seed,
            progress=progress,
        )  # fmt: skip
        frames = figure["frames"]
        path = out / f"reconstruction_{name}.png"
        entries[name]["plots"] = [model_figure(path, results[name], planes, frames, name).name]
        entries[name]["figure_mse_masked"] = panel_mse_masked(results[name], planes, frames)
        entries[name]["checkpoint_step"] = steps[name]
    metrics = {"task": "reconstruction", "schema_version": SCHEMA_VERSION, "split": split,
               "data_dir": str(data_dir), "seed": seed, "models": entries,
               "figure": figure}  # fmt: skip
    write_metrics(out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from whmae.embed import parse_planes
    from whmae.train.checkpoint import CHECKPOINT_STEP_HELP, parse_checkpoint_step

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
    parser.add_argument("--checkpoint-step", type=parse_checkpoint_step, default="best",
                        help=CHECKPOINT_STEP_HELP)  # fmt: skip
    args = parser.parse_args(argv)
    try:
        metrics = run(
            parse_models(args.model), args.data, args.split, args.out,
            batch_size=args.batch_size, mask_ratio=args.mask_ratio, seed=args.seed,
            checkpoint_step=args.checkpoint_step,
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
