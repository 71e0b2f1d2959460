"""The multi-view masked autoencoder (reference `ReconMAE` of WholeHeartRL), in Flax NNX.

Parameters (all float32; logical axis names in brackets; see `whmae.model.vit` for
the block layout). `<- torch` says which reference state_dict entry maps onto it:

  patch_embed.kernel [P, D] ("patch", "embed")   <- patch_embed.proj.weight.reshape(D, P).T
  patch_embed.bias   [D]    ("embed",)           <- patch_embed.proj.bias
  cls_token          [1, 1, D] (None, None, "embed")           <- cls_token
  encoder_blocks[i].{norm1, attn, norm2, mlp}    <- encoder.{i}.{norm1, attn, norm2, mlp}
  encoder_norm.{scale, bias}                     <- encoder_norm.{weight, bias}
  decoder_embed.kernel [D, D_dec] ("embed", None) <- decoder_embed.weight.T
  mask_token         [1, 1, D_dec] (None, None, "embed")        <- mask_token
  decoder_blocks[i]  (as the encoder's)          <- decoder.network.{i}
  decoder_norm       <- decoder.norm;  recon_head [D_dec, P] ("embed", "patch") <- recon_head
  (enc_pos_embed / dec_pos_embed are fixed constants here, `whmae.model.posembed`,
  of the kind config.posembed: "flag_sincos" is the reference's.)

Forward, per exam (fixed shapes, so one jit serves any pattern of absent planes):
  1. select config.planes, patchify to N tokens of P values, (S, t, h, w) order;
  2. order tokens by `ids_shuffle` (random noise, absent planes last); keep the
     first K = int(N * (1 - r)) patches, embed them, add the positional embedding;
     exam b's valid kept count is k_b = int(N_avail_b * (1 - r)) (= K with all
     planes present), the rest is padding that attention ignores;
  3. encoder: cls + kept tokens, pre-norm blocks, final LayerNorm;
  4. decoder in *shuffled* order (attention without a causal mask is permutation
     equivariant, so this equals the reference's unshuffle-then-attend): slots
     [0, k_b) encoder tokens, [k_b, N_avail_b) the mask token, beyond: padding;
     add the decoder positional embedding gathered by ids_shuffle; blocks, norm,
     linear head (+ sigmoid unless norm_pix_loss); un-shuffle to [B, N, P].
  Absent planes' predictions are the decoder's imputation from the available
  planes (mask-token queries); they carry no loss.
  Loss: per-token MSE over P values, averaged over every loss token of the batch
  (available tokens; loss_on="masked": not kept ones): exams weigh by token count.
  With batch 1 and all planes present this is the reference's mean over all values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from whmae.layout import NUM_PLANES
from whmae.model.config import MAEConfig, kept_count, tiny_config
from whmae.model.masking import (
    gather_tokens,
    kept_counts,
    restore_ids,
    restore_order,
    shuffle_ids,
    token_availability,
)
from whmae.model.patches import patchify
from whmae.model.posembed import positional_embedding
from whmae.model.vit import Block, Dense, LayerNorm, apply_blocks, logical_param

__all__ = ["MAEConfig", "MaskedAutoencoder", "embeddings", "flops_per_exam", "tiny_config"]

NORM_PIX_EPS = 1e-6  # MAE paper's per-patch normalisation epsilon


@functools.lru_cache(maxsize=8)
def _pos_embed(
    width: int, planes: tuple[int, ...], grid_thw: tuple[int, int, int], kind: str
) -> np.ndarray:
    return positional_embedding(width, planes, grid_thw, kind)


def normalize_patches(patches: jnp.ndarray) -> jnp.ndarray:
    """Per-patch (x - mean) / sqrt(var + 1e-6), unbiased variance as the MAE paper (torch .var)."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + NORM_PIX_EPS)


