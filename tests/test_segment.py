"""whmae-segment: label maps written back in each input's grid, phenotypes CSV, failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flax import nnx
from ukbb_fixtures import (
    apply_grid_symmetry,
    break_exam,
    make_exam_folder,
    reorient_exam_folder,
)

from whmae import layout
from whmae.finetune import finetune
from whmae.model.io import save_model
from whmae.model.mae import MaskedAutoencoder, tiny_config
from whmae.segment import main
from whmae.tasks.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(token_channels=8, channels=[8, 8, 8], image_channels=4, skip_blocks=[0, 1])
FILE_LABELS = {"seg_sa": {0, 1, 2, 3}, "seg_la_2ch": {0, 1}, "seg_la_4ch": {0, 1, 2}}
INPUT = {"seg_sa": "sa", "seg_la_2ch": "la_2ch", "seg_la_4ch": "la_4ch"}


@pytest.fixture(scope="module")
def segmented(tiny_dataset, tmp_path_factory):
    pretrained = tmp_path_factory.mktemp("pretrained")
    save_model(pretrained, MaskedAutoencoder(tiny_config(), rngs=nnx.Rngs(3)))
    config = load_config_file(ROOT / "configs/segmentation.py", "tiny")
    config.data.dir = str(tiny_dataset)
    config.init.checkpoint = str(pretrained)
    config.model.unetr.update(SMALL)
    config.train.update(steps=3, log_every=1, checkpoint_every=3)
    workdir = tmp_path_factory.mktemp("segmentation")
    finetune(config, str(workdir))

    root = tmp_path_factory.mktemp("ukbb")
    # Different in-plane sizes and frame counts from the model's 32 x 32 x 10 window.
    make_exam_folder(root, "1001", 0, size=48, frames=14, num_slices=8)
    make_exam_folder(root, "1002", 1, size=24, frames=7, num_slices=9)
    make_exam_folder(root, "1003", 2, size=40, frames=10, num_slices=8)
    reason = break_exam(root / "1003", "few_slices")
    # 1001's files stored rotated / flipped (with matching affines): the same heart.
    symmetries = reorient_exam_folder(root / "1001", root / "1004", seed=1)
    out = tmp_path_factory.mktemp("out")
    argv = ["--checkpoint", str(workdir), "--root", str(root), "--out", str(out)]
    assert main([*argv, "--batch-size", "4"]) == 0
    return root, out, reason, symmetries


def test_label_maps_have_the_input_grid_and_file_labels(segmented):
    root, out, _, _ = segmented
    for eid in ("1001", "1002", "1004"):
        for seg, image in INPUT.items():
            source = nib.load(str(root / eid / f"{image}.nii.gz"))
            written = nib.load(str(out / eid / f"{seg}.nii.gz"))
            assert written.shape == source.shape, (eid, seg)
            assert np.allclose(written.affine, source.affine), (eid, seg)
            assert np.allclose(written.header.get_zooms(), source.header.get_zooms())
            data = np.asanyarray(written.dataobj)
            assert data.dtype == np.uint8
            assert set(np.unique(data)) <= FILE_LABELS[seg], (eid, seg, np.unique(data))
        # Only the six selected short-axis slices can carry labels.
        sa = np.asanyarray(nib.load(str(out / eid / "seg_sa.nii.gz")).dataobj)
        assert sa.shape[2] > len(layout.SHORT_AXIS_PLANES)
        labelled = np.flatnonzero(sa.any(axis=(0, 1, 3)))
        assert len(labelled) <= len(layout.SHORT_AXIS_PLANES)


def test_broken_exam_is_reported_and_phenotypes_cover_the_rest(segmented):
    _, out, reason, _ = segmented
    summary = json.loads((out / "segment_summary.json").read_text())
    assert summary["found"] == 4
    assert sorted(summary["written"]) == ["1001", "1002", "1004"]
    assert list(summary["failed"]) == ["1003"] and reason in summary["failed"]["1003"]
    assert not (out / "1003").exists()
    with (out / "phenotypes.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["eid", *layout.PHENOTYPE_COLUMNS]
    assert sorted(r[0] for r in rows[1:]) == ["1001", "1002", "1004"]
    assert all(len(r) == 1 + layout.NUM_PHENOTYPES for r in rows[1:])


def test_predictions_go_back_into_each_files_own_orientation(segmented):
    """1004 holds 1001's views rotated / flipped: the canonical record is the same, so
    the predictions are, and each is written back in its own file's voxel order."""
    root, out, _, symmetries = segmented
    assert len(set(symmetries.values())) > 1
    for seg, image in INPUT.items():
        original = np.asanyarray(nib.load(str(out / "1001" / f"{seg}.nii.gz")).dataobj)
        moved = np.asanyarray(nib.load(str(out / "1004" / f"{seg}.nii.gz")).dataobj)
        assert original.any(), seg  # something was predicted
        expected = apply_grid_symmetry(original, symmetries[image])
        np.testing.assert_array_equal(moved, expected, err_msg=seg)
