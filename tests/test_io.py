"""Atomic writes: a failure mid-write leaves the previous content whole."""

from __future__ import annotations

import os

import pytest

from srppo_fast.io import atomic_dir, atomic_write_text, write_jsonl


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (open(os.path.join(tmp, "a"), "w")).write("v1")
    assert (target / "a").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            open(os.path.join(tmp, "a"), "w").write("half")
            raise RuntimeError("killed mid-save")
    assert (target / "a").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind
    with atomic_dir(target) as tmp:
        open(os.path.join(tmp, "b"), "w").write("v2")
    assert os.listdir(target) == ["b"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    assert os.stat(target / "b").st_mode & 0o777 == 0o666 & ~mask


def test_atomic_file(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "one")
    with pytest.raises(ValueError):
        from srppo_fast.io import atomic_file

        with atomic_file(path) as fh:
            fh.write("two")
            raise ValueError
    assert path.read_text() == "one"
    write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"b": "é"}])
    assert (tmp_path / "r.jsonl").read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "x.txt"]
