"""Crash-safe file and folder replacement (a kill -9 never leaves a half-written one): the one home of this for
the PKI and membership files, the client's model folders and the server's caches and run state.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write a sibling temporary file, fsync it, rename it over
  the target and fsync the folder.
* :func:`staging_dir` / :func:`replace_dir` build a folder under a temporary sibling name and swap it into place
  only once it is complete. Between the two renames of the swap the target is briefly absent, never partial; a
  leftover staging folder (from a killed run) is removed by the next :func:`staging_dir` for the same target; one
  whose process still runs (a concurrent build of the same target) is left alone.
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


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _owner(folder: Path, target: Path) -> int | None:
    """The pid recorded in a staging folder's name (``<prefix><pid>-<random>`` or ``<prefix>old-<pid>``), or None."""
    rest = folder.name[len(_staging_prefix(target)):]
    head = rest.removeprefix("old-").split("-", 1)[0]
    return int(head) if head.isdigit() else None


def staging_dir(target: str | Path) -> Path:
    """A fresh, empty sibling folder to build ``target`` in, named after this process. Staging folders of ``target``
    left by processes that no longer run (a killed build) are removed; those of a live process are not: two
    processes may build the same target at once, and the last :func:`replace_dir` wins whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(_staging_prefix(target) + "*"):
        owner = _owner(old, target)
        if owner is None or not _alive(owner):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_staging_prefix(target)}{os.getpid()}-"))


def replace_dir(staged: str | Path, target: str | Path) -> Path:
    """Swap the complete folder ``staged`` into ``target`` (the old ``target``, if any, is removed)."""
    staged, target = Path(staged), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_staging_prefix(target)}old-{os.getpid()}-"))
        os.replace(target, old / target.name)
    try:
        os.replace(staged, target)
    except OSError:  # another process swapped its build in between: the last one to finish wins
        if not target.exists():
            raise
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staged, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "replace_dir", "staging_dir"]
