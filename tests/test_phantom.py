"""The synthetic phantom: exam schema, labels per view, image realism, true phenotypes."""

import dataclasses
import math

import numpy as np
import pytest

from whmae import layout, phenotypes
from whmae.data.synthetic import phantom, phantom_heart

CONFIG = phantom.PhantomConfig(size=48, frames=8, seed=3)
HEALTHY_RANGES = {  # UK Biobank healthy adults, about mean +- 3.5 sd (men and women pooled)
    "LVEDV (mL)": (70, 280),
    "LVEF (%)": (38, 78),
    "LVM (g)": (35, 180),
    "RVEDV (mL)": (70, 300),
    "RVEF (%)": (36, 76),
    "LAV max (mL)": (25, 160),
    "LAEF (%)": (30, 85),
    "RAV max (mL)": (25, 210),  # a large body (size +2 sd) with a +2.7 sd RA: ~200 mL
    "RAEF (%)": (15, 75),
}
TARGETS = {  # phantom_heart target name -> phenotype column
    "lv_edv": "LVEDV (mL)",
    "lv_ef": "LVEF (%)",
    "lvm": "LVM (g)",
    "rv_edv": "RVEDV (mL)",
    "rv_ef": "RVEF (%)",
    "la_max": "LAV max (mL)",
    "la_ef": "LAEF (%)",
    "ra_max": "RAV max (mL)",
    "ra_ef": "RAEF (%)",
}


@pytest.fixture(scope="module")
def exams():
    return [phantom.make_exam(CONFIG, index) for index in range(3)]


def test_exam_schema(exams):
    exam = exams[1]
    shape = (layout.NUM_PLANES, CONFIG.frames, CONFIG.size, CONFIG.size)
    assert exam["eid"] == "phantom-3-000001"
    assert exam["images"].shape == shape and exam["images"].dtype == np.uint8
    assert exam["labels"].shape == shape and exam["labels"].dtype == np.uint8
    assert exam["phenotypes"].shape == (18,) and exam["phenotypes"].dtype == np.float32
    assert exam["plane_mask"].dtype == bool and exam["plane_mask"].all()
    assert exam["label_mask"].shape == shape[:2]  # per plane and frame: every frame here
    np.testing.assert_array_equal(
        np.flatnonzero(exam["label_mask"].all(1)), np.array(layout.LABELLED_PLANES)
    )
    np.testing.assert_array_equal(exam["label_mask"].all(1), exam["label_mask"].any(1))
    for plane, spacing in enumerate(exam["pixel_spacing"]):
        view = "short_axis" if plane in layout.SHORT_AXIS_PLANES else "long_axis"
        np.testing.assert_allclose(spacing, CONFIG.view_fov_mm(view) / CONFIG.size, rtol=1e-6)
    assert exam["slice_spacing"].dtype == np.float32 and exam["slice_spacing"] == 10.0
    heart_rate = 60.0 / (CONFIG.frames * float(exam["frame_duration"]))
    assert 50 <= heart_rate <= 90


def test_label_classes_follow_uk_biobank_views(exams):
    for exam in exams:
        labels = exam["labels"]
        assert set(np.unique(labels[layout.LA_2CH])) == {0, layout.LA}
        assert set(np.unique(labels[layout.LA_4CH])) == {0, layout.LA, layout.RA}
        assert not labels[layout.LA_3CH].any()
        short_axis = labels[list(layout.SHORT_AXIS_PLANES)]
        assert set(np.unique(short_axis)) == {0, 1, 2, 3}
        for plane in short_axis:  # LV pool and wall in every slice at ED
            assert {1, 2} <= set(np.unique(plane[0]))
        # The heart stays inside the field of view: no label touches the image border.
        border = np.concatenate(
            [labels[..., 0, :], labels[..., -1, :], labels[..., 0], labels[..., -1]], -1
        )
        assert not border.any()


