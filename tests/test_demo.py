"""The main job end to end at toy size: every stage runs and the report is complete."""

from __future__ import annotations

import json

from whmae.demo import run_demo


def test_demo_writes_the_report_and_checks_every_claim(tmp_path):
    summary = run_demo(
        tmp_path, num_exams=24, steps={"pretrain": 3, "phenotype": 3, "segmentation": 3}, workers=1
    )
    report = tmp_path / "report"
    for task in ("reconstruction", "phenotypes", "segmentation", "representation"):
        metrics = json.loads((report / task / "metrics.json").read_text())
        assert metrics, task
        assert list((report / task).glob("*.png")), f"{task} wrote no figure"
    claims = json.loads((report / "claims.json").read_text())
    assert len(claims) == summary["claims"] == 20
    assert all(isinstance(c["holds"], bool) and c["evidence"] and c["control"] for c in claims)
    assert all(c["status"] in ("held", "not held", "void") for c in claims)
    assert summary["claims_held"] == sum(c["holds"] for c in claims)
    assert summary["claims_void"] == sum(c["status"] == "void" for c in claims)
    # Every phenotype model carries its learning checks, with its training log read.
    phenotypes = json.loads((report / "phenotypes" / "metrics.json").read_text())
    for name in ("mae_probe", "random_probe", "mae_finetuned", "vit_scratch", "resnet50"):
        assert phenotypes["models"][name]["learning"]["training"]["rows"] == 3, name
    representation = json.loads((report / "representation" / "metrics.json").read_text())
    assert representation["models"]["random_init"]["control"]["init"] == "random"
    text = (report / "report.md").read_text()
    assert "The paper's claims on the phantom" in text and all(c["claim"] in text for c in claims)
    assert "Phenotype MAE / mean-guess MAE" in text and "Learning checks" in text
    assert set(summary["stage_seconds"]) == {
        "generate", "pretrain", "phenotype", "segmentation", "evaluate"
    }  # fmt: skip
    # The runs and evaluations went through demo_jobs: each timed, each with its log.
    assert summary["jobs"] >= 1 and len(summary["run_seconds"]) == 14
    assert all(seconds > 0 for seconds in summary["run_seconds"].values())
    logs = {p.stem for p in (tmp_path / "logs").glob("*.log")}
    assert logs == {n.replace("/", "_") for n in summary["run_seconds"]} or summary["jobs"] == 1
    assert summary["overrides"]["mae_probe"]["model.pool"] == "tokens"
    assert "model.pool" not in summary["overrides"]["resnet50"]
    assert summary["overrides"]["random_probe"]["init.pretrained"] is False
    assert summary["overrides"]["random_probe"]["model.pool"] == "tokens"
    # Validation: each run's val rows, best checkpoint, and the runs side by side.
    assert summary["checkpoint_steps"] == {name: 3 for name in summary["checkpoint_steps"]}
    assert {"mae_all_planes", "resnet50", "unetr_mae"} <= set(summary["checkpoint_steps"])
    curves = {p.name for p in (report / "val_curves").glob("*.png")}
    assert {"val_Pretraining_all_planes_SA_only_LA_only_loss.png",
            "val_Phenotype_models_mae_std.png",
            "val_Segmentation_models_dice_mean.png"} <= curves  # fmt: skip
    assert "## Training runs" in text and "best val checkpoint: mae_all_planes step 3" in text
