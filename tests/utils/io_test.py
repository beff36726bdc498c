import json
import os

import pytest

from zsp_jax.utils import io


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    io.write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    io.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    io.write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
