"""Reading and preprocessing one UK Biobank-layout exam folder (whmae.data.ingest.nifti_exam)."""

import gzip
import shutil
import zlib

import nibabel as nib
import numpy as np
import pytest
from ukbb_fixtures import (
    ISOLATED_NANS,
    apply_grid_symmetry,
    break_exam,
    keep_short_axis_slices,
    make_exam_folder,
    reorient_exam_folder,
)

from whmae import layout
from whmae.data.ingest import label_maps, nifti_io
from whmae.data.ingest.nifti_exam import (
    IDENTITY_ORIENTATION,
    MAX_REPAIRED_FRACTION,
    ORIENTATION_VERSION,
    ExamError,
    canonical_orientation,
    crop,
    crop_offsets,
    frame_duration_seconds,
    orient,
    preprocess_exam,
    repair_nonfinite,
    resample_time,
    restore_labels,
    select_short_axis_slices,
    unorient,
)

SA = list(layout.SHORT_AXIS_PLANES)
# (eid, phantom index, matrix, frames T, slices Z, time unit of the header)
FOLDERS = (
    ("2000001", 1, 64, 50, 12, "sec"),
    ("2000002", 2, 80, 30, 9, "msec"),
    ("2000003", 3, 48, 30, 14, "sec"),
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{eid: (folder, truth)} of three phantom exams with oblique affines."""
    root = tmp_path_factory.mktemp("ukbb")
    out = {}
    for eid, index, size, frames, slices, unit in FOLDERS:
        truth = make_exam_folder(
            root, eid, index, size=size, frames=frames, num_slices=slices, time_unit=unit
        )
        out[eid] = (root / eid, truth)
    return out


def canonical(volume: np.ndarray, geometry: dict, view: str = "sa") -> np.ndarray:
    """A file-grid [..., H, W] truth in the record's canonical orientation."""
    return orient(volume, geometry["views"][view]["orientation"])


def reference_window(labels_sa: np.ndarray) -> list[int]:
    """The reference rule written out independently: first LV slice at ED + 2, clamped."""
    first = next(z for z in range(len(labels_sa)) if (labels_sa[z, 0] == 1).any())
    start = min(first + 2, len(labels_sa) - 6)
    return list(range(start, start + 6))


def test_header_geometry_spacing_and_frame_duration(folders):
    for eid, (folder, truth) in folders.items():
        exam, geometry = preprocess_exam(folder, frames=50, size=40)
        frames = truth["labels_sa"].shape[1]
        sa = geometry["views"]["sa"]
        assert sa["frames"] == frames and sa["shape"][2] == truth["labels_sa"].shape[0]
        assert sa["frame_duration"] == pytest.approx(truth["frame_duration"], rel=1e-5)
        # 50 resampled frames span the same cycle: duration scales by T / 50.
        expected = truth["frame_duration"] * frames / 50
        assert float(exam["frame_duration"]) == pytest.approx(expected, rel=1e-5), eid
        np.testing.assert_allclose(exam["pixel_spacing"], truth["pixel_spacing"], rtol=1e-5)
        assert float(exam["slice_spacing"]) == pytest.approx(truth["slice_spacing"], rel=1e-4)
        # The header's oblique affine is kept: its slice column is the slice step.
        affine = np.array(sa["affine"])
        assert np.linalg.norm(affine[:3, 2]) == pytest.approx(truth["slice_spacing"], rel=1e-4)
        assert np.abs(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))).max() > 0.1
        assert exam["plane_mask"].all()
        every_frame = np.broadcast_to([1, 0, 1, 1, 1, 1, 1, 1, 1], (50, 9)).T  # ukbb
        np.testing.assert_array_equal(exam["label_mask"], every_frame)


def test_reference_slices_and_crop_keep_the_whole_heart(folders):
    for eid, (folder, truth) in folders.items():
        labels_sa = truth["labels_sa"]
        exam, geometry = preprocess_exam(folder, frames=labels_sa.shape[1], size=40)
        window = reference_window(labels_sa)
        assert geometry["views"]["sa"]["slices"] == window, eid
        row, col = geometry["views"]["sa"]["crop"]
        expected = crop(canonical(labels_sa[window], geometry), row, col, 40)
        np.testing.assert_array_equal(exam["labels"][SA], expected)
        # Nothing of the heart is cut off in the chosen slices (40 px crop of a 48-80 matrix).
        counts = [(labels_sa[window] == c).sum() for c in (1, 2, 3)]
        assert [(exam["labels"][SA] == c).sum() for c in (1, 2, 3)] == counts
        # Images are the same pixels, min-max normalised: bright where the truth is bright.
        images = crop(canonical(truth["images_sa"][window], geometry).astype(float), row, col, 40)
        assert np.corrcoef(images.ravel(), exam["images"][SA].ravel())[0, 1] > 0.999


