"""Per-exam MAE embeddings of a dataset: `whmae-embed --checkpoint DIR --data DIR --out F.npz`.

  whmae-embed --checkpoint runs/pretrain --data data/ukbb --split test --out test.npz
  whmae-embed --checkpoint converted/ --data data/ukbb --split all --out all.npz \\
      --absent-planes la_3ch,sa_5          # robustness: embed as if these were missing
  whmae-embed --checkpoint runs/pretrain --random-init --data data/ukbb --out control.npz
                                           # control: untrained encoder of the same config

The encoder runs without masking (deterministic) on every exam of the split(s):
batched, jitted, the batch split over a `data` mesh axis of all local devices (the
last partial batch padded, the padding dropped). Absent planes (the record's
plane_mask, minus `--absent-planes`) are ignored by attention and pooling.

Random-init control (`--random-init`, `random_init_model`): an untrained MAE of the
checkpoint's config, initialised as `MaskedAutoencoder(config, rngs=nnx.Rngs(seed))`
with `seed` the checkpoint's stored `train.seed` (0 when it has none, e.g. a converted
checkpoint): the model the pretraining run started from (the training loop builds it
from `nnx.Rngs(train.seed)` too, under jit: the same draws, up to ~1e-8 float rounding
in a few parameters), so pretrained and control differ only by training.
`--seed` picks another draw. Only the config of the checkpoint is read.

Output `.npz`, one row per exam in dataset order:
  eid          str [N]          split      str [N]
  cls          float32 [N, D]   the final-norm cls token
  mean_pooled  float32 [N, D]   the mean of the available tokens
  plane_mask   bool [N, 9]      the planes the encoder saw
  checkpoint   str []           step  int []
  random_init  bool []          seed  int [] (with --random-init: the init seed, else -1)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from whmae.data.dataset.pipeline import make_pipeline, num_examples
from whmae.data.dataset.splits import SPLITS
from whmae.layout import NUM_PLANES, PLANE_NAMES
from whmae.model.config import MAEConfig
from whmae.model.io import apply_split, load_config, load_model, resolve_checkpoint
from whmae.model.mae import MaskedAutoencoder, embeddings
from whmae.train.checkpoint import CHECKPOINT_STEP_HELP, checkpoint_step, parse_checkpoint_step
from whmae.train.mesh import batch_sharding, make_mesh, replicated

__all__ = [
    "embed_dataset",
    "init_seed",
    "main",
    "make_embed_fn",
    "parse_planes",
    "random_init_model",
    "write_embeddings",
]

FIELDS = ("eid", "images", "plane_mask")


def local_data_mesh() -> jax.sharding.Mesh:
    """A mesh whose `data` axis spans this process's devices."""
    return make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())


def init_seed(path: str | os.PathLike, step: int | None = None) -> int:
    """The seed a checkpoint's model was initialised from: its stored `train.seed`, or 0
    (the training loop's default) when the checkpoint records none."""
    directory, step = resolve_checkpoint(path, step)
    where = directory / str(step) / "config"
    if not where.is_dir():
        return 0
    stored = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        where, args=ocp.args.JsonRestore()
    )
    train = stored.get("train") or {}
    return int(train.get("seed", 0)) if isinstance(train, dict) else 0


def random_init_model(
    path: str | os.PathLike, step: int | None = None, *, seed: int | None = None
) -> tuple[MaskedAutoencoder, MAEConfig, int]:
    """(untrained model, config, seed): a fresh MAE of the checkpoint's config, initialised
    from `nnx.Rngs(seed)`; `seed` None = `init_seed` (the pretraining run's own start)."""
    directory, step = resolve_checkpoint(path, step)
    config = load_config(directory, step)
    seed = init_seed(directory, step) if seed is None else int(seed)
    return MaskedAutoencoder(config, rngs=nnx.Rngs(seed)), config, seed


def make_embed_fn(
    model: MaskedAutoencoder, mesh: jax.sharding.Mesh
) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`fn(images uint8 [B, 9, T, H, W], plane_mask bool [B, 9]) -> (cls, mean_pooled)`,
    float32 [B, D] numpy; B must divide over the mesh. Parameters replicated."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated(mesh))
    data = batch_sharding(mesh)

    def fn(images, plane_mask):
        images, plane_mask = jax.device_put((images, plane_mask), data)
        return jax.device_get(apply_split(graphdef, embeddings, state, images, plane_mask))

    return fn


def parse_planes(planes: str | Sequence[str | int]) -> tuple[int, ...]:
    """Plane names (`la_3ch`, `sa_5`) or indices 0-8, comma-separated or a list."""
    items = planes.split(",") if isinstance(planes, str) else list(planes)
    out = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if item.isdigit() and int(item) < NUM_PLANES:
            out.append(int(item))
        elif item in PLANE_NAMES:
            out.append(PLANE_NAMES.index(item))
        else:
            raise ValueError(f"unknown plane {item!r}: use 0-{NUM_PLANES - 1} or {PLANE_NAMES}")
    return tuple(sorted(set(out)))


