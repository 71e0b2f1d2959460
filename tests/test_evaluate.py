"""Evaluation tasks: pure evaluation functions on synthetic arrays, and each task's
metrics.json (documented keys, strict JSON) from a tiny checkpoint on the phantom data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from whmae import layout
from whmae.data.dataset.pipeline import make_pipeline
from whmae.evaluate import __main__ as cli
from whmae.evaluate import phenotypes, reconstruction, report, representation, segmentation
from whmae.evaluate.metrics import regression_stats
from whmae.model.io import save_model
from whmae.model.mae import MaskedAutoencoder, tiny_config

COMMON_KEYS = {"task", "schema_version", "split", "data_dir", "models"}
SUMMARY_KEYS = {"mean", "sd", "n", "n_undefined", "n_infinite"}
STATS_KEYS = {"n", "mae", "mae_sd", "rmse", "pearson_r", "bias", "sd", "loa_low", "loa_high"}


def read_json(path) -> dict:
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def dataset(data_dir, split, fields=("eid", "images", "plane_mask", "phenotypes")) -> dict:
    batches = list(make_pipeline(data_dir, split, batch_size=64, fields=fields, shuffle=False,
                                 num_epochs=1, drop_remainder=False, process_index=0,
                                 process_count=1))  # fmt: skip
    return {k: np.concatenate([b[k] for b in batches]) for k in fields}


# ------------------------------------------------------------------- phenotypes
def synthetic_predictions():
    target = np.array([[10.0, 50.0], [20.0, 60.0], [30.0, np.nan], [40.0, 70.0]])
    good = {"eid": np.array(["a", "b", "c", "d"]), "columns": np.array(["LVM (g)", "RVEF (%)"]),
            "pred": target + np.array([[1.0, -2.0]]), "target": target,
            "train_mean": np.array([22.0, 58.0])}  # fmt: skip
    other = {"eid": good["eid"], "columns": np.array(["LVM (g)"]),
             "pred": np.array([[12.0], [18.0], [35.0], [40.0]]), "target": target[:, :1],
             "train_mean": np.array([22.0])}  # fmt: skip
    return {"good": good, "other": other}


def test_evaluate_phenotypes_models_side_by_side_with_the_mean_guess():
    metrics = phenotypes.evaluate_phenotypes(synthetic_predictions())
    assert metrics["columns"] == ["LVM (g)", "RVEF (%)"]
    assert set(metrics["models"]) == {"good", "other", "mean_guess"}
    good = metrics["models"]["good"]["columns"]
    assert good["LVM (g)"]["mae"] == pytest.approx(1.0) and good["LVM (g)"]["bias"] == 1.0
    assert good["RVEF (%)"]["n"] == 3  # the NaN target is left out
    assert good["RVEF (%)"]["bias"] == pytest.approx(-2.0)
    assert good["LVM (g)"]["pearson_r"] == pytest.approx(1.0)
    assert "RVEF (%)" not in metrics["models"]["other"]["columns"]
    # other: errors 2, 2, 5, 0
    assert metrics["models"]["other"]["columns"]["LVM (g)"]["mae"] == pytest.approx(9 / 4)
    guess = metrics["models"]["mean_guess"]["columns"]
    # train mean 22 for everyone: |22-10|, |22-20|, |22-30|, |22-40| -> 40/4
    assert guess["LVM (g)"]["mae"] == pytest.approx(10.0)
    assert guess["RVEF (%)"]["mae"] == pytest.approx((8 + 2 + 12) / 3)
    assert math.isnan(guess["LVM (g)"]["pearson_r"])  # constant prediction: undefined
    assert set(guess["LVM (g)"]) == STATS_KEYS


def test_evaluate_phenotypes_rejects_bad_input_naming_the_model():
    preds = synthetic_predictions()
    preds["other"]["pred"] = preds["other"]["pred"][:, [0, 0]]
    with pytest.raises(ValueError, match="model 'other'"):
        phenotypes.evaluate_phenotypes(preds)
    with pytest.raises(ValueError, match="reserved"):
        phenotypes.evaluate_phenotypes({"mean_guess": synthetic_predictions()["good"]})


def test_phenotypes_cli_on_saved_predictions_writes_the_documented_json(tmp_path, capsys):
    args = []
    for name, p in synthetic_predictions().items():
        np.savez(tmp_path / f"{name}.npz", **p)
        args += ["--model", f"{name}={tmp_path / f'{name}.npz'}"]
    out = tmp_path / "out"
    assert cli.main(["phenotypes", *args, "--data", "unused", "--out", str(out)]) == 0
    assert "mean_guess" in capsys.readouterr().out
    metrics = read_json(out / "metrics.json")
    assert COMMON_KEYS <= set(metrics) and metrics["task"] == "phenotypes"
    assert set(metrics["models"]["good"]["columns"]["LVM (g)"]) == STATS_KEYS
    assert metrics["models"]["mean_guess"]["columns"]["LVM (g)"]["pearson_r"] is None
    assert metrics["schema_version"] == phenotypes.SCHEMA_VERSION == 3
    # Every pair of models once (first name before second), each column with its interval.
    names = list(synthetic_predictions())
    pairs = {(a, b) for a, inner in metrics["paired"].items() for b in inner}
    assert pairs == {(a, b) for i, a in enumerate(names) for b in names[i + 1 :]}
    first = metrics["paired"][names[0]][names[1]]["LVM (g)"]
    assert set(first) == {"n", "mae_diff", "ci95"} and first["ci95"][0] <= first["ci95"][1]
    learning = metrics["models"]["good"]["learning"]
    assert learning["training"] is None and learning["learned"]  # an .npz has no training log
    assert set(learning["columns"]["LVM (g)"]) == {"pred_sd", "target_sd", "sd_ratio",
                                                    "spread_ok", "learned"}  # fmt: skip
    for files in metrics["plots"].values():
        for f in files.values():
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["phenotypes", "--model", f"x={tmp_path}/missing.npz", "--data", "d",
                     "--out", str(out)]) == 2  # fmt: skip
    assert "missing.npz does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------- segmentation
def synthetic_segmentation(frames: int = 3, size: int = 16):
    """Two exams; truth: SA LV square + myocardium ring + RV (exam 1 only), LA in 2ch/4ch,
    RA in 4ch; prediction: the truth with exam 0's LA in 2ch shifted two columns."""
    n = 2
    labels = np.zeros((n, 9, frames, size, size), np.uint8)
    for plane in layout.SHORT_AXIS_PLANES:
        labels[:, plane, :, 3:11, 3:11] = layout.LV_MYOCARDIUM
        for t in range(frames):
            labels[:, plane, t, 5 : 9 - (t % 2), 5:9] = layout.LV_BLOOD_POOL
        labels[1, plane, :, 3:11, 12:15] = layout.RV_BLOOD_POOL
    for plane in (layout.LA_2CH, layout.LA_4CH):
        labels[:, plane, :, 2:10, 4:8] = layout.LA
    labels[:, layout.LA_4CH, :, 2:10, 10:14] = layout.RA
    pred = labels.copy()
    pred[0, layout.LA_2CH] = 0
    pred[0, layout.LA_2CH, :, 2:10, 6:10] = layout.LA
    pred[:, layout.LA_3CH] = layout.LA  # unlabelled plane: must not count
    label_mask = np.ones((n, 9), bool)
    label_mask[:, layout.LA_3CH] = False
    return {
        "eid": np.array(["e0", "e1"]), "pred": pred, "labels": labels,
        "label_mask": label_mask, "plane_mask": np.ones((n, 9), bool),
        "pixel_spacing": np.tile(np.array([2.0, 0.5], np.float32), (n, 9, 1)),
        "slice_spacing": np.full(n, 10.0, np.float32),
        "frame_duration": np.full(n, 0.03, np.float32),
    }  # fmt: skip


