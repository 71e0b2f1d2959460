"""Validation inside the training loop: val curves, the best checkpoint, resuming.

The tiny MAE trains 10 steps with an evaluation every 2 (the shared 24-exam phantom's val
split), once straight through and once preempted by a real SIGTERM right after its step-4
evaluation and resumed; a tiny segmentation run checks that val Dice rises.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from whmae.data.dataset.pipeline import make_pipeline
from whmae.pretrain import pretrain_task
from whmae.tasks.config import load_config_file
from whmae.train.checkpoint import CHECKPOINT_DIR, Checkpointer, checkpoint_step
from whmae.train.loop import train
from whmae.train.metrics import read_metrics
from whmae.train.validation import subset_batches, val_size

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 10, 2
PREEMPT_AFTER_EVAL = 4


def mae_config(data_dir):
    config = load_config_file(ROOT / "configs/pretrain.py", "tiny")
    config.data.dir = str(data_dir)
    # checkpoint_every beyond the run: the eval steps (ranked) and the last are saved.
    config.train.update(steps=STEPS, log_every=2, checkpoint_every=1000, keep_checkpoints=1,
                        eval_every=EVERY, eval_exams=16)  # fmt: skip
    # Rank the HIGHEST val loss best: the best step is then an early one (the val loss
    # falls), so "best" and "latest" differ and both must be kept.
    config.train.update(best_metric="loss", best_mode="max")
    return config


def _preempt_after_eval(task, at_step: int):
    """`task` whose val summary sends this process SIGTERM after evaluating `at_step`
    (the loop's watcher then saves and stops at the next step)."""
    import dataclasses

    calls = []
    summarise = task.validation.summarise

    def wrapped(values):
        calls.append(None)
        if len(calls) == at_step // EVERY:
            os.kill(os.getpid(), signal.SIGTERM)
        return summarise(values)

    validation = dataclasses.replace(task.validation, summarise=wrapped)
    return dataclasses.replace(task, validation=validation)


@pytest.fixture(scope="module")
def mae_runs(tiny_dataset, tmp_path_factory):
    """{"reference": (workdir, summary), "preempted": ..., "resumed": ...}."""
    config = mae_config(tiny_dataset)
    reference = str(tmp_path_factory.mktemp("reference"))
    out = {"reference": (reference, train(config, reference, pretrain_task(config)))}
    preempted = str(tmp_path_factory.mktemp("preempted"))
    task = _preempt_after_eval(pretrain_task(config), PREEMPT_AFTER_EVAL)
    out["preempted"] = (preempted, train(config, preempted, task))
    with Checkpointer(os.path.join(preempted, CHECKPOINT_DIR), save_every=1) as checkpointer:
        out["after_preemption"] = checkpointer.all_steps()
    out["resumed"] = (preempted, train(config, preempted, pretrain_task(config)))
    return out


def _val(workdir) -> list[dict]:
    return read_metrics(workdir, split="val")


def test_val_rows_every_eval_every_steps_and_val_loss_falls(mae_runs):
    workdir, summary = mae_runs["reference"]
    rows = _val(workdir)
    assert [r["step"] for r in rows] == list(range(EVERY, STEPS + 1, EVERY))
    for row in rows:
        assert row["split"] == "val" and row["eval_s"] > 0 and row["eval_fraction"] > 0
        for key in ("loss", "mse_long_axis", "psnr_long_axis", "mse_short_axis",
                    "psnr_short_axis"):  # fmt: skip
            assert np.isfinite(row[key]), (key, row)
        # PSNR (mean over planes) >= PSNR of the mean MSE (Jensen), both in [0, 1] pixels.
        assert row["psnr_short_axis"] >= -10 * np.log10(row["mse_short_axis"]) - 1e-6
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.95 * losses[0], losses
    assert [r["step"] for r in read_metrics(workdir)] == list(range(2, STEPS + 1, 2))
    assert summary["val"]["step"] == STEPS and summary["val"]["loss"] == losses[-1]
    tags = "".join(p.name for p in (Path(workdir) / "tensorboard").iterdir())
    assert tags  # the event file exists; its val/* tags are written with the train/* ones


def test_best_checkpoint_kept_beside_the_latest_and_read_by_default(mae_runs, tiny_dataset,
                                                                    tmp_path):  # fmt: skip
    from whmae.embed import main as embed_main

    workdir, summary = mae_runs["reference"]
    rows = _val(workdir)
    best = max(rows, key=lambda r: r["loss"])["step"]  # best_mode "max"
    assert best < STEPS
    with Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1) as checkpointer:
        assert checkpointer.all_steps() == [best, STEPS]  # keep_checkpoints=1, plus the best
    assert summary["best_step"] == best
    assert checkpoint_step(workdir) == best
    assert checkpoint_step(workdir, "latest") == STEPS
    assert checkpoint_step(workdir, str(STEPS)) == STEPS
    with pytest.raises(FileNotFoundError):
        checkpoint_step(workdir, 7)
    # whmae-embed reads the best step unless told otherwise, and the two differ.
    outputs = {}
    for which in (None, "latest"):
        out = tmp_path / f"{which}.npz"
        args = ["--checkpoint", workdir, "--data", str(tiny_dataset), "--split", "val",
                "--out", str(out), "--no-progress"]  # fmt: skip
        assert embed_main(args + ([] if which is None else ["--checkpoint-step", which])) == 0
        with np.load(out) as f:
            outputs[which] = int(f["step"]), f["cls"]
    assert outputs[None][0] == best and outputs["latest"][0] == STEPS
    assert not np.allclose(outputs[None][1], outputs["latest"][1])