def test_slice_rules_on_hand_made_stacks():
    seg = np.zeros((10, 2, 4, 4), np.uint8)
    seg[3:8, 0, 1, 1] = layout.LV_BLOOD_POOL
    assert select_short_axis_slices(seg, 10, "reference") == ([4, 5, 6, 7, 8, 9], "reference")
    assert select_short_axis_slices(seg, 10, "lv_centre") == ([2, 3, 4, 5, 6, 7], "lv_centre")
    assert select_short_axis_slices(seg, 10, "centre") == ([2, 3, 4, 5, 6, 7], "centre")
    seg14 = np.zeros((14, 2, 4, 4), np.uint8)
    seg14[1:9, 0, 1, 1] = layout.LV_BLOOD_POOL
    seg14[0, 1, 1, 1] = layout.LV_BLOOD_POOL  # LV only at frame 1 does not count
    assert select_short_axis_slices(seg14, 14, "reference")[0] == [3, 4, 5, 6, 7, 8]
    # No LV at frame 0 (or no segmentation): fall back to the stack centre.
    late = np.zeros_like(seg14)
    late[:, 1, 1, 1] = layout.LV_BLOOD_POOL
    assert select_short_axis_slices(late, 14, "reference") == (list(range(4, 10)), "centre")
    assert select_short_axis_slices(None, 7, "reference") == (list(range(0, 6)), "centre")
    # A partial stack: the same rule, the window shifted to hold the whole stack; indices
    # outside the stack are the planes it does not reach.
    assert select_short_axis_slices(None, 5, "centre") == (list(range(-1, 5)), "centre")
    assert select_short_axis_slices(None, 3, "centre") == (list(range(-2, 4)), "centre")
    seg4 = np.zeros((4, 2, 4, 4), np.uint8)
    seg4[:, 0, 1, 1] = layout.LV_BLOOD_POOL
    assert select_short_axis_slices(seg4, 4, "reference") == (list(range(0, 6)), "reference")
    assert select_short_axis_slices(seg4, 4, "lv_centre") == (list(range(-1, 5)), "lv_centre")
    seg4[1:] = 0  # LV only in the first (basal) slice: the window ends with the stack
    assert select_short_axis_slices(seg4, 4, "lv_centre") == (list(range(-2, 4)), "lv_centre")
    with pytest.raises(ExamError, match="only 2 short-axis slices, need at least 3"):
        select_short_axis_slices(None, 2, "centre")


def test_crop_offsets_pad_and_clamp():
    mask = np.zeros((30, 50), bool)
    mask[2:6, 40:48] = True  # near the top-right corner
    assert crop_offsets(mask, 30, 50, 20) == (0, 30)  # clamped inside the image
    assert crop_offsets(None, 30, 50, 20) == (5, 15)
    assert crop_offsets(mask, 30, 50, 40) == (-5, 10)  # rows padded, image centred
    # Labels [Z, T, H, W]: the bounding box of the union over slices and frames.
    labels = np.zeros((3, 4, 30, 50), np.uint8)
    labels[0, 1, 2:4, 40:44] = 2
    labels[2, 3, 5, 45:48] = 5
    assert crop_offsets(labels, 30, 50, 20) == (0, 30)
    assert crop_offsets(labels, 30, 50, 40) == (-5, 10)
    assert crop_offsets(labels[:, :, :, :20] * 0, 30, 20, 10) == (10, 5)  # none: centred
    labels[1, 0, 20, 10] = 1  # one voxel further down-left widens the box
    assert crop_offsets(labels, 30, 50, 20) == (1, 19)
    image = np.arange(30 * 50).reshape(30, 50)
    padded = crop(image, -5, 10, 40, fill=-1)
    np.testing.assert_array_equal(padded[5:35], image[:, 10:50])
    assert (padded[:5] == -1).all() and (padded[35:] == -1).all()


