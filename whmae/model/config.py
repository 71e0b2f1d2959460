"""`MAEConfig`: the shape of the multi-view masked autoencoder, validated once.

The defaults are the reference (`paper`) model: 9 planes of [T=50, 128, 128],
patches (25, 8, 8) -> grid (9, 2, 16, 16) = 4608 tokens of P = 1600 values,
encoder D = 1025 (1 + 4 x 256, see `whmae.model.posembed`), 6 blocks, 5 heads,
decoder 2 blocks at the same width, mask ratio 0.7.

Widths: with the default posembed="flag_sincos" (the reference's) both widths must be
1 + 4k with k even; posembed="view_sincos" takes any multiple of 8 (1024, 512), so
widths, head dims and MLP dims can be matrix-unit shaped (`whmae.model.posembed`).
"""

from __future__ import annotations

import dataclasses
import math

from whmae.layout import NUM_PLANES
from whmae.model.posembed import POSEMBEDS, check_width

LOSS_ON = ("all", "masked")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = (None, "xla", "cudnn", "chunked")


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """Static model shape; `MAEConfig(**config.model)` from an ml_collections config.

    loss_on: "all" = reference (MSE over every available token, kept ones too);
      "masked" = MAE paper (masked tokens only).
    norm_pix_loss: targets are per-patch normalised (mean 0, unbiased std 1, as in
      the MAE paper); the reconstruction head is then the raw linear output, since a
      sigmoid in [0, 1] cannot reach normalised targets. Without it the head ends in
      a sigmoid (reference) and the targets are the [0, 1] pixels.
    dtype: compute dtype of activations and matmuls; parameters are always float32,
      and LayerNorm statistics, softmax and the loss are float32.
    posembed: the fixed positional embedding, one of `whmae.model.posembed.POSEMBEDS`:
      "flag_sincos" = reference (axis-flag column, widths 1 + 4k, weight-compatible);
      "view_sincos" = axis carried by the plane block's sign, widths any multiple of 8.
    attention_impl: `implementation=` of `jax.nn.dot_product_attention`; with "cudnn"
      the head dim is zero-padded to a multiple of 8 inside attention (205 -> 208, same
      result), as cuDNN fused attention requires (bf16/fp16 only, head dim <= 256 on H100);
      "chunked": `whmae.model.chunked_attention` (query chunks, backward recomputed: no
      [heads, L, L] matrix is kept; the paper step's CPU temporaries 5.3 -> 2.6 GiB).
    """

    image_size: int = 128
    frames: int = 50
    patch_size: tuple[int, int, int] = (25, 8, 8)
    planes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8)
    width: int = 1025
    depth: int = 6
    num_heads: int = 5
    mlp_dim: int = 4100
    decoder_width: int = 1025
    decoder_depth: int = 2
    decoder_num_heads: int = 5
    decoder_mlp_dim: int = 4100
    mask_ratio: float = 0.7
    loss_on: str = "all"
    norm_pix_loss: bool = False
    layernorm_eps: float = 1e-5
    gelu_approximate: bool = False
    dtype: str = "float32"
    remat: bool = False
    attention_impl: str | None = None
    posembed: str = "flag_sincos"

    def __post_init__(self):
        # Configs from ml_collections hand over lists; the dataclass must stay hashable.
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "planes", tuple(int(p) for p in self.planes))
        self._validate()

    def _validate(self):
        def fail(msg):
            raise ValueError(f"invalid MAEConfig: {msg}")

        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            fail(f"patch_size must be 3 positive ints (time, row, col), got {self.patch_size}")
        pt, ph, pw = self.patch_size
        if self.frames % pt:
            fail(f"frames={self.frames} is not divisible by the patch's {pt} frames")
        if self.image_size % ph or self.image_size % pw:
            fail(f"image_size={self.image_size} is not divisible by the patch ({ph}, {pw})")
        if not self.planes:
            fail("planes is empty")
        if len(set(self.planes)) != len(self.planes) or sorted(self.planes) != list(self.planes):
            fail(f"planes must be distinct and increasing, got {self.planes}")
        if self.planes[0] < 0 or self.planes[-1] >= NUM_PLANES:
            fail(f"planes must lie in 0..{NUM_PLANES - 1}, got {self.planes}")
        if self.posembed not in POSEMBEDS:
            fail(f"posembed must be one of {POSEMBEDS}, got {self.posembed!r}")
        for name, width, heads in (
            ("width", self.width, self.num_heads),
            ("decoder_width", self.decoder_width, self.decoder_num_heads),
        ):
            # flag_sincos: 1 flag column + 4 sin-cos blocks of even width (1 + 4k, k even);
            # view_sincos: 4 sin-cos blocks of even width (a multiple of 8).
            try:
                check_width(width, self.posembed)
            except ValueError as e:
                fail(f"{name}={width} with posembed={self.posembed!r}: {e}")
            if heads < 1 or width % heads:
                fail(f"{name}={width} is not divisible by its {heads} heads")
        for name in ("depth", "mlp_dim", "decoder_depth", "decoder_mlp_dim"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            fail(f"mask_ratio must lie in [0, 1), got {self.mask_ratio}")
        if self.num_kept < 1:
            fail(f"mask_ratio={self.mask_ratio} keeps no token of {self.num_tokens}")
        if self.loss_on not in LOSS_ON:
            fail(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.dtype not in DTYPES:
            fail(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")

    @property
    def num_planes(self) -> int:
        return len(self.planes)

    @property
    def grid(self) -> tuple[int, int, int, int]:
        """Token grid (S, t, h, w) of the selected planes."""
        pt, ph, pw = self.patch_size
        return (self.num_planes, self.frames // pt, self.image_size // ph, self.image_size // pw)

    @property
    def tokens_per_plane(self) -> int:
        return math.prod(self.grid[1:])

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch_size)

    @property
    def num_kept(self) -> int:
        """Static encoder length K (without cls), the reference's int(N * (1 - ratio))."""
        return kept_count(self.num_tokens, self.mask_ratio)


def kept_count(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept by masking, rounded exactly like the reference: int(N * (1 - r))."""
    return int(num_tokens * (1 - mask_ratio))


def tiny_config(**overrides) -> MAEConfig:
    """A CPU-sized model for tests and demos: grid (9, 2, 4, 4) = 288 tokens of 320 values."""
    fields = dict(
        image_size=32,
        frames=10,
        patch_size=(5, 8, 8),
        width=33,
        depth=2,
        num_heads=3,
        mlp_dim=64,
        decoder_width=33,
        decoder_depth=1,
        decoder_num_heads=3,
        decoder_mlp_dim=64,
    )
    fields.update(overrides)
    return MAEConfig(**fields)