def test_resumed_run_repeats_the_uninterrupted_val_values(mae_runs):
    reference, _ = mae_runs["reference"]
    workdir, preempted = mae_runs["preempted"]
    assert preempted["preempted"] and preempted["step"] == PREEMPT_AFTER_EVAL + 1
    # The best step (an early one, best_mode "max") and the preemption step are kept.
    assert mae_runs["after_preemption"][-1] == PREEMPT_AFTER_EVAL + 1
    _, resumed = mae_runs["resumed"]
    # Training resumes from the newest step, not from the best one.
    assert resumed["start_step"] == PREEMPT_AFTER_EVAL + 1 and resumed["step"] == STEPS
    # Every val row once, with the very same values (timings aside); the train losses too.
    strip = ("eval_s", "eval_fraction", "step_time_s", "exams_per_s")

    def rows(run, split):
        return {r["step"]: {k: v for k, v in r.items() if k not in strip}
                for r in read_metrics(run, split)}  # fmt: skip

    assert rows(workdir, "val") == rows(reference, "val")
    # The train rows too, plus the row of the step the preempted run saved and stopped at.
    train_rows = rows(workdir, "train")
    assert train_rows.pop(PREEMPT_AFTER_EVAL + 1)["step"] == PREEMPT_AFTER_EVAL + 1
    assert train_rows == rows(reference, "train")


