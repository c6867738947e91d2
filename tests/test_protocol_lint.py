"""Lint of the wire contract: `buf lint` (proto/buf.yaml) when buf is available (on PATH or from npm
@bufbuild/buf in tests/interop/node_modules), and a built-in style check that always runs."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "mor" / "v1" / "federation.proto"


def _npmenv():
    if "npmenv" in sys.modules:  # shared with tests/interop (one npm install attempt per session)
        return sys.modules["npmenv"]
    spec = importlib.util.spec_from_file_location("npmenv", ROOT / "tests" / "interop" / "npmenv.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["npmenv"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_buf_lint_is_clean():
    buf = _npmenv().buf()
    if buf is None:
        pytest.skip("buf not available (no `buf` on PATH, npm @bufbuild/buf not installable)")
    r = subprocess.run([buf, "lint"], cwd=ROOT / "proto", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _style_problems(text: str) -> list[str]:
    problems = []
    if 'syntax = "proto3";' not in text or "package mor.v1;" not in text:
        problems.append("proto3 syntax and package mor.v1 required")
    for opt in ("go_package", "java_package", "java_multiple_files", "csharp_namespace"):
        if not re.search(rf"^option {opt} = ", text, re.M):
            problems.append(f"option {opt} missing")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(message|enum|service) (\w+) \{", line)
        if m:
            if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", m.group(2)):
                problems.append(f"line {i + 1}: {m.group(1)} {m.group(2)} is not PascalCase")
            if not lines[i - 1].startswith("//") and m.group(2) not in ("ClientMessage", "ServerMessage"):
                problems.append(f"line {i + 1}: {m.group(1)} {m.group(2)} has no comment")
        f = re.match(r"^\s+(?:repeated |optional )?[\w.]+ (\w+) = (\d+);", line)
        if f and not re.fullmatch(r"[a-z][a-z0-9_]*", f.group(1)):
            problems.append(f"line {i + 1}: field {f.group(1)} is not lower_snake_case")
        e = re.match(r"^\s+([A-Z0-9_]+) = (\d+);", line)
        if e and not e.group(1).startswith("PRIVACY_MODE_"):
            problems.append(f"line {i + 1}: enum value {e.group(1)} lacks the enum's prefix")
    # field numbers unique per message
    for body in re.findall(r"^message \w+ \{(.*?)^\}", text, re.S | re.M):
        nums = re.findall(r"= (\d+);", body)
        if len(nums) != len(set(nums)):
            problems.append(f"duplicate field numbers in a message: {sorted(nums)}")
    return problems


def test_builtin_style_check_passes_and_catches_violations():
    text = PROTO.read_text()
    assert _style_problems(text) == []
    bad = text.replace("string client_id = 1;  // the Common Name", "string ClientId = 1;  // the Common Name")
    bad = bad.replace('option csharp_namespace = "Mor.V1";\n', "")
    got = _style_problems(bad)
    assert any("ClientId" in p for p in got) and any("csharp_namespace" in p for p in got), got
