"""An in-process :class:`~mor_server.alignment.rewards.RewardBackend` over local scorers (no network, no privacy mode).

It is the baseline the federation benchmark compares against (same reward models, called directly) and what
the alignment tests use.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from mor.types import ScoringItem, Scorer

from .rewards import RoundFailed


class InProcessBackend:
    """RewardBackend over ``{client_id: Scorer}`` called in this process."""

    def __init__(self, scorers: Mapping[str, Scorer]):
        if not scorers:
            raise ValueError("InProcessBackend: scorers is empty; pass {client_id: scorer}")
        for name, s in scorers.items():
            if not callable(getattr(s, "score", None)):
                raise TypeError(f"InProcessBackend: scorer {name!r} has no .score(items) method")
        self.scorers = dict(scorers)
        self.rounds = 0

    def client_ids(self) -> list[str]:
        """The clients (every registered scorer is live in process)."""
        return list(self.scorers)

    def _scores(self, client_id: str, items: Sequence[ScoringItem]) -> list[list[float]]:
        try:
            s = self.scorers[client_id].score(items)
        except Exception as e:  # a client failing is a failed round, as over the wire
            raise RoundFailed(f"client {client_id!r} failed to score: {e}") from e
        if len(s) != len(items) or any(len(r) != len(it.candidates) for r, it in zip(s, items)):
            raise RoundFailed(f"client {client_id!r} returned scores of the wrong shape")
        return [[float(v) for v in r] for r in s]

    def client_scores(self, items: Sequence[ScoringItem], *, purpose: str) -> dict[str, list[list[float]]]:
        """Every live client's plain scores."""
        live = self.client_ids()
        if not live:
            raise RoundFailed("no live clients")
        self.rounds += 1
        return {c: self._scores(c, items) for c in live}

    def mixed_scores(self, items: Sequence[ScoringItem], weights: dict[str, list[float]]) -> list[list[float]]:
        """``sum_k weights[k][i] * score_k(items[i].candidates[j])`` over the clients named in ``weights``."""
        for c, w in weights.items():
            if len(w) != len(items):
                raise ValueError(f"weights[{c!r}] has {len(w)} entries for {len(items)} items")
        active = [c for c, w in weights.items() if any(v != 0 for v in w)]
        gone = [c for c in active if c not in self.client_ids()]
        if gone:
            raise RoundFailed(f"clients {gone} are not live")
        self.rounds += 1
        out = [[0.0] * len(it.candidates) for it in items]
        for c in active:
            s = self._scores(c, items)
            w = weights[c]
            for i, row in enumerate(s):
                for j, v in enumerate(row):
                    out[i][j] += w[i] * v
        return out


class LabelExpertScorer:
    """A reference reward model for baselines: strict exact match against the labels it holds for its own question
    types, deterministic uninformative noise in [0, 1) elsewhere (a client that is an expert of one domain).

    examples: labelled examples (``.image`` bytes, ``.question``, ``.answer``, ``.question_type``) the client holds.
    It is an upper bound on what a trained reward model of that client can give, not a trained model.
    salt: None (default): every such client gives the same noise for an item and answer; a string: this client's own
    noise, independent of other salts' (clients whose opinions off their types are independent noise).
    """

    def __init__(self, examples, question_types: Sequence[str], salt: str | None = None):
        import hashlib

        from .policy import exact_match, normalize_answer

        self._sha = lambda b: hashlib.sha1(b).digest()
        self._match = exact_match
        self._prefix = "" if salt is None else f"{salt}|"
        qt = set(question_types)
        self.truth = {(self._sha(e.image), e.question): normalize_answer(e.answer)
                      for e in examples if e.question_type in qt}
        if not self.truth:
            raise ValueError(f"LabelExpertScorer: no example of question types {sorted(qt)} given")

    def score(self, items: Sequence[ScoringItem]) -> list[list[float]]:
        import hashlib

        out = []
        for it in items:
            t = self.truth.get((self._sha(it.image), it.question))
            out.append([float(self._match(c, t)) if t is not None else
                        int.from_bytes(hashlib.sha1(f"{self._prefix}{it.item_id}|{c}".encode()).digest()[:4],
                                       "little") / 2**32
                        for c in it.candidates])
        return out
