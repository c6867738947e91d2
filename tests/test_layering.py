"""The layers of the code base (docs/architecture.md): privacy/ depends on nothing of ours, mor/ (the shared wire
contract) only on privacy-free stubs, the client SDK never on the server, and importing the SDK pulls no training
stack. A new import across a layer boundary fails here, naming the file and the line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: which of our packages each package may import (itself always)
ALLOWED = {
    "privacy": set(),
    "mor": {"privacy"},  # mor.cliargs checks client names with privacy.pki's rule
    "mor_client": {"mor", "privacy"},
    "mor_server": {"mor", "privacy", "mor_client"},
}
#: known crossings, each with its reason; remove the entry when the reason is gone
EXCEPTIONS = {
    # the parameter-sharing baselines' client trainer trains the server's own policy family (tiny Llava) and reuses
    # its warm-start tokenisation; it moves with the policy code to a shared room in the restructure (issue #15)
    ("mor_client/baselines.py", "mor_server"),
}

#: the rooms inside mor_server (docs/architecture.md) and which other rooms' modules each may import: a prefix
#: ``room`` allows the whole room, ``room.module`` that module only
ROOMS = {
    "federation": {"baselines.training_round"},  # the server runs the baselines' training rounds (their round book)
    "alignment": {"federation.rounds", "federation.metrics"},  # pure: round errors, RetryPolicy, closed label sets
    "baselines": {"federation", "alignment"},
    "apps": {"federation", "alignment", "baselines"},
}
#: known crossings between rooms, each with its reason
ROOM_EXCEPTIONS = {
    # ``python -m mor_server.alignment.pipeline`` is an alias of ``mor align``: its main() calls the apps' CLI
    ("mor_server/alignment/pipeline.py", "apps.cli"),
}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_no_import_crosses_a_layer():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            for line, top in _imports(f):
                if top in ALLOWED and top != pkg and top not in allowed and (rel, top) not in EXCEPTIONS:
                    bad.append(f"{rel}:{line} imports {top}")
    assert not bad, "imports across layers (docs/architecture.md):\n" + "\n".join(bad)


def _server_imports(path: Path):
    """(line, module) of every import of mor_server in one of its files, relative imports resolved."""
    pkg = ["mor_server", *path.relative_to(ROOT / "mor_server").parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("mor_server."):
                yield node.lineno, name.removeprefix("mor_server.")


def test_server_rooms_import_only_what_docs_architecture_allows():
    """federation, alignment, baselines and apps are the rooms of mor_server; each file is in exactly one."""
    loose = [p.name for p in (ROOT / "mor_server").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the rooms of mor_server: {loose}"
    bad = []
    for room, allowed in ROOMS.items():
        for f in sorted((ROOT / "mor_server" / room).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            for line, mod in _server_imports(f):
                target = mod.split(".")[0]
                if target == room or (rel, ".".join(mod.split(".")[:2])) in ROOM_EXCEPTIONS:
                    continue
                if not any(mod == a or mod.startswith(a + ".") for a in allowed):
                    bad.append(f"{rel}:{line} imports mor_server.{mod}")
    assert not bad, "imports across rooms of mor_server (docs/architecture.md):\n" + "\n".join(bad)


def test_the_federation_shares_only_the_contract_with_the_sdk():
    """The server side of the wire speaks the contract in mor/ (types, wire helpers, the training codec), never
    the client SDK: a client-side change cannot change what the server accepts."""
    bad = [f"{f.relative_to(ROOT)}:{line} imports mor_client"
           for f in sorted((ROOT / "mor_server" / "federation").rglob("*.py"))
           for line, top in _imports(f) if top == "mor_client"]
    assert not bad, "\n".join(bad)


def test_importing_the_sdk_pulls_no_training_stack():
    """An institution embedding the SDK with its own scorer needs none of torch, transformers, trl, opacus."""
    code = ("import sys, mor_client, mor_client.cli; "
            "print(','.join(m for m in ('torch', 'transformers', 'trl', 'opacus', 'peft') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"import mor_client pulled in: {r.stdout.strip()}"
