"""Client-side data: the easy-vqa loader, a procedural Pillow task family, synthetic public easy-vqa-style data
for pre-training, preference pairs and federation partitions (server public split, server unlabeled pool,
heterogeneous client splits)."""

from .easyvqa import ANSWERS, VQAExample, answer_type, candidate_answers, load_easyvqa
from .pairs import PreferencePair, make_pairs
from .partition import ClientData, FederationSplit, make_federation_split
from .shapes import SHAPES_ANSWERS, make_shapes_examples
from .synthetic import make_synthetic_examples

__all__ = [
    "ANSWERS", "VQAExample", "answer_type", "candidate_answers", "load_easyvqa",
    "PreferencePair", "make_pairs", "ClientData", "FederationSplit", "make_federation_split",
    "SHAPES_ANSWERS", "make_shapes_examples", "make_synthetic_examples",
]
