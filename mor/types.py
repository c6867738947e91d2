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


class ScoreShapeError(ValueError):
    """A scorer returned something other than one list of scores per item, one score per candidate."""


def check_score_shape(scores, items: Sequence[ScoringItem]) -> list[list[float]]:
    """Check a scorer's return value against the task: ``scores[i][j]`` scores ``items[i].candidates[j]``.

    Raises :class:`ScoreShapeError` with a one-line message that shows the expected shape, e.g.
    ``expected list[list[float]] of shape [3, 2, 2] (one list per item, one score per candidate); got a flat list
    of 7 numbers``. Returns the scores as lists of floats."""
    want = [len(it.candidates) for it in items]
    expected = f"expected list[list[float]] of shape {want} (one list per item, one score per candidate)"

    def describe(x) -> str:
        if isinstance(x, (int, float)):
            return f"a number ({x!r})"
        try:
            n = len(x)
        except TypeError:
            return f"a {type(x).__name__}"
        if n and all(isinstance(v, (int, float)) for v in x):
            return f"a flat {type(x).__name__} of {n} numbers"
        return f"a {type(x).__name__} of {n} entries"

    if isinstance(scores, (str, bytes, dict)) or not hasattr(scores, "__len__") or not hasattr(scores, "__iter__"):
        raise ScoreShapeError(f"scorer returned {describe(scores)}; {expected}")
    rows = list(scores)
    if len(rows) != len(items) or any(isinstance(r, (int, float, str, bytes)) or not hasattr(r, "__len__")
                                      for r in rows):
        raise ScoreShapeError(f"scorer returned {describe(scores)}; {expected}")
    out = []
    for i, (row, n) in enumerate(zip(rows, want)):
        vals = list(row)
        if len(vals) != n:
            got = [len(list(r)) for r in rows]
            raise ScoreShapeError(f"scorer returned shape {got} (items[{i}] has {len(vals)} scores for {n} "
                                  f"candidates); {expected}")
        try:
            out.append([float(v) for v in vals])
        except (TypeError, ValueError):
            raise ScoreShapeError(f"scorer returned a non-number in scores[{i}] ({vals!r:.80}); {expected}") from None
    return out


class FunctionScorer:
    """Adapts a plain function ``f(items) -> list[list[float]]`` to the :class:`Scorer` protocol."""

    def __init__(self, fn):
        self._fn = fn

    def score(self, items: Sequence[ScoringItem]) -> list[list[float]]:
        return self._fn(items)
