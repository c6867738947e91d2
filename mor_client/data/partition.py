"""Federation splits: a server public (labelled) calibration split, a server unlabeled prompt pool and
heterogeneous client splits, deterministic from a seed.

Clients draw from easy-vqa's *train* split (and, with ``include_shapes_client``, from procedural images of
seed ``seed``); the server draws from easy-vqa's *test* split (and procedural images of another index
range), so no image and no example is ever shared between a client and the server.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from .easyvqa import VQAExample, load_easyvqa
from .pairs import PreferencePair, make_pairs
from .shapes import make_shapes_examples

EASYVQA_TYPES = ("color", "shape", "yesno")
SCHEMES = ("by_question_type", "dirichlet", "iid")


@dataclass
class ClientData:
    """One client's private data: training pairs, a held-out split (disjoint images) and a description."""

    train: list[PreferencePair]
    heldout: list[PreferencePair]
    domain_desc: str
    question_types: tuple[str, ...] = field(default=())


@dataclass
class FederationSplit:
    """server_public: small labelled calibration split (server only). server_unlabeled: public prompts for
    GRPO (the server never reads ``.answer``). clients: name -> :class:`ClientData`."""

    server_public: list[VQAExample]
    server_unlabeled: list[VQAExample]
    clients: dict[str, ClientData]
    server_heldout: list[VQAExample] = field(default_factory=list)
    """Held-out test items of the procedural family (``include_shapes_client``; images of neither server split), which
    ``mor_server.alignment.pipeline.heldout_test`` adds to easy-vqa's held-out test images. Empty otherwise."""


def _sizes(spec, n: int, name: str) -> list[int | None]:
    if spec is None or isinstance(spec, int):
        if isinstance(spec, int) and spec < 1:
            raise ValueError(f"{name} must be >= 1, got {spec}")
        return [spec] * n
    spec = list(spec)
    if len(spec) != n:
        raise ValueError(f"{name} has {len(spec)} entries but there are {n} clients")
    return spec


