"""The MAE encoder of a fine-tuning model, and loading it from a pretraining checkpoint.

Both fine-tuning tasks hold the encoder as `model.encoder` (an `MAEEncoder`: the MAE's
own encoder half, with the MAE's parameter names `patch_embed`, `cls_token`,
`encoder_blocks`, `encoder_norm`), so a pretraining or converted checkpoint
(`whmae.model.io`) maps onto `params["encoder"]` name for name, value for value: the
copy is bit-exact. `pretrained_encoder_init` makes the `Task.init_params` that does it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from whmae.model.config import MAEConfig
from whmae.model.io import load_config, load_model, resolve_checkpoint
from whmae.model.mae import MaskedAutoencoder
from whmae.train.step import TrainState

__all__ = [
    "ENCODER_PARTS",
    "MAEEncoder",
    "check_encoder_config",
    "encoder_config",
    "load_encoder_params",
    "pretrained_encoder_init",
]

ENCODER_PARTS = ("patch_embed", "cls_token", "encoder_blocks", "encoder_norm")
_DECODER_PARTS = ("decoder_embed", "mask_token", "decoder_blocks", "decoder_norm", "recon_head")
# Fields that decide the encoder's parameters or what its tokens mean.
ENCODER_FIELDS = (
    "image_size",
    "frames",
    "patch_size",
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "layernorm_eps",
    "gelu_approximate",
)

log = logging.getLogger(__name__)


class MAEEncoder(MaskedAutoencoder):
    """The encoder half of `MaskedAutoencoder`: `encode(images, plane_mask)` and
    `select_planes` as the MAE's, no decoder parameters.

    Built as the MAE with the same rngs (so a scratch encoder is initialised exactly as a
    fresh MAE's encoder), then the decoder is dropped.
    """

    def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs):
        # The smallest decoder the MAE accepts: it is deleted right away.
        small = dataclasses.replace(
            config, decoder_width=9, decoder_depth=1, decoder_num_heads=1, decoder_mlp_dim=1
        )
        super().__init__(small, rngs=rngs)
        for name in _DECODER_PARTS:
            delattr(self, name)
        self.config = config

    def decode(self, encoded: dict):
        raise TypeError("MAEEncoder has no decoder; use MaskedAutoencoder for reconstruction")

    def __call__(self, *args, **kwargs):
        raise TypeError("MAEEncoder has no reconstruction pass; call encode(images, plane_mask)")


def encoder_config(model_config: Any) -> MAEConfig:
    """`MAEConfig` from a fine-tuning config's `model.encoder` (MAEConfig fields)."""
    fields = model_config.encoder
    fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
    try:
        return MAEConfig(**fields)
    except TypeError as e:
        raise ValueError(f"config.model.encoder does not fit MAEConfig: {e}") from None


def check_encoder_config(wanted: MAEConfig, stored: MAEConfig, where: str) -> None:
    """Raise ValueError naming every encoder field of `wanted` that differs from the
    checkpoint's `stored` config; the fine-tuned planes must be among the pretrained."""
    wrong = [
        f"{name}: config {getattr(wanted, name)!r} vs checkpoint {getattr(stored, name)!r}"
        for name in ENCODER_FIELDS
        if getattr(wanted, name) != getattr(stored, name)
    ]
    extra = sorted(set(wanted.planes) - set(stored.planes))
    if extra:
        wrong.append(f"planes: config {wanted.planes} uses {extra}, not pretrained in checkpoint")
    if wrong:
        raise ValueError(
            f"the encoder of config.model.encoder does not match checkpoint {where}:\n  "
            + "\n  ".join(wrong)
            + "\nPick the config variant the checkpoint was pretrained with (e.g. tiny or "
            "paper) or override --config.model.encoder.<field>."
        )
    if wanted.planes != stored.planes:
        log.info(
            "fine-tuning planes %s of an encoder pretrained on %s", wanted.planes, stored.planes
        )


def load_encoder_params(
    checkpoint: str, step: int | None, wanted: MAEConfig
) -> tuple[dict[tuple, np.ndarray], str]:
    """(encoder parameters by path, e.g. ("encoder_blocks", 0, "attn", "qkv_kernel") ->
    host float32 array; "dir@step" description), after checking the stored config."""
    directory, step = resolve_checkpoint(checkpoint, step)
    where = f"{directory}@{step}"
    check_encoder_config(wanted, load_config(directory, step), where)
    model, _ = load_model(directory, step)
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    host = {path: np.asarray(v.get_value()) for path, v in params if path[0] in ENCODER_PARTS}
    return host, where


def _set_encoder(params: nnx.State, encoder: Mapping[tuple, np.ndarray], prefix: str, where):
    """`params` with every `prefix/...` leaf replaced by `encoder[...]`, same shardings."""
    updated, used = [], set()
    for path, variable in nnx.to_flat_state(params):
        if path[0] != prefix:
            updated.append((path, variable))
            continue
        key = path[1:]
        if key not in encoder:
            raise ValueError(
                f"checkpoint {where} has no encoder parameter {'/'.join(map(str, key))}"
            )
        value, target = encoder[key], variable.get_value()
        if value.shape != target.shape or value.dtype != target.dtype:
            raise ValueError(
                f"checkpoint {where}: {'/'.join(map(str, key))} is {value.dtype}{value.shape}, "
                f"the model needs {target.dtype}{tuple(target.shape)}"
            )
        # From the host copy on every process, each device its own shard (multi-host safe).
        array = jax.make_array_from_callback(
            value.shape, target.sharding, lambda index, v=value: v[index]
        )
        updated.append((path, variable.replace(array)))
        used.add(key)
    unused = sorted("/".join(map(str, k)) for k in set(encoder) - used)
    if unused:
        raise ValueError(f"checkpoint {where}: encoder parameters {unused} have no place here")
    return nnx.from_flat_state(updated)


def pretrained_encoder_init(
    checkpoint: str, step: int | None, wanted: MAEConfig, prefix: str = "encoder"
) -> Callable[[TrainState], TrainState]:
    """`Task.init_params`: copy the checkpoint's encoder into `state.params[prefix]`.

    The optimizer state is untouched: Adam's moments start at zero whatever the values.
    """

    def init_params(state: TrainState) -> TrainState:
        encoder, where = load_encoder_params(checkpoint, step, wanted)
        log.info("encoder initialised from %s", where)
        return state.replace(params=_set_encoder(state.params, encoder, prefix, where))

    return init_params
