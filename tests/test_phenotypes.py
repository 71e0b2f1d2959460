"""Phenotypes from segmentations: disc summation, ED/ES rule, area-length atria."""

import math

import numpy as np
import pytest

from whmae import layout, phenotypes


def _short_axis_stack(lv_counts, myo_counts, rv_counts, shape=(2, 8, 8)):
    """[Z, T, H, W] labels with the given number of voxels of each class per frame."""
    frames = len(lv_counts)
    flat = np.zeros((frames, int(np.prod(shape))), np.uint8)  # [T, Z*H*W]
    for t in range(frames):
        start = 0
        for label, counts in ((1, lv_counts), (2, myo_counts), (3, rv_counts)):
            flat[t, start : start + counts[t]] = label
            start += counts[t]
    return flat.reshape(frames, *shape).transpose(1, 0, 2, 3)


def _ellipse(a, b, angle, spacing, size, centre=(0.0, 0.0), label=layout.LA):
    """[H, W] labels: an ellipse of semi-axes a (along `angle` in the row/col plane), b (mm)."""
    dy, dx = spacing
    rows = (np.arange(size[0]) - (size[0] - 1) / 2) * dy - centre[0]
    cols = (np.arange(size[1]) - (size[1] - 1) / 2) * dx - centre[1]
    r, c = np.meshgrid(rows, cols, indexing="ij")
    u = r * math.cos(angle) + c * math.sin(angle)
    v = -r * math.sin(angle) + c * math.cos(angle)
    return np.where((u / a) ** 2 + (v / b) ** 2 <= 1.0, label, 0).astype(np.uint8)


def test_disc_summation_and_derived_columns_by_hand():
    seg = _short_axis_stack(lv_counts=[40, 12, 20], myo_counts=[15, 18, 16], rv_counts=[30, 14, 9])
    voxel_ml = 1.5 * 2.0 * 8.0 / 1000.0
    volumes = phenotypes.ventricular_volumes(seg, (1.5, 2.0), 8.0)
    np.testing.assert_allclose(volumes["lv"], np.array([40, 12, 20]) * voxel_ml)
    np.testing.assert_allclose(volumes["rv"], np.array([30, 14, 9]) * voxel_ml)

    result = phenotypes.phenotypes_from_segmentations(
        seg, sa_pixel_spacing=(1.5, 2.0), slice_spacing=8.0, frame_duration=0.25
    )
    # ES is the LV minimum (frame 1); the RV is read at that frame, not at its own minimum.
    assert result["LVEDV (mL)"] == pytest.approx(40 * voxel_ml)
    assert result["LVESV (mL)"] == pytest.approx(12 * voxel_ml)
    assert result["LVSV (mL)"] == pytest.approx(28 * voxel_ml)
    assert result["LVEF (%)"] == pytest.approx(70.0)
    assert result["RVESV (mL)"] == pytest.approx(14 * voxel_ml)
    assert result["RVEF (%)"] == pytest.approx(100 * 16 / 30)
    assert result["LVM (g)"] == pytest.approx(15 * voxel_ml * 1.05)
    heart_rate = 60.0 / (3 * 0.25)  # 80 bpm
    assert result["LVCO (L/min)"] == pytest.approx(28 * voxel_ml * heart_rate / 1000)


def test_end_diastole_is_frame_zero_even_when_not_largest():
    seg = _short_axis_stack(lv_counts=[20, 30, 10, 25], myo_counts=[5] * 4, rv_counts=[5] * 4)
    result = phenotypes.phenotypes_from_segmentations(seg, sa_pixel_spacing=(1, 1), slice_spacing=1)
    assert result["LVEDV (mL)"] == pytest.approx(20 / 1000)
    assert result["LVESV (mL)"] == pytest.approx(10 / 1000)
    assert math.isnan(result["LVCO (L/min)"])  # no frame duration given


def test_labels_on_two_frames_are_ed_and_es_by_volume_and_phases_can_be_given():
    """ACDC / M&Ms: only ED and ES are segmented (here frames 3 and 1 of 5; the others are
    empty). ED is the labelled frame of larger LV, whatever its position; the empty frames
    are not read; the cycle for LVCO is still all 5 frames."""
    seg = _short_axis_stack(lv_counts=[0, 12, 0, 40, 0], myo_counts=[0, 18, 0, 15, 0],
                            rv_counts=[0, 14, 0, 30, 0])  # fmt: skip
    labelled = {"sa": np.array([0, 1, 0, 1, 0], bool)}
    kwargs = dict(sa_pixel_spacing=(1, 1), slice_spacing=1, frame_duration=0.2)
    result = phenotypes.phenotypes_from_segmentations(seg, **kwargs, labelled_frames=labelled)
    assert result["LVEDV (mL)"] == pytest.approx(40 / 1000)
    assert result["LVESV (mL)"] == pytest.approx(12 / 1000)
    assert result["RVEF (%)"] == pytest.approx(100 * 16 / 30)
    assert result["LVM (g)"] == pytest.approx(15 / 1000 * 1.05)
    assert result["LVCO (L/min)"] == pytest.approx(28 / 1000 * 60 / (5 * 0.2) / 1000)
    with pytest.raises(ValueError, match=r"no LV blood pool at ED \(frame 0\)"):
        phenotypes.phenotypes_from_segmentations(seg, **kwargs)  # read as every frame
    swapped = phenotypes.phenotypes_from_segmentations(seg, **kwargs, phases=(1, 3))
    assert swapped["LVEDV (mL)"] == pytest.approx(12 / 1000)
    assert swapped["LVESV (mL)"] == pytest.approx(40 / 1000)


