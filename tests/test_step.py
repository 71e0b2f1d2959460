"""The sharded train step and the optimizer, with the tiny MAE on 8 emulated CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from whmae.model.mae import MaskedAutoencoder, tiny_config
from whmae.train.mesh import logical_rules, make_mesh
from whmae.train.optim import decay_mask, make_optimizer
from whmae.train.step import (
    batch_shardings_for,
    global_batch,
    init_train_state,
    make_train_step,
    pretrain_loss,
)

FIELDS = ("images", "plane_mask", "exam_index")
MODEL_CONFIG = tiny_config(depth=1)


def model_fn(rngs):
    return MaskedAutoencoder(MODEL_CONFIG, rngs=rngs)


def optim_config(**fields):
    base = dict(name="adamw", lr=1e-3, warmup_steps=1, weight_decay=0.05, clip_norm=1.0)
    return ml_collections.ConfigDict({**base, **fields})


def per_exam_mask_loss(model, batch, key):
    """The MAE loss with each exam's mask drawn from its `exam_index` (so a micro-batch
    sees what the full batch sees), plus a draw from the key the step handed over."""
    exam_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(11), i))(batch["exam_index"])
    noise = jax.vmap(lambda k: jax.random.uniform(k, (MODEL_CONFIG.num_tokens,)))(exam_keys)
    images = batch["images"].astype(jnp.float32) / 255.0
    out = model(images, batch["plane_mask"], ids_shuffle=jnp.argsort(noise, axis=1))
    return out["loss"], {"key_probe": jax.random.uniform(key)}


def exam_batch(size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (size, 9, 10, 32, 32), dtype=np.uint8)
    plane_mask = np.ones((size, 9), bool)
    # Missing planes, one in each half, so both halves weigh the same in the loss.
    plane_mask[1, 2] = plane_mask[5, 7] = False
    exam_index = np.arange(size, dtype=np.int32)
    return {"images": images, "plane_mask": plane_mask, "exam_index": exam_index}


def mesh_of(data, fsdp, tensor):
    devices = jax.devices()[: data * fsdp * tensor]
    return make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices)


def build(sizes, rules, optim=None, seed=0, total_steps=10):
    """(mesh, state, step_fn, schedule) for one layout."""
    mesh = mesh_of(*sizes)
    tx, schedule = make_optimizer(optim or optim_config(), total_steps)
    graphdef, state, shardings = init_train_state(
        model_fn, tx, mesh, logical_rules(rules), seed=seed
    )
    batch_shardings = batch_shardings_for(mesh, FIELDS)
    step_fn = make_train_step(
        graphdef, per_exam_mask_loss, tx, mesh, shardings, batch_shardings, schedule
    )
    return mesh, state, step_fn, schedule


def run(sizes, rules, steps=2, seed=0):
    mesh, state, step_fn, _ = build(sizes, rules, seed=seed)
    batch = global_batch(exam_batch(), mesh, batch_shardings_for(mesh, FIELDS))
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, batch, jax.random.key(7))
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


@pytest.fixture(scope="module")
def single_device():
    """One device: (mesh, step_fn, params after 2 steps, metrics per step)."""
    mesh, state, step_fn, _ = build((1, 1, 1), "dp")
    initial = jax.device_get(state.params)
    batch = global_batch(exam_batch(), mesh, batch_shardings_for(mesh, FIELDS))
    history = []
    for _ in range(2):
        state, metrics = step_fn(state, batch, jax.random.key(7))
        history.append(jax.device_get(metrics))
    return dict(
        mesh=mesh,
        step_fn=step_fn,
        initial=initial,
        params=jax.device_get(state.params),
        history=history,
        batch=batch,
    )


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("sizes, rules", [((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")])
def test_sharded_step_matches_single_device(single_device, sizes, rules):
    params, history = run(sizes, rules)
    for ours, reference in zip(history, single_device["history"], strict=True):
        for name in ("loss", "grad_norm", "lr", "key_probe"):
            np.testing.assert_allclose(ours[name], reference[name], rtol=1e-5, atol=1e-6)
    assert_trees_close(params, single_device["params"])
    # The comparison is not vacuous: two steps moved the parameters.
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params, single_device["initial"])
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_step_metrics_fold_the_key_with_the_step(single_device):
    first, second = single_device["history"]
    assert set(first) == {"loss", "grad_norm", "lr", "key_probe"}
    assert first["lr"] == 0.0 and second["lr"] == pytest.approx(1e-3)  # warmup 1
    assert first["key_probe"] == pytest.approx(
        jax.random.uniform(jax.random.fold_in(jax.random.key(7), 0))
    )
    assert first["key_probe"] != second["key_probe"]  # a new mask draw every step
    # Update 0 has lr 0 (warmup from 0): the parameters and so the loss are unchanged.
    assert second["loss"] == first["loss"]


def test_pretrain_loss_scales_uint8_on_device_and_keeps_scalar_outputs():
    seen = {}

    def fake_mae(images, plane_mask, key):
        seen.update(images=images, plane_mask=plane_mask, key=key)
        return {"loss": images.mean(), "pred": images, "extra": jnp.float32(2.0)}

    batch = {"images": np.array([[0, 51, 255]], np.uint8), "plane_mask": np.ones((1, 9), bool)}
    loss, aux = pretrain_loss(fake_mae, batch, jax.random.key(0))
    np.testing.assert_allclose(seen["images"], [[0.0, 0.2, 1.0]], rtol=1e-6)
    assert seen["images"].dtype == jnp.float32
    assert float(loss) == pytest.approx(0.4) and aux == {"extra": 2.0}


def test_same_seed_same_params_and_restart_replays_the_same_step(single_device):
    step_fn, batch, key = single_device["step_fn"], single_device["batch"], jax.random.key(7)
    _, again, _, _ = build((1, 1, 1), "dp")
    again, _ = step_fn(again, batch, key)
    saved = jax.device_get(again)
    again, metrics = step_fn(again, batch, key)
    assert_trees_close(jax.device_get(again.params), single_device["params"], rtol=0, atol=0)
    # A "restored" copy of the step-1 state replays step 2 exactly.
    restored = jax.device_put(saved, jax.tree.map(lambda x: x.sharding, again))
    _, replay = step_fn(restored, batch, key)
    for name, value in jax.device_get(metrics).items():
        assert replay[name] == value, name
    # Another seed: other parameters (built eagerly: no compile needed to see it).
    with nnx.use_eager_sharding(False):
        other = nnx.state(model_fn(nnx.Rngs(1)), nnx.Param)
    a = np.asarray(other["patch_embed"]["kernel"].get_value())
    b = np.asarray(single_device["initial"]["patch_embed"]["kernel"])
    assert np.abs(a - b).max() > 1e-3


def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch(single_device):
    # 2 micro-batches of 4 per update, twice == the reference's 2 steps on 8 exams
    # (same number of updates in the schedule).
    mesh, state, step_fn, _ = build(
        (1, 1, 1), "dp", optim=optim_config(grad_accum_steps=2), total_steps=20
    )
    batch, shardings = exam_batch(), batch_shardings_for(mesh, FIELDS)
    for _ in range(2):
        for rows in (slice(0, 4), slice(4, 8)):
            micro = global_batch({k: v[rows] for k, v in batch.items()}, mesh, shardings)
            state, _ = step_fn(state, micro, jax.random.key(7))
    assert int(state.step) == 4
    assert_trees_close(jax.device_get(state.params), single_device["params"], atol=2e-6)


def test_adamw_decays_matrices_only(single_device):
    params = single_device["initial"]
    mask = decay_mask(params)
    assert mask["encoder_blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
    assert mask["encoder_blocks"][0]["attn"]["qkv_kernel"].get_value()
    assert mask["patch_embed"]["kernel"].get_value()
    for path in (
        ("cls_token",),
        ("mask_token",),
        ("encoder_norm", "scale"),
        ("recon_head", "bias"),
    ):
        node = mask
        for key in path:
            node = node[key]
        assert not node.get_value(), path
    # Zero gradients: Adam's update is 0, so only weight decay moves parameters.
    tx, schedule = make_optimizer(optim_config(lr=1e-2, weight_decay=0.1, clip_norm=0.0), 10)

    @jax.jit
    def two_updates(params):
        opt_state, zeros = tx.init(params), jax.tree.map(jnp.zeros_like, params)
        for _ in range(2):  # update 0 has lr 0 (warmup), update 1 lr 1e-2
            updates, opt_state = tx.update(zeros, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params

    new = two_updates(params)
    shrink = 1 - float(schedule(1)) * 0.1
    for decays, before, after in zip(
        jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(new), strict=True
    ):
        expected = before * shrink if decays else before
        np.testing.assert_allclose(after, expected, rtol=1e-6)


def test_schedules():
    _, cosine = make_optimizer(optim_config(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
    for step, lr in ((0, 0.0), (5, 0.5), (10, 1.0), (60, 0.55), (110, 0.1)):
        assert float(cosine(step)) == pytest.approx(lr, abs=1e-6), step
    # With accumulation the schedule counts updates, not micro-steps.
    _, accum = make_optimizer(
        optim_config(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, grad_accum_steps=2), 220
    )
    assert float(accum(11)) == pytest.approx(0.5) and float(accum(120)) == pytest.approx(0.55)
    _, constant = make_optimizer(ml_collections.ConfigDict(dict(name="adam", lr=1e-4)), 10)
    assert float(constant(0)) == float(constant(9)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_optimizer(optim_config(warmup_steps=10), 10)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        make_optimizer(optim_config(grad_accum_steps=3), 10)


def test_global_batch_rejects_a_batch_that_does_not_split():
    mesh = make_mesh(dict(data=-1, fsdp=1, tensor=1))
    with pytest.raises(ValueError, match="'images'.*does not split over data x fsdp = 8"):
        global_batch({"images": np.zeros((6, 2), np.uint8)}, mesh)
    arrays = global_batch(exam_batch(), mesh)
    assert arrays["images"].sharding.shard_shape(arrays["images"].shape)[0] == 1
    np.testing.assert_array_equal(np.asarray(arrays["images"]), exam_batch()["images"])
