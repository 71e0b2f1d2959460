"""Read a fine-tuned model back and predict a dataset split with it.

  task, model, config = load_finetuned("runs/phenotype")
  result = predict_phenotypes("runs/phenotype", "data/ukbb", "test", absent_planes=(1,))
  result = predict_segmentation("runs/segmentation", "data/ukbb", "test")

Prediction is jitted and batched over this process's devices (parameters replicated,
the batch split over a `data` axis; the last batch padded by repeating its last exam,
the padding dropped), in dataset order. Results are numpy:

predict_phenotypes -> eid str [N]; columns tuple[str] (K); pred float32 [N, K] in
  physical units; target float32 [N, K] (NaN = missing); train_mean float32 [K] (the
  train split's means the model standardised with: the mean-guess baseline);
  checkpoint_step int (the step read from a workdir: by default the best val step).
predict_segmentation -> eid [N]; pred uint8 [N, 9, T, H, W] (argmax class, always one of
  the plane's `layout.PLANE_CLASSES`: the model masks the others; planes the model does
  not segment are 0); labels uint8 [N, 9, T, H, W]; label_mask bool [N, 9, T]
  (labelled AND segmented by the model: the planes and frames to score); plane_mask bool
  [N, 9];
  pixel_spacing float32 [N, 9, 2]; slice_spacing float32 [N]; frame_duration float32 [N].
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from whmae.data.dataset.pipeline import make_pipeline, num_examples
from whmae.embed import local_data_mesh
from whmae.layout import NUM_PLANES
from whmae.model.io import apply_split, resolve_checkpoint
from whmae.train.checkpoint import checkpoint_step as resolve_step
from whmae.train.mesh import batch_sharding, replicated

__all__ = [
    "build_model",
    "finetuned_model",
    "load_finetuned",
    "predict_phenotypes",
    "predict_segmentation",
]

PHENOTYPE_FIELDS = ("eid", "images", "plane_mask", "phenotypes")
SEGMENTATION_FIELDS = (
    "eid",
    "images",
    "plane_mask",
    "labels",
    "label_mask",
    "pixel_spacing",
    "slice_spacing",
    "frame_duration",
)


def build_model(config: Any, rngs: nnx.Rngs) -> nnx.Module:
    """The model of a fine-tuning config (phenotype scales are placeholders until a
    checkpoint restore)."""
    if config.task == "phenotype":
        from whmae.tasks.phenotype import build_regressor

        return build_regressor(config, rngs)
    if config.task == "segmentation":
        from whmae.tasks.segmentation import build_segmenter

        return build_segmenter(config, rngs)
    raise ValueError(f"unknown fine-tuning task {config.task!r}")


def _read_config(step_dir: Path) -> ml_collections.ConfigDict:
    where = step_dir / "config"
    if not where.is_dir():
        raise FileNotFoundError(f"{where} is missing: not a whmae-finetune checkpoint")
    stored = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        where, args=ocp.args.JsonRestore()
    )
    if stored.get("task") not in ("phenotype", "segmentation"):
        raise ValueError(
            f"{where}: config has task {stored.get('task')!r}; load_finetuned reads "
            "whmae-finetune checkpoints (for pretraining ones use whmae.model.io.load_model)"
        )
    return ml_collections.ConfigDict(stored)


def load_finetuned(
    workdir: str | os.PathLike, step: int | str | None = "best"
) -> tuple[str, nnx.Module, ml_collections.ConfigDict]:
    """(task name "phenotype" | "segmentation", model, config) of a whmae-finetune run's
    checkpoint: `step` "best" (default: the best val step, else the newest; see
    `whmae.train.checkpoint.checkpoint_step`), "latest" (None) or a step number; the
    config's `checkpoint_step` says which step it was. Only parameters and the model's
    other variables (phenotype scales) are read, onto the default device."""
    directory, step = resolve_checkpoint(workdir, resolve_step(workdir, step))
    config = _read_config(directory / str(step))
    abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def placed(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)

    target = {"params": placed(params)}
    if jax.tree.leaves(rest):
        target["rest"] = placed(rest)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{directory / str(step)}: the state does not fit the model of its config ({e})"
        ) from None
    model = nnx.merge(graphdef, restored["params"], restored.get("rest", rest))
    with config.unlocked():
        config.checkpoint_step = int(step)
    return str(config.task), model, config


def finetuned_model(workdir_or_model, task: str, step: int | str | None = "best"):
    """(the `task` model of a fine-tuning workdir at `step` (best | latest | N), the step it
    was read from), or (the model given, None)."""
    if isinstance(workdir_or_model, nnx.Module):
        return workdir_or_model, None
    found, model, config = load_finetuned(workdir_or_model, step)
    if found != task:
        raise ValueError(f"{workdir_or_model} holds a {found} model, not a {task} model")
    return model, int(config.checkpoint_step)


def input_geometry(model) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(expected exam shape [9, T, H, W], the model's planes)."""
    geometry = model.encoder.config if hasattr(model, "encoder") else model.geometry
    return (NUM_PLANES, geometry.frames, geometry.image_size, geometry.image_size), geometry.planes


def _pad(batch: dict, size: int) -> dict:
    """Repeat the last exam up to `size` rows (real values: no NaN from empty exams)."""
    short = size - len(batch["eid"])
    if short == 0:
        return batch
    return {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in batch.items()}


