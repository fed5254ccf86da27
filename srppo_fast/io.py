"""Atomic file and directory writes: a reader sees the old content or the new, never half of either,
and a process killed at any instant of a directory save loses nothing that was complete.

A directory save (`atomic_dir(path)`) goes through fixed names beside `path`:

    1. `.NAME.tmp/` is created and filled; every file is fsynced
    2. `.NAME.tmp/.srppo_manifest.json` lists every file and its size: from here the new copy is complete
    3. `NAME/` (the previous copy, if any) is renamed to `.NAME.old/`
    4. `.NAME.tmp/` is renamed to `NAME/`
    5. `.NAME.old/` is deleted (its manifest first, so a half-deleted copy is never taken for a whole one)

A kill between 3 and 4 leaves no `NAME/`: `recover_dir` (run at start-up, and before every save) puts the
newest complete copy back in place (`.NAME.tmp` when its manifest checks, else `.NAME.old`) and sweeps
what is left. `effective_dir` says, without writing anything, which copy recovery would use.

`fs_step` marks each filesystem step of a save: the fault point where tests trace the steps and kill the process
just before one (faults.py, tests/faulty.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import faults

log = logging.getLogger("srppo_fast")
MANIFEST = ".srppo_manifest.json"
_fs_steps = 0


def fs_step(label: str) -> None:
    """One filesystem step of a save is about to happen (a fault point: tests trace and kill here)."""
    global _fs_steps
    _fs_steps += 1
    faults.point("fs_step", n=_fs_steps, label=label)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # named by the file it was for, not the temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like a normal file
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        reason = write_failure(e, path) if isinstance(e, Exception) else None
        if reason is not None:  # the OS names no path for a full disk: this line does
            from .errors import StorageError

            raise StorageError(f"cannot write {path}: {reason}; free some space and run the same command (what was "
                               "written before is intact).") from None
        raise


def read_text_file(path: str | Path, label: str, fix: str, error: type = None) -> str:
    """The whole of a UTF-8 text file, or one `error` (SrppoError) naming `label`, the path and the fix:
    missing, a directory, unreadable, not UTF-8 (with the byte offset and line)."""
    from .errors import SrppoError

    error = error or SrppoError
    if os.path.isdir(path):
        raise error(f"{label} '{path}' is a directory; {fix}")
    if not os.path.exists(path):  # a pipe the shell hands over (`--config <(...)`, /dev/stdin) exists and is read once
        raise error(f"{label} '{path}' does not exist; {fix}")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as e:
        raise error(f"{label} '{path}' cannot be read ({e.strerror or e}); check its permissions.") from None
    except UnicodeDecodeError as e:
        with open(path, "rb") as fh:
            line = fh.read(e.start).count(b"\n") + 1
        raise error(f"{label} '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}, line "
                    f"{line}); save it as UTF-8.") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_file(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# directories


def _aside(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}"


def _files(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            file = Path(dirpath) / name
            rel = file.relative_to(root).as_posix()
            if rel != MANIFEST:
                out[rel] = file.stat().st_size
    return out


def write_failure(e: BaseException, path: str | Path | None = None) -> str | None:
    """The reason a write failed, in words, when `e` is the disk's doing (full, quota, read-only, I/O error), from an
    OSError or a library that wraps one in its own message (safetensors: "No space left on device (os error 28)";
    torch.save: "unexpected pos", which says only that a write fell short: the free space where `path` lives
    tells); else None."""
    import errno as errno_

    if isinstance(e, OSError) and e.errno in (errno_.ENOSPC, errno_.EDQUOT, errno_.EROFS, errno_.EIO, errno_.EFBIG):
        return e.strerror or os.strerror(e.errno)
    text = str(e)
    for needle, reason in (("os error 28", "No space left on device"), ("No space left", "No space left on device"),
                           ("os error 122", "Disk quota exceeded"), ("os error 30", "Read-only file system"),
                           ("os error 5)", "Input/output error")):
        if needle in text:
            return reason
    if "unexpected pos" in text:
        where = Path(path) if path is not None else None
        while where is not None and not where.exists() and where != where.parent:
            where = where.parent
        try:
            if where is not None and shutil.disk_usage(where).free < (16 << 20):
                return "No space left on device"
        except OSError:
            pass
        return "a write fell short (a full disk or quota?)"
    return None


def manifest_problem(path: str | Path) -> str | None:
    """What is wrong with a saved directory against the manifest its save wrote (a file missing, or of another
    size: cut short by a copy, a disk error), or None; None too for a directory without a manifest. Sizes only:
    hashing a multi-GB checkpoint at every start would cost more than the check is worth."""
    path = Path(path)
    try:
        with open(path / MANIFEST, encoding="utf-8") as fh:
            files = json.load(fh)["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest {path / MANIFEST} cannot be read ({e})"
    for rel, size in sorted(files.items()):
        file = path / rel
        if not file.is_file():
            return f"{file} is missing (its save wrote {size:,} bytes)"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} is {actual:,} bytes but its save wrote {size:,}"
    return None


def is_complete(path: str | Path) -> bool:
    """True when `path` holds a manifest and every file it lists, at the listed size."""
    manifest = Path(path) / MANIFEST
    try:
        with open(manifest, encoding="utf-8") as fh:
            files = json.load(fh)["files"]
        return all((Path(path) / rel).is_file() and (Path(path) / rel).stat().st_size == size
                   for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove(path: Path, label: str) -> None:
    """Delete a directory, its manifest first (a half-deleted copy never looks complete)."""
    fs_step(label)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path / MANIFEST)
    shutil.rmtree(path, ignore_errors=True)


def effective_dir(path: str | Path) -> Path | None:
    """The copy of `path` that holds its newest complete content (what `recover_dir` would install),
    or None when there is none. Reads only."""
    path = Path(path)
    tmp, old = _aside(path, "tmp"), _aside(path, "old")
    if is_complete(tmp):
        return tmp
    if path.is_dir():
        return path
    if is_complete(old):
        return old
    return None


def recover_dir(path: str | Path) -> str | None:
    """Finish or undo a save that a kill interrupted: install the newest complete copy as `path`, delete
    the leftovers. Returns a sentence saying what was done, or None when there was nothing to do."""
    path = Path(path)
    tmp, old = _aside(path, "tmp"), _aside(path, "old")
    source, did = effective_dir(path), None
    if source == tmp:  # killed after the new copy was complete: finish that save
        if path.is_dir():
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        did = f"{path}: a save interrupted after it was complete was finished (the newer copy is used)"
    elif source == old:  # killed between its two renames, the new copy incomplete
        did = f"{path}: a save interrupted before it was complete was undone (the previous copy is used)"
    if did:
        os.replace(source, path)
        _fsync_dir(path.parent)
    swept = [p.name for p in (tmp, old) if p.exists()]
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    if swept:
        did = (did + "; " if did else f"{path}: ") + \
            f"removed the leftovers of an interrupted save ({', '.join(swept)})"
    return did


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)$")
_LEGACY = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$")  # mkdtemp names of versions before 0.2
_FILE_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_file's mkstemp names


def recover_tree(root: str | Path, names: set[str] | None = None) -> list[str]:
    """`recover_dir` for every interrupted directory save directly under `root` (only of the directories in
    `names` when given), and removal of the temporary files of interrupted `atomic_file` writes. Returns
    what was done."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = []
    for entry in sorted(os.listdir(root)):
        m = _LEFTOVER.match(entry)
        if names is not None and not (m and m["name"] in names) and not _FILE_LEFTOVER.match(entry):
            continue
        if _LEGACY.match(entry) and (root / entry).is_dir():
            done.append(f"{root / entry}: left by a save that an older srppo-fast had interrupted; it may hold a "
                        "complete copy (look inside): move it into place or delete it")
        elif m and (root / entry).is_dir():
            did = recover_dir(root / m["name"])
            if did:
                done.append(did)
        elif _FILE_LEFTOVER.match(entry) and (root / entry).is_file():
            (root / entry).unlink()
            done.append(f"{root / entry}: removed the temporary file of an interrupted write")
    return done


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[str]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place (the steps are in the
    module docstring). On an exception it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp, old = _aside(path, "tmp"), _aside(path, "old")
    fs_step(f"create {tmp.name}")
    tmp.mkdir(mode=0o777 & ~_umask())
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield str(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                file = os.path.join(root, name)
                os.chmod(file, 0o666 & ~_umask())
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        fs_step(f"write {tmp.name}/{MANIFEST}")
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump({"files": _files(tmp)}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp / MANIFEST, 0o666 & ~_umask())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        fs_step(f"rename {path.name} -> {old.name}")
        os.replace(path, old)
    fs_step(f"rename {tmp.name} -> {path.name}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        _remove(old, f"delete {old.name}")
    fs_step(f"saved {path.name}")
