"""Phenotype regression: several phenotypes at once, on standardised targets.

Targets are standardised per column with the TRAIN split's mean and std
(`dataset_info.json`, `splits.train.phenotype_stats`); the model keeps both as
`PhenotypeScale` variables (saved in checkpoints), predicts standardised values and
`to_physical` undoes it. Missing targets (NaN) carry no loss.

Models (`config.model.arch`): `vit` = `PhenotypeRegressor`, the MAE encoder (pretrained
or from scratch) + a head on the cls token, the mean of the available tokens, both
concatenated, or all tokens in grid order flattened (`model.pool`); in probe mode the
features pass `jax.lax.stop_gradient`, so no gradient reaches the encoder.
`resnet` = `whmae.tasks.resnet.ResNetRegressor`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from whmae.data.dataset.pipeline import dataset_info
from whmae.layout import PHENOTYPE_COLUMNS, phenotype_index
from whmae.model.config import MAEConfig
from whmae.model.masking import drop_planes, restore_order
from whmae.model.vit import Dense
from whmae.tasks.config import init_step
from whmae.tasks.encoder_init import MAEEncoder, encoder_config, pretrained_encoder_init
from whmae.train.loop import Task

__all__ = [
    "POOLS",
    "PhenotypeRegressor",
    "PhenotypeScale",
    "build_regressor",
    "phenotype_loss",
    "phenotype_task",
    "phenotype_validation",
    "train_stats",
]

POOLS = ("cls", "mean", "cls_mean", "tokens")
FIELDS = ("images", "plane_mask", "phenotypes")

log = logging.getLogger(__name__)


class PhenotypeScale(nnx.Variable):
    """Per-column train-split statistics (not trained): mean or std, float32 [K]."""


class Standardised(nnx.Module):
    """Mixin: `columns`, `target_mean`, `target_std`; physical <-> standardised units."""

    def _init_scale(self, columns: Sequence[str], mean, std):
        self.columns = tuple(columns)
        k = len(self.columns)
        mean = np.zeros(k, np.float32) if mean is None else np.asarray(mean, np.float32)
        std = np.ones(k, np.float32) if std is None else np.asarray(std, np.float32)
        if mean.shape != (k,) or std.shape != (k,):
            raise ValueError(f"mean/std must be [{k}] for columns {self.columns}")
        self.target_mean = PhenotypeScale(jnp.asarray(mean))
        self.target_std = PhenotypeScale(jnp.asarray(std))
        self.column_ids = tuple(phenotype_index(c) for c in self.columns)

    def standardise(self, phenotypes: jax.Array) -> jax.Array:
        """[B, 18] all columns, physical -> [B, K] this model's columns, standardised."""
        selected = phenotypes[:, np.asarray(self.column_ids)].astype(jnp.float32)
        return (selected - self.target_mean[...]) / self.target_std[...]

    def to_physical(self, standardised: jax.Array) -> jax.Array:
        """[B, K] standardised -> physical units."""
        return standardised * self.target_std[...] + self.target_mean[...]


