"""benchmarks/bench_demo_steps.py: the demo's runs' real train steps, variants side by side."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_demo_steps", ROOT / "benchmarks" / "bench_demo_steps.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_are_timed_side_by_side_on_their_own_models(tiny_dataset, tmp_path):
    bench = _load()
    out = tmp_path / "steps.json"
    wider = {"model.mlp_dim": 128}
    bench.main([
        "--run", "pretrain/mae_la_only", "--data", str(tiny_dataset),
        "--variant", f"wider mlp={json.dumps(wider)}", "--rounds", "2", "--steps", "2",
        "--out", str(out),
    ])  # fmt: skip
    result = json.loads(out.read_text())
    profile, variant = result["variants"]
    assert (profile["variant"], variant["variant"]) == ("profile", "wider mlp")
    assert variant["overrides"] == wider
    assert profile["ratio_to_profile"] == 1.0
    ratio = variant["s_per_step"] / profile["s_per_step"]
    assert variant["ratio_to_profile"] == pytest.approx(ratio)
    assert profile["steps_timed"] == variant["steps_timed"] == 4
    # The override reached the model: each encoder block's MLP (width -> mlp -> width)
    # grows by (128 - 64) x (2 x width + 1) weights and biases; the decoder's is its own.
    from whmae.model.config import tiny_config

    tiny = tiny_config()
    assert tiny.mlp_dim == 64
    grown = variant["params"] - profile["params"]
    assert grown == tiny.depth * (128 - 64) * (2 * tiny.width + 1), grown
    assert result["batch_size"] == 8 and result["run"] == "pretrain/mae_la_only"


def test_default_variants_are_the_cpu_profile_and_each_cut_of_cpu_fast(tmp_path):
    from whmae import demo
    from whmae.demo_profiles import CPU, CPU_FAST

    bench = _load()
    variants = bench.default_variants("segmentation")
    assert list(variants)[0] == "profile" and variants["profile"] == {}

    def fields(config):
        encoder = config.model.encoder
        return {"attention_impl": encoder.attention_impl, "num_heads": encoder.num_heads,
                "refine_channels": config.model.unetr.refine_channels}  # fmt: skip

    run = "segmentation/unetr_scratch"
    profile = fields(bench.run_config(run, CPU, str(tmp_path))[1])
    changed = {}
    for name, overrides in variants.items():
        config = bench.run_config(run, CPU, str(tmp_path))[1]
        demo._override(config, overrides)
        changed[name] = {k for k, v in fields(config).items() if v != profile[k]}
    assert changed == {"profile": set(), "attention xla": {"attention_impl"},
                       "one head": {"num_heads"}, "no refine": {"refine_channels"},
                       "cpu-fast": {"num_heads", "refine_channels"}}  # fmt: skip
    # "cpu-fast" is exactly the cpu-fast profile's segmentation run.
    config = bench.run_config(run, CPU, str(tmp_path))[1]
    demo._override(config, variants["cpu-fast"])
    assert fields(config) == fields(bench.run_config(run, CPU_FAST, str(tmp_path))[1])


def test_bad_variant_and_unknown_run_name_the_problem():
    bench = _load()
    with pytest.raises(SystemExit, match="not NAME=JSON"):
        bench.main(["--variant", "x={not json"])
    from whmae.demo_profiles import CPU

    with pytest.raises(SystemExit, match="unknown segmentation run 'nope'"):
        bench.run_config("segmentation/nope", CPU, "/tmp")
