"""Labels on some frames only (ACDC / M&Ms segment ED and ES): label_mask [9, T] from the
NIfTI folder through prepare's record to the metrics, validation Dice and phenotypes.
(The segmentation loss's per-frame weights: tests/test_segmentation.py; schema-1 records:
tests/test_records.py.)"""

import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ukbb_fixtures import keep_label_frames, make_exam_folder, roll_frames, write_phenotype_csv

from whmae import layout
from whmae.data.dataset import records
from whmae.data.ingest import prepare
from whmae.data.ingest.nifti_exam import preprocess_exam, resample_time
from whmae.data.synthetic.generate import generate_dataset
from whmae.evaluate import segmentation
from whmae.phenotypes import cardiac_phases, phenotypes_from_exam

SA = list(layout.SHORT_AXIS_PLANES)
LABELLED = [layout.LA_2CH, layout.LA_4CH, *SA]  # the views ukbb_fixtures segments
EID, FRAMES, SIZE = "4000001", 20, 48  # crop = the whole 48 px matrix: same pixels
VENTRICLES = ("LVEDV (mL)", "LVESV (mL)", "LVSV (mL)", "LVEF (%)", "LVCO (L/min)", "LVM (g)",
              "RVEDV (mL)", "RVESV (mL)", "RVSV (mL)", "RVEF (%)")  # fmt: skip


def options(**kwargs):
    return {"frames": FRAMES, "size": SIZE, "label_convention": "acdc", **kwargs}


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    """(base, full-cycle record and geometry, (ED, ES)): base/full/EID is a phantom exam
    with ACDC labels on every frame; base/exams/EID the same with labels at ED and ES only
    (ES: the full record's smallest LV blood pool)."""
    base = tmp_path_factory.mktemp("acdc")
    make_exam_folder(base / "full", EID, 6, size=SIZE, frames=FRAMES, convention="acdc")
    full, geometry = preprocess_exam(base / "full" / EID, **options())
    assert full["label_mask"][LABELLED].all()  # foreground in every frame: all labelled
    lv = np.count_nonzero(full["labels"][SA] == layout.LV_BLOOD_POOL, axis=(0, 2, 3))
    phases = (0, int(np.argmin(lv)))
    shutil.copytree(base / "full" / EID, base / "exams" / EID)
    keep_label_frames(base / "exams" / EID, phases)
    return base, full, geometry, phases


def expected_mask(frames) -> np.ndarray:
    mask = np.zeros((layout.NUM_PLANES, FRAMES), bool)
    mask[np.ix_(LABELLED, list(frames))] = True
    return mask


def test_an_acdc_exam_is_labelled_on_its_two_frames_only(acdc):
    base, full, full_geometry, (ed, es) = acdc
    exam, geometry = preprocess_exam(base / "exams" / EID, **options())
    np.testing.assert_array_equal(exam["label_mask"], expected_mask((ed, es)))
    np.testing.assert_array_equal(exam["labels"][:, [ed, es]], full["labels"][:, [ed, es]])
    assert not exam["labels"][:, ~exam["label_mask"].any(0)].any()
    assert geometry["views"]["sa"]["slices"] == full_geometry["views"]["sa"]["slices"]
    for view in ("sa", "la_2ch", "la_4ch"):
        assert geometry["views"][view]["labelled_frames"] == [ed, es]
        assert full_geometry["views"][view]["labelled_frames"] == list(range(FRAMES))
    # ukbb: UK Biobank segments every frame, so every frame of a segmented view counts.
    ukbb, _ = preprocess_exam(base / "exams" / EID, **options(label_convention="ukbb"))
    np.testing.assert_array_equal(ukbb["label_mask"], expected_mask(range(FRAMES)))