def pool_features(encoded: dict, pool: str) -> jax.Array:
    """Encoder output -> [B, F] float32: cls, mean of the valid tokens, both, or every
    token in grid order, flattened (absent planes' tokens zero: keeps where things are)."""
    cls = encoded["cls"].astype(jnp.float32)
    valid = encoded["token_valid"].astype(jnp.float32)[..., None]
    tokens = encoded["tokens"].astype(jnp.float32)
    if pool == "tokens":
        grid = restore_order(tokens * valid, encoded["ids_shuffle"])
        return grid.reshape(grid.shape[0], -1)
    mean = jnp.sum(tokens * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    return {"cls": cls, "mean": mean, "cls_mean": jnp.concatenate([cls, mean], -1)}[pool]


class PhenotypeRegressor(Standardised):
    """MAE encoder + head: images uint8 [B, 9, T, H, W], plane_mask [B, 9] -> [B, K]
    standardised phenotypes. `head_hidden` 0 = linear head, else one GELU hidden layer."""

    def __init__(
        self,
        encoder: MAEConfig,
        columns: Sequence[str],
        *,
        pool: str = "cls",
        head_hidden: int = 0,
        freeze_encoder: bool = False,
        mean=None,
        std=None,
        rngs: nnx.Rngs,
    ):
        if pool not in POOLS:
            raise ValueError(f"model.pool must be one of {POOLS}, got {pool!r}")
        self.encoder = MAEEncoder(encoder, rngs=rngs)
        self._init_scale(columns, mean, std)
        self.pool, self.freeze_encoder = pool, freeze_encoder
        features = encoder.width * {"cls_mean": 2, "tokens": encoder.num_tokens}.get(pool, 1)
        self.head_norm = nnx.LayerNorm(features, rngs=rngs)
        self.hidden = (
            Dense(features, head_hidden, (None, None), dtype=jnp.float32, rngs=rngs)
            if head_hidden
            else None
        )
        width = head_hidden or features
        self.out = Dense(width, len(self.columns), (None, None), dtype=jnp.float32, rngs=rngs)

    def features(self, images, plane_mask) -> jax.Array:
        """[B, F] pooled encoder features (no masking)."""
        features = pool_features(self.encoder.encode(images, plane_mask), self.pool)
        return jax.lax.stop_gradient(features) if self.freeze_encoder else features

    def __call__(self, images, plane_mask) -> jax.Array:
        x = self.head_norm(self.features(images, plane_mask))
        if self.hidden is not None:
            x = jax.nn.gelu(self.hidden(x))
        return self.out(x)


def phenotype_loss_values(pred, target, kind: str = "mse", delta: float = 1.0):
    """(loss, per-column mean abs error) of pred vs target [B, K] standardised; NaN
    targets are masked out (and averaged over the observed entries only)."""
    observed = ~jnp.isnan(target)
    error = jnp.where(observed, pred - jnp.where(observed, target, 0.0), 0.0)
    if kind == "mse":
        per = jnp.square(error)
    elif kind == "huber":
        per = optax.huber_loss(error, delta=delta)
    else:
        raise ValueError(f"loss must be 'mse' or 'huber', got {kind!r}")
    weight = observed.astype(jnp.float32)
    loss = jnp.sum(per * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    column_mae = jnp.sum(jnp.abs(error), 0) / jnp.maximum(jnp.sum(weight, 0), 1.0)
    return loss, column_mae


def phenotype_loss(
    kind: str = "mse", delta: float = 1.0, plane_dropout: float = 0.0, plane_dropout_max: int = 2
):
    """`loss_fn(model, batch, key)` for the training loop; aux: mae_std (mean abs error
    over all observed entries, standardised units). `plane_dropout` > 0: that fraction of
    the exams loses 1..`plane_dropout_max` of its planes (`masking.drop_planes`)."""

    def loss_fn(model, batch, key):
        plane_mask = drop_planes(key, batch["plane_mask"], plane_dropout, plane_dropout_max)
        pred = model(batch["images"], plane_mask)
        target = model.standardise(batch["phenotypes"])
        loss, column_mae = phenotype_loss_values(pred, target, kind, delta)
        return loss, {"mae_std": jnp.mean(column_mae)}

    return loss_fn


def train_stats(data_dir: str, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 [K] of `columns` over the train split of `data_dir`."""
    stats = dataset_info(data_dir)["splits"]["train"]["phenotype_stats"]
    mean, std = [], []
    for column in columns:
        entry = stats.get(column) or {}
        if not entry.get("count"):
            raise ValueError(f"{data_dir}: phenotype {column!r} has no value in the train split")
        mean.append(entry["mean"])
        # A constant column (or a single exam) gives std 0: keep physical units then.
        std.append(entry["std"] if entry.get("std") else 1.0)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def build_regressor(config: Any, rngs: nnx.Rngs, mean=None, std=None) -> nnx.Module:
    """The regression model `config.model.arch` says (mean/std None: placeholders that
    a checkpoint restore overwrites)."""
    columns = tuple(config.phenotypes)
    unknown = [c for c in columns if c not in PHENOTYPE_COLUMNS]
    if unknown or not columns:
        raise ValueError(f"config.phenotypes {unknown or '[]'}: choose from {PHENOTYPE_COLUMNS}")
    m = config.model
    if m.arch == "vit":
        return PhenotypeRegressor(
            encoder_config(m),
            columns,
            pool=m.pool,
            head_hidden=int(m.head_hidden),
            freeze_encoder=config.mode == "probe",
            mean=mean,
            std=std,
            rngs=rngs,
        )
    if m.arch == "resnet":
        from whmae.tasks.resnet import ResNetRegressor

        return ResNetRegressor(
            encoder_config(m),
            columns,
            widths=tuple(m.resnet.widths),
            blocks=tuple(m.resnet.blocks),
            groups=int(m.resnet.groups),
            # Configs written before these fields existed: the original stem.
            stem=str(m.resnet.get("stem", "imagenet")),
            stem_stride=int(m.resnet.get("stem_stride", 2)),
            mean=mean,
            std=std,
            rngs=rngs,
        )
    raise ValueError(f"model.arch must be 'vit' or 'resnet' for phenotypes, got {m.arch!r}")


def phenotype_task(config: Any) -> Task:
    """The regression `Task` of a resolved config (`whmae.tasks.config.resolve`)."""
    mean, std = train_stats(config.data.dir, tuple(config.phenotypes))
    log.info("targets %s: train mean %s, std %s", tuple(config.phenotypes), mean, std)
    init_params = None
    if config.init.pretrained:
        init_params = pretrained_encoder_init(
            config.init.checkpoint, init_step(config), encoder_config(config.model)
        )
    kind, delta = config.loss, float(config.get("huber_delta", 1.0))
    return Task(
        name="phenotype",
        model_fn=lambda rngs: build_regressor(config, rngs, mean, std),
        loss_fn=phenotype_loss(
            kind,
            delta,
            float(config.data.get("plane_dropout", 0.0)),
            int(config.data.get("plane_dropout_max", 2)),
        ),
        fields=FIELDS,
        init_params=init_params,
        validation=phenotype_validation(tuple(config.phenotypes), kind, delta),
    )


def phenotype_validation(columns: Sequence[str], kind: str = "mse", delta: float = 1.0):
    """Val metrics of a regression model (`whmae.train.validation`):

    loss           the training loss, pooled over the subset's observed entries
    mae_std        the mean over phenotypes of each one's MAE on standardised targets
                   (the train step's `mae_std`, over the subset)
    mae_<column>   each phenotype's MAE in its original units (e.g. `mae_LVM_g`), as
                   `whmae-evaluate phenotypes` computes it (missing targets left out)
    """
    from whmae.evaluate.metrics import regression_stats
    from whmae.evaluate.phenotypes import mean_guess_loss
    from whmae.train.validation import Validation, mean_finite, slug

    def fn(model, batch, key):
        del key
        pred = model(batch["images"], batch["plane_mask"])
        return {
            "pred_std": pred,
            "target_std": model.standardise(batch["phenotypes"]),
            "pred": model.to_physical(pred),
            "target": batch["phenotypes"][:, np.asarray(model.column_ids)].astype(jnp.float32),
        }

    def summarise(values):
        error = values["pred_std"] - values["target_std"]  # NaN where the target is missing
        out = {"loss": mean_guess_loss(error, kind, delta)}
        per_column = [regression_stats(values["pred_std"][:, k], values["target_std"][:, k])
                      for k in range(len(columns))]  # fmt: skip
        out["mae_std"] = mean_finite(s["mae"] for s in per_column)
        for k, column in enumerate(columns):
            out[f"mae_{slug(column)}"] = regression_stats(
                values["pred"][:, k], values["target"][:, k]
            )["mae"]
        return out

    return Validation(fn=fn, summarise=summarise)