def test_resample_time_is_periodic_linear_and_nearest_for_labels():
    t = np.arange(30, dtype=np.float32)
    signal = np.sin(2 * np.pi * t / 30)[:, None, None]
    resampled = resample_time(signal, 50)
    truth = np.sin(2 * np.pi * np.arange(50) * 0.6 / 30)
    assert np.abs(resampled[:, 0, 0] - truth).max() < 0.01  # linear interpolation error
    ramp = resample_time(t[:, None, None], 50)[:, 0, 0]
    np.testing.assert_allclose(ramp[:-1], np.arange(49) * 0.6, atol=1e-5)
    assert ramp[-1] == pytest.approx(0.6 * 29 + 0.4 * 0, abs=1e-4)  # wraps to frame 0
    labels = resample_time(t.astype(np.uint8)[:, None, None], 50, labels=True)[:, 0, 0]
    np.testing.assert_array_equal(labels, np.rint(np.arange(50) * 0.6).astype(int) % 30)


def test_frames_resampled_from_30_to_50(folders):
    folder, truth = folders["2000002"]  # T = 30
    exam, geometry = preprocess_exam(folder, frames=50, size=40)
    window, (row, col) = geometry["views"]["sa"]["slices"], geometry["views"]["sa"]["crop"]
    nearest = np.rint(np.arange(50) * 30 / 50).astype(int) % 30
    expected = crop(canonical(truth["labels_sa"][window][:, nearest], geometry), row, col, 40)
    np.testing.assert_array_equal(exam["labels"][SA], expected)
    assert exam["images"].shape == (9, 50, 40, 40)


def test_restore_labels_round_trip(folders):
    for eid, (folder, _) in folders.items():
        exam, geometry = preprocess_exam(folder, frames=50, size=40)
        restored = restore_labels(exam["labels"], geometry)
        for view in ("sa", "la_2ch", "la_4ch"):
            seg = np.asanyarray(nib.load(str(folder / f"seg_{view}.nii.gz")).dataobj)
            assert restored[view].shape == seg.shape, (eid, view)
            g = geometry["views"][view]
            row, col = g["crop"]
            # The crop is in the canonical grid: marked there, then back to (X, Y, Z, T).
            z, t, height, width = canonical(seg.transpose(2, 3, 1, 0), geometry, view).shape
            inside = np.zeros((z, t, height, width), bool)
            inside[g["slices"], :, max(row, 0) : row + 40, max(col, 0) : col + 40] = True
            inside = unorient(inside, g["orientation"]).transpose(3, 2, 0, 1)
            np.testing.assert_array_equal(restored[view][inside], seg[inside], err_msg=eid)
            assert not restored[view][~inside].any()
        # The whole heart was inside the crop, so the SA window restores exactly.
        window = geometry["views"]["sa"]["slices"]
        seg_sa = np.asanyarray(nib.load(str(folder / "seg_sa.nii.gz")).dataobj)
        np.testing.assert_array_equal(restored["sa"][:, :, window], seg_sa[:, :, window])
        assert restored["la_3ch"].shape == tuple(geometry["views"]["la_3ch"]["shape"])


def test_padding_when_the_matrix_is_smaller_than_the_crop(folders):
    folder, truth = folders["2000003"]  # 48 x 48
    exam, geometry = preprocess_exam(folder, frames=30, size=64)
    assert geometry["views"]["sa"]["crop"] == [-8, -8]
    window = geometry["views"]["sa"]["slices"]
    expected = canonical(truth["labels_sa"][window], geometry)
    np.testing.assert_array_equal(exam["labels"][SA][..., 8:56, 8:56], expected)
    border = exam["images"][SA][..., :8, :]
    assert border.max() == 0  # padding is the image minimum, i.e. 0 after min-max


def test_label_conventions_acdc_and_mnms(tmp_path):
    ukbb = make_exam_folder(tmp_path / "ukbb", "1", 5, size=48, frames=20, long_axis=False)
    make_exam_folder(
        tmp_path / "acdc", "1", 5, size=48, frames=20, convention="acdc", long_axis=False
    )
    make_exam_folder(
        tmp_path / "mnms", "1", 5, size=48, frames=20, convention="mnms", long_axis=False
    )
    acdc_file = np.asanyarray(nib.load(str(tmp_path / "acdc/1/seg_sa.nii.gz")).dataobj)
    ukbb_file = np.asanyarray(nib.load(str(tmp_path / "ukbb/1/seg_sa.nii.gz")).dataobj)
    np.testing.assert_array_equal(acdc_file == 1, ukbb_file == 3)  # ACDC 1 is the RV
    reference, _ = preprocess_exam(tmp_path / "ukbb/1", frames=20, size=40)
    for convention in ("acdc", "mnms"):
        exam, geometry = preprocess_exam(
            tmp_path / convention / "1", frames=20, size=40, label_convention=convention
        )
        np.testing.assert_array_equal(exam["labels"], reference["labels"])
        assert (exam["labels"][SA] == layout.RV_BLOOD_POOL).any()
        # Long-axis views are absent: planes masked, not zero-filled "present" planes.
        assert not exam["plane_mask"][:3].any() and not exam["label_mask"][:3].any()
        assert "la_2ch.nii.gz: missing" in geometry["absent"]
        file_labels = restore_labels(exam["labels"], geometry)["sa"]
        window = geometry["views"]["sa"]["slices"]
        written = np.asanyarray(nib.load(str(tmp_path / convention / "1/seg_sa.nii.gz")).dataobj)
        np.testing.assert_array_equal(file_labels[:, :, window], written[:, :, window])
    # Reading ACDC files as UK Biobank would swap LV and RV: the convention matters.
    wrong, _ = preprocess_exam(tmp_path / "acdc/1", frames=20, size=40)
    assert not np.array_equal(wrong["labels"], reference["labels"])
    assert ukbb["labels_sa"].max() == 3