def test_resampled_frames_are_labelled_where_their_labels_come_from(acdc):
    """A record frame is labelled when the file frame its labels come from (the nearest) is;
    resampling to fewer frames can miss a labelled frame, and says so."""
    base, _, _, (ed, es) = acdc
    file_frames = np.isin(np.arange(FRAMES), [ed, es])

    def taken(frames):  # record frame -> the file frame its labels come from
        return resample_time(np.arange(FRAMES)[:, None, None], frames, labels=True)[:, 0, 0]

    fewer = next(n for n in range(FRAMES - 1, 3, -1) if not {ed, es} <= set(taken(n).tolist()))
    for frames in (2 * FRAMES, fewer):
        exam, geometry = preprocess_exam(base / "exams" / EID, **options(frames=frames))
        np.testing.assert_array_equal(exam["label_mask"][SA[2]], file_frames[taken(frames)])
        labelled = exam["label_mask"][SA[2]]
        assert (exam["label_mask"][LABELLED] == labelled).all()
        assert (exam["labels"][SA][:, labelled] == layout.LV_BLOOD_POOL).any(axis=(0, 2, 3)).all()
        assert not exam["labels"][:, ~labelled].any()
        lost = sorted({ed, es} - set(taken(frames).tolist()))
        warned = [w for w in geometry["warnings"] if "fall between" in w]
        assert len(warned) == (3 if lost else 0), (frames, warned)  # seg_sa, seg_la_2ch, 4ch
    assert warned[0].startswith(f"seg_sa.nii.gz: labelled frames {lost} of {FRAMES} fall")


def test_prepare_writes_the_two_frames_into_the_record_and_the_manifest(acdc, tmp_path):
    base, _, _, (ed, es) = acdc
    write_phenotype_csv(tmp_path / "phenotypes.csv", {EID: np.full(18, np.nan)})
    out = tmp_path / "out"
    prepare.prepare_dataset(base / "exams", tmp_path / "phenotypes.csv", out, frames=FRAMES,
                            size=SIZE, label_convention="acdc", exams_per_shard=4,
                            progress=False)  # fmt: skip
    info = records.read_dataset_info(out)
    assert info["schema_version"] == records.SCHEMA_VERSION == 2
    (split,) = [s for s, entry in info["splits"].items() if entry["num_examples"]]
    source = grain.sources.ArrayRecordDataSource(records.split_paths(out, split, info))
    assert len(source) == 1
    record = source[0]
    assert records.decode_header(record)[0]["schema"] == 2
    exam = records.decode_exam(record)
    np.testing.assert_array_equal(exam["label_mask"], expected_mask((ed, es)))
    (entry,) = [json.loads(line) for line in (out / prepare.MANIFEST_FILE).read_text().splitlines()]
    assert entry["labelled_frames"] == {"sa": 2, "la_2ch": 2, "la_4ch": 2}
    arguments = json.loads((out / prepare.ARGS_FILE).read_text())
    assert arguments["schema_version"] == 2
    assert arguments["preprocessing"]["label_convention"] == "acdc"


def test_an_exam_starting_mid_cycle_reads_the_slice_rule_at_its_labelled_ed(acdc, tmp_path):
    """M&Ms exams need not start at ED: the reference slice rule reads the labelled frame of
    most LV blood pool, not an unlabelled frame 0 (which would fall back to the centre)."""
    base, _, full_geometry, (ed, es) = acdc
    shift = 7
    shutil.copytree(base / "full" / EID, tmp_path / EID)
    roll_frames(tmp_path / EID, shift)
    phases = ((ed + shift) % FRAMES, (es + shift) % FRAMES)
    keep_label_frames(tmp_path / EID, phases)
    exam, geometry = preprocess_exam(tmp_path / EID, **options())
    assert geometry["views"]["sa"]["slices"] == full_geometry["views"]["sa"]["slices"]
    assert not [w for w in geometry["warnings"] if "fell back" in w]
    np.testing.assert_array_equal(exam["label_mask"], expected_mask(phases))
    assert cardiac_phases(exam) == phases


def scoring(exam, pred, label_mask=None) -> dict:
    keys = ("label_mask", "plane_mask", "pixel_spacing", "slice_spacing", "frame_duration")
    result = {k: np.asarray(exam[k])[None] for k in keys}
    if label_mask is not None:
        result["label_mask"] = label_mask[None]
    return {**result, "eid": np.array([EID]), "pred": pred[None], "labels": exam["labels"][None]}


