"""The paper's claims, each checked on the evaluation's numbers against a control that
could fail it: no claim here can be passed by a constant or an untrained model.

  claims = paper_claims("runs/demo/report")   # reads <dir>/<task>/metrics.json
  print(claims_markdown(claims))

`paper_claims(eval_dir)` reads the metrics.json of phenotypes, segmentation,
reconstruction and representation under `eval_dir` (`claims_from_metrics` does the same
on dicts) and returns one dict per claim:

  claim     str    what is claimed, as checked here
  holds     bool   True only when the numbers support it against its control
  status    str    "held" | "not held" | "void" (void: the comparison means nothing, e.g.
                   the baseline did not learn; a void claim never counts as held)
  evidence  str    the numbers
  control   str    what the claim is measured against, with its numbers

The claims (model names are the demo's, `whmae.demo`):
  phenotypes   per phenotype: the pretrained linear probe (mae_probe) learned it (the
               learning checks of `whmae.evaluate.phenotypes`), its MAE is below the mean
               guess's, and its MAE / mean-guess MAE is below the random-init probe's
               (random_probe: the same probe on an untrained encoder). The paper's
               ratios (PAPER_MEAN_GUESS_RATIO) are printed beside it: the bar to aim at.
  baselines    the pretrained fine-tuned model (mae_finetuned) beats X (vit_scratch,
               resnet50) on more than half of the phenotypes X learned, each by a margin
               beyond noise: the 95 % paired bootstrap interval of MAE(mae_finetuned) -
               MAE(X) over the test exams lies below 0 (`paired` of the phenotype
               metrics); a difference whose interval holds 0 is a tie, not a win. Void
               when X learned fewer than half of them (beating a model that predicts a
               constant says nothing).
  segmentation UNETR on the pretrained encoder beats the same network from scratch
               (mean Dice over classes); its Dice per class reaches DICE_TARGETS; the
               LVEF / LVEDV of its segmentations are within LVEF_MAE_MAX points /
               LVEDV_RELATIVE_MAE_MAX of the true labels' on >= PHENOTYPE_COVERAGE_MIN
               of the exams.
  reconstruction  the all-view MAE reconstructs short-axis (long-axis) planes better than
               the SA-only (LA-only) MAE.
  robustness   with single planes / plane pairs removed, the pretrained encoder's cls
               embedding re-identifies the exam among all full-plane test exams (top-1 >=
               REID_TOP1_MIN), moves less than SHIFT_FRACTION_MAX of the median
               between-subject distance, and moves less (relative to that distance) than
               the random-init control (random_init); the regression model's predictions
               move less than PHENOTYPE_SHIFT_FRACTION_MAX of its own MAE on every
               phenotype it learned, and it must have learned them all.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from whmae.evaluate.phenotypes import MEAN_GUESS, SPREAD_RATIO_MIN, paired_difference

__all__ = [
    "BASELINE_LEARNED_FRACTION_MIN",
    "DICE_TARGETS",
    "LVEDV_RELATIVE_MAE_MAX",
    "LVEF_MAE_MAX",
    "PAPER_MEAN_GUESS_RATIO",
    "PHENOTYPE_COVERAGE_MIN",
    "PHENOTYPE_SHIFT_FRACTION_MAX",
    "REID_TOP1_MIN",
    "SHIFT_FRACTION_MAX",
    "claims_from_metrics",
    "claims_markdown",
    "paper_claims",
    "phenotype_ratio_markdown",
]

# ------------------------------------------------------------------ thresholds
# The paper's test MAE over the mean guess's MAE (UK Biobank): LVM 4.33 / 17.1 g, RVEF
# 2.83 / 12.1 %, RAEF 5.40 / 6.59 %, RVEDV 10.7 / 31.9 mL, LASV 3.53 / 8.92 mL. Printed as
# the bar to aim at; not a pass mark (the phantom's spread and resolution differ).
PAPER_MEAN_GUESS_RATIO = {
    "LVM (g)": 4.33 / 17.1,
    "RVEF (%)": 2.83 / 12.1,
    "RAEF (%)": 5.40 / 6.59,
    "RVEDV (mL)": 10.7 / 31.9,
    "LASV (mL)": 3.53 / 8.92,
}
# "Beats X" compares only on phenotypes X learned; X must have learned at least this
# fraction of them, or the comparison is void (a constant baseline is no baseline).
BASELINE_LEARNED_FRACTION_MIN = 0.5
# A reduced exam must be recognised as itself among all test exams nearly always: 0.9
# leaves room for near-twin subjects while chance is 1/N (0.005 for 196 test exams).
REID_TOP1_MIN = 0.9
# Removing planes may move the embedding by less than half the typical distance between
# two different subjects: then the exam stays nearer itself than a typical other subject.
SHIFT_FRACTION_MAX = 0.5
# Removing planes may move a phenotype prediction by at most a quarter of the model's own
# error (the paper: LVM moves 0.3 g at 4.3 g MAE, 7 %); a bigger move would be a visible
# part of the error budget.
PHENOTYPE_SHIFT_FRACTION_MAX = 0.25
# Dice of UNETR on the pretrained encoder (test split, mean over views): the accuracy of
# published UK Biobank cine segmentation networks for the blood pools, a thin structure
# (myocardium) lower; a constant or random segmenter scores near 0.
DICE_TARGETS = {
    "lv_blood_pool": 0.85,
    "rv_blood_pool": 0.85,
    "la": 0.85,
    "ra": 0.85,
    "lv_myocardium": 0.75,
}
# LVEF from the predicted segmentation vs from the true labels: within inter-observer
# variability of manual UK Biobank analysis (a few EF points).
LVEF_MAE_MAX = 5.0
# LVEDV from the predicted segmentation: MAE at most 10 % of the test split's mean LVEDV.
LVEDV_RELATIVE_MAE_MAX = 0.10
# A segmentation-derived phenotype counts only if the prediction yields it for >= 90 % of
# exams: an MAE over the few exams where an LV was found says nothing about the rest.
PHENOTYPE_COVERAGE_MIN = 0.9

# --------------------------------------------------------------- model names
PROBE, RANDOM_PROBE, FINETUNED = "mae_probe", "random_probe", "mae_finetuned"
BASELINES = ("vit_scratch", "resnet50")
SEG_PRETRAINED, SEG_SCRATCH = "unetr_mae", "unetr_scratch"
RECON_ALL = "mae_all_planes"
RECON_SINGLE = (("short_axis", "mae_sa_only"), ("long_axis", "mae_la_only"))
REPRESENTATION, REPRESENTATION_CONTROL = "mae_all_planes", "random_init"
TASKS = ("phenotypes", "segmentation", "reconstruction", "representation")


def _claim(claim: str, holds: bool, evidence: str, control: str, *, void: bool = False) -> dict:
    holds = bool(holds) and not void
    status = "void" if void else ("held" if holds else "not held")
    return {"claim": claim, "holds": holds, "status": status, "evidence": evidence,
            "control": control}  # fmt: skip


def _num(value) -> float:
    return math.nan if value is None else float(value)


def _f(value, digits: int = 3) -> str:
    value = _num(value)
    return "-" if not math.isfinite(value) else f"{value:.{digits}g}"


def _r(value) -> str:
    value = _num(value)
    return "-" if not math.isfinite(value) else f"{value:.2f}x"


# ----------------------------------------------------------------- phenotypes
def _mae(models: Mapping, name: str, column: str) -> float:
    stats = models.get(name, {}).get("columns", {}).get(column)
    return _num(stats["mae"]) if stats else math.nan


def _ratio(models: Mapping, name: str, column: str) -> float:
    guess = _mae(models, MEAN_GUESS, column)
    return _mae(models, name, column) / guess if guess > 0 else math.nan


def _learned(models: Mapping, name: str, column: str) -> bool:
    learning = models.get(name, {}).get("learning")
    entry = (learning or {}).get("columns", {}).get(column)
    return bool(entry and entry["learned"])


def _why_not(models: Mapping, name: str, column: str) -> str:
    learning = models.get(name, {}).get("learning")
    if not learning or column not in learning["columns"]:
        return "no learning check"
    entry, training = learning["columns"][column], learning.get("training")
    reasons = []
    if not entry["spread_ok"]:
        reasons.append(
            f"prediction SD {_r(entry['sd_ratio'])} the targets' (< {SPREAD_RATIO_MIN}x)"
        )
    if training and training.get("fell_below") is False:
        reasons.append("training loss never below the mean guess's")
    return "; ".join(reasons) or "learned"


def phenotype_claims(pheno: Mapping) -> list[dict]:
    models, columns = pheno["models"], pheno["columns"]
    claims = []
    for column in columns:
        ratio, control = _ratio(models, PROBE, column), _ratio(models, RANDOM_PROBE, column)
        learned = _learned(models, PROBE, column)
        has_control = RANDOM_PROBE in models
        holds = learned and ratio < 1.0 and has_control and ratio < control
        paper = PAPER_MEAN_GUESS_RATIO.get(column)
        learned_text = (
            "learned" if learned else f"did NOT learn ({_why_not(models, PROBE, column)})"
        )
        evidence = (
            f"{PROBE} MAE {_f(_mae(models, PROBE, column))} = {_r(ratio)} the mean guess's "
            f"({_f(_mae(models, MEAN_GUESS, column))}); {learned_text}; "
            f"{FINETUNED} {_r(_ratio(models, FINETUNED, column))}; "
            f"paper {_r(paper)} (the bar to aim at)"
        )
        if has_control:
            control_text = (
                f"{RANDOM_PROBE} (same probe, untrained encoder): {_r(control)} the mean "
                f"guess's" + ("" if _learned(models, RANDOM_PROBE, column) else ", did not learn")
            )
        else:
            control_text = f"no {RANDOM_PROBE} in the phenotype metrics: the claim cannot hold"
        claims.append(
            _claim(
                f"the pretrained representation predicts {column} (linear probe: learned, "
                "below the mean guess, and below the random-init probe)",
                holds,
                evidence,
                control_text,
            )
        )
    return claims


def baseline_claims(pheno: Mapping) -> list[dict]:
    models, columns = pheno["models"], pheno["columns"]
    claims = []
    for baseline in BASELINES:
        if baseline not in models:
            continue
        valid = [c for c in columns if _learned(models, baseline, c)]
        unlearned = [c for c in columns if c not in valid]
        diffs = {c: paired_difference(pheno, FINETUNED, baseline, c) for c in columns}
        unpaired = [c for c in valid if not (diffs[c] and diffs[c]["ci95"])]
        wins = [c for c in valid if c not in unpaired and _learned(models, FINETUNED, c)
                and diffs[c]["ci95"][1] < 0]  # fmt: skip
        ties = [c for c in valid if c not in unpaired and c not in wins
                and diffs[c]["ci95"][0] <= 0 <= diffs[c]["ci95"][1]]  # fmt: skip
        void = len(valid) < BASELINE_LEARNED_FRACTION_MIN * len(columns) or bool(unpaired)
        claim = f"the pretrained model ({FINETUNED}) beats {baseline} (phenotype MAE)"
        if unpaired:
            evidence = (
                f"comparison void: no paired test-exam difference for {unpaired} "
                "(phenotype metrics without `paired`: rerun whmae-evaluate phenotypes)"
            )
        elif void:
            why = ", ".join(f"{c}: {_why_not(models, baseline, c)}" for c in unlearned)
            evidence = (
                f"comparison void: {baseline} did not learn {len(unlearned)}/{len(columns)} "
                f"phenotypes ({why})"
            )
        else:
            evidence = (
                f"better beyond noise on {len(wins)}/{len(valid)} phenotypes {baseline} "
                f"learned: {wins}; tied (interval holds 0) on {ties}"
                + (f"; void on {unlearned} ({baseline} did not learn them)" if unlearned else "")
            )
        head = f"{baseline} MAE vs {FINETUNED}'s ({FINETUNED} - {baseline} [95 % CI]): "
        control = head + ", ".join(
            f"{c} {_f(_mae(models, baseline, c))} vs {_f(_mae(models, FINETUNED, c))}"
            + (f" ({_f(diffs[c]['mae_diff'], 2)} [{_f(diffs[c]['ci95'][0], 2)}, "
               f"{_f(diffs[c]['ci95'][1], 2)}])" if diffs[c] and diffs[c]["ci95"] else "")
            for c in columns
        )  # fmt: skip
        claims.append(_claim(claim, len(wins) > len(valid) / 2, evidence, control, void=void))
    return claims


# --------------------------------------------------------------- segmentation
def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _test_mean(data_dir, split: str, column: str) -> float:
    """The mean of `column` over `split` from the dataset's dataset_info.json, or NaN."""
    try:
        info = json.loads((Path(data_dir) / "dataset_info.json").read_text())
        return _num(info["splits"][split]["phenotype_stats"][column]["mean"])
    except (OSError, KeyError, TypeError, ValueError):
        return math.nan


