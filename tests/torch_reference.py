"""A PyTorch stand-in for the authors' `ReconMAE` (WholeHeartRL), for the parity tests.

Same state_dict keys and forward semantics as `models/reconstruction_models.py` there:
Conv3d patch embedding per plane, fixed sin-cos positional embeddings (the authors'
`sincos_pos_embed(..., use_both_axes=True)`, re-derived here), timm-style pre-norm
blocks (qkv bias, exact GELU, LayerNorm eps 1e-5), random masking by argsort of
noise keeping int(N * (1 - r)), decoder with mask tokens unshuffled by ids_restore,
linear head, sigmoid, cls dropped. Written for tests, not copied from their code.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(width: int, positions: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(width // 2, dtype=torch.float32) / (width / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.einsum("m,d->md", positions.reshape(-1).float(), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed(width: int, grid: tuple[int, int, int, int]) -> torch.Tensor:
    """[1 + S*t*h*w, width]: cls zeros, then per axis (3 long-axis planes first)
    [flag | sincos(plane within axis) | sincos(t) | sincos(h) | sincos(w)]."""
    s, t, h, w = grid
    blocks = []
    for flag, planes in ((0.0, 3), (1.0, s - 3)):
        coords = torch.meshgrid(
            *[torch.arange(n, dtype=torch.float32) for n in (planes, t, h, w)], indexing="ij"
        )
        emb = torch.cat([sincos_1d((width - 1) // 4, c) for c in coords], dim=1)
        blocks.append(torch.cat([torch.full((emb.shape[0], 1), flag), emb], dim=1))
    return torch.cat([torch.zeros(1, width), *blocks], dim=0)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDecoder(nn.Module):
    def __init__(self, dim: int, num_heads: int, depth: int):
        super().__init__()
        self.network = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for block in self.network:
            x = block(x)
        return self.norm(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(1, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # [B, S, T, H, W] -> [B, S*t*h*w, D]
        b = x.shape[0]
        y = self.proj(x.reshape(-1, 1, *x.shape[2:]))  # [B*S, D, t, h, w]
        return y.flatten(2).transpose(1, 2).reshape(b, -1, y.shape[1])


class ReconMAE(nn.Module):
    """image_shape (S, T, H, W); widths must be 1 + 4 * (even)."""

    def __init__(
        self,
        image_shape,
        patch_size,
        enc_dim,
        enc_depth,
        enc_heads,
        dec_dim,
        dec_depth,
        dec_heads,
        mask_ratio=0.7,
    ):
        super().__init__()
        s, t, h, w = image_shape
        self.patch_size, self.mask_ratio = tuple(patch_size), mask_ratio
        grid = (s, t // patch_size[0], h // patch_size[1], w // patch_size[2])
        n = math.prod(grid)
        self.patch_embed = PatchEmbed(patch_size, enc_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, enc_dim) * 0.02)
        self.enc_pos_embed = nn.Parameter(
            sincos_pos_embed(enc_dim, grid)[None], requires_grad=False
        )
        self.encoder = nn.ModuleList([Block(enc_dim, enc_heads) for _ in range(enc_depth)])
        self.encoder_norm = nn.LayerNorm(enc_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dec_dim) * 0.02)
        self.decoder_embed = nn.Linear(enc_dim, dec_dim)
        self.dec_pos_embed = nn.Parameter(
            sincos_pos_embed(dec_dim, grid)[None], requires_grad=False
        )
        self.decoder = ViTDecoder(dec_dim, dec_heads, dec_depth)
        self.recon_head = nn.Linear(dec_dim, math.prod(patch_size))
        assert self.enc_pos_embed.shape[1] == 1 + n

    def random_masking(self, x, ids_shuffle):
        """Keep the first int(N * (1 - r)) tokens of ids_shuffle [B, N]."""
        n, d = x.shape[1], x.shape[2]
        keep = int(n * (1 - self.mask_ratio))
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        return torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, d)), ids_restore

    def forward_encoder(self, imgs, ids_shuffle):
        x = self.patch_embed(imgs) + self.enc_pos_embed[:, 1:]
        x, ids_restore = self.random_masking(x, ids_shuffle)
        cls = (self.cls_token + self.enc_pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.encoder:
            x = block(x)
        return self.encoder_norm(x), ids_restore

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        num_mask = ids_restore.shape[1] + 1 - x.shape[1]
        shuffled = torch.cat([x[:, 1:], self.mask_token.repeat(x.shape[0], num_mask, 1)], dim=1)
        index = ids_restore[..., None].repeat(1, 1, shuffled.shape[-1])
        restored = torch.gather(shuffled, 1, index) + self.dec_pos_embed[:, 1:]
        x = torch.cat([x[:, :1] + self.dec_pos_embed[:, :1], restored], dim=1)
        x = self.recon_head(self.decoder(x))
        return torch.sigmoid(x[:, 1:])

    def forward(self, imgs, ids_shuffle):
        """imgs [B, S, T, H, W]; ids_shuffle [B, N] -> (latent [B, 1 + K, D], pred [B, N, P])."""
        latent, ids_restore = self.forward_encoder(imgs, ids_shuffle)
        return latent, self.forward_decoder(latent, ids_restore)
