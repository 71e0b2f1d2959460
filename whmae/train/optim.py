"""Optimizers from config: the reference Adam, or AdamW with warmup + cosine decay.

Both take optional global-norm clipping and gradient accumulation (`optax.MultiSteps`):
with `grad_accum_steps = k`, every k calls of the train step make one update.
`freeze` (regexes over parameter paths such as `encoder/encoder_blocks/0/attn/qkv_kernel`)
gives the matching parameters zero gradients and zero updates (linear probes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Path fragments of parameters that never get weight decay, besides 1-d ones (biases,
# LayerNorm scales): learned tokens and embeddings are not "matrices" in the MAE sense.
NO_DECAY_NAMES = ("bias", "scale", "norm", "token", "pos_embed")

Schedule = Callable[[jax.Array | int], jax.Array]


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]


def decay_mask(params: Any) -> Any:
    """True for weight matrices (ndim >= 2, not a token / norm / bias), False elsewhere."""

    def is_matrix(path, leaf):
        names = _path_names(path)
        excluded = any(word in name for name in names for word in NO_DECAY_NAMES)
        return jnp.ndim(leaf) >= 2 and not excluded

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def param_path(path) -> str:
    """A parameter's path as `a/b/0/c` (what `optim.freeze` regexes match)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    # nnx.Variable leaves add their own `value` entry: not part of the parameter's name.
    return "/".join(names[:-1] if names and names[-1] == "value" else names)


def zero_frozen(patterns) -> optax.GradientTransformation:
    """Stateless: zero the entries of parameters whose path matches a regex of `patterns`
    (re.search); raises at the first call if a pattern matches nothing (a typo would
    silently train everything)."""
    compiled = [re.compile(p) for p in patterns]

    def zero(updates, params=None):
        del params
        used = set()

        def one(path, leaf):
            hits = [p.pattern for p in compiled if p.search(param_path(path))]
            used.update(hits)
            return jnp.zeros_like(leaf) if hits else leaf

        out = jax.tree_util.tree_map_with_path(one, updates)
        unused = [p.pattern for p in compiled if p.pattern not in used]
        if unused:
            raise ValueError(f"optim.freeze patterns {unused} match no parameter path")
        return out

    return optax.stateless(zero)


def make_schedule(optim_config: Any, total_updates: int) -> optax.Schedule:
    """Learning rate per optimizer update: constant (`adam`) or warmup + cosine (`adamw`)."""
    name = optim_config.name
    if name == "adam":
        return optax.constant_schedule(optim_config.lr)
    if name == "adamw":
        warmup = int(optim_config.warmup_steps)
        if total_updates <= warmup:
            raise ValueError(
                f"optim.warmup_steps={warmup} must be below the {total_updates} optimizer updates"
            )
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=optim_config.lr,
            warmup_steps=warmup,
            decay_steps=total_updates,
            end_value=optim_config.lr * optim_config.get("min_lr_ratio", 0.0),
        )
    raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'adamw'")


def make_optimizer(
    optim_config: Any, total_steps: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """(tx, schedule) for `total_steps` calls of the train step (micro-steps).

    `optim_config`: `name` ('adam'|'adamw'), `lr`, `warmup_steps`, `weight_decay`,
    `clip_norm` (0/None: off), `grad_accum_steps` (1: off), optional `b1`, `b2`, `eps`,
    `min_lr_ratio`, `freeze` (list of parameter-path regexes kept fixed). The schedule
    maps a train-step count to the lr that step applies.
    """
    if total_steps < 1:
        raise ValueError(f"train.steps={total_steps} must be >= 1")
    accum = int(optim_config.get("grad_accum_steps", 1) or 1)
    if accum < 1 or total_steps % accum:
        raise ValueError(
            f"optim.grad_accum_steps={accum} must be >= 1 and divide train steps {total_steps}"
        )
    schedule = make_schedule(optim_config, total_steps // accum)
    betas = dict(
        b1=optim_config.get("b1", 0.9),
        b2=optim_config.get("b2", 0.999),
        eps=optim_config.get("eps", 1e-8),
    )
    if optim_config.name == "adam":
        if optim_config.get("weight_decay", 0.0):
            raise ValueError("optimizer 'adam' has no weight decay; use 'adamw'")
        tx = optax.adam(schedule, **betas)
    else:
        tx = optax.adamw(schedule, weight_decay=optim_config.weight_decay, mask=decay_mask, **betas)
    if optim_config.get("clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(optim_config.clip_norm), tx)
    freeze = tuple(optim_config.get("freeze", None) or ())
    if freeze:
        # Zero gradients in (no moments, no share of the clipping norm) and updates out
        # (no weight decay). Not optax.multi_transform: its masked states would be
        # nnx.Variables without arrays, which the state's sharding cannot place.
        tx = optax.chain(zero_frozen(freeze), tx, zero_frozen(freeze))
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()

    def step_schedule(step):
        return schedule(jnp.asarray(step) // accum)

    return tx, step_schedule
