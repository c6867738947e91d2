"""Node.js tooling for the interop tests: installs tests/interop/node_modules from package-lock.json with npm when
node and npm exist and the registry answers; otherwise says why, so the caller can skip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


_FAILED: list[str] = []  # one failed install per test session is enough


def node_modules() -> tuple[Path | None, str]:
    """(path to node_modules, "") when ready, else (None, the reason to skip)."""
    if _FAILED:
        return None, _FAILED[0]
    nm, why = _install()
    if nm is None:
        _FAILED.append(why)
    return nm, why


def _install() -> tuple[Path | None, str]:
    nm = HERE / "node_modules"
    if (nm / "@grpc" / "grpc-js").is_dir() and (nm / "@grpc" / "proto-loader").is_dir():
        return nm, ""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, "node/npm not installed"
    try:
        r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", "--fetch-timeout=30000",
                            "--fetch-retries=1"], cwd=HERE,
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "npm ci did not finish within 300 s (registry unreachable?)"
    if r.returncode != 0:
        return None, f"npm ci failed (registry unreachable?): {(r.stderr or r.stdout).strip()[-300:]}"
    return nm, ""


def buf() -> str | None:
    """A `buf` executable: on PATH, or from npm @bufbuild/buf in node_modules (installed on demand)."""
    if shutil.which("buf"):
        return shutil.which("buf")
    nm, _ = node_modules()
    exe = nm / ".bin" / "buf" if nm else None
    return str(exe) if exe is not None and exe.exists() else None