def test_images_look_like_cine_not_label_maps(exams):
    for exam in exams:
        images, labels = exam["images"].astype(np.float32), exam["labels"]
        assert images.min() == 0 and images.max() == 255
        short_axis = list(layout.SHORT_AXIS_PLANES)
        blood = images[short_axis][labels[short_axis] == layout.LV_BLOOD_POOL]
        wall = images[short_axis][labels[short_axis] == layout.LV_MYOCARDIUM]
        assert blood.mean() > wall.mean() + 60  # bright blood, dark myocardium
        assert blood.std() > 4 and wall.std() > 4  # noise and partial volume, not flat classes
        assert len(np.unique(exam["images"])) > 150
        # The heart moves: frames differ, and more in the ventricles than the background.
        motion = np.abs(images[:, 0] - images[:, CONFIG.frames // 2 - 1])
        assert motion[labels[:, 0] > 0].mean() > 1.5 * motion[labels[:, 0] == 0].mean()


def test_true_phenotypes_are_physiological_and_consistent():
    subjects = [phantom.sample_subject(CONFIG, index) for index in range(16)]
    assert {s.group for s in subjects} == set(phantom_heart.GROUP_NAMES)  # seed 3: all five
    table = np.stack([s.phenotypes for s in subjects]).astype(np.float64)  # [N, 18]
    column = {name: table[:, layout.phenotype_index(name)] for name in layout.PHENOTYPE_COLUMNS}
    healthy = np.array([s.group == "healthy" for s in subjects])
    for name, (low, high) in HEALTHY_RANGES.items():
        assert np.all((column[name][healthy] >= low) & (column[name][healthy] <= high)), name
    for target, name in TARGETS.items():
        low, high = phantom_heart.TARGET_LIMITS[target]
        assert np.all((column[name] > low - 0.5) & (column[name] < high + 0.5)), name
        assert column[name].std() > 0.05 * (high - low), name  # a real regression target
    for prefix in ("LV", "RV"):
        edv, esv = column[f"{prefix}EDV (mL)"], column[f"{prefix}ESV (mL)"]
        np.testing.assert_allclose(column[f"{prefix}SV (mL)"], edv - esv, rtol=1e-5)
        np.testing.assert_allclose(column[f"{prefix}EF (%)"], 100 * (edv - esv) / edv, rtol=1e-5)
    for prefix in ("LA", "RA"):
        v_max, v_min = column[f"{prefix}V max (mL)"], column[f"{prefix}V min (mL)"]
        np.testing.assert_allclose(column[f"{prefix}SV (mL)"], v_max - v_min, rtol=1e-4)
        np.testing.assert_allclose(column[f"{prefix}EF (%)"], 100 * (1 - v_min / v_max), rtol=1e-4)
    heart_rate = np.array([s.heart_rate for s in subjects])
    np.testing.assert_allclose(
        column["LVCO (L/min)"], column["LVSV (mL)"] * heart_rate / 1000, rtol=1e-5
    )
    assert np.corrcoef(column["LVEDV (mL)"], column["RVEDV (mL)"])[0, 1] > 0.3
    # The cheap population draw is the subject's: same group, targets built within 0.5 %
    # (volumes are read at the sampled frames, the RV is solved numerically).
    for index, subject in enumerate(subjects):
        group, _, targets = phantom.sample_population(CONFIG, index)
        assert group == subject.group
        for target, name in TARGETS.items():
            truth = column[name][index]
            if name.endswith("(%)"):
                assert truth == pytest.approx(targets[target], abs=0.3), (index, name)
            else:
                assert truth == pytest.approx(targets[target], rel=0.005), (index, name)


@pytest.fixture(scope="module")
def population():
    """Group, body-size draw and phenotype targets of 400 subjects (no hearts built)."""
    draws = [phantom.sample_population(CONFIG, index) for index in range(400)]
    groups = np.array([group for group, _, _ in draws])
    size = np.array([size for _, size, _ in draws])
    targets = {name: np.array([t[name] for _, _, t in draws]) for name in TARGETS}
    return groups, size, targets


def test_population_mixes_the_groups_in_their_proportions(population):
    groups, _, _ = population
    for name, group in phantom_heart.GROUPS.items():
        share = np.mean(groups == name)
        binomial_sd = math.sqrt(group.share * (1 - group.share) / len(groups))
        assert abs(share - group.share) < 3 * binomial_sd, (name, share)


def test_pathologies_shift_their_phenotypes(population):
    groups, _, t = population

    def mean(name, group):
        return t[name][groups == group].mean()

    healthy = {name: mean(name, "healthy") for name in TARGETS}
    # Dilated cardiomyopathy: lower LVEF (down to ~20 %), larger LV, thin-normal wall.
    assert mean("lv_ef", "dcm") < healthy["lv_ef"] - 15
    assert t["lv_ef"][groups == "dcm"].min() < 25
    assert mean("lv_edv", "dcm") > 1.4 * healthy["lv_edv"]
    assert mean("rv_ef", "dcm") < healthy["rv_ef"] - 8
    # Hypertrophic: more mass per end-diastolic volume, normal-high EF, LV not dilated.
    mass_per_volume = t["lvm"] / t["lv_edv"]
    assert mass_per_volume[groups == "hcm"].mean() > 2 * mass_per_volume[groups == "healthy"].mean()
    assert mean("lv_ef", "hcm") > healthy["lv_ef"] + 5
    assert mean("lv_edv", "hcm") < healthy["lv_edv"]
    # RV dilation / dysfunction, atrial enlargement.
    assert mean("rv_edv", "rv") > 1.3 * healthy["rv_edv"]
    assert mean("rv_ef", "rv") < healthy["rv_ef"] - 10
    for atrium in ("la", "ra"):
        assert mean(f"{atrium}_max", "atrial") > 1.4 * healthy[f"{atrium}_max"]
        assert mean(f"{atrium}_ef", "atrial") < healthy[f"{atrium}_ef"] - 12
    # Spreads wider than the healthy ranges: the mean guess is no longer close.
    assert t["lv_ef"].std() > 9 and t["lv_edv"].std() > 40 and t["lvm"].std() > 35


def test_population_correlations(population):
    groups, size, t = population
    healthy = groups == "healthy"

    def r(a, b):
        return np.corrcoef(a, b)[0, 1]

    for name in ("lv_edv", "lvm", "rv_edv", "la_max", "ra_max"):  # body size drives them
        assert r(size, t[name]) > 0.15, name  # diluted by the groups
        assert r(size[healthy], t[name][healthy]) > 0.3, name
    assert r(t["lv_ef"][healthy], t["rv_ef"][healthy]) > 0.3  # LV and RV function coupled
    assert r(t["lv_ef"], t["rv_ef"]) > 0.4
    assert r(t["lv_edv"], t["lv_ef"]) < -0.4  # the dilated LVs are the failing ones
    for atrium in ("la", "ra"):  # enlarged atria empty less
        assert r(t[f"{atrium}_max"], t[f"{atrium}_ef"]) < -0.4
        assert r(t[f"{atrium}_max"][healthy], t[f"{atrium}_ef"][healthy]) < -0.2


EXTREMES = {  # targets at the corners of TARGET_LIMITS the geometry must still build
    "big failing LV": ("dcm", {"lv_edv": 460, "lv_ef": 12, "lvm": 150, "rv_edv": 300, "rv_ef": 15}),
    "small hypertrophic LV": ("hcm", {"lv_edv": 55, "lv_ef": 82, "lvm": 340, "rv_edv": 55,
                                      "rv_ef": 76}),
    "huge RV, small LV": ("rv", {"lv_edv": 55, "lv_ef": 50, "lvm": 40, "rv_edv": 460,
                                 "rv_ef": 15}),
    "huge atria": ("atrial", {"la_max": 230, "la_ef": 10, "ra_max": 250, "ra_ef": 72}),
    "small atria": ("healthy", {"la_max": 25, "la_ef": 78, "ra_max": 25, "ra_ef": 8}),
}  # fmt: skip


@pytest.mark.parametrize("case", EXTREMES)
def test_geometry_builds_the_extreme_targets(case):
    group, extreme = EXTREMES[case]
    typical = {"lv_edv": 150, "lv_ef": 58, "lvm": 90, "rv_edv": 160, "rv_ef": 56,
               "la_max": 70, "la_ef": 60, "ra_max": 80, "ra_ef": 47}  # fmt: skip
    targets = {**typical, **extreme}
    heart = phantom_heart.sample_heart(np.random.default_rng(7), 20, targets, group)
    truth = phantom_heart.true_phenotypes(heart, 60.0)
    for target, name in TARGETS.items():
        if name.endswith("(%)"):
            assert truth[name] == pytest.approx(targets[target], abs=0.3), name
        else:
            assert truth[name] == pytest.approx(targets[target], rel=0.005), name
    wall = heart.lv_epi.semi_axes - heart.lv_endo.semi_axes
    assert np.all(wall > 1.0) and np.all(heart.lv_endo.semi_axes > 3.0)
    assert np.all(heart.rv.semi_axes > 3.0)


def test_exams_are_deterministic_and_independent_of_order():
    later_first = phantom.make_exam(CONFIG, 5)
    again = [phantom.make_exam(CONFIG, index) for index in (4, 5)][1]
    for key in ("images", "labels", "phenotypes", "frame_duration"):
        np.testing.assert_array_equal(later_first[key], again[key])
    other = phantom.make_exam(CONFIG, 4)
    assert not np.array_equal(other["phenotypes"], again["phenotypes"])
    # The subject does not depend on the image size; the seed changes it.
    small = phantom.sample_subject(dataclasses.replace(CONFIG, size=32), 5)
    np.testing.assert_array_equal(small.phenotypes, again["phenotypes"])
    reseeded = phantom.sample_subject(dataclasses.replace(CONFIG, seed=4), 5)
    assert not np.array_equal(reseeded.phenotypes, again["phenotypes"])


def test_small_exams_keep_the_heart_in_view():
    config = phantom.PhantomConfig(size=32, frames=10, seed=1)
    exam = phantom.make_exam(config, 0)
    assert exam["images"].shape == (9, 10, 32, 32)
    for plane in layout.SHORT_AXIS_PLANES:
        assert (exam["labels"][plane, 0] == layout.LV_BLOOD_POOL).any()
    assert (exam["labels"][layout.LA_4CH] == layout.RA).any()


def test_plane_affines_match_pixel_positions():
    subject = phantom.sample_subject(CONFIG, 0)
    planes = phantom.exam_planes(CONFIG, subject)
    affines = phantom.plane_affines(CONFIG, subject)
    world = planes.world_coordinates()
    for plane, name in enumerate(layout.PLANE_NAMES):
        voxel = np.array([7.0, 30.0, 0.0, 1.0])
        np.testing.assert_allclose((affines[name] @ voxel)[:3], world[plane, 7, 30], atol=1e-3)
    # The short-axis stack steps 10 mm towards the apex, perpendicular to its planes.
    step = affines["sa"][:3, 2]
    assert np.linalg.norm(step) == pytest.approx(CONFIG.slice_spacing_mm)
    assert step @ subject.planning.rotation[:, 2] < -9.9
    # 2ch and 4ch are (nearly) orthogonal, both contain the long axis (up to planning tilt).
    normals = planes.normal
    assert abs(normals[layout.LA_2CH] @ normals[layout.LA_4CH]) < math.sin(math.radians(10))
    assert abs(normals[layout.LA_4CH] @ subject.planning.rotation[:, 2]) < 0.15


@pytest.mark.parametrize(
    ("index", "group"), [(0, "healthy"), (1, "dcm"), (7, "hcm"), (3, "rv"), (9, "atrial")]
)
def test_recomputed_phenotypes_agree_with_true_geometry(index, group):
    """Disc summation on a fine (3 mm) short-axis stack and area-length on the 2ch/4ch
    recover the continuous truth, for one subject of each population group. Tolerances:
    ventricles are exact up to pixel/slice discretisation (~1-3 %; the stroke volume's
    share grows as 1/EF, so an LVEF near 20 % can take LVCO past 5 %); area-length is exact
    for the LA (planes through its axes) but for the base-plane truncation and ~4 deg
    planning tilts (~5 %); single-plane RA also assumes its two minor axes equal (they
    differ by up to 6 %)."""
    config = phantom.PhantomConfig(size=64, frames=6, seed=0)
    subject = phantom.sample_subject(config, index)
    assert subject.group == group
    apex = subject.heart.lv_epi.centre[0, 2] - subject.heart.lv_epi.semi_axes[0, 2]
    step = 3.0
    num_slices = math.ceil((10 - apex) / step) + 1
    _, seg_sa, planes = phantom.render_short_axis_stack(config, subject, num_slices, 5.0, step)
    exam = phantom.make_exam(config, index)
    result = phenotypes.phenotypes_from_segmentations(
        seg_sa,
        exam["labels"][layout.LA_2CH],
        exam["labels"][layout.LA_4CH],
        sa_pixel_spacing=planes.pixel_spacing[0],
        slice_spacing=step,
        la_2ch_pixel_spacing=exam["pixel_spacing"][layout.LA_2CH],
        la_4ch_pixel_spacing=exam["pixel_spacing"][layout.LA_4CH],
        frame_duration=float(exam["frame_duration"]),
    )
    truth = dict(zip(layout.PHENOTYPE_COLUMNS, subject.phenotypes.tolist(), strict=True))
    relative = {
        "LVEDV (mL)": 0.04, "LVESV (mL)": 0.06, "LVM (g)": 0.06, "LVCO (L/min)": 0.05,
        "RVEDV (mL)": 0.04, "RVESV (mL)": 0.06,
        "LAV max (mL)": 0.1, "LAV min (mL)": 0.1, "RAV max (mL)": 0.12, "RAV min (mL)": 0.12,
    }  # fmt: skip
    for name, tolerance in relative.items():
        assert result[name] == pytest.approx(truth[name], rel=tolerance), name
    absolute = {"LVEF (%)": 3.0, "RVEF (%)": 3.0, "LAEF (%)": 6.0, "RAEF (%)": 6.0}
    for name, tolerance in absolute.items():
        assert result[name] == pytest.approx(truth[name], abs=tolerance), name


def test_default_field_of_view_per_view_and_size():
    for view in ("short_axis", "long_axis"):
        assert phantom.default_fov_mm(view, 128) == 210.0  # the reference crop
        assert phantom.default_fov_mm(view, 256) == 210.0  # finer pixels, same framing
        fovs = [phantom.default_fov_mm(view, size) for size in (16, 32, 48, 64, 96, 112, 128)]
        assert fovs == sorted(fovs) and fovs[0] == phantom.TIGHT_FOV_MM[view]
    assert phantom.default_fov_mm("short_axis", 32) < phantom.default_fov_mm("long_axis", 32)
    config = phantom.PhantomConfig(size=32)
    assert config.view_fov_mm("short_axis") == phantom.TIGHT_FOV_MM["short_axis"]
    both = dataclasses.replace(config, fov_mm=180.0)
    assert both.view_fov_mm("short_axis") == both.view_fov_mm("long_axis") == 180.0
    own = dataclasses.replace(both, short_axis_fov_mm=100.0)
    assert own.view_fov_mm("short_axis") == 100.0 and own.view_fov_mm("long_axis") == 180.0
    exam = phantom.make_exam(dataclasses.replace(own, frames=2), 0)
    np.testing.assert_allclose(exam["pixel_spacing"][list(layout.SHORT_AXIS_PLANES)], 100 / 32)
    np.testing.assert_allclose(exam["pixel_spacing"][list(layout.LONG_AXIS_PLANES)], 180 / 32)


def test_short_axis_framing_fills_the_image():
    """At 32 pixels the default framing shows the LV (pool + wall) over the area its
    geometry predicts, ~2x larger than the old 210 mm field, with the heart in view."""
    config = phantom.PhantomConfig(size=32, frames=4, seed=5)
    fractions, old_fractions = [], []
    for index in range(6):
        subject = phantom.sample_subject(config, index)
        planes = phantom.exam_planes(config, subject)
        short_axis = list(layout.SHORT_AXIS_PLANES)
        views = ("la_2ch", "la_3ch", "la_4ch") + ("short_axis",) * len(short_axis)
        _, labels = phantom.render_planes(subject, planes, views, np.random.default_rng(0))
        lv = np.isin(labels[short_axis, 0], (layout.LV_BLOOD_POOL, layout.LV_MYOCARDIUM))
        # The LV epicardium's cross-section at each plane's centre height (ED).
        heart, planning = subject.heart, subject.planning
        height = (planes.centre[short_axis] - planning.origin) @ planning.rotation[:, 2]
        (a, b, c), centre_z = heart.lv_epi.semi_axes[0], heart.lv_epi.centre[0, 2]
        area = math.pi * a * b * np.clip(1 - ((height - centre_z) / c) ** 2, 0, None)
        fov = config.view_fov_mm("short_axis")
        expected = area / fov**2  # of the image
        measured = lv.mean((1, 2))
        basal = expected > 0.05  # planes through the LV's wide part (not near the apex)
        np.testing.assert_allclose(measured[basal], expected[basal], rtol=0.2)
        fractions.append(measured[:3].mean())
        old_fractions.append((expected * (fov / 210.0) ** 2)[:3].mean())
        border = np.concatenate(
            [labels[..., 0, :], labels[..., -1, :], labels[..., 0], labels[..., -1]], -1
        )
        assert not border.any(), index
    assert 0.1 < np.mean(fractions) < 0.3  # the LV ~40 % of the image across
    assert np.mean(fractions) > 2 * np.mean(old_fractions)
