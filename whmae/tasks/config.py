"""What the fine-tuning configs (`configs/phenotype.py`, `configs/segmentation.py`) share.

A variant string is comma-separated tokens, e.g. `tiny,sa_only` or `paper,probe`:

  paper | tiny     encoder size: the reference encoder, or `configs/pretrain.py:tiny`'s
  probe | finetune mode (also `--config.mode=`): probe freezes the encoder (stop_gradient
                   on its features, zero updates), finetune trains everything
  sa_only          short-axis planes 3-8 only;  la_only  long-axis planes 0-2 only
  plus the task's own tokens (`resnet50`, `vit_scratch`, `unetr_scratch`).

`init.pretrained` True needs `--config.init.checkpoint=PRETRAIN_WORKDIR` (a whmae-pretrain
workdir or a whmae-convert checkpoint); `init.step = -1` takes its newest step.
`resolve(config)` turns the mode into optimizer settings before training.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections

from whmae.layout import LONG_AXIS_PLANES, SHORT_AXIS_PLANES
from whmae.model.config import MAEConfig, tiny_config

MODES = ("finetune", "probe")
COMMON_TOKENS = ("paper", "tiny", "probe", "finetune", "sa_only", "la_only")
ENCODER_FREEZE = "^encoder/"


def parse_variant(arg: str | None, task_tokens: tuple[str, ...]) -> tuple[str, ...]:
    """Tokens of `arg` ('paper' if empty), each checked against the known ones."""
    tokens = tuple(t.strip() for t in (arg or "paper").split(",") if t.strip())
    allowed = COMMON_TOKENS + task_tokens
    unknown = [t for t in tokens if t not in allowed]
    if unknown:
        raise ValueError(f"unknown variant token(s) {unknown}; expected some of {allowed}")
    if {"paper", "tiny"} <= set(tokens) or {"sa_only", "la_only"} <= set(tokens):
        raise ValueError(f"variant {arg!r} combines exclusive tokens")
    if {"probe", "finetune"} <= set(tokens):
        raise ValueError(f"variant {arg!r} asks for both probe and finetune")
    return tokens


def base_config(task: str, tokens: tuple[str, ...]) -> ml_collections.ConfigDict:
    """The fields both tasks share, sized by `tokens` (see the module docstring)."""
    tiny = "tiny" in tokens
    encoder = tiny_config() if tiny else MAEConfig()
    if "sa_only" in tokens:
        encoder = dataclasses.replace(encoder, planes=SHORT_AXIS_PLANES)
    elif "la_only" in tokens:
        encoder = dataclasses.replace(encoder, planes=LONG_AXIS_PLANES)
    c = ml_collections.ConfigDict()
    c.task = task
    c.variant = ",".join(tokens)
    c.mode = "probe" if "probe" in tokens else "finetune"
    c.model = dict(arch="vit", encoder=dataclasses.asdict(encoder))
    c.init = dict(pretrained=True, checkpoint="", step=-1)
    c.data = dict(
        dir="",
        batch_size=8 if tiny else 16,
        worker_count=0 if tiny else 4,
        seed=0,
        # Plane dropout (phenotype fine-tuning): this fraction of the training exams
        # loses 1..plane_dropout_max of its planes each step (whmae.model.masking).
        plane_dropout=0.0,
        plane_dropout_max=2,
    )
    c.optim = dict(
        name="adamw",
        lr=1e-4,
        probe_lr=1e-3,  # replaces lr in probe mode: a linear head alone takes larger steps
        warmup_steps=2 if tiny else 500,
        weight_decay=0.05,
        min_lr_ratio=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=1.0,
        grad_accum_steps=1,
        freeze=[],
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules="dp")
    c.train = dict(
        steps=30 if tiny else 20_000,
        seed=0,
        log_every=5 if tiny else 50,
        checkpoint_every=30 if tiny else 2_000,
        keep_checkpoints=2,
        # Validation (`whmae.train.validation`): every eval_every steps (0: off) on the
        # first eval_exams val exams; the task's config sets best_metric / best_mode.
        eval_every=10 if tiny else 1_000,
        eval_exams=16 if tiny else 256,
        best_metric="",
        best_mode="min",
        distributed="auto",
    )
    return c


def resolve(config: Any) -> ml_collections.ConfigDict:
    """A copy of `config` with the mode applied: probe adds the encoder to `optim.freeze`
    and uses `optim.probe_lr`. Checks mode, arch and init; idempotent."""
    config = copy.deepcopy(config)
    if config.mode not in MODES:
        raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}")
    arch = config.model.arch
    with config.unlocked():
        if arch != "vit" and config.init.pretrained:
            raise ValueError(f"model.arch={arch!r} has no pretrained encoder: set init.pretrained")
        if config.init.pretrained and not config.init.checkpoint:
            raise ValueError(
                "init.pretrained needs a pretraining checkpoint: pass "
                "--config.init.checkpoint=PRETRAIN_WORKDIR (or use a *_scratch variant)"
            )
        if config.mode == "probe":
            if arch != "vit":
                raise ValueError(f"mode 'probe' freezes a ViT encoder; model.arch is {arch!r}")
            freeze = list(config.optim.freeze)
            if ENCODER_FREEZE not in freeze:
                config.optim.freeze = [*freeze, ENCODER_FREEZE]
                config.optim.lr = config.optim.probe_lr
    return config


def init_step(config: Any) -> int | None:
    step = int(config.init.step)
    return None if step < 0 else step


def load_config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config path:arg` would (tests, notebooks)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("whmae_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
