"""whmae.files.write_text_atomic: the old file or the new one, never a part, no leftovers."""

import pytest

from whmae.files import write_text_atomic


def test_write_text_atomic_replaces_whole_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    assert write_text_atomic(path, "first") == path
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    with pytest.raises(UnicodeEncodeError):  # fails while writing the temporary file
        write_text_atomic(path, "third \ud800")
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
