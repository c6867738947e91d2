"""Registry of federation clients (pure state: who registered, with which card, who is online, last seen)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mor.modes import MODES

KNOWN_MODES = MODES  # mor.modes: the one list of privacy modes


class CardInvalid(ValueError):
    """A reward-model card failed validation; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def validate_card(card: dict) -> dict:
    """Check a client's reward-model card (as a dict with the proto's field names)."""
    arch = card.get("architecture", "")
    if not isinstance(arch, str) or not arch.strip():
        raise CardInvalid("card.architecture", "card.architecture is empty; name the reward model's architecture")
    if int(card.get("parameter_count", 0)) < 0:
        raise CardInvalid("card.parameter_count", "card.parameter_count must be >= 0")
    eps = float(card.get("training_epsilon", math.inf))
    if math.isnan(eps) or eps < 0:
        raise CardInvalid("card.training_epsilon",
                          f"card.training_epsilon is {eps}; use a value >= 0, or +inf for a model trained without DP")
    delta = float(card.get("training_delta", 0.0))
    if not (0.0 <= delta < 1.0):
        raise CardInvalid("card.training_delta", f"card.training_delta is {delta}; it must be in [0, 1)")
    modes = list(card.get("supported_modes", []))
    if not modes:
        raise CardInvalid("card.supported_modes", "card.supported_modes is empty; list at least one privacy mode")
    bad = [m for m in modes if m not in KNOWN_MODES]
    if bad:
        raise CardInvalid("card.supported_modes", f"card.supported_modes has unknown modes {bad}; known: {KNOWN_MODES}")
    return card


@dataclass
class ClientInfo:
    client_id: str
    card: dict
    registered_at: float
    identity_public_key: object | None = None   # Ed25519PublicKey from the identity certificate, if given
    identity_certificate: bytes = b""
    online: bool = False
    session_id: str | None = None
    last_seen: float = 0.0
    rounds_answered: int = 0
    dropouts: int = 0
    refusals: int = 0
    extra: dict = field(default_factory=dict)

    def supports(self, mode: str) -> bool:
        return mode in self.card.get("supported_modes", [])


class ClientRegistry:
    def __init__(self):
        self._clients: dict[str, ClientInfo] = {}

    def register(self, client_id: str, card: dict, now: float, *, identity_public_key=None,
                 identity_certificate: bytes = b"") -> ClientInfo:
        validate_card(card)
        prev = self._clients.get(client_id)
        info = ClientInfo(client_id, card, now, identity_public_key, identity_certificate)
        if prev is not None:  # re-registration keeps counters and connection state
            info.online, info.session_id, info.last_seen = prev.online, prev.session_id, prev.last_seen
            info.rounds_answered, info.dropouts, info.refusals = prev.rounds_answered, prev.dropouts, prev.refusals
        self._clients[client_id] = info
        return info

    def get(self, client_id: str) -> ClientInfo | None:
        return self._clients.get(client_id)

    def connect(self, client_id: str, session_id: str, now: float) -> str | None:
        """Mark a session online; returns the session id it replaces, if any."""
        info = self._clients[client_id]
        old = info.session_id if info.online else None
        info.online, info.session_id, info.last_seen = True, session_id, now
        return old

    def disconnect(self, client_id: str, session_id: str, now: float) -> bool:
        """Mark offline if ``session_id`` is still the current session (a replaced session does not count)."""
        info = self._clients.get(client_id)
        if info is None or info.session_id != session_id:
            return False
        info.online, info.session_id, info.last_seen = False, None, now
        return True

    def seen(self, client_id: str, now: float) -> None:
        if client_id in self._clients:
            self._clients[client_id].last_seen = now

    def online(self, mode: str | None = None) -> list[str]:
        return sorted(c for c, i in self._clients.items() if i.online and (mode is None or i.supports(mode)))

    def all(self) -> list[ClientInfo]:
        return [self._clients[c] for c in sorted(self._clients)]
