"""The committed generated stubs (mor/v1) must match what scripts/gen_proto.py makes from proto/."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stale(out: Path) -> list[str]:
    gen = _gen_module()
    gen.generate(out)
    stale = []
    fresh = {p.relative_to(out) for p in (out / "mor").rglob("*.py*")}
    # only the generated package mor/v1 (and mor/__init__.py): mor/ also holds hand-written modules (entry.py...)
    committed = {p.relative_to(ROOT) for p in (ROOT / "mor" / "v1").rglob("*.py*") if "__pycache__" not in p.parts}
    committed.add(Path("mor/__init__.py"))
    for rel in sorted(fresh | committed):
        a, b = out / rel, ROOT / rel
        if not a.exists() or not b.exists() or a.read_bytes() != b.read_bytes():
            stale.append(str(rel))
    return stale


def test_generated_stubs_are_current(tmp_path):
    stale = _stale(tmp_path)
    assert not stale, f"generated stubs are stale: {stale}; run `make proto` (python scripts/gen_proto.py)"


def test_a_proto_change_is_detected(tmp_path, monkeypatch):
    """The check itself must fail when the .proto changes and the stubs are not regenerated."""
    gen = _gen_module()
    src = tmp_path / "proto"
    (src / "mor" / "v1").mkdir(parents=True)
    for p in (ROOT / "proto" / "mor" / "v1").glob("*.proto"):
        text = p.read_text()
        if p.name == "federation.proto":
            text = text.replace("message Heartbeat {\n  int64 unix_ms = 1;\n}",
                                "message Heartbeat {\n  int64 unix_ms = 1;\n  string note = 2;\n}")
        (src / "mor" / "v1" / p.name).write_text(text)
    monkeypatch.setattr(gen, "PROTO_ROOT", src)
    out = tmp_path / "out"
    gen.generate(out)
    changed = (out / "mor/v1/federation_pb2.py").read_bytes() != (ROOT / "mor/v1/federation_pb2.py").read_bytes()
    assert changed
