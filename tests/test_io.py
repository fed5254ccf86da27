"""Atomic writes: a failure mid-write leaves the previous content whole."""

from __future__ import annotations

import os

import pytest

from srppo_fast.io import (
    MANIFEST,
    atomic_dir,
    atomic_write_text,
    effective_dir,
    is_complete,
    recover_dir,
    recover_tree,
    write_jsonl,
)


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
    assert sorted(os.listdir(target)) == [MANIFEST, "b"]
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


def _copy(path, content: str) -> None:
    """A directory as a save would leave it: one file and the manifest (complete) ."""
    with atomic_dir(path) as tmp:
        open(os.path.join(tmp, "w"), "w").write(content)


def _state(parent) -> dict:
    return {name: open(os.path.join(parent, name, "w")).read() if os.path.isfile(os.path.join(parent, name, "w"))
            else None for name in sorted(os.listdir(parent))}


def test_recovery_after_a_kill_between_the_two_renames(tmp_path):
    """The window the old code lost a checkpoint in: NAME moved aside, the new copy not yet moved in."""
    _copy(tmp_path / "ckpt", "old")
    _copy(tmp_path / "new", "new")
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old")
    os.replace(tmp_path / "new", tmp_path / ".ckpt.tmp")
    assert effective_dir(tmp_path / "ckpt") == tmp_path / ".ckpt.tmp"  # read-only answer first
    assert sorted(os.listdir(tmp_path)) == [".ckpt.old", ".ckpt.tmp"]
    did = recover_dir(tmp_path / "ckpt")
    assert "finished" in did and "removed the leftovers" in did
    assert _state(tmp_path) == {"ckpt": "new"}


def test_recovery_keeps_the_old_copy_when_the_new_one_is_incomplete(tmp_path):
    _copy(tmp_path / "ckpt", "old")
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old")
    os.mkdir(tmp_path / ".ckpt.tmp")  # killed while writing: no manifest
    open(tmp_path / ".ckpt.tmp" / "w", "w").write("ha")
    assert not is_complete(tmp_path / ".ckpt.tmp")
    assert effective_dir(tmp_path / "ckpt") == tmp_path / ".ckpt.old"
    assert "undone" in recover_dir(tmp_path / "ckpt")
    assert _state(tmp_path) == {"ckpt": "old"}


def test_a_manifest_whose_files_do_not_match_is_incomplete(tmp_path):
    _copy(tmp_path / "ckpt", "12345")
    assert is_complete(tmp_path / "ckpt")
    open(tmp_path / "ckpt" / "w", "w").write("12")  # truncated
    assert not is_complete(tmp_path / "ckpt")
    os.unlink(tmp_path / "ckpt" / "w")
    assert not is_complete(tmp_path / "ckpt")


def test_recover_tree_sweeps_leftovers_and_nothing_else(tmp_path):
    _copy(tmp_path / "a", "a1")
    os.mkdir(tmp_path / ".a.tmp")  # an incomplete save of a, beside a complete a
    os.mkdir(tmp_path / ".b.old")  # a half-deleted old copy (no manifest), b itself gone: nothing to recover
    open(tmp_path / ".metrics.jsonl.ab12cd34.tmp", "w").write("{")  # atomic_file killed mid-write
    open(tmp_path / "keep.txt", "w").write("mine")
    os.mkdir(tmp_path / ".hidden")  # not ours: untouched
    done = recover_tree(tmp_path)
    assert len(done) == 3
    assert sorted(os.listdir(tmp_path)) == [".hidden", "a", "keep.txt"]
    assert recover_tree(tmp_path) == []  # idempotent
    os.mkdir(tmp_path / ".notes.tmp")  # a user's own directory
    assert recover_tree(tmp_path, {"a", "world"}) == [] and (tmp_path / ".notes.tmp").is_dir()


def test_save_after_a_kill_recovers_first(tmp_path):
    """A save into NAME whose previous save was killed between the renames keeps the newest copy as the old
    one and leaves nothing behind."""
    _copy(tmp_path / "ckpt", "v1")
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old")
    _copy(tmp_path / "ckpt", "v3")
    assert _state(tmp_path) == {"ckpt": "v3"}