def test_evaluate_segmentation_by_hand_absent_classes_left_out():
    metrics = segmentation.evaluate_segmentation(synthetic_segmentation())
    sa, la2 = metrics["dice"]["short_axis"], metrics["dice"]["la_2ch"]
    # RV absent from truth and prediction in exam 0: undefined, not a 1.0 in the mean.
    assert sa["rv_blood_pool"] == {"mean": 1.0, "sd": pytest.approx(math.nan, nan_ok=True),
                                   "n": 1, "n_undefined": 1, "n_infinite": 0}  # fmt: skip
    # LA in 2ch of exam 0: 8x4 squares overlapping in 8x2 -> Dice 0.5; exam 1 exact.
    assert la2["la"]["mean"] == pytest.approx(0.75) and la2["la"]["n"] == 2
    assert metrics["dice"]["la_4ch"]["la"]["mean"] == 1.0
    # HD95 of the shift: 2 columns at 0.5 mm; the 3ch view (unlabelled) is not a view here.
    hd = metrics["hd95_mm"]["la_2ch"]["la"]
    assert hd["mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert "la_3ch" not in metrics["dice"]
    assert metrics["mean_dice"]["la"] == pytest.approx((0.75 + 1.0) / 2)
    # Phenotypes: ventricles identical, LA volume of exam 0 from a shifted (same size) chamber.
    stats = metrics["phenotypes"]
    assert stats["LVEDV (mL)"]["n"] == 2 and stats["LVEDV (mL)"]["mae"] == 0.0
    assert stats["LAV max (mL)"]["mae"] == pytest.approx(0.0, abs=1e-6)
    assert stats["RVEDV (mL)"]["n"] == 2 and stats["LVEF (%)"]["mae"] == 0.0
    assert metrics["phenotype_failures"] == 0


def test_evaluate_segmentation_counts_phenotype_failures_and_one_sided_hd95():
    result = synthetic_segmentation()
    result["pred"][1, list(layout.SHORT_AXIS_PLANES)] = 0  # nothing predicted in exam 1's SA
    metrics = segmentation.evaluate_segmentation(result)
    assert metrics["phenotype_failures"] == 1  # no LV at ED
    assert metrics["phenotypes"]["LVEDV (mL)"]["n"] == 1
    lv = metrics["dice"]["short_axis"]["lv_blood_pool"]
    assert lv["n"] == 2 and lv["mean"] == pytest.approx(0.5)  # exam 1 scores 0.0
    assert metrics["hd95_mm"]["short_axis"]["lv_blood_pool"]["n_infinite"] == 1
    text = segmentation.segmentation_table({"models": {"m": metrics}})
    assert "rv_blood_pool" in text and "0.500" in text


# ------------------------------------------------------- model-based evaluations
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_checkpoints")
    all_planes = root / "all_planes"
    save_model(all_planes, MaskedAutoencoder(tiny_config(), rngs=nnx.Rngs(0)))
    few = root / "few_planes"  # 3 planes: fewer removals to embed in the robustness test
    model = MaskedAutoencoder(tiny_config(planes=(2, 5, 6), norm_pix_loss=True), rngs=nnx.Rngs(1))
    save_model(few, model)
    return {"all_planes": all_planes, "few_planes": few}


@pytest.fixture(scope="module")
def reconstruction_run(checkpoints, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reconstruction")
    argv = ["reconstruction", "--data", str(tiny_dataset), "--out", str(out), "--no-progress",
            "--batch-size", "2", *(a for n, p in checkpoints.items()
                                   for a in ("--model", f"{n}={p}"))]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def test_reconstruction_json_has_the_documented_keys_and_counts(reconstruction_run, tiny_dataset):
    metrics = read_json(reconstruction_run / "metrics.json")
    assert COMMON_KEYS | {"seed"} <= set(metrics) and metrics["task"] == "reconstruction"
    exams = dataset(tiny_dataset, "test")
    plane_mask = exams["plane_mask"].astype(bool)
    full = metrics["models"]["all_planes"]
    assert full["num_exams"] == len(exams["eid"])
    assert set(full["plane_types"]) == {"long_axis", "short_axis"}
    for plane_type, planes in (("long_axis", layout.LONG_AXIS_PLANES),
                               ("short_axis", layout.SHORT_AXIS_PLANES)):  # fmt: skip
        s = full["plane_types"][plane_type]
        assert set(s) == set(reconstruction.METRICS)
        assert set(s["psnr"]) == SUMMARY_KEYS
        assert s["mse"]["n"] == plane_mask[:, list(planes)].sum()  # acquired planes only
        assert 0 < s["mse"]["mean"] < 1 and -1 < s["ssim"]["mean"] < 1
    few = metrics["models"]["few_planes"]
    assert few["planes"] == ["la_4ch", "sa_2", "sa_3"]
    assert few["plane_types"]["long_axis"]["mse"]["n"] == plane_mask[:, 2].sum()
    assert set(few["per_plane"]) == {"la_4ch", "sa_2", "sa_3"}
    for entry in (full, few):
        (png,) = entry["plots"]
        assert (reconstruction_run / png).read_bytes()[:4] == b"\x89PNG"


def test_reconstruct_masks_the_model_ratio_and_returns_the_dataset_pixels(
    checkpoints, tiny_dataset
):
    from whmae.model.io import load_model

    model, config = load_model(checkpoints["all_planes"])
    exams = dataset(tiny_dataset, "test")
    batches = list(reconstruction.reconstruct(model, tiny_dataset, "test", batch_size=8,
                                              progress=False))  # fmt: skip
    eids, target, recon, masked, available = (np.concatenate(x) for x in zip(*batches, strict=True))
    np.testing.assert_array_equal(eids, exams["eid"].astype(str))
    np.testing.assert_allclose(target, exams["images"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(available, exams["plane_mask"].astype(bool))
    assert recon.min() >= 0.0 and recon.max() <= 1.0
    for b in range(len(eids)):
        tokens = available[b].sum() * config.tokens_per_plane
        kept = int(tokens * (1 - config.mask_ratio))
        pixels_per_token = config.patch_dim
        assert masked[b][available[b]].sum() == (tokens - kept) * pixels_per_token
    # A fixed seed: the same masks again; another seed: other masks.
    again = next(reconstruction.reconstruct(model, tiny_dataset, "test", batch_size=8,
                                            progress=False))  # fmt: skip
    other = next(reconstruction.reconstruct(model, tiny_dataset, "test", batch_size=8, seed=1,
                                            progress=False))  # fmt: skip
    np.testing.assert_array_equal(again[3], batches[0][3])
    assert not np.array_equal(other[3], batches[0][3])


@pytest.fixture(scope="module")
def representation_run(checkpoints, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("representation")
    argv = ["representation", "--model", f"few={checkpoints['few_planes']}", "--data",
            str(tiny_dataset), "--out", str(out), "--tsne-splits", "all", "--pairs", "1",
            "--batch-size", "8", "--no-progress",
            "--control", f"untrained={checkpoints['few_planes']}"]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def test_representation_json_robustness_and_tsne(representation_run, tiny_dataset, checkpoints):
    from whmae.embed import embed_dataset
    from whmae.model.io import load_model

    metrics = read_json(representation_run / "metrics.json")
    assert COMMON_KEYS <= set(metrics) and metrics["task"] == "representation"
    entry = metrics["models"]["few"]
    tsne = entry["tsne"]
    assert tsne["num_exams"] == 24 and tsne["splits"] == ["train", "val", "test"]
    assert set(tsne["neighbour_spearman"]) == set(layout.PAPER_PHENOTYPES)
    assert (representation_run / tsne["plot"]).read_bytes()[:4] == b"\x89PNG"
    robust = entry["robustness"]
    removed = [r["planes"] for r in robust["removals"]]
    assert removed[:3] == [["la_4ch"], ["sa_2"], ["sa_3"]] and len(removed) == 4
    assert len(removed[3]) == 2
    assert robust["single_plane"]["cosine_cls"]["n"] == sum(
        r["num_exams"] for r in robust["removals"][:3])  # fmt: skip
    # Recompute one removal directly: cosine of la_4ch-less to full over exams having la_4ch.
    model, _ = load_model(checkpoints["few_planes"])
    full = embed_dataset(model, tiny_dataset, ("test",), batch_size=8, progress=False)
    part = embed_dataset(model, tiny_dataset, ("test",), batch_size=8, absent_planes=(2,),
                         progress=False)  # fmt: skip
    had = full["plane_mask"][:, 2]
    cos = representation.cosine_similarity(part["cls"][had], full["cls"][had])
    first = robust["removals"][0]
    assert first["num_exams"] == had.sum()
    assert first["cosine_cls"]["mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert cos.max() < 1.0 - 1e-6  # removing a plane does change the representation
    # Re-identification of the same removal: each reduced exam among all full exams.
    n = len(full["eid"])
    assert robust["distance"] == "euclidean" and robust["num_exams"] == n
    assert robust["chance_top1"] == pytest.approx(1 / n)
    hits, shift = representation.reidentify(part["cls"][had], full["cls"], np.flatnonzero(had))
    between = representation.between_subject_distance(full["cls"])
    assert robust["between_subject"]["cls"]["median"] == pytest.approx(between["median"])
    assert robust["between_subject"]["cls"]["num_pairs"] == n * (n - 1) // 2
    reid = first["reid_cls"]
    assert reid["n"] == had.sum() and reid["top1"] == pytest.approx(hits.mean())
    assert reid["shift_fraction"] == pytest.approx(shift.mean() / between["median"], rel=1e-5)
    pooled = robust["single_plane"]["reid_mean_pooled"]
    assert pooled["n"] == robust["single_plane"]["cosine_mean_pooled"]["n"]
    assert 0 <= pooled["top1"] <= 1 and pooled["shift"]["n"] == pooled["n"]
    # The control: robustness only, of an untrained MAE of the same config (seed 0).
    control = metrics["models"]["untrained"]
    assert control["control"] == {"init": "random", "seed": 0,
                                  "config_from": str(checkpoints["few_planes"])}  # fmt: skip
    assert "tsne" not in control and entry["control"] is None
    assert control["robustness"]["single_plane"]["reid_cls"]["n"] == pooled["n"]
    assert "untrained (random init)" in representation.reid_table(metrics)


def test_reidentify_by_hand_parallel_embeddings_and_random_queries():
    rng = np.random.default_rng(0)
    # Different exams nearly parallel (cosine > 0.999), reduced = full: all found.
    base = rng.normal(size=32) * 10
    full = base + 0.05 * rng.normal(size=(200, 32))
    cos = representation.cosine_similarity(full[:100], full[100:])
    assert cos.min() > 0.999
    hits, shift = representation.reidentify(full, full, np.arange(200))
    assert hits.all() and np.all(shift == 0)
    # Reduced embeddings unrelated to their exam: about chance (1/200).
    random = base + 0.05 * rng.normal(size=(200, 32))
    hits, _ = representation.reidentify(random, full, np.arange(200))
    assert hits.mean() <= 0.03
    # By hand on a line: exams at 0, 1, 3 (pair distances 1, 3, 2: median 2).
    gallery = np.array([[0.0], [1.0], [3.0]])
    between = representation.between_subject_distance(gallery)
    assert between == {"median": 2.0, "num_pairs": 3, "num_exams": 3}
    # exam 0 reduced to 0.5: as near exam 1 as itself, a tie, so a miss; exam 2 at 2.9: hit.
    hits, shift = representation.reidentify(np.array([[0.5], [2.9]]), gallery, [0, 2])
    assert hits.tolist() == [False, True] and shift == pytest.approx([0.5, 0.1])
    summary = representation.reid_summary(hits, shift, between["median"], 3)
    assert summary["top1"] == 0.5 and summary["hits"] == 1 and summary["chance"] == 1 / 3
    assert summary["shift_fraction"] == pytest.approx(0.3 / 2.0)
    assert summary["shift"]["mean"] == pytest.approx(0.3)
    # A larger gallery is subsampled for the median, deterministically.
    sampled = representation.between_subject_distance(full, max_exams=50, seed=1)
    assert sampled["num_exams"] == 50 and sampled["num_pairs"] == 50 * 49 // 2
    assert sampled == representation.between_subject_distance(full, max_exams=50, seed=1)
    with pytest.raises(ValueError, match="must be"):
        representation.reidentify(np.zeros((2, 3)), np.zeros((4, 2)), [0, 1])


def test_neighbour_spearman_and_plane_removals():
    rng = np.random.default_rng(0)
    value = rng.normal(size=60)
    angle = value  # the phenotype is the embedding's direction: neighbours share it
    embedding = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    assert representation.neighbour_spearman(embedding, value, k=3) > 0.95
    noise = rng.normal(size=(60, 8))
    assert abs(representation.neighbour_spearman(noise, value, k=3)) < 0.5
    removals = representation.plane_removals(range(9), pairs=10, seed=0)
    assert removals[:9] == [(p,) for p in range(9)]
    pairs = removals[9:]
    assert len(pairs) == len(set(pairs)) == 10 and all(a < b for a, b in pairs)
    assert representation.plane_removals(range(3), pairs=10)[3:] == [(0, 1), (0, 2), (1, 2)]


def test_report_merges_the_results_with_working_links(reconstruction_run, representation_run,
                                                      tmp_path):  # fmt: skip
    (tmp_path / "phen").mkdir()
    for name, p in synthetic_predictions().items():
        np.savez(tmp_path / f"{name}.npz", **p)
    assert cli.main(["phenotypes", "--model", f"good={tmp_path / 'good.npz'}", "--data", "d",
                     "--out", str(tmp_path / "phen")]) == 0  # fmt: skip
    out = tmp_path / "report" / "report.md"
    argv = ["report", str(representation_run), str(reconstruction_run), str(tmp_path / "phen"),
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = out.read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## Reconstruction", "## Phenotypes", "## Representation"]
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines()
             if line.startswith("![")]  # fmt: skip
    # reconstruction: the side-by-side comparison + one per model; phenotypes 2; t-SNE 1
    assert len(links) == 1 + 2 + 2 + 1
    assert sum("comparison" in link for link in links) == 1
    for link in links:
        assert (out.parent / link).is_file()
    assert "| LVM (g) | 1.000 | 10.000 |" in text  # MAE of good, then the mean guess
    assert cli.main(["nonsense"]) == 2
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        report.find_metrics([tmp_path / "report"])


def test_regression_stats_shared_with_phenotype_json():
    # The phenotype JSON's per-column stats are exactly metrics.regression_stats.
    p = synthetic_predictions()["other"]
    metrics = phenotypes.evaluate_phenotypes({"other": p})
    assert metrics["models"]["other"]["columns"]["LVM (g)"] == regression_stats(
        p["pred"][:, 0], p["target"][:, 0])  # fmt: skip


def test_robustness_reports_the_shift_of_a_regression_models_predictions(checkpoints, tiny_dataset):
    from whmae.model.io import load_model
    from whmae.tasks.config import load_config_file, resolve
    from whmae.tasks.predict import build_model, predict_phenotypes

    config = load_config_file(Path(__file__).parents[1] / "configs/phenotype.py",
                              "tiny,vit_scratch")  # fmt: skip
    config.data.dir = str(tiny_dataset)
    regressor = build_model(resolve(config), nnx.Rngs(0))
    model, _ = load_model(checkpoints["few_planes"])
    robust = representation.robustness(model, tiny_dataset, "test", pairs=0,
                                       regression=regressor, batch_size=8,
                                       progress=False)  # fmt: skip
    assert [r["planes"] for r in robust["removals"]] == [["la_4ch"], ["sa_2"], ["sa_3"]]
    assert robust["plane_pairs"]["cosine_cls"]["n"] == 0  # no pairs asked for
    full = predict_phenotypes(regressor, tiny_dataset, "test")
    without = predict_phenotypes(regressor, tiny_dataset, "test", absent_planes=(5,))
    had = dataset(tiny_dataset, "test", fields=("plane_mask",))["plane_mask"][:, 5].astype(bool)
    shift = np.abs(without["pred"] - full["pred"])[had]
    reported = robust["removals"][1]["phenotype_shift"]
    assert list(reported) == list(full["columns"])
    error = np.abs(full["pred"] - full["target"])
    for k, column in enumerate(full["columns"]):
        assert reported[column]["mean"] == pytest.approx(shift[:, k].mean(), rel=1e-5)
        mae = np.nanmean(error[:, k])
        assert robust["regression"][column]["mae"] == pytest.approx(mae, rel=1e-5)
        fraction = robust["removals"][1]["phenotype_shift_fraction"][column]
        assert fraction == pytest.approx(shift[:, k].mean() / mae, rel=1e-5)
        assert robust["regression"][column]["learned"] in (True, False)
    assert shift.max() > 0  # the regressor does see the removal
    assert set(robust["single_plane"]["phenotype_shift_fraction"]) == set(full["columns"])
