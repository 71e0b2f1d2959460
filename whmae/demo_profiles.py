"""The demo's two profiles: one pipeline, sized for a 2-core CPU or for one big GPU.

  cpu  (default) `whmae-demo`: ~13-15 min on 2 idle CPU cores (measured 12.8 and 14.4 on
       two days with two runs side by side, `whmae.demo_jobs`; 16.9 one at a time,
       `--jobs 1`).
       Small images and the tiny MAE (`configs/pretrain.py:tiny`): enough to check that
       every stage learns and to put each claim beside a control, not to reach the
       paper's figures.
  cpu-fast  `whmae-demo --profile cpu-fast`: the cpu profile with a single-head encoder
       and no per-plane segmentation refinement: 14.2 min against cpu's 17.5 measured with
       the runs one at a time, and two claims fewer hold (see CPU_FAST).
  gpu  `whmae-demo --profile gpu`: the paper's resolution (128 x 128, 50 frames, patches
       25 x 8 x 8 = 4608 tokens per exam) and an MAE wide enough to learn (D 385, 6 + 2
       blocks), sized for <= 20 min on one H100/H200 (stage times are printed and written
       to demo_summary.json).

A profile says how big the data and the models are and how long each stage trains; the
demo (`whmae.demo`) runs the same stages, evaluations and claims for both. Every field
can be overridden from the command line (`whmae-demo --help`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["PROFILES", "Profile", "apply_model", "get_profile"]


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    num_exams: int
    image_size: int
    frames: int
    # Field of view (mm) of the short-axis and long-axis planes; None: the phantom's
    # default for the size (`whmae.data.synthetic.phantom.default_fov_mm`: the heart fills about as
    # much of the image as in the real 128 x 128 crop at ~1.8 mm, 140 / 210 mm at 32 px).
    short_axis_fov_mm: float | None
    long_axis_fov_mm: float | None
    steps: dict[str, int]  # pretrain, phenotype, segmentation
    # MAEConfig fields on top of configs/pretrain.py:tiny's model (all profiles start there).
    model: dict[str, Any]
    # Dotted overrides per stage, e.g. {"data.batch_size": 32}.
    pretrain: dict[str, Any]
    phenotype: dict[str, Any]
    segmentation: dict[str, Any]
    generate_workers: int | None = None  # None: min(cores, 16)
    # Runs side by side (`whmae.demo_jobs`); None: one per core (at most 4). The gpu
    # profile's runs share one accelerator, so they go one after another.
    max_jobs: int | None = None


# Every phenotype model (the baselines too) is fine-tuned with plane dropout: half the
# training exams lose 1-2 random planes, so the heads learn to predict from the planes an
# exam has. Without it the demo's regression moved by 73-180 % of its own MAE when planes
# were removed (the grid-order token head sees zeros where a plane was).
PLANE_DROPOUT = 0.5

CPU = Profile(
    name="cpu",
    num_exams=2000,
    image_size=32,
    frames=10,
    short_axis_fov_mm=None,
    long_axis_fov_mm=None,
    steps={"pretrain": 800, "phenotype": 300, "segmentation": 300},
    # The same attention as "xla", computed in query chunks with a custom backward
    # (`whmae.model.chunked_attention`): on 2 cores XLA's attention takes 1.38x the
    # chunked one's step time in pretraining, 1.34x in phenotype fine-tuning and 0.98x in
    # segmentation, where the decoder dominates (`benchmarks/bench_demo_steps.py`, one
    # run per stage, variants alternating).
    model={"attention_impl": "chunked"},
    pretrain={},
    phenotype={"data.batch_size": 32, "data.plane_dropout": PLANE_DROPOUT},
    segmentation={},
)

# The cpu profile made cheaper to fit 15 min on 2 cores, at a measured cost in what it
# learns. Its two cuts, timed side by side (`benchmarks/bench_demo_steps.py --run R
# --data runs/demo/data`: the real train steps alternating in one process; s/step,
# cpu -> cut):
# * one attention head of 33 instead of three of 11 (the tiny width 33 = 1 + 32 divides
#   only into 1, 3, 11 or 33 heads): the three heads' [B, 3, 289, 289] softmax work and
#   dim-11 matmuls cost more than the rest of the tiny ViT; pretraining 0.049 -> 0.026
#   (0.54x), phenotype fine-tuning 0.236 -> 0.169 (0.72x), segmentation 0.99x;
# * no per-plane refinement in the UNETR head: its [B * 9, T, H, W, c] tensors cost ~25 %
#   of the segmentation step whatever c is (another run: refine 4: 0.756 s, 2: 0.754,
#   1: 0.722, 0: 0.582); segmentation 0.824 -> 0.630 (0.76x).
# Measured whole (2 idle cores, the same seeds and steps as the cpu profile, the runs one
# at a time as the demo then ran them): 14.2 min
# against 17.5, and 13 of 20 claims against 15: the single-head encoder's linear probe no
# longer beats the untrained one on LASV (0.81x vs 0.80x the mean guess), and left atrium
# Dice falls to 0.844 (< 0.85) without the refinement. The default stays `cpu`.
CPU_FAST = dataclasses.replace(
    CPU,
    name="cpu-fast",
    model={**CPU.model, "num_heads": 1, "decoder_num_heads": 1},
    segmentation={**CPU.segmentation, "model.unetr.refine_channels": 0},
)

# One H100/H200, bf16. Per training exam the MAE below costs ~0.47 TFLOP (encoder 1383
# tokens x 6 blocks, decoder 4609 tokens x 2 blocks at D 385; the paper model: 2.1), so
# at ~25 % of a ~900 TFLOP/s peak ~450 exams/s: 6000 exams x 20 epochs is ~4-5 min for
# the all-planes MAE (the single-view ones have fewer tokens).
GPU = Profile(
    name="gpu",
    max_jobs=1,
    num_exams=6000,
    image_size=128,
    frames=50,
    short_axis_fov_mm=None,
    long_axis_fov_mm=None,
    steps={"pretrain": 4000, "phenotype": 1500, "segmentation": 1500},
    model=dict(
        patch_size=(25, 8, 8),
        width=385,
        depth=6,
        num_heads=5,
        mlp_dim=1536,
        decoder_width=385,
        decoder_depth=2,
        decoder_num_heads=5,
        decoder_mlp_dim=1536,
        loss_on="masked",
        norm_pix_loss=False,
        dtype="bfloat16",
        attention_impl=None,
    ),
    pretrain={
        "data.batch_size": 32,
        "data.worker_count": 8,
        "optim.lr": 5e-4,
        "optim.warmup_steps": 200,
    },  # fmt: skip
    # The real ResNet50 (ImageNet stem, full widths) at 128 x 128, as in the paper.
    phenotype={
        "data.batch_size": 32,
        "data.worker_count": 8,
        "data.plane_dropout": PLANE_DROPOUT,
        "model.resnet.stem": "imagenet",
        "model.resnet.widths": [64, 128, 256, 512],
    },  # fmt: skip
    segmentation={
        "data.batch_size": 8,
        "data.worker_count": 8,
        "model.unetr.token_channels": 64,
        "model.unetr.channels": [128, 64, 32],
        "model.unetr.image_channels": 16,
    },  # fmt: skip
)

PROFILES = {p.name: p for p in (CPU, CPU_FAST, GPU)}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown demo profile {name!r}; expected one of {sorted(PROFILES)}")
    return PROFILES[name]


def apply_model(model_fields: dict, profile: Profile) -> dict:
    """MAEConfig fields (a tiny config's, as a dict) resized to the profile."""
    fields = dict(model_fields)
    fields.update(image_size=profile.image_size, frames=profile.frames, **profile.model)
    return fields
