"""The paper's claims (whmae.evaluate.claims) on hand-written metrics: every claim has a
control that can fail it, a constant baseline voids its comparison, and the learning
checks of whmae.evaluate.phenotypes behave as documented."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from whmae import layout
from whmae.evaluate import claims as paper
from whmae.evaluate import phenotypes, representation
from whmae.evaluate.results import jsonable, write_metrics

COLUMNS = list(layout.PAPER_PHENOTYPES)


# ------------------------------------------------------------------- fixtures
def prediction(target, pred) -> dict:
    k = target.shape[1]
    return {"columns": np.array(COLUMNS[:k]), "pred": pred, "target": target,
            "train_mean": np.zeros(k)}  # fmt: skip


def phenotype_metrics(**preds) -> dict:
    """metrics.json of the phenotype task from {name: pred [N, K]} on one target set."""
    target = TARGET
    return jsonable(phenotypes.evaluate_phenotypes({n: prediction(target, p)
                                                    for n, p in preds.items()}))  # fmt: skip


RNG = np.random.default_rng(0)
TARGET = RNG.normal(0.0, 10.0, (200, 5))
GOOD = TARGET + RNG.normal(0.0, 3.0, TARGET.shape)  # r ~ 0.96
WEAK = 0.5 * TARGET + RNG.normal(0.0, 5.0, TARGET.shape)  # learned, worse than GOOD
CONSTANT = np.full(TARGET.shape, 0.1)


def reid(top1, shift, n=100) -> dict:
    return {"top1": top1, "hits": int(top1 * n), "n": n, "chance": 0.005,
            "shift": {"mean": shift, "sd": 0.0, "n": n, "n_undefined": 0, "n_infinite": 0},
            "shift_fraction": shift}  # fmt: skip


def robust(top1, shift, regression=None, fraction=0.05) -> dict:
    entry = {removal: {"reid_cls": reid(top1, shift), "reid_mean_pooled": reid(top1, shift)}
             for removal in ("single_plane", "plane_pairs")}  # fmt: skip
    if regression is not None:
        entry["regression"] = regression
        for removal in ("single_plane", "plane_pairs"):
            entry[removal]["phenotype_shift"] = {c: {"mean": 0.1} for c in regression}
            entry[removal]["phenotype_shift_fraction"] = {c: fraction for c in regression}
    return {"robustness": entry}


def representation_metrics(model=(1.0, 0.1), control=(1.0, 0.6), regression=None,
                           fraction=0.05) -> dict:  # fmt: skip
    models = {"mae_all_planes": robust(*model, regression, fraction)}
    if control is not None:
        models["random_init"] = robust(*control)
    return {"task": "representation", "models": models}


def claims_by_prefix(claims, prefix):
    return [c for c in claims if c["claim"].startswith(prefix)]


# ----------------------------------------------------------- learning checks
def test_prediction_spread_and_learning_checks_flag_a_constant_model():
    spread = phenotypes.prediction_spread([1.0, 2.0, 3.0, np.nan], [2.0, 4.0, 6.0, 1.0])
    assert spread["sd_ratio"] == pytest.approx(0.5)
    metrics = phenotype_metrics(good=GOOD, constant=CONSTANT)
    good, constant = (metrics["models"][n]["learning"] for n in ("good", "constant"))
    assert good["learned"] and good["did_not_learn"] == [] and good["training"] is None
    assert not constant["learned"] and constant["did_not_learn"] == COLUMNS
    assert constant["columns"]["LVM (g)"]["sd_ratio"] == 0.0
    assert "learning" not in metrics["models"]["mean_guess"]
    (line,) = phenotypes.learning_summary(metrics)
    assert line.startswith("**constant did not learn any phenotype**")
    assert "NO" in phenotypes.learning_table(metrics, markdown=True)


def test_training_check_smooths_and_compares_with_the_mean_guess_loss():
    falling = [3.0, 2.0, 1.2, 0.9, 0.8, 0.7, 0.7]
    check = phenotypes.training_check(falling, 1.0, window=3)
    assert check["fell_below"] and check["min_smoothed_loss"] == pytest.approx(0.7333, abs=1e-4)
    # One lucky batch below the mean guess is not enough: the moving mean stays above.
    noisy = [1.1, 1.05, 0.85, 1.1, 1.05, 1.1]
    assert phenotypes.training_check(noisy, 1.0, window=3)["fell_below"] is False
    assert phenotypes.training_check(noisy, 1.0, window=1)["fell_below"] is True
    assert phenotypes.training_check([], 1.0)["fell_below"] is None
    result = prediction(TARGET, GOOD)
    record = {"loss": "mse", "huber_delta": 1.0, "losses": [2.0, 1.5, 1.2], "mean_guess_loss": 1.0}
    checked = phenotypes.learning_checks(result, record)
    assert not checked["learned"] and checked["training"]["fell_below"] is False
    assert all(c["spread_ok"] for c in checked["columns"].values())


def test_mean_guess_loss_mse_is_the_variance_and_huber_by_hand():
    z = np.array([[0.5, -2.0], [np.nan, 3.0]])
    assert phenotypes.mean_guess_loss(z, "mse") == pytest.approx((0.25 + 4 + 9) / 3)
    # huber delta 1: 0.5 * 0.5^2, 1 * (2 - 0.5), 1 * (3 - 0.5)
    assert phenotypes.mean_guess_loss(z, "huber", 1.0) == pytest.approx((0.125 + 1.5 + 2.5) / 3)
    with pytest.raises(ValueError, match="mse' or 'huber"):
        phenotypes.mean_guess_loss(z, "l1")


def test_mean_guess_mse_is_one_on_the_train_split_by_construction(tiny_dataset):
    from whmae.tasks.phenotype import train_stats

    mean, std = train_stats(str(tiny_dataset), COLUMNS)
    values = phenotypes._split_phenotypes(tiny_dataset, "train")
    index = [layout.phenotype_index(c) for c in COLUMNS]
    z = (values[:, index] - mean) / std
    assert phenotypes.mean_guess_loss(z, "mse") == pytest.approx(1.0, abs=1e-5)
    assert 0 < phenotypes.mean_guess_loss(z, "huber", 1.0) < 0.5


# ---------------------------------------------------------------- phenotypes
def test_a_phenotype_claim_needs_learning_and_a_better_ratio_than_the_random_probe():
    held = paper.phenotype_claims(phenotype_metrics(mae_probe=GOOD, random_probe=WEAK))
    assert len(held) == 5 and all(c["holds"] and c["status"] == "held" for c in held)
    assert "paper 0.25x" in held[0]["evidence"] and "random_probe" in held[0]["control"]
    # A random control that equals the model fails every claim.
    same = paper.phenotype_claims(phenotype_metrics(mae_probe=GOOD, random_probe=GOOD))
    assert not any(c["holds"] for c in same)
    # A model that did not learn fails even against a worse control.
    flat = paper.phenotype_claims(phenotype_metrics(mae_probe=CONSTANT, random_probe=-TARGET))
    assert not any(c["holds"] for c in flat) and "did NOT learn" in flat[0]["evidence"]
    # No control: cannot hold.
    alone = paper.phenotype_claims(phenotype_metrics(mae_probe=GOOD))
    assert not any(c["holds"] for c in alone) and "cannot hold" in alone[0]["control"]


def test_beating_a_constant_baseline_is_void_and_never_held():
    metrics = phenotype_metrics(mae_finetuned=GOOD, resnet50=CONSTANT, vit_scratch=WEAK)
    claims = {c["claim"]: c for c in paper.baseline_claims(metrics)}
    resnet = claims["the pretrained model (mae_finetuned) beats resnet50 (phenotype MAE)"]
    assert resnet["status"] == "void" and resnet["holds"] is False
    assert "comparison void" in resnet["evidence"] and "did not learn 5/5" in resnet["evidence"]
    vit = claims["the pretrained model (mae_finetuned) beats vit_scratch (phenotype MAE)"]
    assert vit["holds"] and vit["status"] == "held" and "5/5" in vit["evidence"]
    # A learned baseline that is better than the model: not held, not void.
    worse = paper.baseline_claims(phenotype_metrics(mae_finetuned=WEAK, vit_scratch=GOOD))
    assert worse[0]["status"] == "not held"
    markdown = paper.claims_markdown(paper.baseline_claims(metrics))
    assert "VOID" in markdown and "(1/2 hold, 1 void)" in markdown
    ratios = paper.phenotype_ratio_markdown(metrics)
    assert "| LVM (g) |" in ratios and " *" in ratios  # resnet50 marked as not learned


def test_a_win_must_be_beyond_the_paired_bootstrap_interval_and_a_tie_is_no_win():
    # Exact differences: |error| 1 vs 3 on every exam -> MAE difference -2, interval [-2, -2].
    metrics = phenotype_metrics(mae_finetuned=TARGET + 1.0, resnet50=TARGET + 3.0)
    entry = phenotypes.paired_difference(metrics, "mae_finetuned", "resnet50", "LVM (g)")
    assert entry["n"] == 200 and entry["mae_diff"] == pytest.approx(-2.0)
    assert entry["ci95"] == pytest.approx([-2.0, -2.0])
    back = phenotypes.paired_difference(metrics, "resnet50", "mae_finetuned", "LVM (g)")
    assert back["mae_diff"] == pytest.approx(2.0) and back["ci95"] == pytest.approx([2.0, 2.0])
    # A noisy difference: the interval is the bootstrap's, around the mean difference.
    noisy = phenotype_metrics(mae_finetuned=GOOD, vit_scratch=WEAK)
    entry = phenotypes.paired_difference(noisy, "mae_finetuned", "vit_scratch", "RVEF (%)")
    diff = np.abs(GOOD[:, 1] - TARGET[:, 1]) - np.abs(WEAK[:, 1] - TARGET[:, 1])
    assert entry["mae_diff"] == pytest.approx(diff.mean())
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))  # the normal approximation
    assert entry["ci95"][0] == pytest.approx(diff.mean() - half, abs=0.3 * half)
    assert entry["ci95"][1] == pytest.approx(diff.mean() + half, abs=0.3 * half)
    # Lower MAE on every phenotype, but by less than the noise: tied, not held.
    tiny = RNG.normal(0.0, 0.05, TARGET.shape)
    tie = paper.baseline_claims(phenotype_metrics(mae_finetuned=GOOD, resnet50=GOOD + tiny))
    (claim,) = tie
    assert claim["status"] == "not held" and "0/5" in claim["evidence"]
    assert "tied (interval holds 0)" in claim["evidence"] and "95 % CI" in claim["control"]
    # Without paired differences (an older metrics.json) the comparison is void.
    old = phenotype_metrics(mae_finetuned=GOOD, resnet50=WEAK)
    del old["paired"]
    (void,) = paper.baseline_claims(old)
    assert void["status"] == "void" and "no paired test-exam difference" in void["evidence"]


# ----------------------------------------------------------------- robustness
def test_robustness_needs_reid_small_shift_and_a_better_shift_than_the_control():
    held = paper.robustness_claims(representation_metrics(model=(0.95, 0.2), control=(1.0, 0.4)))
    reid_claims = claims_by_prefix(held, "removing planes (")
    assert len(reid_claims) == 2 and all(c["holds"] for c in reid_claims)
    assert "random_init" in reid_claims[0]["control"] and "top-1 0.95" in reid_claims[0]["evidence"]
    for model, control in (
        ((0.95, 0.2), (1.0, 0.2)),  # the control moves as little
        ((0.5, 0.2), (0.1, 0.9)),  # not re-identified
        ((1.0, 0.6), (1.0, 0.9)),
    ):  # moves more than half a subject
        claims = paper.robustness_claims(representation_metrics(model=model, control=control))
        assert not any(c["holds"] for c in claims_by_prefix(claims, "removing planes ("))
    # An untrained control whose embeddings are all equal (undefined shift) is beaten.
    undefined = paper.robustness_claims(representation_metrics(control=(0.0, None)))
    assert all(c["holds"] for c in claims_by_prefix(undefined, "removing planes ("))
    missing = paper.robustness_claims(representation_metrics(control=None))
    assert not any(c["holds"] for c in missing)


def test_phenotype_shift_claim_needs_a_regression_model_that_learned():
    learned = {c: {"mae": 4.3, "sd_ratio": 0.9, "learned": True} for c in COLUMNS}
    (shift,) = claims_by_prefix(
        paper.robustness_claims(representation_metrics(regression=learned)), "removing planes moves"
    )
    assert shift["holds"] and "5 % of MAE 4.3" in shift["evidence"]
    big = paper.robustness_claims(representation_metrics(regression=learned, fraction=0.3))
    assert not claims_by_prefix(big, "removing planes moves")[0]["holds"]
    constant = {c: {"mae": 8.0, "sd_ratio": 0.0, "learned": False} for c in COLUMNS}
    flat = paper.robustness_claims(representation_metrics(regression=constant, fraction=0.0))
    (claim,) = claims_by_prefix(flat, "removing planes moves")
    assert not claim["holds"] and "did NOT learn" in claim["evidence"]
    none = paper.robustness_claims(representation_metrics())
    assert not claims_by_prefix(none, "removing planes moves")[0]["holds"]


def test_reid_figures_of_a_constant_encoder_fail():
    gallery = np.zeros((10, 4))
    hits, shift = representation.reidentify(gallery, gallery, np.arange(10))
    between = representation.between_subject_distance(gallery)
    summary = representation.reid_summary(hits, shift, between["median"], 10)
    assert summary["top1"] == 0.0 and math.isnan(summary["shift_fraction"])


# --------------------------------------------------------------- segmentation
def segmentation_metrics(dice, lvef=(3.0, 95), lvedv=(8.0, 100), data_dir="", scratch=0.5):
    def model(dice_value, lvef, lvedv):
        return {"num_exams": 100, "mean_dice": dice_value,
                "phenotypes": {"LVEF (%)": {"n": lvef[1], "mae": lvef[0]},
                               "LVEDV (mL)": {"n": lvedv[1], "mae": lvedv[0]}}}  # fmt: skip

    return {"task": "segmentation", "split": "test", "data_dir": data_dir, "models": {
        "unetr_mae": model(dice, lvef, lvedv),
        "unetr_scratch": model({k: scratch for k in dice}, (9.0, 100), (30.0, 100))}}  # fmt: skip


def test_segmentation_dice_targets_and_derived_phenotypes(tmp_path):
    info = {"splits": {"test": {"phenotype_stats": {"LVEDV (mL)": {"mean": 100.0}}}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    dice = {"lv_blood_pool": 0.9, "lv_myocardium": 0.76, "rv_blood_pool": 0.86, "la": 0.84,
            "ra": None}  # fmt: skip
    claims = paper.segmentation_claims(segmentation_metrics(dice, data_dir=str(tmp_path)))
    holds = {c["claim"]: c["holds"] for c in claims}
    assert holds["segmentation on the pretrained encoder beats the same network from scratch"]
    assert holds["segmentation Dice of lv_blood_pool >= 0.85"]
    assert holds["segmentation Dice of lv_myocardium >= 0.75"]
    assert not holds["segmentation Dice of la >= 0.85"]
    assert not holds["segmentation Dice of ra >= 0.85"]  # undefined is not a pass
    assert holds["segmentation-derived LVEF within 5 points (MAE) of the truth's"]
    lvedv = next(c for c in claims if "LVEDV" in c["claim"])
    assert lvedv["holds"] and "8 % of the test mean LVEDV 100" in lvedv["evidence"]
    # An LV found in too few exams: the MAE over those says nothing.
    few = paper.segmentation_claims(segmentation_metrics(dice, lvef=(1.0, 50), data_dir=""))
    assert not next(c for c in few if "LVEF" in c["claim"])["holds"]
    assert not next(c for c in few if "LVEDV" in c["claim"])["holds"]  # mean unknown
    # The scratch network as good as the pretrained one: not held.
    tie = paper.segmentation_claims(segmentation_metrics(dict.fromkeys(dice, 0.5)))
    assert not tie[0]["holds"]


# ---------------------------------------------------------------- all claims
def test_paper_claims_reads_every_task_and_counts_twenty(tmp_path):
    metrics = {
        "phenotypes": phenotype_metrics(mae_probe=GOOD, random_probe=WEAK, mae_finetuned=GOOD,
                                        vit_scratch=WEAK, resnet50=CONSTANT),
        "segmentation": segmentation_metrics(dict.fromkeys(paper.DICE_TARGETS, 0.9)),
        "reconstruction": {"models": {name: {"plane_types": {
            t: {"mse": {"mean": mse}} for t in ("short_axis", "long_axis")}}
            for name, mse in (("mae_all_planes", 0.01), ("mae_sa_only", 0.02),
                              ("mae_la_only", 0.005))}},
        "representation": representation_metrics(),
    }  # fmt: skip
    for task, m in metrics.items():
        version = {"phenotypes": phenotypes.SCHEMA_VERSION,
                   "representation": representation.SCHEMA_VERSION}.get(task, 1)  # fmt: skip
        write_metrics(tmp_path / task, {"task": task, "schema_version": version, **m})
    claims = paper.paper_claims(tmp_path)
    assert len(claims) == 20
    assert all(set(c) == {"claim", "holds", "status", "evidence", "control"} for c in claims)
    status = {c["claim"]: c["status"] for c in claims}
    assert status["all-view reconstruction beats mae_sa_only on short_axis planes"] == "held"
    assert status["all-view reconstruction beats mae_la_only on long_axis planes"] == "not held"
    assert [c["status"] for c in claims].count("void") == 1
    write_metrics(tmp_path / "phenotypes", {"task": "phenotypes", "schema_version": 1,
                                            **metrics["phenotypes"]})  # fmt: skip
    with pytest.raises(ValueError, match="schema_version 1, this code reads 3"):
        paper.paper_claims(tmp_path)