def test_area_length_length_is_major_axis_of_rotated_ellipse():
    spacing = (0.2, 0.25)
    seg = np.stack([_ellipse(30.0, 18.0, angle, spacing, (400, 340)) for angle in (0.3, 1.2, -0.7)])
    area, length = phenotypes.chamber_area_length(seg, layout.LA, spacing)
    np.testing.assert_allclose(area, math.pi * 30 * 18, rtol=3e-3)
    np.testing.assert_allclose(length, 60.0, atol=0.3)


def test_area_length_volumes_of_ellipsoids_are_exact():
    a, b, c = 32.0, 21.0, 17.0  # LA: long axis a, 4ch minor b, 2ch minor c
    spacing = (0.25, 0.25)
    seg_4ch = _ellipse(a, b, 0.2, spacing, (380, 300), centre=(-8, 3))[None]
    seg_2ch = _ellipse(a, c, -0.4, spacing, (300, 300))[None]
    la = phenotypes.left_atrial_volume(seg_2ch, seg_4ch, spacing, spacing)
    assert la[0] == pytest.approx(4 / 3 * math.pi * a * b * c / 1000, rel=1e-2)
    ra_seg = _ellipse(a, b, 0.5, spacing, (300, 300), label=layout.RA)[None]
    ra = phenotypes.right_atrial_volume(ra_seg, spacing)
    assert ra[0] == pytest.approx(4 / 3 * math.pi * a * b * b / 1000, rel=1e-2)


def test_atrial_cycle_columns_and_absent_views_are_nan():
    spacing = (0.5, 0.5)
    scales = [1.0, 0.7, 0.85]  # LA max at frame 0, min at frame 1
    seg_4ch = np.stack(
        [
            _ellipse(28 * s, 18 * s, 0.0, spacing, (160, 200), centre=(0, -22))
            + _ellipse(26 * s, 16 * s, 0.0, spacing, (160, 200), centre=(0, 25), label=layout.RA)
            for s in scales
        ]
    )
    seg_2ch = np.stack([_ellipse(28 * s, 15 * s, 0.0, spacing, (160, 160)) for s in scales])
    result = phenotypes.phenotypes_from_segmentations(
        None, seg_2ch, seg_4ch, la_2ch_pixel_spacing=spacing, la_4ch_pixel_spacing=spacing
    )
    la_max = 4 / 3 * math.pi * 28 * 18 * 15 / 1000
    assert result["LAV max (mL)"] == pytest.approx(la_max, rel=0.02)
    assert result["LAV min (mL)"] == pytest.approx(la_max * 0.7**3, rel=0.03)
    assert result["LAEF (%)"] == pytest.approx(100 * (1 - 0.7**3), abs=1.0)
    assert result["RASV (mL)"] == pytest.approx(result["RAV max (mL)"] - result["RAV min (mL)"])
    for column in layout.PHENOTYPE_COLUMNS[:10]:
        assert math.isnan(result[column]), column

    only_4ch = phenotypes.phenotypes_from_segmentations(
        None, None, seg_4ch, la_4ch_pixel_spacing=spacing
    )
    assert math.isnan(only_4ch["LAV max (mL)"])  # biplane LA needs both views
    assert only_4ch["RAV max (mL)"] == pytest.approx(result["RAV max (mL)"])

    vector = phenotypes.phenotype_vector(result)
    assert vector.dtype == np.float32 and vector.shape == (layout.NUM_PHENOTYPES,)
    assert vector[layout.phenotype_index("LASV (mL)")] == pytest.approx(result["LASV (mL)"])
    assert np.isnan(vector[layout.phenotype_index("LVM (g)")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seg_sa=np.ones((2, 3, 4), np.uint8)), "seg_sa must be"),
        (dict(seg_sa=np.ones((1, 2, 3, 3), np.uint8), sa_pixel_spacing=(1, 0)), "pixel_spacing"),
        (dict(seg_sa=np.ones((1, 2, 3, 3), np.uint8), slice_spacing=-1.0), "slice_spacing"),
        (dict(seg_sa=np.full((1, 2, 3, 3), 2, np.uint8)), "no LV blood pool at ED"),
        (dict(seg_la_4ch=np.ones((3, 3), np.uint8)), "seg_la_4ch must be"),
    ],
)
def test_bad_input_names_subject_and_problem(kwargs, message):
    defaults = dict(sa_pixel_spacing=(1.0, 1.0), slice_spacing=8.0, la_4ch_pixel_spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match=message) as error:
        phenotypes.phenotypes_from_segmentations(**{**defaults, **kwargs}, subject="1234567")
    assert "1234567" in str(error.value)
