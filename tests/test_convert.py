"""whmae-convert: the authors' PyTorch ReconMAE weights -> whmae, checked numerically."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from tests.torch_reference import ReconMAE, sincos_1d
from whmae import convert as convert_cli
from whmae.convert import ConversionError, convert, load_state_dict, rebuild_state_dict
from whmae.model.config import MAEConfig, tiny_config
from whmae.model.io import abstract_model, load_model
from whmae.model.torch_keys import check_config, infer_shapes, key_table, to_whmae

# The tiny reference: images [9, 10, 32, 32], patch (5, 8, 8), encoder 33 wide.
TINY = dict(
    image_shape=(9, 10, 32, 32),
    patch_size=(5, 8, 8),
    enc_dim=33,
    enc_depth=2,
    enc_heads=3,
    dec_dim=33,
    dec_depth=1,
    dec_heads=3,
)
TINY_CONFIG = tiny_config(mlp_dim=132, decoder_mlp_dim=132)
# ViTa-shaped: patch (5, 8, 8) over 25 frames; a decoder narrower than the encoder.
VITA = dict(
    image_shape=(9, 25, 32, 32),
    patch_size=(5, 8, 8),
    enc_dim=65,
    enc_depth=2,
    enc_heads=5,
    dec_dim=33,
    dec_depth=1,
    dec_heads=3,
)


def random_reference(seed: int, **shape) -> ReconMAE:
    """The reference module with every parameter random: torch's default init for the
    weight matrices (a realistic scale at any width), noise on norms and biases."""
    torch.manual_seed(seed)
    model = ReconMAE(**shape).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_reference():
    return random_reference(0, **TINY)


@pytest.fixture(scope="module")
def tiny_pt(tiny_reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "recon.pt"
    torch.save(tiny_reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_converted(tiny_pt, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    report = convert(tiny_pt, out, TINY_CONFIG)
    return out, report


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def assert_parity(reference: ReconMAE, model, seed: int, batch: int = 2):
    """Encoder output (cls + kept tokens) and reconstruction agree to 1e-5 relative."""
    num_tokens = reference.enc_pos_embed.shape[1] - 1
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(
        (batch, 9, model.config.frames, model.config.image_size, model.config.image_size),
        generator=gen,
    )
    ids_shuffle = torch.argsort(torch.rand((batch, num_tokens), generator=gen), dim=1)
    with torch.no_grad():
        latent, pred = reference(images, ids_shuffle)
    images_j, ids_j = jnp.asarray(images.numpy()), jnp.asarray(ids_shuffle.numpy())
    plane_mask = jnp.ones((batch, 9), bool)
    encoded = model.encode(
        images_j, plane_mask, mask_ratio=model.config.mask_ratio, ids_shuffle=ids_j
    )
    ours = jnp.concatenate([encoded["cls"][:, None], encoded["tokens"]], axis=1)
    assert ours.shape == latent.shape
    assert relative_error(ours, latent.numpy()) <= 1e-5
    out = model(images_j, plane_mask, ids_shuffle=ids_j)
    assert relative_error(out["pred"], pred.numpy()) <= 1e-5
    # The check can fail: another permutation gives another encoding.
    other = model.encode(
        images_j,
        plane_mask,
        mask_ratio=model.config.mask_ratio,
        ids_shuffle=jnp.flip(ids_j, axis=1),
    )
    assert relative_error(other["cls"], latent[:, 0].numpy()) > 1e-3


def test_tiny_reference_matches_whmae_after_conversion(tiny_reference, tiny_converted):
    out, report = tiny_converted
    assert report["parts"] == ("encoder", "decoder") and report["pos_embed"] == []
    model, config = load_model(out)
    assert config == TINY_CONFIG
    assert_parity(tiny_reference, model, seed=1)


def test_vita_shaped_checkpoint_converts_with_inferred_shapes(tmp_path):
    reference = random_reference(3, **VITA)
    path = tmp_path / "vita.pt"
    torch.save(reference.state_dict(), path)
    report = convert(path, tmp_path / "out", tiny_config(), infer=True, overrides={"num_heads": 5})
    config = report["config"]
    assert (config.patch_size, config.frames, config.width, config.decoder_width) == (
        (5, 8, 8),
        25,
        65,
        33,
    )
    assert (config.mlp_dim, config.decoder_mlp_dim, config.depth) == (260, 132, 2)
    model, _ = load_model(tmp_path / "out")
    assert_parity(reference, model, seed=4)


def test_key_table_covers_the_full_paper_size_state_dict():
    with torch.device("meta"):
        reference = ReconMAE((9, 50, 128, 128), (25, 8, 8), 1025, 6, 5, 1025, 2, 5)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    paper = MAEConfig()
    check_config(shapes, paper)
    inferred = infer_shapes(shapes, paper)
    assert {k: getattr(paper, k) for k in inferred} == inferred
    assert set(inferred) >= {
        "patch_size",
        "frames",
        "width",
        "depth",
        "mlp_dim",
        "decoder_width",
        "decoder_depth",
        "decoder_mlp_dim",
    }
    table = key_table(paper)
    assert {e.key: e.torch_shape for e in table} == shapes
    _, abstract, _ = abstract_model(paper)
    expected = {tuple(p): v.shape for p, v in nnx.to_flat_state(abstract)}
    mapped = {
        e.path: to_whmae(e, np.broadcast_to(np.float32(0), e.torch_shape)).shape
        for e in table
        if e.kind != "pos_embed"
    }
    assert mapped == expected


def test_round_trip_rebuilds_the_original_state_dict(tiny_reference, tiny_converted):
    model, _ = load_model(tiny_converted[0])
    rebuilt = rebuild_state_dict(model)
    original = numpy_state_dict(tiny_reference)
    assert set(rebuilt) == set(original)
    for key, value in original.items():
        if key.endswith("pos_embed"):
            np.testing.assert_allclose(rebuilt[key], value, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(rebuilt[key], value, err_msg=key)


def test_shape_fields_unlike_the_config_are_named_with_both_values(tiny_pt, tmp_path):
    with pytest.raises(ConversionError) as err:
        convert(
            tiny_pt,
            tmp_path / "out",
            TINY_CONFIG.__class__(**{**dataclasses.asdict(TINY_CONFIG), "frames": 20, "depth": 3}),
        )
    message = str(err.value)
    assert "frames: checkpoint 10" in message and "config 20" in message
    assert "depth: checkpoint 2" in message and "config 3" in message
    assert "enc_pos_embed (1, 289, 33)" in message
    assert not (tmp_path / "out").exists()


def test_a_wrong_key_shape_names_the_key_and_both_shapes(tiny_reference, tmp_path):
    state = numpy_state_dict(tiny_reference)
    state["encoder.1.attn.proj.bias"] = np.zeros(32, np.float32)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(
        ConversionError,
        match=r"encoder\.1\.attn\.proj\.bias: checkpoint "
        r"\(32,\), expected \(33,\)",
    ):
        convert(tmp_path / "w.safetensors", tmp_path / "out", TINY_CONFIG)


def test_missing_and_unknown_keys_are_listed(tiny_reference, tmp_path):
    state = numpy_state_dict(tiny_reference)
    del state["encoder.0.norm2.weight"], state["recon_head.bias"]
    state["encoder.0.ls1.gamma"] = np.ones(33, np.float32)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert(tmp_path / "w.safetensors", tmp_path / "out", TINY_CONFIG)
    message = str(err.value)
    assert "'encoder.0.norm2.weight'" in message and "'recon_head.bias'" in message
    assert "unknown keys: ['encoder.0.ls1.gamma']" in message


def test_encoder_only_checkpoint_needs_allow_missing_and_loads_the_encoder(
    tiny_reference, tmp_path
):
    state = {
        k: v
        for k, v in numpy_state_dict(tiny_reference).items()
        if k.startswith(("patch_embed", "cls_token", "enc_pos_embed", "encoder"))
    }
    save_file(state, str(tmp_path / "enc.safetensors"))
    with pytest.raises(ConversionError, match="--allow-missing decoder") as err:
        convert(tmp_path / "enc.safetensors", tmp_path / "out", TINY_CONFIG)
    assert "'decoder_embed.weight'" in str(err.value) and "'mask_token'" in str(err.value)
    report = convert(
        tmp_path / "enc.safetensors", tmp_path / "out", TINY_CONFIG, allow_missing=("decoder",)
    )
    assert report["parts"] == ("encoder",)
    model, _ = load_model(tmp_path / "out")
    rebuilt = rebuild_state_dict(model, include_decoder=False)
    for key in state:
        if not key.endswith("pos_embed"):
            np.testing.assert_array_equal(rebuilt[key], state[key], err_msg=key)


def test_a_positional_embedding_mismatch_is_reported_not_replaced(tiny_reference, tmp_path):
    state = numpy_state_dict(tiny_reference)
    # Short-axis planes indexed 3-8 (not restarting at 0): what a single-axis formula gives.
    pos = state["enc_pos_embed"][0]
    block = (33 - 1) // 4
    tokens_per_plane = 2 * 4 * 4
    for plane in range(3, 9):
        rows = slice(1 + plane * tokens_per_plane, 1 + (plane + 1) * tokens_per_plane)
        pos[rows, 1 : 1 + block] = sincos_1d(block, torch.tensor([float(plane)])).numpy()
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConversionError, match=r"enc_pos_embed differs .* \(plane block\)"):
        convert(tmp_path / "w.safetensors", tmp_path / "out", TINY_CONFIG)
    report = convert(
        tmp_path / "w.safetensors", tmp_path / "out", TINY_CONFIG, allow_pos_embed_mismatch=True
    )
    assert len(report["pos_embed"]) == 1 and "enc_pos_embed" in report["pos_embed"][0]
    assert "dec_pos_embed" not in report["pos_embed"][0]


class _Hyperparameters:
    """Stands for the custom objects Lightning pickles into `hyper_parameters`."""

    def __init__(self):
        self.enc_embed_dim = 33


def test_lightning_checkpoint_with_prefix_and_safetensors_give_the_same_weights(
    tiny_reference, tiny_converted, tmp_path
):
    state = tiny_reference.state_dict()
    ckpt = {
        "epoch": 3,
        "global_step": 7,
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "hyper_parameters": {"enc_embed_dim": 33},
    }
    torch.save(ckpt, tmp_path / "plain.ckpt")
    report = convert(tmp_path / "plain.ckpt", tmp_path / "from_ckpt", TINY_CONFIG)
    assert report["prefix"] == "model."
    save_file(numpy_state_dict(tiny_reference), str(tmp_path / "w.safetensors"))
    convert(tmp_path / "w.safetensors", tmp_path / "from_safetensors", TINY_CONFIG)
    reference_params = rebuild_state_dict(load_model(tiny_converted[0])[0])
    for out in ("from_ckpt", "from_safetensors"):
        rebuilt = rebuild_state_dict(load_model(tmp_path / out)[0])
        for key, value in reference_params.items():
            np.testing.assert_array_equal(rebuilt[key], value, err_msg=f"{out}: {key}")

    ckpt["hyper_parameters"] = _Hyperparameters()
    torch.save(ckpt, tmp_path / "custom.ckpt")
    with pytest.raises(ConversionError, match="--trust-pickle"):
        load_state_dict(tmp_path / "custom.ckpt")
    trusted = load_state_dict(tmp_path / "custom.ckpt", trust_pickle=True)
    np.testing.assert_array_equal(trusted["model.cls_token"], state["cls_token"].numpy())


def test_keys_outside_the_model_prefix_are_unknown(tiny_reference, tmp_path):
    state = {f"net.{k}": v for k, v in tiny_reference.state_dict().items()}
    state["criterion.weight"] = torch.ones(3)
    torch.save({"state_dict": state}, tmp_path / "x.ckpt")
    with pytest.raises(ConversionError, match=r"unknown keys: \['criterion.weight'\]"):
        convert(tmp_path / "x.ckpt", tmp_path / "out", TINY_CONFIG)


def test_pytorch_files_without_torch_say_how_to_install_it(tiny_pt, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
        load_state_dict(tiny_pt)


def test_command_line_converts_and_reports_errors(tiny_pt, tmp_path, capsys):
    assert convert_cli.main([str(tiny_pt), str(tmp_path / "out"), "--config", "tiny"]) == 2
    assert "mlp_dim: checkpoint 132" in capsys.readouterr().err
    argv = [str(tiny_pt), str(tmp_path / "out"), "--config", "tiny", "--infer-shapes"]
    assert convert_cli.main(argv) == 0
    assert "encoder, decoder" in capsys.readouterr().out
    model, config = load_model(tmp_path / "out")
    assert config.mlp_dim == 132 and config.num_heads == 3
    assert convert_cli.main(argv) == 2  # never overwrites a checkpoint
    assert "already holds step 0" in capsys.readouterr().err