def segmentation_claims(seg: Mapping) -> list[dict]:
    models = seg["models"]
    pretrained, scratch = models[SEG_PRETRAINED], models.get(SEG_SCRATCH, {})
    dice, scratch_dice = pretrained["mean_dice"], scratch.get("mean_dice", {})
    mean_pre, mean_scratch = _mean(dice.values()), _mean(scratch_dice.values())
    claims = [
        _claim(
            "segmentation on the pretrained encoder beats the same network from scratch",
            mean_pre > mean_scratch,
            f"mean Dice {_f(mean_pre)} ({SEG_PRETRAINED})",
            f"{SEG_SCRATCH}: mean Dice {_f(mean_scratch)}",
        )
    ]
    for name, target in DICE_TARGETS.items():
        value = _num(dice.get(name))
        claims.append(
            _claim(
                f"segmentation Dice of {name} >= {target}",
                value >= target,
                f"{SEG_PRETRAINED}: Dice {_f(value)} (target {target})",
                f"{SEG_SCRATCH}: {_f(scratch_dice.get(name))}; a constant segmenter scores ~0",
            )
        )
    num_exams = pretrained.get("num_exams") or 0
    for column, limit, relative in (
        ("LVEF (%)", LVEF_MAE_MAX, False),
        ("LVEDV (mL)", LVEDV_RELATIVE_MAE_MAX, True),
    ):
        stats = pretrained.get("phenotypes", {}).get(column) or {}
        n, mae = stats.get("n") or 0, _num(stats.get("mae"))
        coverage = n / num_exams if num_exams else math.nan
        covered = coverage >= PHENOTYPE_COVERAGE_MIN
        scratch_stats = scratch.get("phenotypes", {}).get(column) or {}
        if relative:
            mean = _test_mean(seg.get("data_dir", ""), seg.get("split", "test"), column)
            error, unit = mae / mean if mean > 0 else math.nan, "of the mean"
            scratch_error = _num(scratch_stats.get("mae")) / mean if mean > 0 else math.nan
            text = (
                f"MAE {_f(mae)} mL = {_f(100 * error)} % of the test mean LVEDV {_f(mean)} mL"
                if math.isfinite(error)
                else f"MAE {_f(mae)} mL, test mean LVEDV unknown (dataset_info.json unreadable)"
            )
            claim = f"segmentation-derived LVEDV within {100 * limit:.0f} % of the truth's"
            control = f"{SEG_SCRATCH}: {_f(100 * scratch_error)} % {unit}"
        else:
            error = mae
            text = f"MAE {_f(mae)} points"
            claim = f"segmentation-derived LVEF within {limit:g} points (MAE) of the truth's"
            control = f"{SEG_SCRATCH}: MAE {_f(scratch_stats.get('mae'))} points"
        evidence = (
            f"{SEG_PRETRAINED}: {text}, derived for {n}/{num_exams} exams "
            f"(needs >= {PHENOTYPE_COVERAGE_MIN:.0%})"
        )
        claims.append(_claim(claim, covered and error <= limit, evidence, control))
    return claims


