"""Pre-norm ViT block (timm `Block` with qkv bias), with float32 params and a compute dtype.

Parameter layout (what a PyTorch state_dict converter maps onto; torch Linear
weights are (out, in)):

  Dense.kernel        [in, out]              = torch weight.T
  Dense.bias          [out]
  LayerNorm.scale     [D]                    = torch weight
  Attention.qkv.kernel [D, 3, heads, head_dim] = w.reshape(3, H, hd, D).transpose(3, 0, 1, 2)
  Attention.qkv.bias   [3, heads, head_dim]    = b.reshape(3, H, hd)
  Attention.proj.kernel [heads, head_dim, D]   = w.T.reshape(H, hd, D)
  Mlp.fc1 [D, mlp], Mlp.fc2 [mlp, D]

Every `nnx.Param` carries logical axis names in its `out_sharding` metadata (read by
`nnx.get_partition_spec`, mapped to mesh axes by the trainer's rules), with eager
sharding off: the model never needs a mesh to be built.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from whmae.model.chunked_attention import chunked_attention

Names = tuple[str | None, ...]

xavier_uniform = jax.nn.initializers.xavier_uniform


def logical_param(init: Callable, key: jax.Array, shape: tuple[int, ...], names: Names):
    """A float32 `nnx.Param` annotated with logical axis names (one per dimension)."""
    if len(names) != len(shape):
        raise ValueError(f"axis names {names} do not match parameter shape {shape}")
    return nnx.Param(init(key, shape, jnp.float32), out_sharding=names, eager_sharding=False)


def zeros(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype=jnp.float32):
    del key
    return jnp.ones(shape, dtype)


class Dense(nnx.Module):
    """x @ kernel + bias; xavier-uniform kernel, zero bias (the reference's init)."""

    def __init__(
        self,
        features_in: int,
        features_out: int,
        names: Names,
        *,
        dtype,
        rngs: nnx.Rngs,
        bias_names: Names | None = None,
    ):
        self.kernel = logical_param(
            xavier_uniform(), rngs.params(), (features_in, features_out), names
        )
        bias_names = names[1:] if bias_names is None else bias_names
        self.bias = logical_param(zeros, None, (features_out,), bias_names)
        self.dtype = dtype

    def __call__(self, x):
        kernel = self.kernel[...].astype(self.dtype)
        return x.astype(self.dtype) @ kernel + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics (biased variance, as torch); output in `dtype`."""

    def __init__(self, width: int, *, eps: float, dtype, name: str = "embed"):
        self.scale = logical_param(ones, None, (width,), (name,))
        self.bias = logical_param(zeros, None, (width,), (name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


# cuDNN fused attention takes head dims that are multiples of 8 (<= 256 from Hopper on).
CUDNN_HEAD_DIM_MULTIPLE = 8


def padded_attention(q, k, v, kv_lengths, *, implementation, multiple: int = 1):
    """`jax.nn.dot_product_attention` with the head dim zero-padded up to a multiple
    (implementation "chunked": `whmae.model.chunked_attention`, no padding).

    q, k, v [B, L, heads, head_dim]. Zero columns add nothing to q . k, the scale stays
    1/sqrt(head_dim), and the padded output columns (zero-weighted v) are cut off, so the
    result equals the unpadded one; the reference's head_dim 205 becomes 208 for cuDNN.
    """
    head_dim = q.shape[-1]
    if implementation == "chunked":
        return chunked_attention(q, k, v, kv_lengths, scale=head_dim**-0.5)
    padded = -(-head_dim // multiple) * multiple
    if padded != head_dim:
        widths = [(0, 0)] * (q.ndim - 1) + [(0, padded - head_dim)]
        q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=head_dim**-0.5,
        key_value_seq_lengths=kv_lengths,
        implementation=implementation,
    )
    return out[..., :head_dim]


class Attention(nnx.Module):
    """Multi-head self-attention with fused qkv (bias) and an output projection."""

    def __init__(self, width: int, num_heads: int, *, dtype, implementation, rngs: nnx.Rngs):
        head_dim = width // num_heads
        self.qkv_kernel = logical_param(
            xavier_uniform(in_axis=0, out_axis=(1, 2, 3)),
            rngs.params(),
            (width, 3, num_heads, head_dim),
            ("embed", "qkv", "heads", "head_dim"),
        )
        self.qkv_bias = logical_param(
            zeros, None, (3, num_heads, head_dim), ("qkv", "heads", "head_dim")
        )
        self.proj_kernel = logical_param(
            xavier_uniform(in_axis=(0, 1), out_axis=2),
            rngs.params(),
            (num_heads, head_dim, width),
            ("heads", "head_dim", "embed"),
        )
        self.proj_bias = logical_param(zeros, None, (width,), ("embed",))
        self.dtype = dtype
        self.implementation = implementation

    def __call__(self, x, kv_lengths):
        """x [B, L, D]; kv_lengths [B] int32: keys at positions >= kv_lengths[b] are ignored."""
        x = x.astype(self.dtype)
        qkv = jnp.einsum("bld,dthk->blthk", x, self.qkv_kernel[...].astype(self.dtype))
        qkv = qkv + self.qkv_bias[...].astype(self.dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, heads, head_dim]
        multiple = CUDNN_HEAD_DIM_MULTIPLE if self.implementation == "cudnn" else 1
        out = padded_attention(
            q, k, v, kv_lengths, implementation=self.implementation, multiple=multiple
        )
        out = jnp.einsum("blhk,hkd->bld", out, self.proj_kernel[...].astype(self.dtype))
        return out + self.proj_bias[...].astype(self.dtype)


class Mlp(nnx.Module):
    def __init__(self, width: int, mlp_dim: int, *, dtype, gelu_approximate: bool, rngs):
        self.fc1 = Dense(width, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(mlp_dim, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.gelu_approximate = gelu_approximate

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.gelu_approximate))


class Block(nnx.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        eps: float,
        dtype,
        gelu_approximate: bool,
        implementation: str | None,
        rngs: nnx.Rngs,
    ):
        self.norm1 = LayerNorm(width, eps=eps, dtype=dtype)
        self.attn = Attention(
            width, num_heads, dtype=dtype, implementation=implementation, rngs=rngs
        )
        self.norm2 = LayerNorm(width, eps=eps, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, dtype=dtype, gelu_approximate=gelu_approximate, rngs=rngs)

    def __call__(self, x, kv_lengths):
        x = x + self.attn(self.norm1(x), kv_lengths)
        return x + self.mlp(self.norm2(x))


def apply_blocks(blocks, x, kv_lengths, *, remat: bool):
    """Run blocks in turn; returns (x, [per-block outputs]). `remat` recomputes each block."""

    def run(block, x, kv_lengths):
        return block(x, kv_lengths)

    if remat:
        run = nnx.remat(run)
    hidden = []
    for block in blocks:
        x = run(block, x, kv_lengths)
        hidden.append(x)
    return x, hidden
