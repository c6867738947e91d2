"""The privacy modes of a scoring round: the one list every part of MoR uses (CLIs, cards, server, metrics).

A mode says what leaves a client for one round (docs/protocol.md, README "Privacy modes on the wire"):

* ``plain``: the client's scores, in the clear (trusted pilots);
* ``dp``: the client's scores with calibrated Gaussian noise, charged to its ledger;
* ``secagg``: the scores times the routing weight, masked by SecAgg+: the server learns only the weighted sum;
* ``secagg+dp``: as ``secagg``, plus each client's share of discrete-Gaussian noise on the sum (charged).

``PrivacyMode`` is a ``str`` enum, so a member equals its wire string (``PrivacyMode.SECAGG_DP == "secagg+dp"``)
and code that stores or compares plain strings keeps working; the ``mor.v1.PrivacyMode`` protobuf enum is the
same list on the wire (``mor.wire.MODE_TO_PB``).
"""

from __future__ import annotations

import enum


class PrivacyMode(str, enum.Enum):
    PLAIN = "plain"
    DP = "dp"
    SECAGG = "secagg"
    SECAGG_DP = "secagg+dp"

    def __str__(self) -> str:
        return self.value

    @property
    def masked(self) -> bool:
        """Secure aggregation: the server sees only the weighted sum over the round's clients."""
        return self in (PrivacyMode.SECAGG, PrivacyMode.SECAGG_DP)

    @property
    def charged(self) -> bool:
        """A DP release: the client charges its privacy ledger before anything leaves."""
        return self in (PrivacyMode.DP, PrivacyMode.SECAGG_DP)


#: every mode, in the wire enum's order: ("plain", "dp", "secagg", "secagg+dp")
MODES: tuple[str, ...] = tuple(m.value for m in PrivacyMode)
#: the secure-aggregation modes (the server unmasks only a sum): ("secagg", "secagg+dp")
SECAGG_MODES: tuple[str, ...] = tuple(m.value for m in PrivacyMode if m.masked)
#: the modes in which the server receives each client's own scores (what router calibration needs): ("plain", "dp")
PER_CLIENT_MODES: tuple[str, ...] = tuple(m.value for m in PrivacyMode if not m.masked)
#: the modes whose release is charged to the client's ledger: ("dp", "secagg+dp")
DP_MODES: tuple[str, ...] = tuple(m.value for m in PrivacyMode if m.charged)


def is_masked(mode: str) -> bool:
    """True for ``secagg`` and ``secagg+dp`` (the strings or the enum members)."""
    return mode in SECAGG_MODES


__all__ = ["DP_MODES", "MODES", "PER_CLIENT_MODES", "PrivacyMode", "SECAGG_MODES", "is_masked"]
