"""Shard sizes and checksums in the markers, checked when a dataset opens and by
`whmae-dataset verify` (issue 17)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import random_exam

from whmae.data.dataset import shards, verify
from whmae.data.dataset.records import INFO_FILE, RecordError, read_dataset_info, split_paths


@pytest.fixture
def dataset(random_dataset, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(random_dataset[0], out)
    return out


def _verify(capsys, *args):
    rc = verify.main(["verify", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err


def _make_old(data_dir):
    """The dataset as written before issue 17: no size or checksum anywhere."""
    for marker in data_dir.glob("shard-*.json"):
        content = json.loads(marker.read_text())
        for entry in content["splits"].values():
            del entry["bytes"], entry["crc32"]
        marker.write_text(json.dumps(content))
    info = json.loads((data_dir / INFO_FILE).read_text())
    for entry in info["splits"].values():
        del entry["file_info"]
    (data_dir / INFO_FILE).write_text(json.dumps(info))


def test_markers_record_size_and_checksum_of_each_file_across_many_flushes(tmp_path, monkeypatch):
    # Flush (and checksum the new bytes) about every exam: the running CRC over the pieces
    # must equal the CRC of the finished file.
    monkeypatch.setenv(shards.FLUSH_ENV, "0.01")
    shards.write_shard([random_exam(i) for i in range(30)], tmp_path, 0, 1)
    marker = json.loads((tmp_path / "shard-00000-of-00001.json").read_text())
    assert marker["splits"]
    for entry in marker["splits"].values():
        path = tmp_path / entry["file"]
        assert entry["bytes"] == path.stat().st_size > 10 * 1024
        assert entry["crc32"] == verify.file_crc32(path)
    info = shards.finalize_dataset(tmp_path, {})
    for entry in info["splits"].values():
        for name in entry["files"]:
            assert entry["file_info"][name]["bytes"] == (tmp_path / name).stat().st_size


def test_good_dataset_verifies_clean(dataset, capsys):
    rc, lines, err = _verify(capsys, dataset)
    assert rc == 0 and err == ""
    files = len(list(dataset.glob("*.array_record")))
    assert lines == [f"{dataset}: OK, {files} shard files, 41 records, {_mb(dataset)} MB checked"]


def _mb(data_dir):
    return f"{sum(p.stat().st_size for p in data_dir.glob('*.array_record')) / 1e6:.1f}"


def _train_shard(data_dir):
    return split_paths(data_dir, "train")[0]


def test_truncated_shard_named_by_verify_and_when_opening(dataset, capsys):
    from whmae.data.dataset.pipeline import make_pipeline

    shard = _train_shard(dataset)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    rc, lines, _ = _verify(capsys, dataset)
    assert rc == 1 and len(lines) == 2
    assert lines[0].startswith(f"{shard}: {size - 1000} bytes, shard marker 0 records {size}")
    assert "(truncated)" in lines[0] and "not a readable ArrayRecord file" in lines[0]
    assert lines[1].startswith(f"{dataset}: 1 bad, ")
    # Opening the dataset stats the files: a one-line error naming the file, no reading.
    with pytest.raises(RecordError) as caught:
        make_pipeline(dataset, "train", batch_size=2, fields=("images",))
    message = str(caught.value)
    assert message.startswith(f"{shard}: {size - 1000} bytes, but {INFO_FILE} records {size}")
    assert "\n" not in message and "whmae-dataset verify" in message


def test_flipped_byte_found_by_the_checksum(dataset, capsys):
    shard = _train_shard(dataset)
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    for quick in ([], ["--quick"]):
        rc, lines, _ = _verify(capsys, *quick, dataset)
        assert rc == 1 and len(lines) == 2, lines
        assert lines[0].startswith(f"{shard}: checksum crc32 "), lines[0]
        assert "shard marker 0 records" in lines[0] and "(bytes changed on disk)" in lines[0]
    read_dataset_info(dataset)  # same size: opening does not read, so it does not notice


def test_missing_shard_file_and_missing_marker(dataset, capsys):
    shard = _train_shard(dataset)
    os.unlink(shard)
    (dataset / "shard-00002-of-00003.json").unlink()
    rc, lines, _ = _verify(capsys, dataset)
    assert rc == 1 and len(lines) == 3, lines
    assert f"{shard}: missing (listed in shard marker 0)" in lines
    assert (
        f"{dataset / 'shard-00002-of-00003.json'}: missing: this shard was never completed "
        "(or its marker was deleted)"
    ) in lines
    assert lines[-1].startswith(f"{dataset}: 2 bad, ")
    with pytest.raises(FileNotFoundError, match="is missing"):
        read_dataset_info(dataset)


def test_old_dataset_without_sizes_is_accepted_and_still_checked_record_by_record(dataset, capsys):
    from whmae.data.dataset.pipeline import make_pipeline

    _make_old(dataset)
    rc, lines, _ = _verify(capsys, dataset)
    assert rc == 0 and len(lines) == 1
    files = len(list(dataset.glob("*.array_record")))
    assert lines[0].endswith(
        f"({files} files without a recorded size and checksum: written before these were recorded)"
    )
    next(make_pipeline(dataset, "train", batch_size=2, fields=("images",)))
    assert shards.finalize_dataset(dataset, {})["splits"]["train"]["file_info"]  # old markers

    shard = _train_shard(dataset)
    with open(shard, "r+b") as f:  # damage in a record's data, the size unchanged
        f.seek(os.path.getsize(shard) // 3)
        f.write(os.urandom(4096))
    rc, lines, _ = _verify(capsys, dataset)
    assert rc == 1 and len(lines) == 2, lines
    assert lines[0].startswith(f"{shard}: ") and "records bad, first: record " in lines[0]


def test_record_holding_another_eid_is_named(tmp_path, capsys):
    shards.write_shard([random_exam(i) for i in range(6)], tmp_path, 0, 2)
    shards.write_shard([random_exam(i) for i in range(6, 12)], tmp_path, 1, 2)
    shards.finalize_dataset(tmp_path, {})
    for shard in (0, 1):  # shard 1's files under shard 0's marker: sizes, CRC32s and eids
        path = tmp_path / f"shard-0000{shard}-of-00002.json"
        marker = json.loads(path.read_text())
        for entry in marker["splits"].values():
            entry.pop("bytes", None), entry.pop("crc32", None)
        path.write_text(json.dumps(marker))
    first = sorted(tmp_path.glob("train-00000-*"))[0]
    other = sorted(tmp_path.glob("train-00001-*"))[0]
    shutil.copy(other, first)
    rc, lines, _ = _verify(capsys, tmp_path)
    assert rc == 1, lines
    bad = [line for line in lines if line.startswith(f"{first}: ")]
    assert bad and "holds eid '10000" in bad[0] and "the marker lists '10000" in bad[0], lines


def test_not_a_dataset_is_a_usage_error(tmp_path, capsys):
    rc, lines, err = _verify(capsys, tmp_path / "nope")
    assert rc == 2 and lines == []
    assert err == f"whmae-dataset: {tmp_path / 'nope'} does not exist or is not a directory\n"
    rc, lines, err = _verify(capsys, tmp_path)
    assert rc == 2 and err.startswith("whmae-dataset: ") and "not a dataset" in err
