"""The reward that reaches TRL is the routed mixture of the clients' rewards, computed over real gRPC with mTLS
(plain and secagg); a failed round reaches TRL as None, never as 0."""

import numpy as np
import pytest

from mor_client import ClientCredentials, ClientThread, FederationClient, ReleasePolicy
from mor_client.secagg_session import SecAggSession
from mor_server.alignment.features import FeatureExtractor
from mor_server.federation.backend import FederatedBackend
from mor_server.alignment.inprocess import InProcessBackend
from mor_server.alignment.rewards import MoRReward
from mor_server.alignment.router import MoRRouter
from mor_server.federation.config import ServerConfig
from mor_server.federation.thread import ServerThread

from fedutil import LengthScorer

NAMES = ("alice", "bob", "carol")


class WordScorer:
    """Prefers a given answer word (a different one per client), so clients disagree and routing matters."""

    def __init__(self, word):
        self.word = word

    def score(self, items):
        return [[1.0 if c == self.word else -0.5 * len(c) / 8 for c in it.candidates] for it in items]


def _federation(pki_dir, scorers: dict, architecture: str):
    """A server and one client thread per scorer (plain and secagg), over mTLS; yields (server, client threads)."""
    srv = ServerThread(ServerConfig(pki_dir=pki_dir))
    srv.start()
    threads = []
    for n in NAMES:
        creds = ClientCredentials.from_dir(pki_dir / "clients" / n)
        card = {"architecture": architecture, "parameter_count": 0, "supported_modes": ["plain", "secagg"]}
        c = FederationClient(f"localhost:{srv.port}", creds, scorers[n], card=card,
                             policy=ReleasePolicy(("plain", "secagg")), secagg_handler=SecAggSession(creds))
        threads.append(ClientThread(c).start())
    srv.wait_for_clients(3, timeout=20)
    yield srv, threads
    for t in threads:
        t.stop()
    srv.stop()


@pytest.fixture(scope="module")
def fed(pki_dir):
    scorers = {"alice": WordScorer("red"), "bob": WordScorer("circle"), "carol": WordScorer("yes")}
    for srv, threads in _federation(pki_dir, scorers, "word"):
        yield srv, scorers, threads


def _batch(png):
    questions = ["what color is the shape?", "what shape is in the image?", "is there a red shape?"]
    completions, kw = [], {"question": [], "image_png": [], "example_id": []}
    for i, q in enumerate(questions):
        for ans in ("red", "circle", "yes", "blue"):
            completions.append([{"role": "assistant", "content": ans}])
            kw["question"].append(q)
            kw["image_png"].append(png)
            kw["example_id"].append(f"ex{i}")
    return completions, kw


@pytest.mark.parametrize("mode", ["plain", "secagg"])
def test_reward_reaching_trl_is_the_routed_mixture(fed, png_bytes, mode):
    srv, scorers, _ = fed
    fe = FeatureExtractor()
    router = MoRRouter(list(NAMES), fe.dim, seed=3)
    completions, kw = _batch(png_bytes)
    fed_reward = MoRReward(FederatedBackend(srv, mix_mode=mode, timeout=20), router, fe)
    local_reward = MoRReward(InProcessBackend(scorers), router, fe)
    got = fed_reward(prompts=None, completions=completions, **kw)
    expect = local_reward(prompts=None, completions=completions, **kw)
    assert None not in got
    np.testing.assert_allclose(got, expect, atol=2e-4)
    # it is a mixture, not any single client's reward
    single = [InProcessBackend({c: scorers[c]}) for c in NAMES]
    for b in single:
        r = MoRReward(b, MoRRouter([b.client_ids()[0]], fe.dim), fe)(prompts=None, completions=completions, **kw)
        assert not np.allclose(got, r, atol=1e-3)


def test_failed_round_is_none_not_zero(fed, png_bytes):
    srv, scorers, _ = fed
    fe = FeatureExtractor()
    router = MoRRouter(list(NAMES), fe.dim)
    # a round that cannot reach min_clients fails; the one retry layer (MoRReward's RetryPolicy) tries again, then
    # TRL gets None for the whole batch; the backend itself never retries (no stacked retries)
    backend = FederatedBackend(srv, mix_mode="plain", min_clients=4, timeout=5)
    reward = MoRReward(backend, router, fe, retries=1)
    completions, kw = _batch(png_bytes)
    out = reward(prompts=None, completions=completions, **kw)
    assert out == [None] * len(completions)
    assert reward.rounds_failed == 1 and reward.attempts_failed == 2
    assert backend.rounds["failed"] == 2 and backend.rounds["ok"] == 0


class GradedScorer:
    """Scores answers on a wide scale (up to 40), ranking a favourite above a second choice above the rest."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def score(self, items):
        return [[40.0 if c == self.first else 25.0 if c == self.second else -10.0 for c in it.candidates]
                for it in items]


@pytest.fixture(scope="module")
def loud_fed(pki_dir):
    scorers = {"alice": GradedScorer("red", "blue"), "bob": GradedScorer("circle", "yes"),
               "carol": GradedScorer("yes", "red")}
    for srv, _ in _federation(pki_dir, scorers, "graded"):
        yield srv, scorers


def test_secagg_encodes_scores_in_the_range_the_calibration_measured(loud_fed, png_bytes):
    """secagg clips every score to the round's value range before weighting. With the transport's default range (16)
    a client scoring its first and second choice 40 and 25 sends both as 16: the mixture can no longer tell them
    apart (in the demo this took a colour client's held-out ranking from 91% to 53%). The calibration's score bound
    (router.calibration["score_bound"]) sets a range that holds them."""
    from mor_server.federation.backend import secagg_value_range

    assert secagg_value_range(0.0) == secagg_value_range(float("nan")) == 16.0
    assert secagg_value_range(9.0) == 16.0 and secagg_value_range(40.0) == 64.0 and secagg_value_range(47.5) == 128.0
    srv, scorers = loud_fed
    fe = FeatureExtractor()
    router = MoRRouter(list(NAMES), fe.dim, seed=3)
    completions, kw = _batch(png_bytes)
    expect = MoRReward(InProcessBackend(scorers), router, fe)(prompts=None, completions=completions, **kw)
    clipped = MoRReward(FederatedBackend(srv, mix_mode="secagg", timeout=20), router, fe)(
        prompts=None, completions=completions, **kw)
    # "red" (alice's 40) and "blue" (alice's 25) on the colour question: alice's part of the gap is gone once clipped
    assert np.max(np.abs(np.asarray(clipped) - np.asarray(expect))) > 5.0
    assert abs(clipped[0] - clipped[3]) < 0.6 * abs(expect[0] - expect[3])
    backend = FederatedBackend(srv, mix_mode="secagg", timeout=20)
    backend.set_score_bound(40.0)
    assert backend.secagg_options["value_range"] == 64.0
    got = MoRReward(backend, router, fe)(prompts=None, completions=completions, **kw)
    np.testing.assert_allclose(got, expect, atol=2e-3)
    fixed = FederatedBackend(srv, mix_mode="secagg", timeout=20, secagg_options={"value_range": 32.0})
    fixed.set_score_bound(40.0)  # an operator's explicit range wins
    assert fixed.secagg_options["value_range"] == 32.0
    noisy = FederatedBackend(srv, mix_mode="secagg+dp", timeout=20)
    noisy.set_score_bound(40.0)  # secagg+dp: the range is the DP clipping bound (noise scales with it): unchanged
    assert "value_range" not in noisy.secagg_options