def make_federation_split(*, seed: int, scheme: str = "by_question_type", n_clients: int = 3,
                          dirichlet_alpha: float = 0.5, pairs_per_client: int | Sequence[int] | None = None,
                          public_size: int = 300, unlabeled_size: int = 600, flip_fraction: float = 0.0,
                          include_shapes_client: bool = False, heldout_fraction: float = 0.1,
                          max_heldout: int = 600, rejected_per_example: int = 1,
                          n_annotators: int = 8, shapes_test_size: int = 150,
                          synthetic_prompt_images: int = 0) -> FederationSplit:
    """Split easy-vqa (and optionally the procedural family) into a federation.

    scheme:
      * ``by_question_type``: client k holds question type ``("color", "shape", "yesno")[k % 3]``; clients
        sharing a type hold disjoint image subsets.
      * ``dirichlet``: each question type is spread over clients with Dirichlet(``dirichlet_alpha``)
        proportions, at the level of images (an image's questions stay with one client).
      * ``iid``: images spread uniformly.
    ``pairs_per_client``: None (all available, naturally unequal), an int cap, or one cap per client.
    ``include_shapes_client``: the last client instead holds the procedural "shapes" domain
    (count / relation questions); the server's public and unlabeled sets then also contain shapes items, and
    ``server_heldout`` holds ``shapes_test_size`` more (a third index range) for the held-out test.
    ``synthetic_prompt_images``: the server also renders this many public synthetic images
    (:mod:`mor_client.data.synthetic`, a seed of their own; a colour, a shape and a yes/no question each) and adds
    them to ``server_unlabeled`` as GRPO prompts: more images to align on at no privacy cost, without taking any
    from easy-vqa's test split (so the held-out test is unchanged).
    Each client's held-out split uses images its training split does not.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if dirichlet_alpha <= 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
    if synthetic_prompt_images < 0:
        raise ValueError(f"synthetic_prompt_images must be >= 0, got {synthetic_prompt_images}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    caps = _sizes(pairs_per_client, n_clients, "pairs_per_client")
    rng = random.Random(seed)
    n_easy = n_clients - 1 if include_shapes_client else n_clients

    # ---- server side: easy-vqa test split (+ procedural items from a separate index range)
    test = load_easyvqa("test")
    test_images = sorted({e.image_id for e in test}, key=lambda s: int(s.split("-")[1]))
    rng.shuffle(test_images)
    n_pub_img = max(1, public_size // 4)
    pub_imgs, unl_imgs = set(test_images[:n_pub_img]), set(test_images[n_pub_img:n_pub_img + max(1, unlabeled_size // 4)])
    public = [e for e in test if e.image_id in pub_imgs]
    unlabeled = [e for e in test if e.image_id in unl_imgs]
    heldout: list[VQAExample] = []
    if include_shapes_client:
        if shapes_test_size < 0:
            raise ValueError(f"shapes_test_size must be >= 0, got {shapes_test_size}")
        n_sh_pub = max(1, public_size // (n_clients + 1))
        n_sh_unl = max(1, unlabeled_size // (n_clients + 1))
        public += make_shapes_examples(n_sh_pub, seed=seed + 1_000_003)
        unlabeled += make_shapes_examples(n_sh_unl, seed=seed + 1_000_003, start=n_sh_pub)
        heldout = make_shapes_examples(shapes_test_size, seed=seed + 1_000_003, start=n_sh_pub + n_sh_unl)
    rng.shuffle(public)
    rng.shuffle(unlabeled)
    public, unlabeled = public[:public_size], unlabeled[:unlabeled_size]
    if synthetic_prompt_images:
        from .synthetic import make_synthetic_examples

        # appended (the trainer shuffles its prompts), drawing nothing from ``rng``: the clients' split is unchanged
        unlabeled += make_synthetic_examples(synthetic_prompt_images, seed=20_000 + seed, questions_per_image=3)

    # ---- client side: easy-vqa train split
    train = load_easyvqa("train")
    by_image: dict[str, list[VQAExample]] = defaultdict(list)
    for e in train:
        by_image[e.image_id].append(e)
    images = sorted(by_image, key=lambda s: int(s.split("-")[1]))
    rng.shuffle(images)
    assigned: list[list[VQAExample]] = [[] for _ in range(n_easy)]
    descs, qtypes = [], []
    if n_easy:
        if scheme == "by_question_type":
            types = [EASYVQA_TYPES[k % 3] for k in range(n_easy)]
            for t in EASYVQA_TYPES:
                owners = [k for k in range(n_easy) if types[k] == t]
                for j, img in enumerate(images):
                    if owners:
                        k = owners[j % len(owners)]
                        assigned[k] += [e for e in by_image[img] if e.question_type == t]
            qtypes = [(t,) for t in types]
            descs = [f"easy-vqa {t} questions" for t in types]
        else:
            nprng = __import__("numpy").random.default_rng(seed)
            props = (nprng.dirichlet([dirichlet_alpha] * n_easy) if scheme == "dirichlet"
                     else [1.0 / n_easy] * n_easy)
            for img in images:
                k = int(nprng.choice(n_easy, p=props))
                assigned[k] += by_image[img]
            qtypes = [tuple(sorted({e.question_type for e in a})) for a in assigned]
            descs = [f"easy-vqa {scheme} share {p:.2f} of images" for p in props]
    if include_shapes_client:
        n_sh = caps[-1] if caps[-1] is not None else 6000
        assigned.append(make_shapes_examples(int(n_sh / (1 - heldout_fraction)) + 1, seed=seed))
        qtypes.append(("count", "relation"))
        descs.append("procedural shapes: counting and left/right relations")

    clients: dict[str, ClientData] = {}
    for k, exs in enumerate(assigned):
        crng = random.Random(f"{seed}:client:{k}")
        imgs = sorted({e.image_id for e in exs})
        crng.shuffle(imgs)
        n_ho = max(1, int(len(imgs) * heldout_fraction))
        ho_imgs = set(imgs[:n_ho])
        tr = [e for e in exs if e.image_id not in ho_imgs]
        ho = [e for e in exs if e.image_id in ho_imgs]
        crng.shuffle(tr)
        crng.shuffle(ho)
        tr_pairs = make_pairs(tr, seed=seed * 7919 + k, flip_fraction=flip_fraction, n_annotators=n_annotators,
                              rejected_per_example=rejected_per_example)
        if caps[k] is not None:
            tr_pairs = tr_pairs[:caps[k]]
        ho_pairs = make_pairs(ho, seed=seed * 7919 + k + 104729, n_annotators=n_annotators)[:max_heldout]
        clients[f"client{k}"] = ClientData(train=tr_pairs, heldout=ho_pairs, domain_desc=descs[k],
                                           question_types=qtypes[k])
    return FederationSplit(server_public=public, server_unlabeled=unlabeled, clients=clients, server_heldout=heldout)