def test_remap_labels_rejects_unknown_values():
    np.testing.assert_array_equal(
        label_maps.remap_labels(np.array([0, 1, 2]), "la_4ch"), [0, layout.LA, layout.RA]
    )
    with pytest.raises(ValueError, match=r"unexpected label values \[4\]"):
        label_maps.remap_labels(np.array([0, 1, 4]), "sa")
    with pytest.raises(ValueError, match="non-integer"):
        label_maps.remap_labels(np.array([0.0, 0.5]), "sa")
    with pytest.raises(ValueError, match="unknown label convention"):
        label_maps.remap_labels(np.array([0]), "sa", "kaggle")


def test_identity_label_map_returns_a_copy_not_the_file_buffer():
    seg = np.array([[0, 1], [2, 3]], np.uint8)
    out = label_maps.remap_labels(seg, "sa", "ukbb")  # UK Biobank sa labels = layout classes
    np.testing.assert_array_equal(out, seg)
    assert out.dtype == np.uint8 and not np.shares_memory(out, seg)
    acdc = label_maps.remap_labels(seg, "sa", "acdc")
    np.testing.assert_array_equal(acdc, [[0, layout.RV_BLOOD_POOL], [2, layout.LV_BLOOD_POOL]])


def _inflate_backends():
    """(libdeflate or None, streaming inflater, its errors): zlib, and libdeflate and
    python-isal when installed (the `fast` extra): all must behave the same."""
    backends = [(None, zlib, (zlib.error,))]
    try:
        import deflate

        backends.append((deflate, zlib, (zlib.error,)))
    except ImportError:
        pass
    try:
        from isal import isal_zlib

        backends.append((None, isal_zlib, (zlib.error, isal_zlib.error)))
    except ImportError:
        pass
    return backends


def test_inflate_backends_give_the_same_exam_and_name_truncated_files(
    folders, tmp_path, monkeypatch
):
    folder = folders["2000001"][0]
    expected, _ = preprocess_exam(folder, frames=20, size=40)
    damaged = tmp_path / "2000001"
    shutil.copytree(folder, damaged)
    reason = break_exam(damaged, "truncated_sa")
    for libdeflate, module, errors in _inflate_backends():
        monkeypatch.setattr(nifti_io, "_libdeflate", libdeflate)
        monkeypatch.setattr(nifti_io, "_inflater", module)
        monkeypatch.setattr(nifti_io, "_INFLATE_ERRORS", errors)
        name = f"{libdeflate and libdeflate.__name__} then {module.__name__}"
        exam, _ = preprocess_exam(folder, frames=20, size=40)
        for field in ("images", "labels", "pixel_spacing"):
            np.testing.assert_array_equal(exam[field], expected[field], err_msg=name)
        with pytest.raises(ExamError, match=f"^{reason}"):
            preprocess_exam(damaged, frames=20, size=40)


def test_inflate_gzip_takes_several_members_like_zlib():
    """libdeflate refuses a second gzip member; the fallback then reads the first one."""
    first, second = b"NIfTI bytes " * 100, b"trailing member"
    data = gzip.compress(first) + gzip.compress(second)
    assert nifti_io.inflate_gzip(data) == zlib.decompress(data, wbits=31) == first


