"""Metric functions against hand-computed cases (whmae.evaluate.metrics, results)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from whmae.evaluate import metrics
from whmae.evaluate.results import format_table, jsonable, read_metrics, write_metrics


def test_dice_by_hand_with_absent_classes_undefined_not_one():
    pred = np.array([0, 1, 1, 2, 4])
    truth = np.array([0, 1, 2, 2, 0])
    assert metrics.dice(pred, truth, 1) == pytest.approx(2 * 1 / 3)
    assert metrics.dice(pred, truth, 2) == pytest.approx(2 * 1 / 3)
    assert math.isnan(metrics.dice(pred, truth, 3))  # in neither: undefined, never 1.0
    assert metrics.dice(pred, truth, 4) == 0.0  # predicted only
    assert metrics.dice(truth, truth, 2) == 1.0


def test_hd95_of_single_pixels_is_their_distance_in_mm():
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[5, 5] = True
    b[8, 9] = True
    # 3 rows at 2.0 mm, 4 cols at 0.5 mm.
    assert metrics.hd95(a, b, (2.0, 0.5)) == pytest.approx(math.hypot(6.0, 2.0))


def square(rows, cols, shape=(24, 24)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_hd95_of_offset_squares_with_anisotropic_spacing():
    # 4x4 squares 10 rows apart. A's surface rows lie 7..10 rows from B's top edge:
    # distances {3.5 x4, 4.0 x2, 4.5 x2, 5.0 x4} mm at 0.5 mm rows: the 95th percentile is 5.0.
    a, b = square((2, 6), (2, 6)), square((12, 16), (2, 6))
    assert metrics.hd95(a, b, (0.5, 3.0)) == pytest.approx(5.0)
    assert metrics.hd95(b, a, (0.5, 3.0)) == pytest.approx(5.0)
    assert metrics.hd95(a, b, (3.0, 0.5)) == pytest.approx(30.0)  # spacing is per axis
    # Offset along columns instead: only the column spacing matters.
    c = square((2, 6), (12, 16))
    assert metrics.hd95(a, c, (0.5, 3.0)) == pytest.approx(30.0)
    # Labels select the class; absent from both -> NaN, from one -> inf.
    labels_a, labels_b = a * 4, b * 4
    assert metrics.hd95(labels_a, labels_b, (0.5, 3.0), label=4) == pytest.approx(5.0)
    assert math.isnan(metrics.hd95(labels_a, labels_b, (0.5, 3.0), label=5))
    assert metrics.hd95(labels_a, np.zeros_like(labels_b), (0.5, 3.0), label=4) == math.inf


def test_hd95_of_overlapping_squares_matches_brute_force_point_distances():
    a, b = square((3, 15), (4, 12)), square((6, 20), (7, 18))
    spacing = np.array([1.7, 0.6])

    def surface_points(mask):
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & \
            mask[1:-1, :-2] & mask[1:-1, 2:]  # fmt: skip
        return np.argwhere(mask & ~inner) * spacing

    def brute_force(a, b):
        pa, pb = surface_points(a), surface_points(b)
        dist = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
        return max(np.percentile(dist.min(1), 95), np.percentile(dist.min(0), 95))

    assert metrics.hd95(a, b, spacing) == pytest.approx(brute_force(a, b))
    # Touching the image edge: edge pixels are surface, in the full image as in any crop.
    edge_a, edge_b = square((0, 6), (0, 24)), square((2, 12), (3, 10))
    assert metrics.hd95(edge_a, edge_b, spacing) == pytest.approx(brute_force(edge_a, edge_b))
    assert metrics.hd95(a, a, spacing) == 0.0


def test_bland_altman_and_regression_stats_by_hand_ignoring_missing_pairs():
    pred = [1.0, 2.0, 3.0, 4.0, np.nan, 7.0]
    target = [0.0, 2.0, 2.0, 6.0, 5.0, np.nan]
    # differences 1, 0, 1, -2: bias 0, SD sqrt(6/3)
    ba = metrics.bland_altman(pred, target)
    assert ba["bias"] == pytest.approx(0.0)
    assert ba["sd"] == pytest.approx(math.sqrt(2.0))
    assert ba["loa_low"] == pytest.approx(-1.96 * math.sqrt(2.0))
    assert ba["loa_high"] == pytest.approx(1.96 * math.sqrt(2.0))
    stats = metrics.regression_stats(pred, target)
    assert stats["n"] == 4
    assert stats["mae"] == pytest.approx(1.0)
    assert stats["mae_sd"] == pytest.approx(math.sqrt(2.0 / 3.0))
    assert stats["rmse"] == pytest.approx(math.sqrt(6.0 / 4.0))


def test_pearson_r_by_hand():
    assert metrics.pearson_r([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert metrics.pearson_r([1, 2, 3], [10, 8, 6]) == pytest.approx(-1.0)
    assert math.isnan(metrics.pearson_r([1, 2, 3], [4, 4, 4]))  # constant: undefined
    assert math.isnan(metrics.pearson_r([1.0, np.nan], [1.0, 2.0]))  # one pair only


def test_psnr_known_cases():
    target = np.zeros((4, 8, 8))
    assert metrics.psnr(np.full_like(target, 0.1), target) == pytest.approx(20.0)
    assert metrics.psnr(np.full_like(target, 25.5), target, data_range=255.0) == pytest.approx(20)
    assert metrics.psnr(target, target) == math.inf
    assert metrics.mse(np.full_like(target, 0.5), target) == pytest.approx(0.25)


def test_ssim_known_cases():
    rng = np.random.default_rng(0)
    image = rng.random((3, 24, 24))
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    # Constant images: contrast/structure terms are C2/C2 = 1, only luminance remains.
    a, b, c1 = 0.2, 0.6, (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert metrics.ssim(np.full((16, 16), a), np.full((16, 16), b)) == pytest.approx(expected)
    noisy = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1)
    noisier = np.clip(image + rng.normal(0, 0.3, image.shape), 0, 1)
    s1, s2 = metrics.ssim(noisy, image), metrics.ssim(noisier, image)
    assert 0 < s2 < s1 < 1
    assert metrics.ssim(image, noisy) == pytest.approx(s1)  # symmetric
    # Frames are separate images: the first frame's blur never reaches the second.
    stacked = metrics.ssim(np.stack([noisy[0], image[1]]), image[:2])
    assert stacked == pytest.approx((metrics.ssim(noisy[0], image[0]) + 1.0) / 2)


def test_summary_counts_undefined_and_infinite_and_skips_them():
    s = metrics.summary([1.0, 3.0, np.nan, np.inf])
    assert s == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2.0)), "n": 2,
                 "n_undefined": 1, "n_infinite": 1}  # fmt: skip


def test_metrics_json_is_strict_with_null_for_nan(tmp_path):
    data = {"task": "t", "schema_version": 1, "models": {"m": {"a": np.float32(np.nan),
            "b": np.inf, "c": np.arange(2), "d": (1.5, np.float64(2.0))}}}  # fmt: skip
    path = write_metrics(tmp_path, data)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["models"]["m"] == {"a": None, "b": None, "c": [0, 1], "d": [1.5, 2.0]}
    assert read_metrics(tmp_path)["task"] == "t"
    assert jsonable({"x": [np.nan]}) == {"x": [None]}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text('{"task": "t"}')
    with pytest.raises(ValueError, match="lacks the keys"):
        read_metrics(tmp_path / "bad")


def test_format_table_prints_dash_for_undefined():
    text = format_table(["model", "mae"], [["a", 1.23456], ["b", None], ["c", math.nan]], digits=2)
    lines = text.splitlines()
    assert lines[2].split() == ["a", "1.23"]
    assert lines[3].split() == ["b", "-"] and lines[4].split() == ["c", "-"]
    md = format_table(["model", "mae"], [["a", 1.0]], markdown=True)
    assert md.splitlines()[0] == "| model | mae |" and md.splitlines()[2] == "| a | 1.000 |"
