"""The key table between the reference `ReconMAE` state_dict and whmae's parameters.

Pure numpy, no torch. Each reference key maps onto one parameter path of
`MaskedAutoencoder` (see the layouts in `whmae.model.mae` and `whmae.model.vit`):

  patch_embed.proj.weight (D, 1, pt, ph, pw) -> patch_embed.kernel [P, D]   (reshape, .T)
  Linear weight (out, in)                    -> kernel [in, out]            (.T)
  attn.qkv.weight (3D, D), rows q,k,v x heads x head_dim -> qkv_kernel [D, 3, H, hd]
  attn.qkv.bias (3D,)                        -> qkv_bias [3, H, hd]
  attn.proj.weight (D, D)                    -> proj_kernel [H, hd, D]
  LayerNorm weight / bias                    -> scale / bias;  tokens: as they are
  enc_pos_embed, dec_pos_embed (1, 1 + N, D) -> no parameter: checked against
                                                `whmae.model.posembed` instead

The encoder part is required; the decoder part (mask_token, decoder_embed,
dec_pos_embed, decoder.network.{i}, decoder.norm, recon_head) may be absent.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from whmae.model.config import MAEConfig
from whmae.model.posembed import positional_embedding

PARTS = ("encoder", "decoder")
POS_EMBED_ATOL = 1e-5  # float32 sin/cos of torch and numpy agree to ~1e-7


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str  # reference state_dict key (no prefix)
    path: tuple  # whmae parameter path, list indices as ints; () for positional embeddings
    torch_shape: tuple[int, ...]
    kind: str  # copy | linear | patch | qkv_weight | qkv_bias | proj_weight | pos_embed
    part: str  # encoder | decoder
    heads: int = 1


def _block(prefix: str, path: tuple, part: str, width: int, heads: int, mlp: int) -> list[Entry]:
    rows = [
        ("norm1.weight", ("norm1", "scale"), (width,), "copy"),
        ("norm1.bias", ("norm1", "bias"), (width,), "copy"),
        ("attn.qkv.weight", ("attn", "qkv_kernel"), (3 * width, width), "qkv_weight"),
        ("attn.qkv.bias", ("attn", "qkv_bias"), (3 * width,), "qkv_bias"),
        ("attn.proj.weight", ("attn", "proj_kernel"), (width, width), "proj_weight"),
        ("attn.proj.bias", ("attn", "proj_bias"), (width,), "copy"),
        ("norm2.weight", ("norm2", "scale"), (width,), "copy"),
        ("norm2.bias", ("norm2", "bias"), (width,), "copy"),
        ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), (mlp, width), "linear"),
        ("mlp.fc1.bias", ("mlp", "fc1", "bias"), (mlp,), "copy"),
        ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), (width, mlp), "linear"),
        ("mlp.fc2.bias", ("mlp", "fc2", "bias"), (width,), "copy"),
    ]
    return [Entry(prefix + k, path + p, s, kind, part, heads) for k, p, s, kind in rows]


def key_table(config: MAEConfig, include_decoder: bool = True) -> list[Entry]:
    """Every reference key of a `ReconMAE` shaped as `config`, with its whmae path."""
    c = config
    d, dd, n = c.width, c.decoder_width, c.num_tokens
    entries = [
        Entry(
            "patch_embed.proj.weight",
            ("patch_embed", "kernel"),
            (d, 1, *c.patch_size),
            "patch",
            "encoder",
        ),
        Entry("patch_embed.proj.bias", ("patch_embed", "bias"), (d,), "copy", "encoder"),
        Entry("cls_token", ("cls_token",), (1, 1, d), "copy", "encoder"),
        Entry("enc_pos_embed", (), (1, 1 + n, d), "pos_embed", "encoder"),
    ]
    for i in range(c.depth):
        entries += _block(
            f"encoder.{i}.", ("encoder_blocks", i), "encoder", d, c.num_heads, c.mlp_dim
        )
    entries += [
        Entry("encoder_norm.weight", ("encoder_norm", "scale"), (d,), "copy", "encoder"),
        Entry("encoder_norm.bias", ("encoder_norm", "bias"), (d,), "copy", "encoder"),
    ]
    if not include_decoder:
        return entries
    entries += [
        Entry("mask_token", ("mask_token",), (1, 1, dd), "copy", "decoder"),
        Entry("decoder_embed.weight", ("decoder_embed", "kernel"), (dd, d), "linear", "decoder"),
        Entry("decoder_embed.bias", ("decoder_embed", "bias"), (dd,), "copy", "decoder"),
        Entry("dec_pos_embed", (), (1, 1 + n, dd), "pos_embed", "decoder"),
    ]
    for i in range(c.decoder_depth):
        entries += _block(
            f"decoder.network.{i}.",
            ("decoder_blocks", i),
            "decoder",
            dd,
            c.decoder_num_heads,
            c.decoder_mlp_dim,
        )
    entries += [
        Entry("decoder.norm.weight", ("decoder_norm", "scale"), (dd,), "copy", "decoder"),
        Entry("decoder.norm.bias", ("decoder_norm", "bias"), (dd,), "copy", "decoder"),
        Entry(
            "recon_head.weight", ("recon_head", "kernel"), (c.patch_dim, dd), "linear", "decoder"
        ),
        Entry("recon_head.bias", ("recon_head", "bias"), (c.patch_dim,), "copy", "decoder"),
    ]
    return entries


def to_whmae(entry: Entry, w: np.ndarray) -> np.ndarray:
    """A reference tensor (numpy) -> the whmae parameter value."""
    if entry.kind == "copy":
        return w
    if entry.kind == "linear":
        return w.T
    if entry.kind == "patch":
        return w.reshape(w.shape[0], -1).T
    if entry.kind == "qkv_weight":
        width = w.shape[1]
        return w.reshape(3, entry.heads, width // entry.heads, width).transpose(3, 0, 1, 2)
    if entry.kind == "qkv_bias":
        return w.reshape(3, entry.heads, -1)
    if entry.kind == "proj_weight":
        width = w.shape[0]
        return w.T.reshape(entry.heads, width // entry.heads, width)
    raise ValueError(f"{entry.key}: no parameter for kind {entry.kind}")


def to_torch(entry: Entry, v: np.ndarray) -> np.ndarray:
    """The whmae parameter value -> the reference tensor (numpy): `to_whmae`'s inverse."""
    if entry.kind == "copy":
        return np.asarray(v)
    if entry.kind in ("linear", "patch"):
        return np.asarray(v).T.reshape(entry.torch_shape)
    if entry.kind == "qkv_weight":
        return np.asarray(v).transpose(1, 2, 3, 0).reshape(entry.torch_shape)
    if entry.kind == "qkv_bias":
        return np.asarray(v).reshape(-1)
    if entry.kind == "proj_weight":
        return np.asarray(v).reshape(entry.torch_shape[0], -1).T
    raise ValueError(f"{entry.key}: no parameter for kind {entry.kind}")


