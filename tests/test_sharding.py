"""Mesh construction, logical-axis rules and FSDP memory, on 8 emulated CPU devices."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from whmae.model.mae import MaskedAutoencoder, tiny_config
from whmae.train.mesh import logical_rules, logical_to_spec, make_mesh, tree_shardings
from whmae.train.optim import make_optimizer
from whmae.train.step import abstract_state, init_train_state


def mesh_of(data, fsdp, tensor):
    return make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_make_mesh_resolves_remaining_devices_and_rejects_bad_sizes():
    mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1)))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    with pytest.raises(ValueError, match="do not divide"):
        mesh_of(-1, 3, 1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        mesh_of(2, 2, 1)
    with pytest.raises(ValueError, match="at most one"):
        mesh_of(-1, -1, 1)


def test_logical_to_spec_serves_largest_dim_first_and_skips_non_divisible():
    mesh = mesh_of(2, 2, 2)
    fsdp_tp = logical_rules("fsdp_tp")
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh, fsdp_tp) == (P("fsdp", "tensor"), [])
    # Odd width: mlp takes tensor, then fsdp stacks onto it; embed is reported.
    spec, misfits = logical_to_spec(("embed", "mlp"), (33, 64), mesh, fsdp_tp)
    assert spec == P(None, ("tensor", "fsdp"))
    assert misfits == []  # every wanted axis found a home
    spec, misfits = logical_to_spec(("heads", "head_dim"), (5, 41), mesh, logical_rules("tp"))
    assert spec == P(None, None)
    assert misfits == [("heads", 5, "tensor")]
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh, logical_rules("dp"))[0] == P(
        None, None
    )
    with pytest.raises(ValueError, match="unknown sharding rules"):
        logical_rules("zero3")
    with pytest.raises(ValueError, match="mesh axes are"):
        logical_rules([("embed", "model")])


@pytest.fixture(scope="module")
def tiny_mae_shapes():
    """Abstract tiny-MAE train state (no compilation)."""
    tx, _ = make_optimizer(ml_collections.ConfigDict(dict(name="adam", lr=1e-4)), 10)
    model_config = tiny_config()
    return tx, lambda rngs: MaskedAutoencoder(model_config, rngs=rngs)


@pytest.mark.parametrize(
    "preset, sizes, fc1_kernel, patch_kernel, qkv_kernel",
    [
        ("dp", (8, 1, 1), P(None, None), P(None, None), P(None, None, None, None)),
        ("fsdp", (2, 4, 1), P(None, "fsdp"), P("fsdp", None), P(None, None, None, None)),
        ("tp", (2, 2, 2), P(None, "tensor"), P(None, None), P(None, None, None, None)),
        (
            "fsdp_tp",
            (2, 2, 2),
            P(None, ("tensor", "fsdp")),
            P("fsdp", None),
            P(None, None, None, None),
        ),
    ],
)
def test_presets_give_expected_specs_for_the_mae(
    tiny_mae_shapes, caplog, preset, sizes, fc1_kernel, patch_kernel, qkv_kernel
):
    tx, model_fn = tiny_mae_shapes
    with caplog.at_level(logging.WARNING, logger="whmae.train.mesh"):
        _, abstract, _ = abstract_state(model_fn, tx, mesh_of(*sizes), logical_rules(preset))
    params = abstract.params
    fc1 = params["encoder_blocks"][0]["mlp"]["fc1"]
    assert fc1["kernel"].sharding.spec == fc1_kernel
    assert params["patch_embed"]["kernel"].sharding.spec == patch_kernel
    assert params["encoder_blocks"][0]["attn"]["qkv_kernel"].sharding.spec == qkv_kernel
    # Adam moments follow their parameters; the count is replicated.
    adam = abstract.opt_state[0]
    assert adam.mu["encoder_blocks"][0]["mlp"]["fc1"]["kernel"].sharding.spec == fc1_kernel
    assert adam.count.sharding.spec == P()
    assert abstract.step.sharding.spec == P()
    warned = " ".join(r.getMessage() for r in caplog.records)
    if preset in ("tp", "fsdp_tp"):
        # 3 heads do not split in 2: a one-line warning names the cause.
        assert "'heads' dim 3 does not split over tensor=2" in warned
    if preset == "dp":
        assert warned == ""


class EvenStandIn(nnx.Module):
    """A model whose every dim divides 8: FSDP should reach ~1/N memory per device."""

    def __init__(self, rngs: nnx.Rngs):
        def param(shape, names):
            init = nnx.initializers.normal(1.0)
            return nnx.Param(init(rngs.params(), shape), out_sharding=names, eager_sharding=False)

        self.up = param((64, 256), ("embed", "mlp"))
        self.up_bias = param((256,), ("mlp",))
        self.down = param((256, 64), ("mlp", "embed"))
        self.norm_scale = param((64,), ("embed",))
        self.tiny = param((3,), (None,))  # an unshardable leftover


def _bytes_per_device(tree) -> dict[int, int]:
    per_device: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return per_device


def test_fsdp_shards_params_and_optimizer_state():
    tx, _ = make_optimizer(
        ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, warmup_steps=1, weight_decay=0.1)),
        10,
    )
    mesh = mesh_of(2, 4, 1)
    _, state, _ = init_train_state(EvenStandIn, tx, mesh, logical_rules("fsdp"), seed=0)
    memory = (state.params, state.opt_state)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(memory))
    replicated = sum(
        leaf.nbytes for leaf in jax.tree.leaves(memory) if leaf.sharding.is_fully_replicated
    )
    assert replicated < 0.01 * total  # the optax count and the 3-vector
    per_device = _bytes_per_device(memory)
    assert len(per_device) == 8
    for nbytes in per_device.values():
        assert nbytes == pytest.approx(total / 4 + replicated * 3 / 4, rel=1e-6)
    # The same parameters materialise whatever the layout.
    _, dense, _ = init_train_state(EvenStandIn, tx, mesh, logical_rules("dp"), seed=0)
    np.testing.assert_array_equal(np.asarray(state.params["up"]), np.asarray(dense.params["up"]))
    assert max(_bytes_per_device((dense.params, dense.opt_state)).values()) == total


def test_tree_shardings_replicates_plain_leaves():
    mesh = mesh_of(2, 4, 1)
    tree = {"count": jnp.zeros((), jnp.int32), "key": jax.random.key(0)}
    shardings = tree_shardings(tree, mesh, logical_rules("fsdp"))
    assert all(s.spec == P() for s in jax.tree.leaves(shardings))
