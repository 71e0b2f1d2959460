"""The demo's profiles build every run's model at the profile's size (abstractly: the
gpu profile's paper-resolution models are never materialised on the CPU)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from whmae import demo
from whmae.demo_profiles import PROFILES, get_profile
from whmae.pretrain import pretrain_task
from whmae.tasks.config import resolve
from whmae.tasks.predict import build_model


def _param_count(model_fn) -> int:
    state = nnx.state(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_run_of_the_profile_builds_at_its_size(name, tmp_path):
    profile = get_profile(name)
    sizes = {}
    for variant in demo.PRETRAIN_RUNS.values():
        config = demo._pretrain_config(variant, profile)
        assert (config.model.image_size, config.model.frames) == (
            profile.image_size,
            profile.frames,
        )
        sizes[variant] = _param_count(pretrain_task(config).model_fn)
        planes = {"tiny": 9, "tiny,sa_only": 6, "tiny,la_only": 3}[variant]
        assert len(config.model.planes) == planes
    for stage in ("phenotype", "segmentation"):
        runs = list(demo.finetune_configs(stage, profile, profile.steps, tmp_path, "ckpt"))
        assert [n for n, _ in runs] == list(
            demo.PHENOTYPE_RUNS if stage == "phenotype" else demo.SEGMENTATION_RUNS
        )
        for run, config in runs:
            encoder = config.model.encoder
            assert (encoder.image_size, encoder.frames) == (profile.image_size, profile.frames)
            for field, value in profile.model.items():
                assert encoder[field] == value, (run, field)
            assert config.train.steps == profile.steps[stage]
            assert config.init.checkpoint == ("ckpt" if config.init.pretrained else "")
            config = resolve(config)
            assert _param_count(lambda rngs, c=config: build_model(c, rngs)) > 0
    # The control probe is the pretrained probe's run with an untrained encoder.
    phenotype = dict(demo.finetune_configs("phenotype", profile, profile.steps, tmp_path, "c"))
    control, probe = phenotype["random_probe"], phenotype["mae_probe"]
    assert not control.init.pretrained and probe.init.pretrained
    assert control.model.to_dict() == probe.model.to_dict()
    assert min(sizes.values()) > 0


def test_gpu_profile_is_the_papers_resolution():
    cpu, gpu = get_profile("cpu"), get_profile("gpu")
    assert (gpu.image_size, gpu.frames, gpu.model["patch_size"]) == (128, 50, (25, 8, 8))
    assert gpu.model["width"] > 4 * 33  # "wide enough to learn": well above the tiny MAE
    assert cpu.image_size < gpu.image_size
    with pytest.raises(ValueError, match="unknown demo profile"):
        get_profile("tpu")
