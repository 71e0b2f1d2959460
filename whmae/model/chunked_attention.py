"""Attention that never holds a [heads, L, L] matrix: query chunks, recomputed backward.

`jax.nn.dot_product_attention(implementation="xla")` materialises the logits and the
probabilities of every head, [B, heads, L, L], and autodiff keeps the probabilities for
the backward pass; at the paper's decoder (L = 4609, 5 heads) that is 405 MiB per copy,
and the compiled CPU train step held seven such buffers (2.8 of its 5.3 GiB of temporaries,
`benchmarks/bench_vs_torch.py`). Here the queries go in chunks of `chunk` rows: the
forward keeps only the output and the per-row log-sum-exp, and the backward recomputes
each chunk's probabilities from them (the FlashAttention recurrence, in plain jnp: one
extra q.k^T per chunk), so the largest temporary is [B, heads, chunk, L].

Same inputs and result as `jax.nn.dot_product_attention(q, k, v, scale=...,
key_value_seq_lengths=...)`: q, k, v [B, L, heads, head_dim], keys at positions >=
kv_lengths[b] ignored. Softmax statistics are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_CHUNK", "chunked_attention"]

# Query rows per chunk: [B, heads, 512, L] float32 is 47 MiB at the paper's decoder.
DEFAULT_CHUNK = 512
_MASKED = -1e30  # a masked key's logit: exp(_MASKED - max) is 0 without inf - inf


def _chunks(x, chunk: int):
    """[B, L, H, K] -> [n, B, chunk, H, K], L zero-padded up to n * chunk."""
    b, length, h, k = x.shape
    n = -(-length // chunk)
    x = jnp.pad(x, ((0, 0), (0, n * chunk - length), (0, 0), (0, 0)))
    return x.reshape(b, n, chunk, h, k).transpose(1, 0, 2, 3, 4)


def _unchunk(x, length: int):
    """[n, B, chunk, ...] -> [B, length, ...]."""
    n, b, chunk = x.shape[:3]
    return x.transpose(1, 0, 2, *range(3, x.ndim)).reshape(b, n * chunk, *x.shape[3:])[:, :length]


def _logits(q_chunk, k, key_valid, scale):
    """[B, chunk, H, K] x [B, L, H, K] -> float32 [B, H, chunk, L], masked keys _MASKED."""
    s = jnp.einsum("bqhk,blhk->bhql", q_chunk, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(key_valid[:, None, None, :], s, _MASKED)


def _forward(q, k, v, kv_lengths, scale, chunk):
    length = k.shape[1]
    key_valid = jnp.arange(length)[None, :] < kv_lengths[:, None]  # [B, L]

    def one(q_chunk):
        s = _logits(q_chunk, k, key_valid, scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("bhql,blhk->bqhk", (p / total).astype(v.dtype), v,
                         preferred_element_type=jnp.float32)  # fmt: skip
        lse = (m + jnp.log(total))[..., 0]  # [B, H, chunk]
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(one, _chunks(q, chunk))
    return _unchunk(out, q.shape[1]), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, kv_lengths, scale, chunk):
    return _forward(q, k, v, kv_lengths, scale, chunk)[0]


def _attention_fwd(q, k, v, kv_lengths, scale, chunk):
    out, lse = _forward(q, k, v, kv_lengths, scale, chunk)
    return out, (q, k, v, kv_lengths, out, lse)


def _attention_bwd(scale, chunk, residuals, d_out):
    q, k, v, kv_lengths, out, lse = residuals
    length = k.shape[1]
    key_valid = jnp.arange(length)[None, :] < kv_lengths[:, None]
    # D_i = sum_k dO_ik O_ik: the softmax Jacobian's row term.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, L, H]

    def one(carry, xs):
        dk, dv = carry
        q_c, do_c, delta_c, lse_c = xs
        p = jnp.exp(_logits(q_c, k, key_valid, scale) - lse_c[..., None])  # [B, H, c, L]
        do32 = do_c.astype(jnp.float32)
        dv = dv + jnp.einsum("bhql,bqhk->blhk", p, do32)
        dp = jnp.einsum("bqhk,blhk->bhql", do32, v.astype(jnp.float32))
        ds = p * (dp - delta_c.transpose(0, 2, 1)[..., None]) * scale
        dq_c = jnp.einsum("bhql,blhk->bqhk", ds, k.astype(jnp.float32))
        dk = dk + jnp.einsum("bhql,bqhk->blhk", ds, q_c.astype(jnp.float32))
        return (dk, dv), dq_c

    zeros = jnp.zeros(k.shape, jnp.float32)
    xs = (_chunks(q, chunk), _chunks(d_out, chunk),
          _chunks(delta[..., None], chunk)[..., 0], lse)  # fmt: skip
    (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), xs)
    dq = _unchunk(dq, q.shape[1])
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q, k, v, kv_lengths=None, *, scale: float, chunk: int = DEFAULT_CHUNK):
    """Softmax attention of q, k, v [B, L, heads, head_dim] (module docstring)."""
    if kv_lengths is None:
        kv_lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
    chunk = max(1, min(int(chunk), q.shape[1]))
    return _attention(q, k, v, jnp.asarray(kv_lengths, jnp.int32), float(scale), chunk)