def garbage_outside_labels(exam, seed=0) -> np.ndarray:
    """The truth on labelled (plane, frame) images, random classes everywhere else."""
    pred = exam["labels"].copy()
    unlabelled = ~exam["label_mask"]
    rng = np.random.default_rng(seed)
    pred[unlabelled] = rng.integers(0, layout.NUM_CLASSES, pred[unlabelled].shape)
    return pred


def test_metrics_and_phenotypes_read_the_labelled_frames_only(acdc):
    base, full, _, (ed, es) = acdc
    exam, _ = preprocess_exam(base / "exams" / EID, **options())
    assert cardiac_phases(exam) == (ed, es) and cardiac_phases(full) is None
    # The truth's phenotypes from ED and ES alone are the full cycle's ventricular ones.
    partial, whole = phenotypes_from_exam(exam), phenotypes_from_exam(full)
    for column in VENTRICLES:
        assert partial[column] == pytest.approx(whole[column], rel=1e-9), column
    # Read as if every frame were labelled, an empty frame would be ES: LVEF 100 %.
    every_frame = {**exam, "label_mask": exam["label_mask"].any(1)}
    assert phenotypes_from_exam(every_frame)["LVEF (%)"] == 100.0

    pred = garbage_outside_labels(exam)
    metrics = segmentation.evaluate_segmentation(scoring(exam, pred))
    for view, classes in metrics["dice"].items():
        for name, summary in classes.items():
            assert summary["mean"] == 1.0, (view, name)
            assert metrics["hd95_mm"][view][name]["mean"] == 0.0, (view, name)
    assert metrics["phenotype_failures"] == 0
    for column in (*VENTRICLES, "LAV max (mL)", "RAV min (mL)"):
        stats = metrics["phenotypes"][column]
        assert stats["n"] == 1 and stats["mae"] == pytest.approx(0.0, abs=1e-9), column
    # The same garbage scored on every frame (a per-plane mask) does count.
    counted = segmentation.evaluate_segmentation(scoring(exam, pred, exam["label_mask"].any(1)))
    assert counted["dice"]["short_axis"]["lv_blood_pool"]["mean"] < 0.5
    # Overlays show the truth's labelled ED and ES.
    rows = segmentation.overlay_rows(scoring(exam, pred), 0)
    assert [r[0] for r in rows[:2]] == ["la_2ch ED", "la_2ch ES"]
    np.testing.assert_array_equal(rows[1][2], exam["labels"][layout.LA_2CH, es])


def test_validation_dice_reads_the_labelled_frames_only(acdc):
    base, _, _, _ = acdc
    exam, _ = preprocess_exam(base / "exams" / EID, **options())
    pred = garbage_outside_labels(exam, seed=1)

    class Model:  # predicts `pred` whatever the images
        planes = tuple(range(layout.NUM_PLANES))

        def __call__(self, images, plane_mask):
            return jnp.asarray(np.eye(layout.NUM_CLASSES, dtype=np.float32)[pred][None])

    validation = segmentation.validation(Model.planes)
    batch = {k: jnp.asarray(exam[k][None]) for k in ("images", "labels", "plane_mask",
                                                     "label_mask")}  # fmt: skip
    values = jax.tree.map(np.asarray, validation.fn(Model(), batch, None))
    assert validation.summarise(values)["dice_mean"] == 1.0
    batch["label_mask"] = batch["label_mask"].any(-1)  # per plane: every frame counts
    values = jax.tree.map(np.asarray, validation.fn(Model(), batch, None))
    assert validation.summarise(values)["dice_mean"] < 0.5


def test_a_phantom_dataset_of_schema_1_is_reused_not_refused(tmp_path):
    """Phantom labels cover every frame under both schemas: a rerun of whmae-generate (the
    demo's resume) into a schema-1 dataset keeps it, and training reads it per frame."""
    args = dict(num_exams=3, size=16, frames=3, seed=0, num_shards=1, workers=1,
                progress=False, figure=False)  # fmt: skip
    generate_dataset(tmp_path, **args)
    path = tmp_path / "generate_args.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 1}))
    assert generate_dataset(tmp_path, **args)["status"] == "complete"
