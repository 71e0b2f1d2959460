"""Device mesh, logical-axis rules and the shardings they give parameters and batches.

The model names the dims of its parameters with logical axes (`patch`, `embed`, `mlp`,
`qkv`, `heads`, `head_dim`) through `nnx.with_partitioning`; a table of rules maps them
onto the three mesh axes `("data", "fsdp", "tensor")`, so the layout is chosen in the
config (`config.mesh.rules`), never in model code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The leading (batch) dim of every input is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, str | None], ...]

# A logical name may appear several times: candidates in order of preference. The
# reference width D = 1 + 4 x 256 is odd (and 3, heads=5, head_dim=205 too), so FSDP
# must be able to fall back to the even dims (mlp = 4 D, patch = 1600).
_FSDP = (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("patch", "fsdp"),
    ("heads", "fsdp"),
    ("head_dim", "fsdp"),
)
_TP = (("mlp", "tensor"), ("heads", "tensor"))
RULE_PRESETS: dict[str, Rules] = {
    "dp": (),
    "fsdp": _FSDP,
    "tp": _TP,
    "fsdp_tp": _TP + _FSDP,
}

log = logging.getLogger(__name__)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh; one size may be -1 (all remaining devices).

    `mesh_config` has attributes or keys `data`, `fsdp`, `tensor`. `jax.make_mesh` picks a
    device order that keeps the inner axes on fast links on multi-host slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(_field(mesh_config, axis)) for axis in MESH_AXES]
    named = {axis: _field(mesh_config, axis) for axis in MESH_AXES}
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {named}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh sizes {named} do not divide {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {named} needs {math.prod(sizes)} devices, have {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def logical_rules(rules: str | Sequence[Sequence[str | None]]) -> Rules:
    """Rules from a preset name (`dp`, `fsdp`, `tp`, `fsdp_tp`) or a list of pairs
    (logical name, mesh axis or None). Names without a rule stay unsharded."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"unknown sharding rules {rules!r}; presets: {sorted(RULE_PRESETS)}")
        rules = RULE_PRESETS[rules]
    pairs = tuple((str(name), None if axis is None else str(axis)) for name, axis in rules)
    for name, axis in pairs:
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"rule {name!r} -> {axis!r}: mesh axes are {MESH_AXES}")
    return pairs


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> tuple[PartitionSpec, list[tuple[str, int, str]]]:
    """(spec, misfits) for one array; misfits: (logical name, dim size, mesh axis) of dims
    a rule wanted on a mesh axis it does not divide, where the array then left that axis
    unused (replicated over it).

    Like `flax.linen.logical_to_mesh_axes` (the first rule whose mesh axis is still free
    wins), but dims are served largest first, a mesh axis is only taken where it divides
    the dim, and an axis left over may stack onto a dim that already has one
    (`mlp` -> ("tensor", "fsdp")), so odd widths fall back instead of failing.
    """
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    spec: list[tuple[str, ...]] = [()] * len(shape)
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    used: set[str] = set()
    wanted: list[tuple[int, str]] = []

    def try_take(dim: int, axis: str) -> bool:
        if axis in used or shape[dim] % (
            math.prod(mesh.shape[a] for a in spec[dim]) * mesh.shape[axis]
        ):
            return False
        spec[dim] += (axis,)
        used.add(axis)
        return True

    for stacking in (False, True):
        for dim in order:
            if spec[dim] and not stacking:
                continue
            for name, axis in rules:
                if name != logical[dim] or axis is None:
                    continue
                if not stacking:
                    wanted.append((dim, axis))
                if try_take(dim, axis) and not stacking:
                    break
    misfits = [
        (logical[dim], shape[dim], axis)
        for dim, axis in wanted
        if axis not in used and mesh.shape[axis] > 1
    ]
    entries = [None if not axes else axes[0] if len(axes) == 1 else axes for axes in spec]
    return PartitionSpec(*entries), misfits


def _field(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, Mapping) else getattr(config, name)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """`NamedSharding`s for a tree of (abstract) arrays and `nnx.Variable`s.

    Variables take the spec of their logical-axis metadata (`out_sharding`, which optax
    moments inherit from their params) under `rules`; every other leaf (optax counts,
    RNG keys, the step) is replicated. One warning line per distinct array shape that
    could not use a mesh axis its rules asked for.
    """
    misfits: dict = {}

    def one(path, leaf):
        if not isinstance(leaf, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        shape = tuple(np.shape(leaf.get_value()))
        logical = leaf.get_metadata().get("out_sharding") or (None,) * len(shape)
        spec, misfit = logical_to_spec(tuple(logical), shape, mesh, rules)
        for cause in set(misfit):
            misfits.setdefault(cause, []).append(_path_name(path))
        return leaf.replace(NamedSharding(mesh, spec))

    shardings = jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for (name, size, axis), paths in misfits.items():
        log.warning(
            "sharding: %r dim %d does not split over %s=%d; replicated in %d arrays (e.g. %s)",
            name,
            size,
            axis,
            mesh.shape[axis],
            len(paths),
            paths[0],
        )
    return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over `("data", "fsdp")`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
