"""benchmarks/gpu_check: the one-command GPU check, rehearsed on the CPU (tiny config).

The rehearsal runs every section for real on 2 emulated CPU devices: the data-parallel
losses must match one device's within the fp32 bound, the sweep and the loop must measure
positive rates, and the report (JSON + markdown, printed last) must name every section.
A failure injected in one section and a process that dies in another must be recorded
while the later sections still run (gpu_check.sh restarts a dead process with --resume).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    for name in ("WHMAE_GPU_CHECK_FAIL", "WHMAE_GPU_CHECK_CRASH"):
        env.pop(name, None)
    env.update(extra)
    return env


def _report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_section(tmp_path):
    gpu_check = _module()
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--work", str(tmp_path)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = _report(out)
    sections = report["sections"]
    assert {k: v["status"] for k, v in sections.items()} == dict.fromkeys(gpu_check.SECTIONS, "ok")
    assert report["environment"]["devices"] == 2

    # (a) two devices in data parallel vs one: the same 20 losses within the fp32 bound.
    c = sections["correctness"]["result"]
    assert c["passed"] is True and c["accelerator"].startswith("2 x cpu")
    reference = c["reference_losses"]
    assert len(reference) == 20 and all(math.isfinite(x) and 0 < x < 1 for x in reference)
    rows = {(r["dtype"], r["attention"], r["precision"]): r for r in c["rows"]}
    fp32 = rows[("float32", "auto", "highest")]
    assert fp32["status"] == "ok" and fp32["passed"] and fp32["rtol"] == 1e-3
    assert max(abs(a - b) / b for a, b in zip(fp32["losses"], reference, strict=True)) <= 1e-3
    assert reference[-1] < 0.95 * reference[0]  # it trains: a trajectory, not a constant
    bf16 = rows[("bfloat16", "auto", "default")]
    assert bf16["status"] == "ok" and bf16["passed"] and 0 < bf16["max_rel_diff"] <= bf16["rtol"]
    assert rows[("bfloat16", "cudnn", "default")]["status"] == "skipped: GPU only"

    # (b) and (c): a positive peak; every config's points, the runnable ones measured.
    peak = sections["peak"]["result"]["flops_per_s"]
    assert peak > 0
    points = sections["step"]["result"]["points"]
    ok = [p for p in points if p["status"] == "ok"]
    assert {p["config"] for p in points} == {"tiny"}
    assert {(p["remat"], p["batch_per_device"]) for p in ok} == {(False, 2), (False, 4), (True, 4)}
    for p in ok:
        assert (
            p["exams_per_s"] > 0 and p["compile_s"] > 0 and p["batch"] == 2 * p["batch_per_device"]
        )
        assert p["mfu"] == pytest.approx(p["exams_per_s"] * p["flops_per_exam_analytic"] / peak)
        assert p["memory_peak_bytes_per_device"] > 0
    assert all(
        p["status"].startswith("skipped: cuDNN") for p in points if p["attention"] == "cudnn"
    )
    assert sections["step"]["result"]["best"]["tiny"]["exams_per_s"] == max(
        p["exams_per_s"] for p in ok
    )

    # (d) the real loop over ArrayRecord shards against the step alone.
    (loop,) = sections["loop"]["result"]["rows"]
    assert loop["status"] == "ok" and loop["exam_shape"] == [9, 10, 32, 32]
    assert loop["loop_exams_per_s"] > 0 and loop["step_alone_exams_per_s"] > 0
    assert loop["ratio"] == pytest.approx(loop["loop_exams_per_s"] / loop["step_alone_exams_per_s"])
    assert loop["passed"] == (loop["ratio"] >= 0.9) and loop["measured_steps"] >= 8
    assert loop["pipeline_alone"]["exams_per_s"] > 0 and loop["where_time_goes"]
    assert math.isfinite(loop["final_loss"])

    # The table: a file naming every section, and the last thing printed.
    table = (out / "gpu_check.md").read_text()
    for title in gpu_check.TITLES.values():
        assert title in table
    assert done.stdout.rstrip().endswith(table.rstrip())


@pytest.mark.slow
def test_failure_and_crash_are_recorded_and_later_steps_run(tmp_path):
    """correctness fails (injected), the step sweep's first point kills the process
    (os.abort): gpu_check.sh resumes, the peak and the next point are still measured."""
    out = tmp_path / "out"
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--out", str(out),
               "--work", str(tmp_path), "--only", "correctness,peak,step", "--batches", "4",
               "--attentions", "xla"]  # fmt: skip
    env = _env(
        PYTHON=sys.executable, WHMAE_GPU_CHECK_FAIL="correctness", WHMAE_GPU_CHECK_CRASH="step"
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "resuming after the point it died in" in done.stderr
    report = _report(out)
    assert report["restarts"] == 1
    sections = report["sections"]
    assert set(sections) == {"correctness", "peak", "step"}
    assert sections["correctness"]["status"].startswith("failed: RuntimeError: failure injected")
    assert sections["peak"]["status"] == "ok" and sections["peak"]["result"]["flops_per_s"] > 0
    assert sections["step"]["status"] == "ok"
    points = {p["remat"]: p for p in sections["step"]["result"]["points"]}
    assert points[False]["status"].startswith("crashed")
    assert points[True]["status"] == "ok" and points[True]["exams_per_s"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "failure injected" in table and "crashed" in table


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    gpu_check = _module()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out")]) == 0
    plan = capsys.readouterr().out
    assert "gpu mode" in plan and "paper, base in bf16" in plan and "cudnn/xla" in plan
    assert "8192^3" in plan and "128 phantom exams" in plan
    assert not (tmp_path / "out").exists()
    args = ["--dry-run", "--cpu", "--budget", "step=0", "--fail", "loop"]
    assert gpu_check.main(args) == 0
    plan = capsys.readouterr().out
    assert "cpu mode" in plan and "tiny in bf16" in plan and "step [0 s]" in plan
    assert "failing on purpose: loop" in plan
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--only", "nonsense"])


def test_loop_schedule_measures_after_the_prefetch_buffers():
    gpu_check = _module()
    plan = gpu_check.Plan(mode="gpu", sections=(), budgets={}, deadline_at=0.0, loop_workers=12)
    total, log_every, first = gpu_check.loop_schedule(plan, step_s=0.2)
    assert first >= 12 * 5 + log_every  # one interval for the compile, then the buffers
    assert total - first >= max(plan.loop_min_steps, plan.loop_window_s / 0.2)
    assert first % log_every == 0 and total % log_every == 0