# -------------------------------------------------------------- reconstruction
def reconstruction_claims(recon: Mapping) -> list[dict]:
    models = recon["models"]
    claims = []
    for plane_type, single in RECON_SINGLE:
        full = _num(models[RECON_ALL]["plane_types"][plane_type]["mse"]["mean"])
        alone = _num(models[single]["plane_types"][plane_type]["mse"]["mean"])
        claims.append(
            _claim(
                f"all-view reconstruction beats {single} on {plane_type} planes",
                full < alone,
                f"MSE {_f(full, 4)} ({RECON_ALL})",
                f"{single}: MSE {_f(alone, 4)} (same steps, {plane_type} planes only)",
            )
        )
    return claims


# ------------------------------------------------------------------ robustness
def _reid(entry: Mapping, removal: str, embedding: str = "cls") -> dict:
    return entry["robustness"][removal][f"reid_{embedding}"]


def robustness_claims(rep: Mapping) -> list[dict]:
    models = rep["models"]
    entry, control = models[REPRESENTATION], models.get(REPRESENTATION_CONTROL)
    claims = []
    for removal in ("single_plane", "plane_pairs"):
        r = _reid(entry, removal)
        top1, shift = _num(r["top1"]), _num(r["shift_fraction"])
        pooled = _reid(entry, removal, "mean_pooled")
        evidence = (
            f"cls: re-ID top-1 {_f(top1)} over {r['n']} reduced exams (chance {_f(r['chance'])}), "
            f"shift {_f(shift)}x the median between-subject distance; mean-pooled: top-1 "
            f"{_f(pooled['top1'])}, shift {_f(pooled['shift_fraction'])}x; "
            f"needs top-1 >= {REID_TOP1_MIN}, shift < {SHIFT_FRACTION_MAX}x and below the control"
        )
        if control is None:
            beats, control_text = False, f"no {REPRESENTATION_CONTROL} control: cannot hold"
        else:
            c = _reid(control, removal)
            c_shift = _num(c["shift_fraction"])
            # An undefined control shift (all its embeddings equal) is as bad as it gets.
            beats = math.isfinite(shift) and (not math.isfinite(c_shift) or shift < c_shift)
            control_text = (
                f"{REPRESENTATION_CONTROL} (untrained, same config): top-1 {_f(c['top1'])}, "
                f"shift {_f(c_shift)}x"
            )
        holds = top1 >= REID_TOP1_MIN and shift < SHIFT_FRACTION_MAX and beats
        claims.append(
            _claim(
                f"removing planes ({removal.replace('_', ' ')}) keeps the exam re-identifiable "
                "and moves it less than subjects differ",
                holds,
                evidence,
                control_text,
            )
        )
    claims.append(_phenotype_shift_claim(entry["robustness"]))
    return claims