def _predict(
    model: nnx.Module,
    apply: Callable,
    data_dir,
    split: str,
    batch_size: int,
    fields: Sequence[str],
    absent_planes: Sequence[int] = (),
    desc: str = "predict",
):
    """Yield (host batch with plane_mask minus absent_planes, apply's output for it)."""
    mesh = local_data_mesh()
    batch_size = math.ceil(batch_size / mesh.devices.size) * mesh.devices.size
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated(mesh))
    data = batch_sharding(mesh)
    expected, _ = input_geometry(model)
    dropped = np.zeros(NUM_PLANES, bool)
    dropped[list(absent_planes)] = True

    total = num_examples(data_dir, split)
    if total == 0:
        raise ValueError(f"{data_dir}: split {split!r} holds no exams")
    batches = make_pipeline(
        data_dir, split, batch_size=batch_size, fields=tuple(fields), shuffle=False,
        num_epochs=1, drop_remainder=False, process_index=0, process_count=1,
    )  # fmt: skip
    with tqdm(total=total, desc=desc, unit="exam", leave=False) as bar:
        for batch in batches:
            if tuple(batch["images"].shape[1:]) != expected:
                raise ValueError(
                    f"{data_dir} split {split!r} (eids {list(batch['eid'][:3])}...): images "
                    f"are {batch['images'].shape[1:]}, the model needs {expected}"
                )
            batch = dict(batch, plane_mask=batch["plane_mask"].astype(bool) & ~dropped)
            empty = [str(e) for e, m in zip(batch["eid"], batch["plane_mask"], strict=True)
                     if not m.any()]  # fmt: skip
            if empty:
                raise ValueError(f"{data_dir}: exams {empty} have no acquired plane left")
            padded = _pad({k: batch[k] for k in ("eid", "images", "plane_mask")}, batch_size)
            inputs = jax.device_put((padded["images"], padded["plane_mask"]), data)
            out = np.asarray(jax.device_get(apply_split(graphdef, apply, state, *inputs)))[
                : len(batch["eid"])
            ]
            bar.update(len(batch["eid"]))
            yield batch, out


def _physical_phenotypes(model, images, plane_mask):
    return model.to_physical(model(images, plane_mask))


def _segmentation_classes(model, images, plane_mask):
    return model(images, plane_mask).argmax(axis=-1).astype(np.uint8)


def predict_phenotypes(
    workdir_or_model,
    data_dir: str | os.PathLike,
    split: str = "test",
    *,
    batch_size: int = 16,
    absent_planes: Sequence[int] = (),
    config: Any = None,
    checkpoint_step: int | str | None = "best",
) -> dict[str, Any]:
    """Phenotype predictions of every exam of `split` (see the module docstring).

    `absent_planes`: plane indices removed through plane_mask (token removal), for the
    robustness evaluation. `config` is accepted for symmetry and unused: the model
    carries its columns and train statistics. `checkpoint_step`: which step of a
    workdir (`load_finetuned`); the result's `checkpoint_step` says which it was.
    """
    del config
    model, step = finetuned_model(workdir_or_model, "phenotype", checkpoint_step)

    rows = {"eid": [], "pred": [], "target": []}
    ids = np.asarray(model.column_ids)
    for batch, pred in _predict(
        model,
        _physical_phenotypes,
        data_dir,
        split,
        batch_size,
        PHENOTYPE_FIELDS,
        absent_planes,
        "phenotypes",
    ):
        rows["eid"].append(batch["eid"].astype(str))
        rows["pred"].append(pred.astype(np.float32))
        rows["target"].append(batch["phenotypes"][:, ids].astype(np.float32))
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["columns"] = tuple(model.columns)
    out["train_mean"] = np.asarray(model.target_mean[...], np.float32)
    if step is not None:
        out["checkpoint_step"] = step
    return out


def predict_segmentation(
    workdir_or_model,
    data_dir: str | os.PathLike,
    split: str = "test",
    *,
    batch_size: int = 4,
    config: Any = None,
    checkpoint_step: int | str | None = "best",
) -> dict[str, np.ndarray]:
    """Segmentations of every exam of `split` (see the module docstring);
    `checkpoint_step` as in `predict_phenotypes`."""
    del config
    model, step = finetuned_model(workdir_or_model, "segmentation", checkpoint_step)
    planes = np.asarray(model.planes)
    segmented = np.zeros(NUM_PLANES, bool)
    segmented[planes] = True

    keep = ("eid", "labels", "label_mask", "plane_mask", "pixel_spacing", "slice_spacing",
            "frame_duration")  # fmt: skip
    rows = {k: [] for k in (*keep, "pred")}
    for batch, pred in _predict(
        model,
        _segmentation_classes,
        data_dir,
        split,
        batch_size,
        SEGMENTATION_FIELDS,
        (),
        "segmentation",
    ):
        full = np.zeros(batch["labels"].shape, np.uint8)
        full[:, planes] = pred
        rows["pred"].append(full)
        for k in keep:
            rows[k].append(np.asarray(batch[k]))
        label_mask = rows["label_mask"][-1].astype(bool)  # [B, 9, T] (schema 1: broadcast)
        rows["label_mask"][-1] = label_mask & segmented.reshape(-1, *(1,) * (label_mask.ndim - 2))
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["eid"] = out["eid"].astype(str)
    if step is not None:
        out["checkpoint_step"] = step
    return out
