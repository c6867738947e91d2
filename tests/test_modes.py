"""One list of privacy modes (mor.modes): it matches the wire enum, and no module declares its own copy."""

from __future__ import annotations

import re
from pathlib import Path

from mor.modes import DP_MODES, MODES, PER_CLIENT_MODES, SECAGG_MODES, PrivacyMode, is_masked
from mor.v1 import federation_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_modes_match_the_wire_enum():
    wire = [n for n in pb.PrivacyMode.keys() if n != "PRIVACY_MODE_UNSPECIFIED"]
    assert wire == [f"PRIVACY_MODE_{m.name}" for m in PrivacyMode]
    assert MODES == ("plain", "dp", "secagg", "secagg+dp")
    assert SECAGG_MODES == ("secagg", "secagg+dp") and DP_MODES == ("dp", "secagg+dp")
    assert PER_CLIENT_MODES == ("plain", "dp")
    assert PrivacyMode.SECAGG_DP == "secagg+dp" and str(PrivacyMode.DP) == "dp"
    assert is_masked("secagg") and is_masked(PrivacyMode.SECAGG_DP) and not is_masked("dp")


def test_no_module_declares_its_own_list_of_modes():
    """A mode list written out by hand (a tuple/list of two or more mode strings) outside mor/modes.py is a second
    home that a new mode would miss; use MODES / SECAGG_MODES / DP_MODES."""
    lit = r'"(?:plain|dp|secagg|secagg\+dp)"'
    pattern = re.compile(rf"[(\[]\s*{lit}(?:\s*,\s*{lit})+\s*,?\s*[)\]]")
    found = []
    for pkg in ("mor", "mor_server", "mor_client"):
        for f in (ROOT / pkg).rglob("*.py"):
            if f.name == "modes.py" or "_pb2" in f.name:
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "mode lists outside mor/modes.py:\n" + "\n".join(found)