def _phenotype_shift_claim(robust: Mapping) -> dict:
    claim = (
        "removing planes moves the phenotype predictions by < "
        f"{PHENOTYPE_SHIFT_FRACTION_MAX:.0%} of the model's own MAE"
    )
    regression = robust.get("regression")
    if not regression:
        return _claim(claim, False, "no regression model evaluated (--regression)", "none")
    parts, holds = [], True
    for column, reg in regression.items():
        worst = max(
            (_num(robust[r].get("phenotype_shift_fraction", {}).get(column))
             for r in ("single_plane", "plane_pairs")),
            key=lambda v: -math.inf if math.isnan(v) else v,
        )  # fmt: skip
        ok = reg["learned"] and math.isfinite(worst) and worst < PHENOTYPE_SHIFT_FRACTION_MAX
        holds = holds and ok
        shift = _num(robust["plane_pairs"].get("phenotype_shift", {}).get(column, {}).get("mean"))
        parts.append(
            f"{column} {_f(100 * worst, 2)} % of MAE {_f(reg['mae'])} (pairs: shift {_f(shift)})"
            + ("" if reg["learned"] else " - regression did NOT learn it")
        )
    control = (
        "the regression model's learning check (a constant predictor never moves): "
        + ", ".join(f"{c} SD ratio {_r(reg['sd_ratio'])}" for c, reg in regression.items())
    )
    return _claim(claim, holds, "worst of single planes and pairs: " + "; ".join(parts), control)