def _max_index(keys, pattern: str) -> int | None:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) if found else None


def _infer(shapes: Mapping[str, tuple], config: MAEConfig) -> dict[str, tuple[object, str]]:
    """{MAEConfig field: (value, evidence)} for every field the shapes reveal."""
    found: dict[str, tuple[object, str]] = {}

    def shape(key):
        return tuple(shapes[key]) if key in shapes else None

    patch = shape("patch_embed.proj.weight")
    if patch is not None:
        if len(patch) != 5 or patch[1] != 1:
            raise ConversionError(
                f"patch_embed.proj.weight has shape {patch}; a Conv3d over one channel "
                "(D, 1, pt, ph, pw) was expected"
            )
        evidence = f"patch_embed.proj.weight {patch}"
        found["width"] = (patch[0], evidence)
        found["patch_size"] = (tuple(patch[2:]), evidence)
    for field, blocks, fc1 in (
        ("depth", "encoder", "encoder.0.mlp.fc1.weight"),
        ("decoder_depth", "decoder.network", "decoder.network.0.mlp.fc1.weight"),
    ):
        last = _max_index(shapes, re.escape(blocks) + r"\.(\d+)\.")
        if last is not None:
            found[field] = (last + 1, f"highest block index {blocks}.{last}")
        if shape(fc1) is not None:
            mlp_field = "mlp_dim" if field == "depth" else "decoder_mlp_dim"
            found[mlp_field] = (shape(fc1)[0], f"{fc1} {shape(fc1)}")
    if shape("decoder_embed.weight") is not None:
        found["decoder_width"] = (
            shape("decoder_embed.weight")[0],
            f"decoder_embed.weight {shape('decoder_embed.weight')}",
        )
    pos = shape("enc_pos_embed")
    if pos is not None and "patch_size" in found:
        pt, ph, pw = found["patch_size"][0]
        size = config.image_size
        if size % ph or size % pw:
            raise ConversionError(
                f"image_size={size} is not divisible by the checkpoint's patch {(pt, ph, pw)}"
            )
        per_frame_group = config.num_planes * (size // ph) * (size // pw)
        if len(pos) != 3 or (pos[1] - 1) % per_frame_group:
            raise ConversionError(
                f"enc_pos_embed {pos} holds {pos[1] - 1} tokens: not a multiple of "
                f"{config.num_planes} planes x {size // ph} x {size // pw} patches at "
                f"image_size={size} (set the image size / planes of the checkpoint's model)"
            )
        frames = (pos[1] - 1) // per_frame_group * pt
        found["frames"] = (
            frames,
            f"enc_pos_embed {pos} at image_size={size}, {config.num_planes} planes",
        )
    return found


def infer_shapes(shapes: Mapping[str, tuple], config: MAEConfig) -> dict[str, object]:
    """MAEConfig fields implied by the checkpoint's shapes: patch_size, frames, width,
    depth, mlp_dim and the decoder's (when present). Heads are not visible in shapes;
    image size and planes come from `config`."""
    return {k: v for k, (v, _) in _infer(shapes, config).items()}


def check_config(shapes: Mapping[str, tuple], config: MAEConfig) -> None:
    """ConversionError naming every shape field where checkpoint and config disagree."""
    wrong = [
        f"  {field}: checkpoint {value!r} (from {evidence}), config {getattr(config, field)!r}"
        for field, (value, evidence) in _infer(shapes, config).items()
        if value != getattr(config, field)
    ]
    if wrong:
        raise ConversionError(
            "the checkpoint does not have the config's shape:\n"
            + "\n".join(wrong)
            + "\nchoose the matching config, or let the converter take these from the "
            "checkpoint (--infer-shapes)"
        )


def _check_keys(shapes, table, allow_missing) -> None:
    expected = {e.key: e for e in table}
    missing = [e.key for e in table if e.key not in shapes]
    unknown = sorted(k for k in shapes if k not in expected)
    wrong = [
        f"  {k}: checkpoint {tuple(shapes[k])}, expected {expected[k].torch_shape}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k].torch_shape
    ]
    problems = []
    if missing:
        hint = (
            ""
            if "decoder" in allow_missing
            else " (an encoder-only checkpoint? allow a missing decoder: --allow-missing decoder)"
        )
        problems.append(f"missing keys{hint}: {missing}")
    if unknown:
        problems.append(f"unknown keys: {unknown}")
    if wrong:
        problems.append("shape mismatches:\n" + "\n".join(wrong))
    if problems:
        raise ConversionError("the state_dict does not fit the model:\n" + "\n".join(problems))


def pos_embed_findings(state_dict: Mapping[str, np.ndarray], config: MAEConfig) -> list[str]:
    """Differences between stored positional embeddings and whmae's formula (none: [])."""
    findings = []
    for key, width in (("enc_pos_embed", config.width), ("dec_pos_embed", config.decoder_width)):
        if key not in state_dict:
            continue
        ours = positional_embedding(width, config.planes, config.grid[1:])
        theirs = np.asarray(state_dict[key], np.float32).reshape(ours.shape)
        diff = np.abs(theirs - ours)
        if diff.max() > POS_EMBED_ATOL:
            row, col = np.unravel_index(np.argmax(diff), diff.shape)
            block = ("axis flag", "plane", "t", "h", "w")[
                0 if col == 0 else 1 + (col - 1) * 4 // (width - 1)
            ]
            findings.append(
                f"{key} differs from whmae's positional embedding: max |diff| {diff.max():.3g} "
                f"at token row {row}, column {col} ({block} block); "
                f"{int((diff > POS_EMBED_ATOL).sum())} of {diff.size} values differ"
            )
    return findings


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    config: MAEConfig,
    *,
    allow_missing: tuple[str, ...] = (),
    allow_pos_embed_mismatch: bool = False,
) -> tuple[dict, dict]:
    """(nested parameter dict of the parts present, report {parts, pos_embed}).

    Raises ConversionError on shape fields that differ from `config`, missing keys
    (the decoder may be absent with allow_missing=("decoder",)), unknown keys, key
    shapes, and positional embeddings unlike whmae's (unless allowed: then reported).
    """
    bad = set(allow_missing) - set(PARTS[1:])
    if bad:
        raise ValueError(f"allow_missing may hold {PARTS[1:]}, got {sorted(bad)}")
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    check_config(shapes, config)
    decoder_keys = {e.key for e in key_table(config) if e.part == "decoder"}
    include_decoder = "decoder" not in allow_missing or bool(decoder_keys & set(shapes))
    table = key_table(config, include_decoder)
    _check_keys(shapes, table, allow_missing)
    findings = pos_embed_findings(state_dict, config)
    if findings and not allow_pos_embed_mismatch:
        raise ConversionError(
            "\n".join(findings) + "\nwhmae computes positional embeddings from its formula and "
            "would not use the stored ones; pass --allow-pos-embed-mismatch to convert anyway"
        )
    params: dict = {}
    for entry in table:
        if entry.kind == "pos_embed":
            continue
        node = params
        for k in entry.path[:-1]:
            node = node.setdefault(k, {})
        node[entry.path[-1]] = np.asarray(
            to_whmae(entry, np.asarray(state_dict[entry.key])), np.float32
        )
    parts = ("encoder", "decoder") if include_decoder else ("encoder",)
    return params, {"parts": parts, "pos_embed": findings}


def params_to_state_dict(
    params: Mapping, config: MAEConfig, *, include_decoder: bool = True
) -> dict[str, np.ndarray]:
    """The reference state_dict (numpy) of whmae parameters (a nested dict as
    `nnx.to_pure_dict` gives), positional embeddings from whmae's formula."""
    out = {}
    for entry in key_table(config, include_decoder):
        if entry.kind == "pos_embed":
            width = entry.torch_shape[-1]
            out[entry.key] = positional_embedding(width, config.planes, config.grid[1:])[None]
            continue
        node = params
        for k in entry.path:
            node = node[k] if k in node else node[str(k)]
        out[entry.key] = to_torch(entry, np.asarray(node))
    return out