def test_val_subset_is_the_first_exams_whatever_the_process_count(tiny_dataset):
    fields = ("eid", "plane_mask")
    total = val_size(str(tiny_dataset))
    order = np.concatenate([b["eid"] for b in make_pipeline(
        tiny_dataset, "val", batch_size=64, fields=fields, shuffle=False, num_epochs=1,
        drop_remainder=False, process_index=0, process_count=1)])  # fmt: skip
    for count, global_batch, wanted in [(1, 8, 16), (2, 4, total), (2, 2, 1), (4, 4, total)]:
        per_process = [list(subset_batches(str(tiny_dataset), fields, global_batch, wanted,
                                           process_index=p, process_count=count))
                       for p in range(count)]  # fmt: skip
        lengths = {len(batches) for batches in per_process}
        assert lengths == {-(-min(wanted, total) // global_batch)}, (count, lengths)
        eids = []
        for b in range(lengths.pop()):
            for p in range(count):
                batch, valid = per_process[p][b]
                assert len(batch["eid"]) == len(valid) == global_batch // count
                eids += list(batch["eid"][valid])
        assert eids == list(order[: min(wanted, total)]), (count, global_batch, wanted)


def test_phenotype_val_metrics_in_original_and_standardised_units():
    from whmae.tasks.phenotype import phenotype_validation

    validation = phenotype_validation(("LVM (g)", "RVEF (%)"))
    std = np.array([20.0, 5.0])
    pred_std = np.array([[0.5, 1.0], [-1.0, 0.0], [0.0, 2.0]])
    target_std = np.array([[0.0, 0.0], [0.0, np.nan], [1.0, 0.0]])
    values = {"pred_std": pred_std, "target_std": target_std,
              "pred": pred_std * std + 100, "target": target_std * std + 100}  # fmt: skip
    out = validation.summarise(values)
    assert out["mae_LVM_g"] == pytest.approx(20.0 * (0.5 + 1.0 + 1.0) / 3)
    assert out["mae_RVEF"] == pytest.approx(5.0 * (1.0 + 2.0) / 2)
    assert out["mae_std"] == pytest.approx(((0.5 + 1 + 1) / 3 + (1 + 2) / 2) / 2)
    errors = [0.25, 1.0, 1.0, 1.0, 4.0]  # squared errors of the 5 observed entries
    assert out["loss"] == pytest.approx(np.mean(errors))


def test_val_dice_of_a_tiny_segmentation_run_rises(tiny_dataset, tmp_path):
    from whmae.finetune import finetune

    config = load_config_file(ROOT / "configs/segmentation.py", "tiny,unetr_scratch")
    config.data.dir = str(tiny_dataset)
    config.model.unetr.update(token_channels=8, channels=[8, 8, 8], image_channels=4)
    config.train.update(steps=4, log_every=2, checkpoint_every=4, eval_every=2, eval_exams=16)
    summary = finetune(config, str(tmp_path))
    rows = _val(str(tmp_path))
    assert [r["step"] for r in rows] == [2, 4]
    dice = [r["dice_mean"] for r in rows]
    assert dice[-1] > dice[0] + 0.01, dice
    classes = {k for k in rows[0] if k.startswith("dice_") and k != "dice_mean"}
    assert classes == {"dice_lv_blood_pool", "dice_lv_myocardium", "dice_rv_blood_pool",
                       "dice_la", "dice_ra"}  # fmt: skip
    # dice_mean is ranked "max": the best step is the one with the highest val Dice.
    assert summary["best_step"] == max(rows, key=lambda r: r["dice_mean"])["step"]
    assert checkpoint_step(tmp_path) == summary["best_step"]


def test_report_puts_runs_side_by_side(mae_runs, tmp_path):
    from whmae.evaluate import report

    reference, _ = mae_runs["reference"]
    preempted, _ = mae_runs["resumed"]
    out = report.write_report(
        [], tmp_path / "report.md",
        runs={"Pretraining": {"straight": reference, "resumed": preempted}},
    )  # fmt: skip
    text = out.read_text()
    pngs = sorted(p.name for p in (tmp_path / report.CURVES_DIR).glob("*.png"))
    assert pngs == sorted(
        f"val_Pretraining_{m}.png"
        for m in ("loss", "mse_long_axis", "psnr_long_axis", "mse_short_axis", "psnr_short_axis")
    )
    assert all(f"]({report.CURVES_DIR}/{name})" in text for name in pngs)
    best = checkpoint_step(reference)
    assert f"straight step {best} (best val loss, max)" in text
    final = _val(reference)[-1]["loss"]
    assert f"{final:.4g} @ {STEPS}" in text
    assert "| loss (min) |" in text  # losses: lower is better in the table