def test_frame_duration_units():
    info = {"zooms": [1.8, 1.8, 10.0, 0.0], "time_unit": "unknown"}
    assert np.isnan(frame_duration_seconds(info))
    assert frame_duration_seconds({**info, "zooms": [1, 1, 1, 35.0]}) == pytest.approx(0.035)
    assert frame_duration_seconds({**info, "zooms": [1, 1, 1, 0.03]}) == pytest.approx(0.03)
    assert np.isnan(frame_duration_seconds({**info, "zooms": [1, 1, 1, 1.0]}))
    ms = {"zooms": [1, 1, 1, 30.0], "time_unit": "msec"}
    assert frame_duration_seconds(ms) == pytest.approx(0.03)
    assert frame_duration_seconds({**ms, "time_unit": "sec"}) == pytest.approx(0.03)  # a slip
    assert frame_duration_seconds({**ms, "zooms": [1, 1, 1, 0.04], "time_unit": "sec"}) == 0.04
    assert np.isnan(frame_duration_seconds({**ms, "zooms": [1, 1, 1, 2000.0]}))


@pytest.mark.parametrize(
    "how", ["missing_sa", "truncated_sa", "nan_sa", "blank_sa", "few_slices", "sa_3d"]
)
def test_broken_short_axis_is_rejected_with_the_file_named(tmp_path, how):
    make_exam_folder(tmp_path, "3", 7, size=48, frames=20, long_axis=False)
    reason = break_exam(tmp_path / "3", how)
    with pytest.raises(ExamError) as error:
        preprocess_exam(tmp_path / "3", frames=20, size=40)
    assert str(error.value).startswith(reason)


def test_repair_nonfinite_fills_isolated_voxels_from_their_neighbours():
    view = np.arange(2 * 1 * 5 * 5, dtype=np.float32).reshape(2, 1, 5, 5)
    view[0, 0, 2, 2], view[1, 0, 0, 0], view[1, 0, 0, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(ExamError, match=r"^x: NaN values in 3 voxels \(6.000% of the view\)"):
        repair_nonfinite(view, "x")  # 3 of 50 voxels: over the threshold
    big = np.tile(np.arange(50, dtype=np.float32).reshape(2, 1, 5, 5), (1, 20, 1, 1))
    big[0, 0, 2, 2], big[1, 0, 0, 0], big[1, 0, 0, 1] = np.nan, np.inf, -np.inf  # 0.3 %
    repaired, count = repair_nonfinite(big, "x")
    assert count == 3 and np.isfinite(repaired).all() and np.isnan(big[0, 0, 2, 2])
    assert repaired[0, 0, 2, 2] == 12.0  # the mean of its 8 neighbours in arange(25)
    assert repaired[1, 0, 0, 0] == (30 + 31) / 2  # finite neighbours only (26 is -inf)
    assert repaired[1, 0, 0, 1] == pytest.approx((27 + 30 + 31 + 32) / 4)
    unchanged = np.isfinite(big)
    np.testing.assert_array_equal(repaired[unchanged], big[unchanged])
    cluster = np.tile(np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5), (1, 400, 1, 1))
    cluster[0, 0, 1:4, 1:4] = np.nan  # 9 of 10000 voxels, but the centre has no finite one
    with pytest.raises(ExamError, match="no finite in-plane neighbour"):
        repair_nonfinite(cluster, "x")
    assert MAX_REPAIRED_FRACTION == 0.005


def test_isolated_nan_voxels_are_repaired_and_recorded(tmp_path):
    make_exam_folder(tmp_path, "7", 7, size=48, frames=20, num_slices=10)
    clean, _ = preprocess_exam(tmp_path / "7", frames=20, size=48, slice_rule="centre")
    reason = break_exam(tmp_path / "7", "nan_sa_isolated")
    exam, geometry = preprocess_exam(tmp_path / "7", frames=20, size=48, slice_rule="centre")
    fraction = len(ISOLATED_NANS) / (48 * 48 * 10 * 20)
    assert geometry["warnings"] == [
        f"{reason} ({fraction:.3%}) repaired from their in-plane neighbours"
    ]
    assert geometry["views"]["sa"]["repaired_voxels"] == len(ISOLATED_NANS)
    differ = np.argwhere(exam["images"] != clean["images"])  # [plane, t, row, col]
    slices = geometry["views"]["sa"]["slices"]
    repaired = np.zeros((10, 20, 48, 48), bool)  # the file's [Z, T, H = Y, W = X]
    for x, y, z, t in ISOLATED_NANS:
        repaired[z, t, y, x] = True
    planes = np.zeros((9, 20, 48, 48), bool)  # the crop is the whole (canonical) image
    planes[SA] = canonical(repaired, geometry)[slices]
    inside = {tuple(v) for v in np.argwhere(planes)}
    assert {tuple(d) for d in differ} <= inside  # only the repaired voxels can change
    assert np.abs(exam["images"].astype(int) - clean["images"]).max() < 40


