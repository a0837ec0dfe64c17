import os
import stat

import pytest

from omniportrait.files import atomic_write, write_json_atomic, write_text_atomic


def test_written_file_is_complete_and_world_readable(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "a.json", {"b": 1})
    assert path.read_text().strip() == '{\n  "b": 1\n}'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x.bin") as stream:
            stream.write(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_replace_keeps_the_old_file_until_the_new_one_is_complete(tmp_path):
    target = write_text_atomic(tmp_path / "t.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as stream:
            stream.write(b"new")
            raise RuntimeError
    assert target.read_text() == "old"
