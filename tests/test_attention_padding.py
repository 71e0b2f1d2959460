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


def test_chunked_attention_equals_dense_attention_with_gradients():
    """Query chunks with a recomputed backward (`whmae.model.chunked_attention`) give
    the dense result: chunk sizes that do and do not divide L, some keys masked out."""
    from whmae.model.chunked_attention import chunked_attention

    q, k, v, w = jax.random.normal(jax.random.key(1), (4, 2, 37, 3, 8))
    kv_lengths = jnp.array([37, 20])

    def dense(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, scale=8**-0.5,
                                           key_value_seq_lengths=kv_lengths)  # fmt: skip
        return jnp.sum(out * w), out

    (_, expected), expected_grads = jax.jit(jax.value_and_grad(dense, (0, 1, 2), has_aux=True))(
        q, k, v
    )
    for chunk in (8, 37, 64):

        def chunked(q, k, v, chunk=chunk):
            out = chunked_attention(q, k, v, kv_lengths, scale=8**-0.5, chunk=chunk)
            return jnp.sum(out * w), out

        (_, out), grads = jax.jit(jax.value_and_grad(chunked, (0, 1, 2), has_aux=True))(q, k, v)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, expected_grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    # Masked keys get no gradient; a query's output ignores them.
    assert float(jnp.abs(grads[1][1, 20:]).max()) == 0.0


def test_chunk_rows_are_balanced():
    """The fewest chunks of at most `chunk` rows, equal in size: padding < one row per chunk."""
    from whmae.model.chunked_attention import chunk_rows

    assert chunk_rows(1153, 256) == 231  # 5 x 231 = 1155, not 5 x 256 = 1280
    assert chunk_rows(4609, 256) == 243
    assert chunk_rows(512, 256) == 256 and chunk_rows(37, 64) == 37 and chunk_rows(5, 1) == 1
    for length in (1, 7, 37, 257, 1153, 4609):
        for chunk in (1, 8, 64, 256, 512):
            rows = chunk_rows(length, chunk)
            n = -(-length // rows)
            assert rows <= min(chunk, length) and n == -(-length // min(chunk, length))
            assert n * rows - length < n


def test_chunked_attention_backward_copies_no_probability_chunk():
    """The keys-major layout: the compiled backward never copies (transposes) a
    probability-sized [B, heads, L, chunk] buffer, which the queries-major layout did for
    p^T.dO and ds^T.q (16 % of the small benchmark step)."""
    import re

    from whmae.model.chunked_attention import chunked_attention

    b, length, heads, head_dim, chunk = 1, 96, 3, 8, 32
    q, k, v = jax.random.normal(jax.random.key(4), (3, b, length, heads, head_dim))

    def loss(q, k, v):
        return jnp.sum(chunked_attention(q, k, v, scale=0.3, chunk=chunk) ** 2)

    hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile().as_text()
    probability = b * heads * length * chunk
    copies = []
    for name, dims in re.findall(r"%((?:copy|transpose)[\w.\-]*) = f32\[([\d,]+)\]", hlo):
        if np.prod([int(d) for d in dims.split(",")]) == probability:
            copies.append(name)
    assert "while" in hlo and not copies, copies


def test_mae_step_with_chunked_attention_matches_xla():
    """The whole MAE loss and its gradients: attention_impl "chunked" == "xla"."""
    from flax import nnx

    from whmae.model.mae import MaskedAutoencoder, tiny_config

    images = jax.random.uniform(jax.random.key(2), (2, 9, 10, 32, 32))
    plane_mask = jnp.ones((2, 9), bool).at[1, 3].set(False)
    results = {}
    for impl in ("xla", "chunked"):
        model = MaskedAutoencoder(tiny_config(attention_impl=impl), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, graphdef=graphdef, rest=rest):
            return nnx.merge(graphdef, params, rest)(images, plane_mask, jax.random.key(3))["loss"]

        results[impl] = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(results["chunked"][0], results["xla"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results["chunked"][1]), jax.tree.leaves(results["xla"][1]),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