def test_too_many_nan_voxels_drop_a_long_axis_view(tmp_path):
    make_exam_folder(tmp_path, "8", 8, size=48, frames=20)
    path = tmp_path / "8" / "la_2ch.nii.gz"
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[:, :, 0, 3] = np.nan  # one whole frame of 20: 5 %
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    exam, geometry = preprocess_exam(tmp_path / "8", frames=20, size=40)
    assert not exam["plane_mask"][0] and exam["plane_mask"][1:].all()
    assert geometry["absent"] == [
        "la_2ch.nii.gz: NaN values in 2304 voxels (5.000% of the view), more than the 0.5% "
        "that are repaired"
    ]


def test_broken_long_axis_and_segmentation_become_absent(tmp_path):
    make_exam_folder(tmp_path, "4", 8, size=48, frames=20)
    break_exam(tmp_path / "4", "la_4ch_wrong_dims")
    break_exam(tmp_path / "4", "missing_seg_sa")
    exam, geometry = preprocess_exam(tmp_path / "4", frames=20, size=40)
    np.testing.assert_array_equal(exam["plane_mask"], [1, 1, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(
        exam["label_mask"].T, np.broadcast_to([1, 0, 0, 0, 0, 0, 0, 0, 0], (20, 9))
    )
    assert not exam["images"][2].any() and not exam["labels"][SA].any()
    assert np.isnan(exam["pixel_spacing"][2]).all()
    assert geometry["absent"][0].startswith("la_4ch.nii.gz: expected 4-D (X, Y, 1, T)")
    assert "slice rule reference fell back to centre" in geometry["warnings"]
    assert geometry["views"]["sa"]["slices"] == [2, 3, 4, 5, 6, 7]  # centre of 10


def test_a_blank_crop_rejects_the_exam_or_drops_the_long_axis_plane(tmp_path):
    """Blank = one value throughout the crop, whatever lies outside it: a constant long-axis
    file drops its plane; a short-axis stack with signal only in a far corner is rejected."""
    make_exam_folder(tmp_path, "6", 10, size=48, frames=20)

    def rewrite(name, edit):
        image = nib.load(str(tmp_path / "6" / name))
        data = np.full(image.shape, 5, image.get_data_dtype())
        edit(data)
        nib.save(nib.Nifti1Image(data, image.affine, image.header), str(tmp_path / "6" / name))

    rewrite("la_2ch.nii.gz", lambda data: None)
    exam, geometry = preprocess_exam(tmp_path / "6", frames=20, size=20)
    np.testing.assert_array_equal(exam["plane_mask"], [0, 1, 1, 1, 1, 1, 1, 1, 1])
    assert geometry["absent"] == ["la_2ch.nii.gz: blank image (constant 5 in the 20x20 crop)"]

    rewrite("sa.nii.gz", lambda data: data.__setitem__((slice(0, 3), slice(0, 3)), 900))
    with pytest.raises(ExamError, match=r"^sa.nii.gz: blank image \(constant 5 in the 20x20"):
        preprocess_exam(tmp_path / "6", frames=20, size=20)
    assert preprocess_exam(tmp_path / "6", frames=20, size=48)[0]["images"][SA].any()


def test_unexpected_segmentation_values_leave_the_plane_unlabelled(tmp_path):
    make_exam_folder(tmp_path, "5", 9, size=48, frames=20, long_axis=False)
    path = tmp_path / "5" / "seg_sa.nii.gz"
    seg = nib.load(str(path))
    data = np.asanyarray(seg.dataobj).copy()
    data[0, 0, 0, 0] = 7  # a label value outside the UK Biobank convention, at ED
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), str(path))
    exam, geometry = preprocess_exam(tmp_path / "5", frames=20, size=40)
    assert exam["plane_mask"][SA].all() and not exam["label_mask"][SA].any()
    assert geometry["warnings"][0].startswith("seg_sa.nii.gz: unexpected label values [7]")


