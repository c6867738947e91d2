"""Answer types learned from the server's public split: which answers a question can take.

A reward model is trained on pairs whose rejected answer has the *same type* as the right one (a colour for a
colour question), so its score for an answer of another type ("gray" to "is there a circle?") is unconstrained:
a policy optimising the mixture can drift there and be paid for it. The format rule therefore checks the answer's
type, and the MoR reward only sends well-typed completions to the clients.

The types are learned, not hard-coded. Questions are reduced to templates by masking the words of the answer
vocabulary (``"is there a red circle?"`` -> ``"is there a * * ?"``). Two answer words are of the same type when
they are answers of the same template in the labelled public split, or fill the same slot of a template in any
question (labelled or unlabeled: reading a question is not reading its answer). The type of a template is the
type of its public answers; a template never seen is matched to the most similar known one. Pure and
deterministic: no I/O, no model.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

_TOKEN = re.compile(r"[a-z0-9]+|\?")
_PUNCT = {"?", ".", ",", "!"}


def _words(text: str) -> list[str]:
    return _TOKEN.findall(str(text).lower())


class AnswerSchema:
    """Which answer words are valid for a question (see the module doc).

    Build with :meth:`fit`; query with :meth:`valid_answers` / :meth:`is_valid`; persist with
    :meth:`to_dict` / :meth:`from_dict`.
    """

    def __init__(self, vocabulary: Iterable[str], template_types: Mapping[str, Iterable[str]]):
        self.vocabulary = frozenset(w.lower() for w in vocabulary)
        if not self.vocabulary:
            raise ValueError("AnswerSchema: the answer vocabulary is empty")
        self.template_types = {t: frozenset(a) for t, a in template_types.items()}
        self._token_sets = {t: set(t.split()) for t in self.template_types}

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, labelled: Iterable[tuple[str, str]], *, questions: Iterable[str] = (),
            vocabulary: Iterable[str] | None = None) -> "AnswerSchema":
        """labelled: (question, answer) pairs of the server's public split. questions: further questions
        (e.g. the unlabeled prompt pool; only their wording is used). vocabulary: every answer word of the task
        (default: the answers in ``labelled``); answers outside it are ignored."""
        labelled = [(str(q), str(a).strip().lower()) for q, a in labelled]
        if not labelled:
            raise ValueError("AnswerSchema.fit: no labelled (question, answer) pairs; pass the server's public split")
        vocab = {w.lower() for w in vocabulary} if vocabulary is not None else {a for _, a in labelled}
        vocab = {w for w in vocab if w and len(_words(w)) == 1}
        if not vocab:
            raise ValueError("AnswerSchema.fit: the answer vocabulary is empty (answers must be single words)")
        parent = {w: w for w in vocab}

        def find(w):
            while parent[w] != w:
                parent[w] = parent[parent[w]]
                w = parent[w]
            return w

        def union(ws):
            ws = [w for w in ws if w in parent]
            for w in ws[1:]:
                ra, rb = find(ws[0]), find(w)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)

        answers_of: dict[str, set[str]] = {}
        slots: dict[tuple[str, int], set[str]] = {}
        for q in [q for q, _ in labelled] + [str(q) for q in questions]:
            t, fill = cls._template(q, vocab)
            for i, w in enumerate(fill):
                slots.setdefault((t, i), set()).add(w)
        for q, a in labelled:
            if a in vocab:
                answers_of.setdefault(cls._template(q, vocab)[0], set()).add(a)
        for ws in list(answers_of.values()) + list(slots.values()):
            union(sorted(ws))
        groups: dict[str, set[str]] = {}
        for w in vocab:
            groups.setdefault(find(w), set()).add(w)
        types = {t: frozenset().union(*(groups[find(a)] for a in ans)) for t, ans in answers_of.items()}
        return cls(vocab, types)

    @staticmethod
    def _template(question: str, vocab) -> tuple[str, list[str]]:
        words = _words(question)
        return " ".join("*" if w in vocab else w for w in words), [w for w in words if w in vocab]

    # ------------------------------------------------------------------ queries
    def types(self) -> list[frozenset[str]]:
        """The distinct answer types (sets of answer words) the schema knows, largest first."""
        return sorted(set(self.template_types.values()), key=lambda s: (-len(s), sorted(s)))

    def valid_answers(self, question: str) -> frozenset[str]:
        """Answer words valid for ``question``: its template's type, else the most similar known template's
        (Jaccard over template words; ties merge), else the whole vocabulary."""
        t, _ = self._template(question, self.vocabulary)
        if t in self.template_types:
            return self.template_types[t]
        toks = set(t.split())
        best, out = 0.0, set()
        for other, ot in self._token_sets.items():
            j = len(toks & ot) / max(1, len(toks | ot))
            if j > best:
                best, out = j, set(self.template_types[other])
            elif j == best and j > 0:
                out |= self.template_types[other]
        return frozenset(out) if best >= 0.5 else self.vocabulary

    def is_valid(self, question: str, completion: str) -> bool:
        """True when the completion is exactly one answer word (punctuation ignored) valid for the question."""
        words = [w for w in _words(completion) if w not in _PUNCT]
        return len(words) == 1 and words[0] in self.valid_answers(question)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"vocabulary": sorted(self.vocabulary),
                "template_types": {t: sorted(a) for t, a in sorted(self.template_types.items())}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "AnswerSchema":
        try:
            return cls(d["vocabulary"], d["template_types"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"AnswerSchema.from_dict: not an answer schema ({e}); expected keys vocabulary, "
                             f"template_types") from None

    @classmethod
    def untyped(cls, answers: Sequence[str]) -> "AnswerSchema":
        """A schema that only checks membership of the answer set (every question takes every answer)."""
        return cls(answers, {})


__all__ = ["AnswerSchema"]
