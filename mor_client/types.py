"""Types shared by the client SDK, the reward-model zoo and the server (no I/O, no grpc).

A *scorer* is what an institution plugs into :class:`mor_client.FederationClient`: it maps a batch of
public items (image, question, candidate answers) to one reward score per candidate. Scores are plain
floats; the privacy mode (plain / dp / secagg / secagg+dp) is applied by the SDK afterwards, so a scorer
never has to know about it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class ScoringItem:
    """One public item of a scoring task.

    image: encoded image bytes (PNG or JPEG) exactly as sent on the wire.
    question: the question text.
    candidates: the candidate answers to score (at least one).
    item_id: an identifier unique within the task.
    """

    item_id: str
    image: bytes
    question: str
    candidates: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False)

    def pil_image(self):
        """Decode the image bytes with Pillow (RGB)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.image)).convert("RGB")


@runtime_checkable
class Scorer(Protocol):
    """Maps a batch of items to scores: ``result[i][j]`` scores ``items[i].candidates[j]``."""

    def score(self, items: Sequence[ScoringItem]) -> list[list[float]]: ...


class FunctionScorer:
    """Adapts a plain function ``f(items) -> list[list[float]]`` to the :class:`Scorer` protocol."""

    def __init__(self, fn):
        self._fn = fn

    def score(self, items: Sequence[ScoringItem]) -> list[list[float]]:
        return self._fn(items)