def test_long_axis_crop_central_or_on_the_atria(folders):
    folder, truth = folders["2000002"]  # 80 x 80
    central, geometry = preprocess_exam(folder, frames=30, size=48)
    atria = canonical(truth["long_axis"]["la_4ch"] >= layout.LA, geometry, "la_4ch")  # [T, H, W]
    assert geometry["views"]["la_4ch"]["crop"] == [16, 16]
    exam, geometry = preprocess_exam(folder, frames=30, size=48, la_crop="label")
    row, col = geometry["views"]["la_4ch"]["crop"]
    rows, cols = np.flatnonzero(atria.any((0, 2))), np.flatnonzero(atria.any((0, 1)))
    centre = ((rows[0] + rows[-1] + 1) // 2 - 24, (cols[0] + cols[-1] + 1) // 2 - 24)
    assert (row, col) == tuple(int(np.clip(c, 0, 32)) for c in centre)
    # Centred on the atria, a crop larger than their extent keeps all of them.
    assert rows[-1] - rows[0] < 48 and cols[-1] - cols[0] < 48
    assert (exam["labels"][layout.LA_4CH] >= layout.LA).sum() == atria.sum()
    np.testing.assert_array_equal(exam["labels"][SA], central["labels"][SA])


@pytest.mark.parametrize(
    # rule, the full stack's first slice kept, the partial window's planes holding the stack
    ("rule", "first", "planes"),
    [
        ("centre", 3, [1, 2, 3, 4]),  # 4 slices centred: window starts one slice early
        ("reference", 2, [0, 1, 2, 3]),  # LV from slice 0: window from slice 0 + 2
    ],
)
def test_a_partial_stack_keeps_its_planes_where_the_slice_rule_puts_them(
    tmp_path, rule, first, planes
):
    make_exam_folder(tmp_path / "full", "4", 8, size=48, frames=20, num_slices=10)
    shutil.copytree(tmp_path / "full/4", tmp_path / "partial/4")
    if first == 3:
        reason = break_exam(tmp_path / "partial/4", "partial_sa")  # slices 3..6 of the 10
    else:
        keep_short_axis_slices(tmp_path / "partial/4", first, 4)
        reason = "sa.nii.gz: partial stack of 4 short-axis slices"
    # size = the matrix: both crops are the whole image, so the pixels line up.
    full, full_geometry = preprocess_exam(tmp_path / "full/4", frames=20, size=48, slice_rule=rule)
    exam, geometry = preprocess_exam(tmp_path / "partial/4", frames=20, size=48, slice_rule=rule)
    assert full_geometry["views"]["sa"]["slices"] == [2, 3, 4, 5, 6, 7]
    assert full_geometry["views"]["sa"]["slice_rule"] == geometry["views"]["sa"]["slice_rule"]
    # The full stack's slices first..first+3 sit at the same planes in both records.
    present = [SA[p] for p in planes]
    assert geometry["views"]["sa"]["planes"] == present
    assert geometry["views"]["sa"]["slices"] == [0, 1, 2, 3]
    assert [full_geometry["views"]["sa"]["slices"][p] for p in planes] == list(
        range(first, first + 4)
    )
    absent = [p for p in SA if p not in present]
    assert exam["plane_mask"].tolist() == [p not in absent for p in range(layout.NUM_PLANES)]
    assert not exam["label_mask"][absent].any() and exam["label_mask"][present].all()
    assert not exam["images"][absent].any() and not exam["labels"][absent].any()
    assert np.isnan(exam["pixel_spacing"][absent]).all()
    np.testing.assert_array_equal(exam["labels"][present], full["labels"][present])
    np.testing.assert_array_equal(exam["pixel_spacing"][present], full["pixel_spacing"][present])
    # Same pixels; uint8 levels agree up to the exam-wide min-max over fewer planes.
    image, reference = exam["images"][present].astype(float), full["images"][present]
    assert np.corrcoef(image.ravel(), reference.ravel())[0, 1] > 0.9999
    planes = ",".join(map(str, absent))
    assert geometry["absent"] == [f"{reason} (fewer than 6): planes '{planes}' absent"]
    # Predicted labels go back into the 4-slice file's own slices.
    restored = restore_labels(exam["labels"], geometry)["sa"]
    written = np.asanyarray(nib.load(str(tmp_path / "partial/4/seg_sa.nii.gz")).dataobj)
    slices = geometry["views"]["sa"]["slices"]
    np.testing.assert_array_equal(restored[:, :, slices], written[:, :, slices])


def test_too_short_a_stack_is_rejected_naming_subject_and_file(tmp_path):
    make_exam_folder(tmp_path, "5", 8, size=48, frames=20, num_slices=10)
    reason = break_exam(tmp_path / "5", "few_slices")
    with pytest.raises(ExamError, match="need at least 3") as error:
        preprocess_exam(tmp_path / "5", frames=20, size=48)
    assert str(error.value).startswith(reason) and "subject 5" in reason


FIELDS = ("images", "labels", "plane_mask", "label_mask", "pixel_spacing", "slice_spacing")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rotated_and_flipped_files_of_one_heart_give_the_same_record(folders, tmp_path, seed):
    eid = "2000002"  # 80 x 80, 30 frames
    folder, _ = folders[eid]
    symmetries = reorient_exam_folder(folder, tmp_path / eid, seed)
    reference, geometry = preprocess_exam(folder, frames=30, size=48)
    exam, moved = preprocess_exam(tmp_path / eid, frames=30, size=48)
    for field in FIELDS:
        np.testing.assert_array_equal(exam[field], reference[field], err_msg=f"{seed} {field}")
    assert exam["plane_mask"].all() and moved["orientation"] == ORIENTATION_VERSION
    # Some views are stored in another voxel order, so their transforms differ.
    transforms = [
        (geometry["views"][v]["orientation"], moved["views"][v]["orientation"]) for v in symmetries
    ]
    assert any(a != b for a, b in transforms), symmetries
    for view in symmetries:
        g, h = geometry["views"][view], moved["views"][view]
        assert h["crop"] == g["crop"] and h["slices"] == g["slices"], view
        # The stored transform differs with the file's voxel order, the result does not.
        file_view = np.asanyarray(nib.load(str(tmp_path / eid / f"{view}.nii.gz")).dataobj)
        original = np.asanyarray(nib.load(str(folder / f"{view}.nii.gz")).dataobj)
        np.testing.assert_array_equal(
            orient(file_view.transpose(2, 3, 1, 0), h["orientation"]),
            orient(original.transpose(2, 3, 1, 0), g["orientation"]),
        )
    # Labels go back into each file's own voxel order: the original's restored labels
    # under the same symmetry (and, inside the window, the file's segmentation itself).
    restored = restore_labels(exam["labels"], moved)
    expected = restore_labels(reference["labels"], geometry)
    for view, symmetry in symmetries.items():
        np.testing.assert_array_equal(
            restored[view], apply_grid_symmetry(expected[view], symmetry), err_msg=view
        )
    window = moved["views"]["sa"]["slices"]
    seg = np.asanyarray(nib.load(str(tmp_path / eid / "seg_sa.nii.gz")).dataobj)
    np.testing.assert_array_equal(restored["sa"][:, :, window], seg[:, :, window])


def test_canonical_orientation_points_columns_left_and_rows_down():
    # An axial plane stored with X toward the patient's right and Y anterior (RAS+):
    # canonical columns run toward the left (flip X), rows toward posterior (flip Y).
    axial = np.diag([1.0, 1.0, 1.0, 1.0])
    assert canonical_orientation(axial) == {
        "transpose": False,
        "flip_rows": True,
        "flip_cols": True,
    }
    # Already canonical: X toward the left, Y toward posterior-inferior.
    canonical_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert canonical_orientation(canonical_affine) == IDENTITY_ORIENTATION
    # X and Y swapped: a transpose.
    swapped = canonical_affine[:, [1, 0, 2, 3]]
    assert canonical_orientation(swapped)["transpose"]
    with pytest.raises(ValueError, match="degenerate"):
        canonical_orientation(np.zeros((4, 4)))
    view = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for transpose in (False, True):
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                o = {"transpose": transpose, "flip_rows": flip_rows, "flip_cols": flip_cols}
                np.testing.assert_array_equal(unorient(orient(view, o), o), view)


def test_geometry_without_orientation_is_the_files_and_a_newer_version_is_refused(folders):
    folder, _ = folders["2000001"]
    exam, geometry = preprocess_exam(folder, frames=50, size=40)
    restored = restore_labels(exam["labels"], geometry)
    # Before versioning, records kept each file's orientation: no transform to undo.
    old = {k: v for k, v in geometry.items() if k != "orientation"}
    old["views"] = {k: {**v, "orientation": None} for k, v in geometry["views"].items()}
    identity = {**geometry, "views": {
        k: {**v, "orientation": IDENTITY_ORIENTATION} for k, v in geometry["views"].items()
    }}  # fmt: skip
    for view, labels in restore_labels(exam["labels"], old).items():
        np.testing.assert_array_equal(labels, restore_labels(exam["labels"], identity)[view])
    assert any(v["orientation"] != IDENTITY_ORIENTATION for v in geometry["views"].values())
    assert any(
        not np.array_equal(restored[v], restore_labels(exam["labels"], identity)[v])
        for v in restored
    )
    with pytest.raises(ValueError, match="orientation version 2"):
        restore_labels(exam["labels"], {**geometry, "orientation": 2})
