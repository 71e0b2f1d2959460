"""Attention that never holds a [heads, L, L] matrix: query chunks, recomputed backward.

`jax.nn.dot_product_attention(implementation="xla")` materialises the logits and the
probabilities of every head, [B, heads, L, L], and autodiff keeps the probabilities for
the backward pass; at the paper's decoder (L = 4609, 5 heads) that is 405 MiB per copy,
and the compiled CPU train step held seven such buffers (2.8 of its 5.3 GiB of temporaries,
`benchmarks/bench_vs_torch.py`). Here the queries go in chunks of at most `chunk` rows
(balanced: L = 1153 with chunk 256 is 5 chunks of 231, not 4 of 256 and one of 129
padded to 256): the forward keeps only the output and the per-row log-sum-exp, and the
backward recomputes each chunk's probabilities from them (the FlashAttention
recurrence, in plain jnp: one extra q.k^T per chunk), so the largest temporary is
[B, heads, L, chunk].

Layout: everything runs heads-major and keys-major, [B, heads, L_keys, chunk]: every
product over a probability chunk (the backward's p^T.dO and ds^T.q, the forward's p.v)
takes it as it is stored, so XLA:CPU emits no transposing copy of one (the
queries-major layout spent 16 % of the small benchmark step in such copies; measured
with `jax.profiler`, README "Against the authors' PyTorch model on CPU").

Same inputs and result as `jax.nn.dot_product_attention(q, k, v, scale=...,
key_value_seq_lengths=...)`: q, k, v [B, L, heads, head_dim], keys at positions >=
kv_lengths[b] ignored. Softmax statistics are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_CHUNK", "chunk_rows", "chunked_attention"]

# Most query rows per chunk: [B, 5 heads, 4609, 256] float32 is 23 MiB at the paper's
# decoder. Forward + backward of one attention on 2 cores (2026-12-03, best of runs), at
# most 128 / 256 / 384 / 512 rows: the small benchmark's decoder (L 1153, 3 heads of 43)
# 26.9 / 28.7 / 32.8 / 31.8 ms, the paper's (L 4609, 5 heads of 205) 2.69 / 2.46 / 2.63 s
# (512 not run there). Differences under ~10 % are inside this machine's noise.
DEFAULT_CHUNK = 256
_MASKED = -1e30  # a masked key's logit: exp(_MASKED - max) is 0 without inf - inf


def chunk_rows(length: int, chunk: int) -> int:
    """Rows per chunk: the fewest chunks of at most `chunk` rows, of equal size."""
    chunk = max(1, min(int(chunk), length))
    return -(-length // -(-length // chunk))


def _heads(x):
    """[B, L, H, K] -> [B, H, L, K] (and back: the same swap)."""
    return x.transpose(0, 2, 1, 3)


def _chunks(x, chunk: int):
    """[B, H, L, ...] -> [n, B, H, chunk, ...], L zero-padded up to n * chunk."""
    b, h, length = x.shape[:3]
    n = -(-length // chunk)
    pad = [(0, 0), (0, 0), (0, n * chunk - length)] + [(0, 0)] * (x.ndim - 3)
    x = jnp.pad(x, pad).reshape(b, h, n, chunk, *x.shape[3:])
    return jnp.moveaxis(x, 2, 0)


def _unchunk(x, length: int):
    """[n, B, H, chunk, ...] -> [B, H, length, ...]."""
    n, b, h, chunk = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n * chunk, *x.shape[4:])[:, :, :length]


def _logits(k, q_chunk, key_valid, scale):
    """[B, H, L, K] x [B, H, chunk, K] -> float32 [B, H, L, chunk], masked keys _MASKED."""
    s = jnp.einsum("bhlk,bhqk->bhlq", k, q_chunk, preferred_element_type=jnp.float32) * scale
    return jnp.where(key_valid[:, None, :, None], s, _MASKED)


def _key_valid(kv_lengths, length: int):
    return jnp.arange(length)[None, :] < kv_lengths[:, None]  # [B, L]


def _forward(q, k, v, kv_lengths, scale, chunk):
    key_valid = _key_valid(kv_lengths, k.shape[1])
    k, v = _heads(k), _heads(v)

    def one(q_chunk):
        s = _logits(k, q_chunk, key_valid, scale)
        m = jnp.max(s, axis=2, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=2, keepdims=True)
        out = jnp.einsum("bhlq,bhlk->bhqk", (p / total).astype(v.dtype), v,
                         preferred_element_type=jnp.float32)  # fmt: skip
        lse = (m + jnp.log(total))[:, :, 0]  # [B, H, chunk]
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(one, _chunks(_heads(q), chunk))
    return _heads(_unchunk(out, q.shape[1])), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, kv_lengths, scale, chunk):
    return _forward(q, k, v, kv_lengths, scale, chunk)[0]


def _attention_fwd(q, k, v, kv_lengths, scale, chunk):
    out, lse = _forward(q, k, v, kv_lengths, scale, chunk)
    return out, (q, k, v, kv_lengths, out, lse)


def _attention_bwd(scale, chunk, residuals, d_out):
    q, k, v, kv_lengths, out, lse = residuals
    key_valid = _key_valid(kv_lengths, k.shape[1])
    q32, k32, v32, do32 = (_heads(t.astype(jnp.float32)) for t in (q, k, v, d_out))
    # D_i = sum_k dO_ik O_ik: the softmax Jacobian's row term.
    delta = jnp.sum(do32 * _heads(out.astype(jnp.float32)), axis=-1)  # [B, H, L]

    def one(carry, xs):
        dk, dv = carry
        q_c, do_c, delta_c, lse_c = xs
        p = jnp.exp(_logits(k32, q_c, key_valid, scale) - lse_c[:, :, None, :])  # [B,H,L,c]
        dv = dv + jnp.einsum("bhlq,bhqk->bhlk", p, do_c)
        dp = jnp.einsum("bhlk,bhqk->bhlq", v32, do_c)
        ds = p * (dp - delta_c[:, :, None, :]) * scale
        dk = dk + jnp.einsum("bhlq,bhqk->bhlk", ds, q_c)
        dq_c = jnp.einsum("bhlq,bhlk->bhqk", ds, k32)
        return (dk, dv), dq_c

    zeros = jnp.zeros(k32.shape, jnp.float32)
    xs = (_chunks(q32, chunk), _chunks(do32, chunk), _chunks(delta, chunk), lse)
    (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), xs)
    dq = _unchunk(dq, q.shape[1])
    return (_heads(dq).astype(q.dtype), _heads(dk).astype(k.dtype),
            _heads(dv).astype(v.dtype), None)  # fmt: skip


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q, k, v, kv_lengths=None, *, scale: float, chunk: int = DEFAULT_CHUNK):
    """Softmax attention of q, k, v [B, L, heads, head_dim] (module docstring); `chunk`:
    the most query rows per chunk."""
    if kv_lengths is None:
        kv_lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
    chunk = chunk_rows(q.shape[1], chunk)
    return _attention(q, k, v, jnp.asarray(kv_lengths, jnp.int32), float(scale), chunk)
