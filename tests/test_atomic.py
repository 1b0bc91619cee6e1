"""The package's atomic writes: a file is replaced whole or left as it was, and no temporary file stays behind."""
import json

import pytest

from nnunet_diffusion.atomic import atomic_path, write_json_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("writer died")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_a_finished_write_replaces_the_file_and_keeps_the_asked_ending_while_writing(tmp_path):
    target = tmp_path / "sub" / "case.nii.gz"
    with atomic_path(target, suffix=".nii.gz") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_bytes(b"image")
    assert target.read_bytes() == b"image"
    assert [p.name for p in target.parent.iterdir()] == ["case.nii.gz"]


def test_text_and_json_writes(tmp_path):
    write_text_atomic(tmp_path / "a.md", "é\n")
    assert (tmp_path / "a.md").read_bytes() == "é\n".encode("utf-8")
    write_json_atomic(tmp_path / "g.json", {"b": 1, "a": [2]})
    assert (tmp_path / "g.json").read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}'
    assert json.loads((tmp_path / "g.json").read_text()) == {"a": [2], "b": 1}
