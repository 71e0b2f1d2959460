"""Import the authors' PyTorch `ReconMAE` weights: `whmae-convert CHECKPOINT OUT`.

  whmae-convert recon.ckpt converted/                      # paper config, checked
  whmae-convert vita.safetensors vita/ --infer-shapes --num-heads 5
  whmae-convert encoder.pt enc/ --allow-missing decoder    # encoder-only weights

Reads a Lightning `.ckpt` (its `state_dict`, any `model.`-style key prefix), a plain
`.pt` state_dict or a `.safetensors` file, maps every key onto whmae's parameters
(`whmae.model.torch_keys`) and writes a checkpoint in the training loop's layout
(`whmae.model.io`), loadable by `whmae-embed --checkpoint OUT` and fine-tuning.

Checks, each failing with the key and both shapes or values: the shapes the
checkpoint implies (patch size, frames, widths, depths, MLP sizes) against the
config; every key and shape against the table (unknown and missing keys are listed);
the stored positional embeddings against whmae's formula (whmae computes them, so a
mismatch would silently change the model: it is an error unless allowed).
PyTorch is needed only for `.ckpt`/`.pt` files: `pip install -e .[torch]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from whmae.model.config import MAEConfig, tiny_config
from whmae.model.io import model_from_params, save_model
from whmae.model.mae import MaskedAutoencoder
from whmae.model.torch_keys import (
    PARTS,
    ConversionError,
    infer_shapes,
    params_to_state_dict,
    state_dict_to_params,
)

__all__ = ["ConversionError", "convert", "load_state_dict", "main", "strip_prefix"]

log = logging.getLogger(__name__)

ANCHOR_KEY = "patch_embed.proj.weight"
MODEL_PRESETS = {"paper": MAEConfig, "tiny": tiny_config}
# Reference semantics a config must keep for the weights to mean the same thing.
REFERENCE_SEMANTICS = {"norm_pix_loss": False, "gelu_approximate": False, "layernorm_eps": 1e-5}


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(
            "reading PyTorch checkpoints needs torch: pip install -e '.[torch]' "
            "(safetensors files need only the safetensors package)"
        ) from None
    return torch


def _to_numpy(tensor) -> np.ndarray:
    torch = _import_torch()
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)  # bf16/fp16 weights have no exact numpy twin
    return tensor.numpy()


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """The float32 numpy state_dict of a `.safetensors`, `.ckpt` (Lightning) or `.pt` file.

    Pickled files load with `weights_only=True`; `trust_pickle` allows full unpickling
    (runs code from the file: only for files you trust, e.g. a Lightning checkpoint
    whose hyper-parameters hold custom objects).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for unsafe pickles
        if trust_pickle:
            raise ConversionError(f"{path}: torch.load failed ({e})") from None
        raise ConversionError(
            f"{path}: cannot load with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}). Lightning checkpoints may pickle custom "
            "hyper-parameters: pass --trust-pickle if you trust the file, or save "
            "`ckpt['state_dict']` on its own with torch.save."
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        kind = type(obj).__name__
        keys = sorted(obj)[:10] if isinstance(obj, Mapping) else []
        raise ConversionError(
            f"{path}: expected a state_dict (or a Lightning checkpoint with `state_dict`), "
            f"got a {kind} {keys}"
        )
    return {k: _to_numpy(v) for k, v in obj.items()}


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except TypeError:  # bfloat16 has no numpy dtype: read through torch
        _import_torch()
        with safe_open(str(path), framework="pt") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """(state_dict without the model's key prefix, the prefix), found from
    `...patch_embed.proj.weight`; keys outside the prefix are kept (reported unknown)."""
    anchors = [k for k in state_dict if k == ANCHOR_KEY or k.endswith("." + ANCHOR_KEY)]
    if len(anchors) != 1:
        shown = sorted(state_dict)[:12]
        what = "no" if not anchors else f"{len(anchors)} ({anchors})"
        raise ConversionError(
            f"found {what} `{ANCHOR_KEY}` keys: not one ReconMAE state_dict (first keys: {shown})"
        )
    prefix = anchors[0][: -len(ANCHOR_KEY)]
    return {
        (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()
    }, prefix


def _check_semantics(config: MAEConfig) -> None:
    wrong = {
        k: getattr(config, k) for k, v in REFERENCE_SEMANTICS.items() if getattr(config, k) != v
    }
    if wrong:
        raise ConversionError(
            f"the reference model has {REFERENCE_SEMANTICS}; the config has {wrong}, under which "
            "the converted weights would compute something else"
        )


def convert(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: MAEConfig | None = None,
    *,
    infer: bool = False,
    overrides: Mapping[str, object] | None = None,
    allow_missing: tuple[str, ...] = (),
    allow_pos_embed_mismatch: bool = False,
    trust_pickle: bool = False,
    seed: int = 0,
) -> dict:
    """Convert a PyTorch ReconMAE checkpoint into a whmae checkpoint in `out_dir`.

    config: the model to load into (default: the paper model). infer: take the shape
    fields the checkpoint implies instead of checking them (image size, planes and
    heads still come from `config`). overrides: MAEConfig fields to set, applied
    with the inferred ones (e.g. num_heads, which shapes do not reveal).
    allow_missing=("decoder",): accept an encoder-only checkpoint; the decoder keeps a
    fresh init (seed) and the report says so. Returns the report: config, prefix,
    parts loaded, pos_embed findings, out (the step directory).
    """
    config = MAEConfig() if config is None else config
    state_dict, prefix = strip_prefix(load_state_dict(checkpoint, trust_pickle=trust_pickle))
    fields = dict(overrides or {})
    if infer:
        image = {k: fields.get(k, getattr(config, k)) for k in ("image_size", "planes")}
        # Inference reads image size and planes; validate the rest together with it.
        probe = dataclasses.replace(MAEConfig(), **image, frames=1, patch_size=(1, 1, 1))
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        fields = {**infer_shapes(shapes, probe), **fields}
    config = dataclasses.replace(config, **fields)
    _check_semantics(config)
    params, report = state_dict_to_params(
        state_dict,
        config,
        allow_missing=allow_missing,
        allow_pos_embed_mismatch=allow_pos_embed_mismatch,
    )
    if "decoder" not in report["parts"]:
        fresh = nnx.to_pure_dict(
            nnx.state(MaskedAutoencoder(config, rngs=nnx.Rngs(seed)), nnx.Param)
        )
        params = {**{k: v for k, v in fresh.items() if k not in params}, **params}
        log.warning(
            "%s has no decoder: the decoder is freshly initialised (seed %d)", checkpoint, seed
        )
    model = model_from_params(config, params)
    report.update(config=config, prefix=prefix, checkpoint=str(Path(checkpoint).absolute()))
    provenance = {
        "converted_from": report["checkpoint"],
        "key_prefix": prefix,
        "parts_loaded": list(report["parts"]),
        "decoder": "converted" if "decoder" in report["parts"] else f"fresh init, seed {seed}",
        "pos_embed_findings": report["pos_embed"],
    }
    report["out"] = str(save_model(out_dir, model, extra_config=provenance))
    return report


def rebuild_state_dict(model: MaskedAutoencoder, include_decoder: bool = True) -> dict:
    """The reference state_dict (numpy) of a whmae model: the converter's inverse."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return params_to_state_dict(params, model.config, include_decoder=include_decoder)


def load_model_config(spec: str) -> MAEConfig:
    """`paper`, `tiny`, or a config file `path.py[:arg]` whose `get_config(arg).model`."""
    if spec in MODEL_PRESETS:
        return MODEL_PRESETS[spec]()
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"config {path!r} is neither a preset {sorted(MODEL_PRESETS)} nor a file"
        )
    module_spec = importlib.util.spec_from_file_location("whmae_convert_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return MAEConfig(**module.get_config(arg or None).model.to_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whmae-convert", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help=".ckpt (Lightning), .pt/.pth state_dict or .safetensors")
    parser.add_argument("out", help="output checkpoint directory (as whmae-pretrain writes)")
    parser.add_argument("--config", default="paper", help="paper, tiny or FILE.py[:variant]")
    parser.add_argument("--infer-shapes", action="store_true", help="take shapes from the weights")
    parser.add_argument("--num-heads", type=int, help="encoder heads (not visible in shapes)")
    parser.add_argument("--decoder-num-heads", type=int, help="decoder heads")
    parser.add_argument("--image-size", type=int, help="rows = cols of each plane")
    parser.add_argument("--allow-missing", action="append", default=[], choices=PARTS[1:])
    parser.add_argument("--allow-pos-embed-mismatch", action="store_true")
    parser.add_argument("--trust-pickle", action="store_true", help="full torch.load (unsafe)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = load_model_config(args.config)
        overrides = {
            "num_heads": args.num_heads,
            "decoder_num_heads": args.decoder_num_heads,
            "image_size": args.image_size,
        }
        report = convert(
            args.checkpoint,
            args.out,
            config,
            infer=args.infer_shapes,
            overrides={k: v for k, v in overrides.items() if v},
            allow_missing=tuple(args.allow_missing),
            allow_pos_embed_mismatch=args.allow_pos_embed_mismatch,
            trust_pickle=args.trust_pickle,
        )
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"whmae-convert: {e}", file=sys.stderr)
        return 2
    for finding in report["pos_embed"]:
        print(f"warning: {finding}", file=sys.stderr)
    print(f"converted {report['checkpoint']} ({', '.join(report['parts'])}) -> {report['out']}")
    print(f"  config: {report['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