# ----------------------------------------------------------------- all claims
def claims_from_metrics(metrics: Mapping[str, Mapping]) -> list[dict]:
    """Every claim on {task: metrics.json dict}; tasks missing from `metrics` add none."""
    claims = []
    if "phenotypes" in metrics:
        claims += phenotype_claims(metrics["phenotypes"])
        claims += baseline_claims(metrics["phenotypes"])
    if "segmentation" in metrics:
        claims += segmentation_claims(metrics["segmentation"])
    if "reconstruction" in metrics:
        claims += reconstruction_claims(metrics["reconstruction"])
    if "representation" in metrics:
        claims += robustness_claims(metrics["representation"])
    return claims


def paper_claims(eval_dir: str | os.PathLike) -> list[dict]:
    """The claims on `<eval_dir>/<task>/metrics.json` of every task (all four needed)."""
    from whmae.evaluate.report import read_task_metrics

    eval_dir = Path(eval_dir)
    return claims_from_metrics({task: read_task_metrics(eval_dir / task) for task in TASKS})


def claims_markdown(claims: list[dict]) -> str:
    held = sum(c["holds"] for c in claims)
    void = sum(c.get("status") == "void" for c in claims)
    title = f"## The paper's claims on the phantom ({held}/{len(claims)} hold"
    title += f", {void} void)" if void else ")"
    lines = [title, ""]
    lines += ["| claim | holds | evidence | control |", "|---|---|---|---|"]
    mark = {"held": "yes", "not held": "NO", "void": "VOID"}
    lines += [
        f"| {c['claim']} | {mark.get(c.get('status'), 'yes' if c['holds'] else 'NO')} "
        f"| {c['evidence']} | {c.get('control', '')} |"
        for c in claims
    ]
    return "\n".join(lines) + "\n"


def phenotype_ratio_markdown(pheno: Mapping) -> str:
    """Each model's MAE / mean-guess MAE per phenotype beside the paper's (markdown)."""
    models, columns = pheno["models"], pheno["columns"]
    names = [n for n in models if n != MEAN_GUESS]
    lines = [
        "### Phenotype MAE / mean-guess MAE (lower is better; * = did not learn)",
        "",
        "| phenotype | " + " | ".join(names) + " | paper |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for column in columns:
        cells = [
            _r(_ratio(models, n, column)) + ("" if _learned(models, n, column) else " *")
            for n in names
        ]
        lines.append(
            f"| {column} | " + " | ".join(cells) + f" | {_r(PAPER_MEAN_GUESS_RATIO.get(column))} |"
        )
    return "\n".join(lines) + "\n"
