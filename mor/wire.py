"""Conversions between the SDK's Python types and the generated ``mor.v1`` messages (shared by client and server)."""

from __future__ import annotations

import json
import math
from typing import Sequence

from .modes import PrivacyMode
from .v1 import federation_pb2 as pb

from .types import ScoringItem

#: mor.modes.PrivacyMode <-> the wire's mor.v1.PrivacyMode (the same list; PRIVACY_MODE_<NAME> for each member)
MODE_TO_PB = {m.value: pb.PrivacyMode.Value(f"PRIVACY_MODE_{m.name}") for m in PrivacyMode}
PB_TO_MODE = {v: k for k, v in MODE_TO_PB.items()}
SDK_VERSION = "mor-python/0.1.0"
"""What this SDK sends as ``RegisterRequest.sdk_version`` / ``Hello.sdk_version``: ``<implementation>/<version>``,
free text for logs and audit; compatibility is negotiated with :data:`PROTOCOL_REVISION`."""
PROTOCOL_REVISION = 3
"""Newest revision of ``mor.v1`` this code speaks (docs/protocol.md, "Versioning"). Revision 1: the original
contract. Revision 2: ``ScoringTask.score_bound`` (declared score range), Heartbeat echoes, Welcome's revisions.
Revision 3: training rounds of the parameter-sharing baselines (``TrainingTask``, ``ParameterUpdate``,
``RegisterRequest.training_methods``; docs/protocol.md §9)."""
MIN_PROTOCOL_REVISION = 1
"""Oldest revision the server accepts by default (``ServerConfig.min_protocol_revision`` may raise it)."""
PRIVACY_UNITS = ("pair", "annotator")
"""Accepted ``RewardModelCard.privacy_unit`` values (the example-level units of the privacy ledger)."""
MAX_CARD_JSON_BYTES = 64 * 1024


def check_card_pb(card: pb.RewardModelCard) -> tuple[str, str] | None:
    """Wire-level checks of a card beyond ``registry.validate_card``: ``(field, message)`` of the first problem, or
    None. ``card_json`` must be empty or a JSON object of at most 64 KiB; ``privacy_unit`` one of
    :data:`PRIVACY_UNITS`; counts non-negative."""
    if card.privacy_unit not in PRIVACY_UNITS:
        return ("card.privacy_unit", f"card.privacy_unit is {card.privacy_unit!r}; use one of {list(PRIVACY_UNITS)} "
                "(the example-level unit training_epsilon protects)")
    if card.training_examples < 0:
        return ("card.training_examples", f"card.training_examples is {card.training_examples}; it must be >= 0")
    if card.parameter_count < 0:
        return ("card.parameter_count", f"card.parameter_count is {card.parameter_count}; it must be >= 0")
    if card.card_json:
        size = len(card.card_json.encode("utf-8"))
        if size > MAX_CARD_JSON_BYTES:
            return ("card.card_json", f"card.card_json has {size} bytes; at most {MAX_CARD_JSON_BYTES} are accepted")
        try:
            doc = json.loads(card.card_json)
        except ValueError as e:
            return ("card.card_json", f"card.card_json is not valid JSON ({e}); send a JSON object or leave it empty")
        if not isinstance(doc, dict):
            return ("card.card_json", f"card.card_json is a JSON {type(doc).__name__}; it must be a JSON object")
    return None


def mode_to_pb(mode: str) -> int:
    try:
        return MODE_TO_PB[mode]
    except KeyError:
        raise ValueError(f"unknown privacy mode {mode!r}; choose one of {sorted(MODE_TO_PB)}") from None


def items_to_pb(items: Sequence[ScoringItem]) -> list[pb.Item]:
    return [pb.Item(item_id=i.item_id, image=i.image, question=i.question, candidates=list(i.candidates))
            for i in items]


def items_from_pb(items) -> list[ScoringItem]:
    return [ScoringItem(i.item_id, bytes(i.image), i.question, tuple(i.candidates)) for i in items]


def expected_scores(items) -> int:
    return sum(len(i.candidates) for i in items)


def flatten(scores: Sequence[Sequence[float]]) -> list[float]:
    return [float(s) for row in scores for s in row]


def unflatten(flat: Sequence[float], items) -> list[list[float]]:
    out, k = [], 0
    for i in items:
        n = len(i.candidates)
        out.append(list(flat[k:k + n]))
        k += n
    return out


def card_to_pb(card: dict) -> pb.RewardModelCard:
    eps = card.get("training_epsilon", card.get("epsilon"))
    eps = math.inf if eps in (None, "inf", "Infinity") else float(eps)
    modes = card.get("supported_modes", ["plain"])
    return pb.RewardModelCard(
        architecture=str(card.get("architecture", "")),
        parameter_count=int(card.get("parameter_count", 0)),
        training_epsilon=eps,
        training_delta=float(card.get("training_delta", card.get("delta", 0.0)) or 0.0),
        supported_modes=[mode_to_pb(m) for m in modes],
        privacy_unit=str(card.get("privacy_unit", "pair")),
        domain=str(card.get("domain", "")),
        training_examples=int(card.get("training_examples", card.get("data_size", 0)) or 0),
        card_json=json.dumps(card, sort_keys=True, default=str),
    )


def card_from_pb(card: pb.RewardModelCard) -> dict:
    return {
        "architecture": card.architecture,
        "parameter_count": card.parameter_count,
        "training_epsilon": card.training_epsilon,
        "training_delta": card.training_delta,
        "supported_modes": [PB_TO_MODE.get(m, f"unknown({m})") for m in card.supported_modes],
        "privacy_unit": card.privacy_unit,
        "domain": card.domain,
        "training_examples": card.training_examples,
    }
