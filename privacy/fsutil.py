"""Crash-safe file and folder replacement (a kill -9 never leaves a half-written one): the one home of this for
the PKI and membership files, the client's model folders and the server's caches and run state.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write a sibling temporary file, fsync it, rename it over
  the target and fsync the folder.
* :func:`staging_dir` / :func:`replace_dir` build a folder under a temporary sibling name and swap it into place
  only once it is complete. Between the two renames of the swap the target is briefly absent, never partial; a
  leftover staging folder (from a killed run) is removed by the next :func:`staging_dir` for the same target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically (parent folders created). ``mode``: permission bits of the new file
    (default: ``tempfile.mkstemp``'s 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.staging-"


def staging_dir(target: str | Path) -> Path:
    """A fresh, empty sibling folder to build ``target`` in; stale staging folders of ``target`` are removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(_staging_prefix(target) + "*"):
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target)))


def replace_dir(staged: str | Path, target: str | Path) -> Path:
    """Swap the complete folder ``staged`` into ``target`` (the old ``target``, if any, is removed)."""
    staged, target = Path(staged), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f"{_staging_prefix(target)}old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staged, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "replace_dir", "staging_dir"]
