"""Save and load an MAE's parameters in the training loop's checkpoint layout.

A checkpoint directory is what `whmae.train.checkpoint.Checkpointer` writes:
`<dir>/<step>/state` (a pytree whose `params` entry holds the model's `nnx.Param`
state) and `<dir>/<step>/config` (JSON whose `model` entry is the `MAEConfig`).
Pretraining checkpoints also hold the optimiser state; converted ones
(`whmae-convert`) hold only `step` and `params`. `load_model` restores `params`
alone (a partial Orbax restore), so it serves both.

`load_model` accepts the run's workdir (holding `checkpoints/`), the checkpoint
directory itself, or one step directory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from whmae.model.config import MAEConfig
from whmae.model.mae import MaskedAutoencoder
from whmae.train.checkpoint import CHECKPOINT_DIR, Checkpointer

__all__ = [
    "abstract_model",
    "load_model",
    "model_from_params",
    "resolve_checkpoint",
    "save_model",
]


@functools.partial(jax.jit, static_argnames=("graphdef", "fn"))
def apply_split(graphdef: nnx.GraphDef, fn, state: nnx.State, *args):
    """`fn(model, *args)` for the model `nnx.split` gave as (graphdef, state), jitted.

    The one compiled cache for evaluations that run one model many times (every split,
    every set of removed planes): keyed by graphdef, `fn` (a module-level function, so the
    same object every call) and argument shapes, it compiles once per shape where a
    `jax.jit` of a closure made per call compiled on every call."""
    return fn(nnx.merge(graphdef, state), *args)


def abstract_model(config: MAEConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params of `jax.ShapeDtypeStruct`, other state) without allocating."""
    model = nnx.eval_shape(lambda: MaskedAutoencoder(config, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param, ...)


def model_from_params(config: MAEConfig, params: Mapping[str, Any]) -> MaskedAutoencoder:
    """A model whose parameters are `params`, a nested dict as `nnx.to_pure_dict` gives
    (list indices as ints or strings); shapes must match the config's."""
    graphdef, abstract, rest = abstract_model(config)
    flat_target = dict(nnx.to_flat_state(abstract))
    flat_given = {tuple(_key(k) for k in path): v for path, v in _flatten(params).items()}
    missing = sorted(set(flat_target) - set(flat_given))
    unknown = sorted(set(flat_given) - set(flat_target))
    if missing or unknown:
        raise ValueError(
            f"parameters do not fit MaskedAutoencoder({config}): missing "
            f"{[_dotted(p) for p in missing]}, unknown {[_dotted(p) for p in unknown]}"
        )
    for path, variable in flat_target.items():
        value = flat_given[path]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"parameter {_dotted(path)} has shape {tuple(value.shape)}, the config needs "
                f"{tuple(variable.shape)}"
            )
        variable.set_value(jax.numpy.asarray(value, variable.dtype))
    return nnx.merge(graphdef, abstract, rest)


def save_model(
    directory: str | os.PathLike,
    model: MaskedAutoencoder,
    *,
    step: int = 0,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model`'s parameters and config as checkpoint `step` of `directory`.

    Layout as the training loop's (items `state` = {step, params} and `config` =
    {"model": MAEConfig fields, **extra_config}). Returns the step directory.
    """
    params = nnx.state(model, nnx.Param)
    config = {"model": dataclasses.asdict(model.config), **dict(extra_config or {})}
    state = {"step": np.int32(step), "params": params}
    with Checkpointer(str(directory), save_every=1, async_save=False) as checkpointer:
        if step in checkpointer.all_steps():
            raise FileExistsError(f"{checkpointer.directory} already holds step {step}")
        checkpointer.save(step, state, config=config, force=True)
        return Path(checkpointer.directory) / str(step)


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[Path, int]:
    """(checkpoint directory, step) for a workdir, a checkpoint dir or a step dir."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a directory)")
    if (path / "state").is_dir() and path.name.isdigit():
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is step {path.name}, but step {step} was asked for")
        return path.parent, int(path.name)
    if (path / CHECKPOINT_DIR).is_dir():
        path = path / CHECKPOINT_DIR
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())
    if not steps:
        raise FileNotFoundError(
            f"{path} holds no checkpoint steps (expected <step>/state from whmae-pretrain "
            "or whmae-convert)"
        )
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {path}; have {steps}")
    return path, step


def load_config(path: str | os.PathLike, step: int | None = None) -> MAEConfig:
    """The `MAEConfig` stored with a checkpoint."""
    directory, step = resolve_checkpoint(path, step)
    where = directory / str(step) / "config"
    if not where.is_dir():
        raise FileNotFoundError(f"{where} is missing: the checkpoint has no config to build from")
    restored = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        where, args=ocp.args.JsonRestore()
    )
    if "model" not in restored:
        raise ValueError(f"{where} has no `model` entry (keys {sorted(restored)})")
    try:
        return MAEConfig(**restored["model"])
    except TypeError as e:
        raise ValueError(f"{where}: model config does not fit MAEConfig ({e})") from None


def load_model(
    path: str | os.PathLike,
    step: int | None = None,
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[MaskedAutoencoder, MAEConfig]:
    """(model, config) from a pretraining or converted checkpoint; newest step by default.

    Only the parameters are read. `sharding` places every parameter (e.g. replicated
    on a mesh); by default they land on the default device.
    """
    directory, step = resolve_checkpoint(path, step)
    config = load_config(directory, step)
    graphdef, abstract, rest = abstract_model(config)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        "params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
        )
    }
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{directory / str(step)}: parameters do not match the stored config {config} ({e})"
        ) from None
    return nnx.merge(graphdef, restored["params"], rest), config


def _key(k):
    return int(k) if isinstance(k, str) and k.isdigit() else k


def _dotted(path) -> str:
    return ".".join(str(k) for k in path)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, (*prefix, k)))
        else:
            flat[(*prefix, k)] = v
    return flat
