"""Zero-padding the head dim inside attention (for cuDNN) leaves every output unchanged."""

import jax
import jax.numpy as jnp
import numpy as np

from whmae.model.vit import padded_attention


def test_padded_head_dim_is_numerically_identical():
    # head_dim 13 -> 16, like the reference's 205 -> 208; some keys masked out.
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 11, 3, 13))
    kv_lengths = jnp.array([11, 6])

    def loss(q, k, v, multiple):
        out = padded_attention(q, k, v, kv_lengths, implementation="xla", multiple=multiple)
        return jnp.sum(out * jnp.sin(out)), out

    (_, plain), plain_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, 1)
    (_, padded), padded_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, 8)
    assert padded.shape == plain.shape == (2, 11, 3, 13)
    np.testing.assert_allclose(padded, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(padded_grads, plain_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The scale must stay 1/sqrt(13): with the padded width's scale the result differs.
    wrong = jax.nn.dot_product_attention(
        *(jnp.pad(t, [(0, 0)] * 3 + [(0, 3)]) for t in (q, k, v)), key_value_seq_lengths=kv_lengths
    )[..., :13]
    assert not np.allclose(wrong, plain, atol=1e-3)