class MaskedAutoencoder(nnx.Module):
    """Multi-view cine MAE; see the module docstring for layout and forward pass."""

    def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        dtype = jnp.dtype(c.dtype)
        block = functools.partial(
            Block,
            eps=c.layernorm_eps,
            dtype=dtype,
            gelu_approximate=c.gelu_approximate,
            implementation=c.attention_impl,
            rngs=rngs,
        )
        token_init = jax.nn.initializers.normal(0.02)
        self.patch_embed = Dense(c.patch_dim, c.width, ("patch", "embed"), dtype=dtype, rngs=rngs)
        self.cls_token = logical_param(
            token_init, rngs.params(), (1, 1, c.width), (None, None, "embed")
        )
        self.encoder_blocks = nnx.List(
            [block(c.width, c.num_heads, c.mlp_dim) for _ in range(c.depth)]
        )
        self.encoder_norm = LayerNorm(c.width, eps=c.layernorm_eps, dtype=dtype)
        # Both sides are model widths; naming both "embed" would shard one mesh axis twice.
        self.decoder_embed = Dense(
            c.width, c.decoder_width, ("embed", None), bias_names=("embed",), dtype=dtype, rngs=rngs
        )
        self.mask_token = logical_param(
            token_init, rngs.params(), (1, 1, c.decoder_width), (None, None, "embed")
        )
        self.decoder_blocks = nnx.List(
            [
                block(c.decoder_width, c.decoder_num_heads, c.decoder_mlp_dim)
                for _ in range(c.decoder_depth)
            ]
        )
        self.decoder_norm = LayerNorm(c.decoder_width, eps=c.layernorm_eps, dtype=dtype)
        self.recon_head = Dense(
            c.decoder_width, c.patch_dim, ("embed", "patch"), dtype=dtype, rngs=rngs
        )

    # ----------------------------------------------------------------- inputs
    def select_planes(self, images, plane_mask):
        """[B, 9, T, H, W] (float in [0, 1] or uint8), [B, 9] -> [B, S, T, H, W] f32, [B, S]."""
        c = self.config
        expected = (NUM_PLANES, c.frames, c.image_size, c.image_size)
        if images.ndim != 5 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be [B, {', '.join(map(str, expected))}], got {images.shape}"
            )
        if tuple(plane_mask.shape) != (images.shape[0], NUM_PLANES):
            raise ValueError(f"plane_mask must be [B, {NUM_PLANES}], got {plane_mask.shape}")
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        images = images.astype(jnp.float32)
        plane_available = plane_mask.astype(bool)
        if c.planes != tuple(range(NUM_PLANES)):
            planes = np.asarray(c.planes)
            images, plane_available = images[:, planes], plane_available[:, planes]
        return images, plane_available

    # ---------------------------------------------------------------- encoder
    def encode(self, images, plane_mask, key=None, *, mask_ratio=0.0, ids_shuffle=None) -> dict:
        """Encode an exam batch, keeping int(N * (1 - mask_ratio)) tokens (all by default).

        Returns cls [B, D]; tokens [B, K, D] (after the final norm, shuffled order);
        token_valid [B, K] bool; ids_shuffle [B, N] int32; num_kept [B] int32 (k_b);
        num_available [B] int32 (available tokens); hidden: per-block outputs
        [B, 1 + K, D] (before the final norm, cls first).
        """
        images, plane_available = self.select_planes(images, plane_mask)
        return self._encode(
            patchify(images, self.config.patch_size), plane_available, key, mask_ratio, ids_shuffle
        )

    def _encode(self, patches, plane_available, key, mask_ratio, ids_shuffle) -> dict:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        n = c.num_tokens
        num_kept_static = kept_count(n, mask_ratio)
        if num_kept_static < 1:
            raise ValueError(f"mask_ratio={mask_ratio} keeps no token of {n}")
        if mask_ratio > 0 and key is None and ids_shuffle is None:
            raise ValueError("masking (mask_ratio > 0) needs a jax.random key or ids_shuffle")
        token_available = token_availability(plane_available, c.tokens_per_plane)
        ids = shuffle_ids(token_available, key if mask_ratio > 0 else None, ids_shuffle)
        num_available = token_available.sum(axis=1, dtype=jnp.int32)
        num_kept = kept_counts(
            plane_available.sum(axis=1), c.tokens_per_plane, c.num_planes, mask_ratio
        )

        pos = jnp.asarray(_pos_embed(c.width, c.planes, c.grid[1:], c.posembed))  # [1 + N, D]
        kept_ids = ids[:, :num_kept_static]
        # Embedding only the kept patches equals embedding all, then gathering.
        x = self.patch_embed(gather_tokens(patches, kept_ids))
        x = x + jnp.take(pos[1:], kept_ids, axis=0).astype(dtype)
        cls = (self.cls_token[...] + pos[0]).astype(dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.width)), x], axis=1)
        x, hidden = apply_blocks(self.encoder_blocks, x, 1 + num_kept, remat=c.remat)
        x = self.encoder_norm(x)
        return {
            "cls": x[:, 0],
            "tokens": x[:, 1:],
            "token_valid": jnp.arange(num_kept_static)[None, :] < num_kept[:, None],
            "ids_shuffle": ids,
            "num_kept": num_kept,
            "num_available": num_available,
            "hidden": hidden,
        }

    # ---------------------------------------------------------------- decoder
    def decode(self, encoded: dict) -> jnp.ndarray:
        """Encoder output (from `encode`) -> predicted patches [B, N, P] f32, original order."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        ids = encoded["ids_shuffle"]
        b, n = ids.shape
        tokens = jnp.concatenate([encoded["cls"][:, None], encoded["tokens"]], axis=1)
        y = self.decoder_embed(tokens)  # [B, 1 + K, D_dec]
        num_kept_static = y.shape[1] - 1
        mask_token = self.mask_token[...].astype(dtype)
        slots = jnp.concatenate(
            [y[:, 1:], jnp.broadcast_to(mask_token, (b, n - num_kept_static, c.decoder_width))],
            axis=1,
        )
        is_encoded = jnp.arange(n)[None, :] < encoded["num_kept"][:, None]
        slots = jnp.where(is_encoded[..., None], slots, mask_token)
        pos = jnp.asarray(_pos_embed(c.decoder_width, c.planes, c.grid[1:], c.posembed))
        slots = slots + jnp.take(pos[1:], ids, axis=0).astype(dtype)
        x = jnp.concatenate([y[:, :1] + pos[0].astype(dtype), slots], axis=1)
        x, _ = apply_blocks(self.decoder_blocks, x, 1 + encoded["num_available"], remat=c.remat)
        # The norm and head act per token, so the original order is restored before them:
        # the same values, but the gather (and its scatter-add gradient) moves D_dec-wide
        # rows, not patch-wide ones (129 vs 1600 floats in the small benchmark). The head on
        # the cls token would be dropped anyway: skip it.
        x = restore_order(x[:, 1:], ids)
        out = self.recon_head(self.decoder_norm(x)).astype(jnp.float32)
        if not c.norm_pix_loss:
            out = jax.nn.sigmoid(out)
        return out

    # ------------------------------------------------------------ pretraining
    def __call__(self, images, plane_mask, key=None, *, ids_shuffle=None) -> dict:
        """Masked reconstruction of images [B, 9, T, H, W] given plane_mask [B, 9].

        Returns loss (scalar f32), pred and target [B, N, P] f32 (original token
        order), loss_mask [B, N] f32, token_loss [B, N] f32 (each token's MSE; loss is its
        loss_mask-weighted mean), ids_shuffle [B, N] int32, num_kept [B] int32.
        """
        c = self.config
        images, plane_available = self.select_planes(images, plane_mask)
        patches = patchify(images, c.patch_size)
        encoded = self._encode(patches, plane_available, key, c.mask_ratio, ids_shuffle)
        pred = self.decode(encoded)
        target = normalize_patches(patches) if c.norm_pix_loss else patches

        ids = encoded["ids_shuffle"]
        loss_mask = token_availability(plane_available, c.tokens_per_plane)
        if c.loss_on == "masked":
            kept = restore_ids(ids) < encoded["num_kept"][:, None]
            loss_mask = loss_mask & ~kept
        loss_mask = loss_mask.astype(jnp.float32)
        per_token = jnp.mean(jnp.square(pred - target), axis=-1)
        loss = jnp.sum(per_token * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)
        return {
            "loss": loss,
            "token_loss": per_token,
            "pred": pred,
            "target": target,
            "loss_mask": loss_mask,
            "ids_shuffle": ids,
            "num_kept": encoded["num_kept"],
        }


def embeddings(model: MaskedAutoencoder, images, plane_mask) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Unmasked exam representations: (cls [B, D], mean of the valid tokens [B, D]), float32."""
    encoded = model.encode(images, plane_mask)
    valid = encoded["token_valid"].astype(jnp.float32)[..., None]
    tokens = encoded["tokens"].astype(jnp.float32)
    mean = jnp.sum(tokens * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    return encoded["cls"].astype(jnp.float32), mean


def _block_flops(length: int, width: int, mlp_dim: int) -> float:
    dense = 2 * length * width * (3 * width + width + 2 * mlp_dim)  # qkv, proj, mlp
    attention = 2 * 2 * length * length * width  # q @ k^T and softmax @ v
    return float(dense + attention)


def flops_per_exam(config: MAEConfig) -> float:
    """Analytic forward FLOPs (2 per multiply-add) of one exam, as computed here.

    Patch embedding on the K kept patches only, the head on N tokens (cls skipped);
    elementwise work (norms, GELU, softmax) is not counted. The reference computes
    the patch embedding on all N tokens (~10 G more at the paper size).
    """
    c = config
    n, k, p = c.num_tokens, c.num_kept, c.patch_dim
    encoder = 2 * k * p * c.width + c.depth * _block_flops(1 + k, c.width, c.mlp_dim)
    decoder = (
        2 * (1 + k) * c.width * c.decoder_width
        + c.decoder_depth * _block_flops(1 + n, c.decoder_width, c.decoder_mlp_dim)
        + 2 * n * c.decoder_width * p
    )
    return float(encoder + decoder)
