"""Reconstruction figures: one exam, the same mask for every model, visible patches pasted back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from whmae import layout
from whmae.evaluate import reconstruction
from whmae.model.mae import MaskedAutoencoder, tiny_config

SA, LA = layout.SHORT_AXIS_PLANES, layout.LONG_AXIS_PLANES


def exam(seed: int = 0, absent=()) -> dict:
    rng = np.random.default_rng(seed)
    plane_mask = np.ones(layout.NUM_PLANES, bool)
    plane_mask[list(absent)] = False
    images = rng.integers(0, 256, (layout.NUM_PLANES, 10, 32, 32), dtype=np.uint8)
    return {"eid": f"exam{seed}", "images": images, "plane_mask": plane_mask}


@pytest.fixture(scope="module")
def models():
    return {
        "all_planes": MaskedAutoencoder(tiny_config(), rngs=nnx.Rngs(0)),
        "sa_only": MaskedAutoencoder(tiny_config(planes=SA), rngs=nnx.Rngs(1)),
        "la_only": MaskedAutoencoder(tiny_config(planes=LA, norm_pix_loss=True), rngs=nnx.Rngs(2)),
    }


@pytest.mark.parametrize("name", ["all_planes", "la_only"])  # plain pixels, norm-pix
def test_pasted_image_is_the_input_on_visible_patches_and_the_reconstruction_on_masked(
    models, name
):
    model = models[name]
    r = reconstruction.reconstruct_exam(model, exam(), model.config.mask_ratio)
    target, recon, pasted, masked = r["target"], r["recon"], r["pasted"], r["masked"]
    planes = list(model.config.planes)
    np.testing.assert_array_equal(target, exam()["images"][planes] / np.float32(255.0))
    np.testing.assert_array_equal(pasted[~masked], target[~masked])  # exactly the input
    np.testing.assert_array_equal(pasted[masked], recon[masked])
    assert masked.any() and (~masked).any() and not np.array_equal(recon, target)
    # Every plane keeps the same number of tokens: int(32 * 0.3) = 9 of the 2x4x4 grid.
    c = model.config
    assert r["tokens_per_plane"] == 32 and r["kept_per_plane"] == 9
    per_plane = masked.reshape(len(planes), -1).sum(1)
    np.testing.assert_array_equal(per_plane, (32 - 9) * c.patch_dim)


def test_every_model_gets_the_same_mask_on_the_planes_it_shares(models):
    for absent in ((), (4, 1)):  # absent planes do not shift the others' masks
        ex = exam(3, absent)
        results = {n: reconstruction.reconstruct_exam(m, ex, 0.7) for n, m in models.items()}
        full = results["all_planes"]["masked"]
        for name, planes in (("sa_only", SA), ("la_only", LA)):
            np.testing.assert_array_equal(results[name]["masked"], full[list(planes)])
        assert not np.array_equal(full[0], full[1])  # per plane, not one mask for all
    other = reconstruction.reconstruct_exam(models["all_planes"], exam(4), 0.7)
    assert not np.array_equal(other["masked"], full)  # one key per exam: its eid


def test_norm_pix_masked_patches_do_not_see_their_own_statistics(models):
    """The masked patches of a norm-pix model are de-normalised with the visible
    patches' statistics: changing the hidden pixels changes nothing shown."""
    model = models["la_only"]
    ex = exam(5)
    r = reconstruction.reconstruct_exam(model, ex, 0.7)
    assert r["norm_pix"]
    hidden = ex["images"].copy()
    full_mask = np.zeros(hidden.shape, bool)
    full_mask[list(LA)] = r["masked"]
    hidden[full_mask] = 255 - hidden[full_mask]
    r2 = reconstruction.reconstruct_exam(model, {**ex, "images": hidden}, 0.7)
    np.testing.assert_array_equal(r2["masked"], r["masked"])
    np.testing.assert_allclose(r2["recon"][r["masked"]], r["recon"][r["masked"]], atol=1e-6)


def test_run_writes_each_models_figure_and_the_comparison(models, tiny_dataset, tmp_path):
    from whmae.model.io import save_model

    paths = {}
    for name, model in models.items():
        save_model(tmp_path / "ckpt" / name, model)
        paths[name] = str(tmp_path / "ckpt" / name)
    out = tmp_path / "out"
    metrics = reconstruction.run(paths, tiny_dataset, "test", out, batch_size=4, progress=False)
    figure = metrics["figure"]
    assert figure["comparison"] == "reconstruction_comparison.png"
    assert figure["planes"] == ["la_4ch", "sa_3"] and figure["frames"] == [0, 5]
    assert figure["kept_per_plane"] == 9 and figure["mask_ratio"] == pytest.approx(23 / 32)
    for png in [figure["comparison"], *(f for e in metrics["models"].values() for f in e["plots"])]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert set(metrics["models"]["sa_only"]["figure_mse_masked"]) == {"sa_3 t=0", "sa_3 t=5"}
    assert set(metrics["models"]["la_only"]["figure_mse_masked"]) == {"la_4ch t=0", "la_4ch t=5"}
    written = json.loads((out / "metrics.json").read_text())
    assert written["figure"]["eid"] == figure["eid"]