def _pad(batch: dict, size: int) -> dict:
    """Repeat the last exam up to `size` rows (real values: no NaN from empty exams)."""
    short = size - len(batch["eid"])
    if short == 0:
        return batch
    return {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in batch.items()}


def embed_dataset(
    model: MaskedAutoencoder,
    data_dir: str | os.PathLike,
    splits: Sequence[str] = ("test",),
    *,
    batch_size: int = 32,
    absent_planes: Sequence[int] = (),
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Embeddings of every exam of `splits` (dataset order): eid, split, cls,
    mean_pooled, plane_mask (as in the module docstring). `batch_size` is rounded up
    to a multiple of the mesh's devices."""
    mesh = local_data_mesh() if mesh is None else mesh
    devices = mesh.devices.size
    batch_size = math.ceil(batch_size / devices) * devices
    c = model.config
    expected = (NUM_PLANES, c.frames, c.image_size, c.image_size)
    dropped = np.zeros(NUM_PLANES, bool)
    dropped[list(absent_planes)] = True
    embed = make_embed_fn(model, mesh)
    counts = {split: num_examples(data_dir, split) for split in splits}
    rows: dict[str, list] = {k: [] for k in ("eid", "split", "cls", "mean_pooled", "plane_mask")}
    bar = tqdm(total=sum(counts.values()), desc="embed", unit="exam", disable=not progress)
    for split in splits:
        if counts[split] == 0:
            continue
        batches = make_pipeline(
            data_dir, split, batch_size=batch_size, fields=FIELDS, shuffle=False,
            num_epochs=1, drop_remainder=False, process_index=0, process_count=1,
        )  # fmt: skip
        for batch in batches:
            n = len(batch["eid"])
            if tuple(batch["images"].shape[1:]) != expected:
                raise ValueError(
                    f"{data_dir} split {split!r}: images are {batch['images'].shape[1:]}, the "
                    f"model needs {expected} (image_size={c.image_size}, frames={c.frames})"
                )
            plane_mask = batch["plane_mask"].astype(bool) & ~dropped
            empty = [str(e) for e, m in zip(batch["eid"], plane_mask, strict=True) if not m.any()]
            if empty:
                raise ValueError(f"{data_dir}: exams {empty} have no plane left to embed")
            padded = _pad({"images": batch["images"], "plane_mask": plane_mask,
                           "eid": batch["eid"]}, batch_size)  # fmt: skip
            cls, mean = embed(padded["images"], padded["plane_mask"])
            rows["eid"].append(batch["eid"].astype(str))
            rows["split"].append(np.full(n, split))
            rows["cls"].append(cls[:n])
            rows["mean_pooled"].append(mean[:n])
            rows["plane_mask"].append(plane_mask)
            bar.update(n)
    bar.close()
    if not rows["eid"]:
        raise ValueError(f"{data_dir}: splits {list(splits)} hold no exams")
    return {k: np.concatenate(v) for k, v in rows.items()}


def write_embeddings(path: str | os.PathLike, result: dict[str, np.ndarray], **meta) -> Path:
    """Write `result` (+ scalar metadata) as one .npz, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **result, **{k: np.asarray(v) for k, v in meta.items()})
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-embed", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="workdir, checkpoint or step dir")
    parser.add_argument("--checkpoint-step", "--step", dest="checkpoint_step", default="best",
                        type=parse_checkpoint_step, help=CHECKPOINT_STEP_HELP)  # fmt: skip
    parser.add_argument("--data", required=True, help="dataset directory (whmae-generate/prepare)")
    parser.add_argument("--split", default="test", help=f"one of {SPLITS}, a list, or 'all'")
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--absent-planes", default="", help="planes to treat as missing")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="control: embed with an untrained MAE of the checkpoint's config",
    )
    parser.add_argument("--seed", type=int, help="--random-init seed (default: train.seed)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        splits = SPLITS if args.split == "all" else tuple(args.split.split(","))
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown split(s) {bad}; use {SPLITS} or 'all'")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        directory, step = resolve_checkpoint(
            args.checkpoint, checkpoint_step(args.checkpoint, args.checkpoint_step)
        )
        mesh = local_data_mesh()
        seed = -1
        if args.random_init:
            model, _, seed = random_init_model(directory, step, seed=args.seed)
        else:
            model, _ = load_model(directory, step, sharding=replicated(mesh))
        result = embed_dataset(
            model,
            args.data,
            splits,
            batch_size=args.batch_size,
            absent_planes=parse_planes(args.absent_planes),
            mesh=mesh,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"whmae-embed: {e}", file=sys.stderr)
        return 2
    out = write_embeddings(args.out, result, checkpoint=str(directory), step=step,
                           random_init=args.random_init, seed=seed)  # fmt: skip
    n, d = result["cls"].shape
    print(f"wrote {n} exams x {d} dims ({', '.join(splits)}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
