"""The real train step compiled by the TPU compiler (libtpu, the `tpu-compile` extra) for
a v5e 2x2 slice, on this CPU host: it compiles under dp and fsdp, FSDP splits the
parameters and optimizer state, and the compiled FLOPs match the analytic count.

The compile runs in a subprocess (benchmarks/tpu_compile.py), so the TPU compiler never
touches this session's 8 emulated CPU devices. Without libtpu the test fails: it never
skips.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHIPS = 4


@pytest.mark.slow
def test_train_step_compiles_for_tpu_v5e_2x2(tmp_path):
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail(
            "libtpu is not installed: the TPU compile test needs the `tpu-compile` extra "
            '(pip install -e ".[tpu-compile]")'
        )
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    # Compile-only TPU executables stay out of the tests' shared CPU compilation cache.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "tpu_compile.py"),
        "--out",
        str(tmp_path),
        "--topologies",
        "v5e-4",
        "--configs",
        "tiny-wide",
        "--layouts",
        "dp,fsdp",
        "--batch",
        "2",
        "--no-search",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "tpu_compile.json").read_text())
    rows = {r["layout"]: r for r in result["rows"]}
    assert set(rows) == {"dp", "fsdp"}, result["rows"]
    for row in rows.values():
        assert "error" not in row, row
        assert row["chips"] == CHIPS and row["device_kind"].startswith("TPU v5"), row
        assert 0 < row["total_bytes"] <= row["hbm_bytes"] and row["fits"], row
        # Compiled (forward + backward + optimizer) vs 3 x the analytic forward count.
        assert abs(row["compiled_over_analytic"] - 1) < 0.05, row
    state = {k: r["params_bytes"] + r["optimizer_bytes"] for k, r in rows.items()}
    assert state["fsdp"] <= 1.2 / CHIPS * state["dp"], state
    assert rows["fsdp"]["collective_bytes"]["all-gather"] > 0, rows["fsdp"]
    assert (tmp_path / "tpu_compile.md").read_text().count("| v5e-4 |") == 2


def _load_tpu_compile():
    spec = importlib.util.spec_from_file_location(
        "tpu_compile", ROOT / "benchmarks" / "tpu_compile.py"
    )
    module = importlib.util.module_from_spec(spec)
    saved = dict(os.environ)  # the script sets its own JAX/libtpu defaults on import
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


@pytest.mark.parametrize("largest", [1, 2, 3, 7, 8, 100, 255, 256])
def test_batch_search_finds_the_largest_batch_that_fits(largest):
    """The max-batch search (doubling, then bisection) against a memory limit it cannot
    see: it must return exactly the largest fitting batch, never one that does not fit,
    in O(log limit) compiles."""
    search = _load_tpu_compile().largest_batch
    asked = []

    def fits(batch):
        asked.append(batch)
        return batch <= largest

    found, compiles = search(fits, 1, True, 256)
    assert found == largest and compiles == len(asked)
    assert all(b <= 256 for b in asked) and compiles <= 2 * 8 + 1
    assert search(fits, 1, False, 256) == (0, 0)  # the first batch already does not fit
