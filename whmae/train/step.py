"""The train state and the one jitted, sharded train step shared by every stage.

Pretraining, phenotype regression and segmentation all use `make_train_step`; only the
model and the `loss_fn(model, batch, key) -> (loss, aux)` change. Pure functional NNX:
the state is `nnx.split` pieces, the step `nnx.merge`s them, computes, and returns new
pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from whmae.train.mesh import Rules, batch_sharding, replicated, tree_shardings

LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: nnx.State of Params; rest: other variables (may be empty)."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState


def _build(model_fn: Callable[[nnx.Rngs], nnx.Module], tx, seed: int):
    """(graphdef, init, shapes): `init()` returns the TrainState (trace it under jit),
    `shapes` is its abstract tree from a single abstract trace of the model."""

    def create():
        # Shardings are applied by jit's out_shardings, not per Variable at creation.
        with nnx.use_eager_sharding(False):
            return model_fn(nnx.Rngs(seed))

    graphdef, params, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=jax.eval_shape(tx.init, params),
    )

    def init() -> TrainState:
        _, params, rest = nnx.split(create(), nnx.Param, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params)
        )

    return graphdef, init, shapes


def abstract_state(
    model_fn: Callable[[nnx.Rngs], nnx.Module], tx, mesh: Mesh, rules: Rules, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, TrainState of `jax.ShapeDtypeStruct` with shardings, state shardings).

    The abstract tree is what Orbax restores into: any mesh and rules, no allocation.
    """
    graphdef, _, shapes = _build(model_fn, tx, seed)
    shardings = tree_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return graphdef, abstract, shardings


def init_train_state(
    model_fn: Callable[[nnx.Rngs], nnx.Module], tx, mesh: Mesh, rules: Rules, seed: int
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state, state_shardings); parameters materialise directly sharded."""
    graphdef, init, shapes = _build(model_fn, tx, seed)
    shardings = tree_shardings(shapes, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    batch_shardings: Any,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`step_fn(state, batch, key) -> (new_state, metrics)`, one jit, state donated.

    `key` is folded with `state.step`, so a run restarted from a checkpoint draws the same
    masks. Metrics (replicated scalars): loss, grad_norm, lr (if `schedule`), and the
    loss_fn's aux scalars.
    """

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)

        def loss_of(params):
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            loss, aux = loss_fn(model, batch, step_key)
            return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (aux, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        return new_state, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

    scalar = replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings, scalar),
        out_shardings=(state_shardings, scalar),
        donate_argnums=(0,),
    )


EvalFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], dict[str, jax.Array]]


def make_eval_step(
    graphdef: nnx.GraphDef,
    eval_fn: EvalFn,
    mesh: Mesh,
    state_shardings: TrainState,
    batch_shardings: Any,
) -> Callable[[TrainState, dict, jax.Array], dict[str, jax.Array]]:
    """`eval_step(state, batch, key) -> values`, one jit, nothing donated.

    `eval_fn(model, batch, key)` returns per-exam values (leading dim B, the batch split
    over the mesh like the train step's); they come back replicated (gathered over the
    devices and processes: small), so every process can read them.
    """

    def eval_step(params: nnx.State, rest: nnx.State, batch: dict, key: jax.Array):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return eval_fn(model, batch, key)

    scalar = replicated(mesh)
    step = jax.jit(
        eval_step,
        in_shardings=(state_shardings.params, state_shardings.rest, batch_shardings, scalar),
        out_shardings=scalar,
    )
    return lambda state, batch, key: step(state.params, state.rest, batch, key)


def pretrain_loss(model: nnx.Module, batch: Mapping[str, jax.Array], key: jax.Array):
    """MAE loss on `images` uint8 [B, 9, T, H, W] (scaled to [0, 1] here, on device) and
    `plane_mask` bool [B, 9]; aux holds the model's other scalar outputs."""
    images = batch["images"].astype(jnp.float32) / 255.0
    out = model(images, batch["plane_mask"], key)
    aux = {k: v for k, v in out.items() if k != "loss" and jnp.ndim(v) == 0}
    return out["loss"], aux


def batch_shardings_for(mesh: Mesh, fields: tuple[str, ...]) -> dict[str, NamedSharding]:
    """Batch dim over ("data", "fsdp") for each field of a batch dict."""
    return {name: batch_sharding(mesh) for name in fields}


def global_batch(
    host_batch: Mapping[str, np.ndarray], mesh: Mesh, batch_shardings: Any = None
) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of the batch (multi-host safe).

    `host_batch[k]` has leading dim global_batch / process_count; `batch_shardings` is one
    sharding or a dict by field (default: batch dim over ("data", "fsdp")).
    """
    if batch_shardings is None:
        batch_shardings = batch_sharding(mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for name, value in host_batch.items():
        value = np.asarray(value)
        if (value.shape[0] * jax.process_count()) % shards:
            raise ValueError(
                f"batch field {name!r}: global batch {value.shape[0] * jax.process_count()} "
                f"does not split over data x fsdp = {shards} devices"
            )
        sharding = (
            batch_shardings[name] if isinstance(batch_shardings, Mapping) else batch_shardings
        )
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out
