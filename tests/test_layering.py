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


def test_importing_the_sdk_pulls_no_training_stack():
    """An institution embedding the SDK with its own scorer needs none of torch, transformers, trl, opacus."""
    code = ("import sys, mor_client, mor_client.cli; "
            "print(','.join(m for m in ('torch', 'transformers', 'trl', 'opacus', 'peft') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"import mor_client pulled in: {r.stdout.strip()}"
