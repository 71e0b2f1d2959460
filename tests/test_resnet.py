"""The ResNet50 baseline: planes x frames as channels, GroupNorm, a learning step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from whmae.layout import NUM_PLANES, PAPER_PHENOTYPES, PHENOTYPE_COLUMNS
from whmae.model.mae import tiny_config
from whmae.tasks.phenotype import phenotype_loss
from whmae.tasks.resnet import ResNetRegressor, stack_planes

B, T, SIZE = 4, 10, 32
WIDTHS = (8, 8, 16, 16)


def test_stack_planes_puts_plane_s_frame_t_in_channel_s_times_t():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, NUM_PLANES, T, 8, 8), dtype=np.uint8)
    mask = np.ones((2, NUM_PLANES), bool)
    mask[1, 4] = False
    planes = (3, 4, 5)
    stacked = np.asarray(stack_planes(jnp.asarray(images), jnp.asarray(mask), planes))
    assert stacked.shape == (2, 8, 8, 3 * T)
    np.testing.assert_allclose(stacked[0, :, :, 1 * T + 7], images[0, 4, 7] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(stacked[1, :, :, 2 * T + 2], images[1, 5, 2] / 255.0, rtol=1e-6)
    assert not stacked[1, :, :, T : 2 * T].any()  # plane 4 of exam 1 is absent


@pytest.fixture(scope="module")
def regressor_and_batch():
    rng = np.random.default_rng(1)
    model = ResNetRegressor(tiny_config(), PAPER_PHENOTYPES, widths=WIDTHS, groups=4,
                            rngs=nnx.Rngs(0))  # fmt: skip
    batch = {
        "images": jnp.asarray(rng.integers(0, 256, (B, NUM_PLANES, T, SIZE, SIZE), np.uint8)),
        "plane_mask": jnp.ones((B, NUM_PLANES), bool),
        "phenotypes": jnp.asarray(rng.normal(size=(B, len(PHENOTYPE_COLUMNS))), jnp.float32),
    }
    return model, batch


def test_resnet50_has_16_bottlenecks_and_predicts_each_exam_on_its_own(regressor_and_batch):
    model, batch = regressor_and_batch
    assert len(model.layers) == 3 + 4 + 6 + 3
    pred = np.asarray(model(batch["images"], batch["plane_mask"]))
    assert pred.shape == (B, len(PAPER_PHENOTYPES)) and np.isfinite(pred).all()
    # GroupNorm, not BatchNorm: an exam's prediction does not depend on its batch mates.
    alone = np.asarray(model(batch["images"][:1], batch["plane_mask"][:1]))
    np.testing.assert_allclose(alone, pred[:1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(pred[0], pred[1])


def test_a_gradient_step_reduces_the_loss(regressor_and_batch):
    model, batch = regressor_and_batch
    loss_fn = phenotype_loss("mse")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            return loss_fn(nnx.merge(graphdef, params, rest), batch, None)[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = tx.init(params)
    losses = []
    for _ in range(4):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
