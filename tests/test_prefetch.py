"""Reading ahead in whmae-prepare: the next exams' files are asked for while one is computed."""

import pytest

from whmae.data.ingest import nifti_io, prepare


def test_prefetched_asks_for_each_folder_once_and_depth_exams_ahead(monkeypatch):
    asked = []
    monkeypatch.setattr(prepare, "prefetch_files", asked.append)
    jobs = [{"eid": str(i), "folder": f"/exams/{i}"} for i in range(6)]
    jobs[2] = {"eid": "2", "status": "rejected", "reason": "no exam folder"}  # nothing to read
    seen = []
    for job in prepare._prefetched(jobs, depth=2):
        i = int(job["eid"])
        seen.append(i)
        # jobs i .. i + 2 (those with files) were asked for before job i came out
        expected = [f"/exams/{k}" for k in range(min(i + 3, 6)) if k != 2]
        assert asked == expected, (i, asked)
    assert seen == list(range(6))
    asked.clear()
    assert [job["eid"] for job in prepare._prefetched(jobs, depth=0)] == [str(i) for i in range(6)]
    assert asked == []


def test_prefetch_files_never_raises(tmp_path):
    (tmp_path / "sa.nii.gz").write_bytes(b"not even gzip")
    (tmp_path / "la_2ch.nii.gz").mkdir()  # a folder where a file should be
    nifti_io.prefetch_files(tmp_path)
    nifti_io.prefetch_files(tmp_path / "missing")


def test_negative_prefetch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--prefetch must be >= 0"):
        prepare.prepare_dataset(tmp_path, tmp_path / "p.csv", tmp_path / "out", prefetch=-1)
