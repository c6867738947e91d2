"""Training rounds of the parameter-sharing baselines over loopback gRPC with mTLS (protocol revision 3): the
broadcast reaches the trainers, their updates come back exactly, every malformed or oversized update gets a status
naming its field, and the round is audited and counted like a scoring round."""

import asyncio
import math

import grpc
import numpy as np
import pytest

from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from mor_client import ClientCredentials, FederationClient
from mor.training import (TRAINING_REVISION, TensorProblem, decode_tensors, encode_tensor, hparams_from_pb,
                          hparams_to_pb, tensors_to_pb)
from mor_client.training import TrainingRefused, TrainingResult
from mor.wire import card_to_pb
from mor_server.baselines import aggregation as agg
from mor_server.baselines.training_round import TrainingRound, TrainingSpec, validate_update
from mor_server.federation.rounds import ReportRejected

from fedutil import CARD, LengthScorer, start_federation, stop_federation

A, B = "m.o_proj.lora_A.weight", "m.o_proj.lora_B.weight"
PARAMS = {A: np.arange(6, dtype=np.float32).reshape(2, 3) / 10, B: np.zeros((4, 2), np.float32)}


class FakeTrainer:
    """A deterministic numpy trainer: every update tensor is the broadcast value plus ``offset``."""

    methods = ("fedit", "stack", "ffa", "fedcmp")

    def __init__(self, offset=1.0, n=10, delay=0.0, refuse=None):
        self.offset, self.n, self.delay, self.refuse = offset, n, delay, refuse
        self.requests = []

    def train(self, req):
        import time

        self.requests.append(req)
        if self.delay:
            time.sleep(self.delay)
        if self.refuse:
            raise TrainingRefused("RESOURCE_EXHAUSTED", self.refuse, remaining_epsilon=0.0)
        return TrainingResult({n: req.parameters[n] + self.offset for n in req.update_names}, self.n, epsilon=2.5,
                              loss=0.25)


def _client(pki_dir, name, server, trainer):
    return FederationClient(f"localhost:{server.port}", ClientCredentials.from_dir(pki_dir / "clients" / name),
                            LengthScorer(), card=CARD, trainer=trainer)


async def _start(pki_dir, trainers, **kw):
    return await start_federation(pki_dir, list(trainers), lambda d, n, srv: _client(d, n, srv, trainers[n]), **kw)


_stop = stop_federation


# ---------------------------------------------------------------------------------------------- pure checks
def test_codec_round_trip_is_exact_little_endian():
    x = np.array([[1.5, -2.0, 3.25e-8]], dtype=np.float32)
    t = encode_tensor("w", x)
    assert t["shape"] == [1, 3] and t["dtype"] == "float32" and t["data"] == x.astype("<f4").tobytes()
    assert t["data"] == bytes.fromhex("0000c03f000000c021960b33")  # docs/protocol.md §9.2 example
    back = decode_tensors(tensors_to_pb({"w": x}), {"w": (1, 3)}, "p")
    assert np.array_equal(back["w"], x)
    h = {"learning_rate": 0.1, "epsilon": 4.0, "total_rounds": 3, "round_index": 2, "weight_decay": 0.0}
    got = hparams_from_pb(hparams_to_pb(h))
    assert got["learning_rate"] == 0.1 and got["round_index"] == 2 and got["weight_decay"] == 0.0
    assert math.isinf(hparams_from_pb(hparams_to_pb({"epsilon": math.inf}))["epsilon"])
    with pytest.raises(ValueError, match="hparams.learning_rate"):
        hparams_to_pb({"learning_rate": -1})
    with pytest.raises(ValueError, match="unknown key 'lr'"):
        hparams_to_pb({"lr": 1})


def _t(name, arr=None, shape=None, dtype="float32", data=None):
    arr = np.zeros(shape or (2, 3), np.float32) if arr is None else np.asarray(arr, np.float32)
    return pb.Tensor(name=name, shape=list(shape or arr.shape), dtype=dtype,
                     data=arr.astype("<f4").tobytes() if data is None else data)


BAD_UPDATES = [  # (tensors, num_examples, field, words in the message)
    ([_t(A, data=b"\0" * 20)], 5, "report.update.tensors[0].data", "needs exactly 24"),
    ([_t(A, data=b"\0" * 4000)], 5, "report.update.tensors[0].data", "4000 bytes"),
    ([_t(A, shape=(3, 2))], 5, "report.update.tensors[0].shape", "has shape [2, 3]"),
    ([_t(A, [[0, math.nan, 0], [0, 0, 0]])], 5, "report.update.tensors[0].data", "element 1"),
    ([_t(A, [[0, 0, 0], [0, 0, -math.inf]])], 5, "report.update.tensors[0].data", "finite"),
    ([_t(A, [[0, 0, 0], [0, 0, 1e6]])], 5, "report.update.tensors[0].data", "value_bound"),
    ([_t(A, dtype="float16")], 5, "report.update.tensors[0].dtype", "float32"),
    ([_t("x.unknown")], 5, "report.update.tensors[0].name", "not a tensor of this round"),
    ([_t(A), _t(A)], 5, "report.update.tensors[1].name", "twice"),
    ([], 5, "report.update.tensors", "lacks tensor"),
    ([_t(A)], 0, "report.update.num_examples", "1..1000"),
    ([_t(A)], 10 ** 9, "report.update.num_examples", "1..1000"),
]


@pytest.mark.parametrize("tensors,n,field_path,words", BAD_UPDATES)
def test_pure_update_validation_names_the_field(tensors, n, field_path, words):
    spec = TrainingSpec("fedit", {A: (2, 3), B: (4, 2)}, (A,), value_bound=100.0, max_num_examples=1000)
    with pytest.raises(ReportRejected) as e:
        validate_update(spec, tensors, n)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.field == field_path, e.value.message
    assert words in e.value.message
    ok = validate_update(spec, [_t(A, np.ones((2, 3)))], 7)
    assert ok.num_examples == 7 and np.array_equal(ok.tensors[A], np.ones((2, 3))) and len(ok.digest) == 64


def test_training_round_state_machine():
    spec = TrainingSpec("ffa", {A: (2, 3), B: (4, 2)}, (B,))
    rnd = TrainingRound("r1", ("alice", "bob"), 1, 10.0, 0.0, 0, "train:ffa", spec=spec)
    good = [_t(B, np.ones((4, 2)))]
    with pytest.raises(ReportRejected) as e:
        rnd.submit_update("mallory", good, 3, 1.0, 0.0, 1.0)
    assert e.value.code == "PERMISSION_DENIED"
    with pytest.raises(ReportRejected) as e:  # A is frozen in ffa: not part of the update
        rnd.submit_update("alice", [_t(A)] + good, 3, 1.0, 0.0, 1.0)
    assert e.value.field == "report.update.tensors[0].name"
    rnd.submit_update("alice", good, 3, 1.0, 0.0, 1.0)
    with pytest.raises(ReportRejected) as e:
        rnd.submit_update("alice", good, 3, 1.0, 0.0, 1.0)
    assert e.value.code == "ALREADY_EXISTS"
    with pytest.raises(ReportRejected) as e:
        rnd.submit_update("bob", good, 3, 1.0, 0.0, 11.0)
    assert e.value.code == "DEADLINE_EXCEEDED"
    out = rnd.close(11.0)
    assert out.ok and out.responders == ("alice",) and "bob" in out.dropped
    assert rnd.total_bytes == 32
    with pytest.raises(ValueError, match="update_names"):
        TrainingSpec("fedit", {A: (2, 3)}, ("nope",))
    with pytest.raises(ValueError, match="method"):
        TrainingSpec("fedavg", {A: (2, 3)}, (A,))


# ------------------------------------------------------------------------------------------ over gRPC + mTLS
def test_training_round_over_mtls_aggregates_exactly(pki_dir, tmp_path):
    from privacy.audit.log import read_entries

    trainers = {"alice": FakeTrainer(1.0, n=10), "bob": FakeTrainer(-3.0, n=30)}
    log_path = tmp_path / "audit.jsonl"

    async def main():
        server, clients, tasks = await _start(pki_dir, trainers, audit_path=log_path)
        try:
            assert sorted(await server.wait_for_trainers(2, "fedit", timeout=10)) == ["alice", "bob"]
            hp = {"learning_rate": 0.01, "total_rounds": 2, "round_index": 1, "epsilon": 8.0, "seed": 5}
            out = await server.run_training_round(PARAMS, "fedit", hp, timeout=10)
            assert out.ok, out.reason
            assert set(out.responders) == {"alice", "bob"}
            req = trainers["alice"].requests[0]
            assert req.method == "fedit" and req.update_names == (A, B) and req.hparams["round_index"] == 1
            assert req.hparams["learning_rate"] == 0.01 and req.hparams["epsilon"] == 8.0
            assert np.array_equal(req.parameters[A], PARAMS[A]) and np.array_equal(req.parameters[B], PARAMS[B])
            for c, off in (("alice", 1.0), ("bob", -3.0)):
                u = out.reports[c]
                assert u.num_examples == trainers[c].n and u.epsilon == 2.5
                for n in (A, B):
                    assert np.array_equal(u.tensors[n], PARAMS[n] + np.float32(off))
            avg = agg.fedit([out.reports[c].tensors for c in ("alice", "bob")], [10, 30])
            for n in (A, B):  # p = (1/4, 3/4): offset 1/4 - 9/4 = -2
                assert np.allclose(avg[n], PARAMS[n] - 2.0, atol=1e-6)
            # ffa: only B comes back
            out2 = await server.run_training_round(PARAMS, "ffa", {}, update_names=[B], timeout=10)
            assert out2.ok and set(out2.reports["bob"].tensors) == {B}
            m = server.metrics
            assert m.value("mor_rounds_completed_total", {"mode": "train:fedit"}) == 1
            assert m.value("mor_rounds_completed_total", {"mode": "train:ffa"}) == 1
            # a refusing trainer is a dropout, not a zero update
            trainers["bob"].refuse = "budget of this run spent"
            out3 = await server.run_training_round(PARAMS, "fedit", {}, min_clients=1, timeout=10)
            assert out3.ok and out3.responders == ("alice",) and "refused" in out3.dropped["bob"]
        finally:
            await _stop(server, clients, tasks)

    asyncio.run(main())
    rounds = [e.payload for e in read_entries(log_path) if e.event == "round"]
    assert [r["mode"] for r in rounds] == ["train:fedit", "train:ffa", "train:fedit"]
    r0 = rounds[0]
    assert r0["method"] == "fedit" and r0["state"] == "completed" and len(r0["task_digest"]) == 64
    assert r0["updates"]["bob"]["num_examples"] == 30 and len(r0["updates"]["bob"]["sha256"]) == 64
    assert r0["updates"]["alice"]["bytes"] == 4 * (6 + 8) and r0["hparams"]["round_index"] == 1
    # the training seed is public (in the task): logged as such, never mistaken for secret material
    assert r0["hparams"]["public_seed"] == 5 and "seed" not in r0["hparams"]
    assert r0["epsilon_total"] == {"alice": 2.5, "bob": 2.5}
    assert "data" not in str(r0), "the audit log holds digests and counts, never tensor values"


class RawTrainer:
    """Speaks the wire protocol directly at revision 3, announcing training methods."""

    def __init__(self, pki_dir, name, port, max_message_bytes=None):
        d = pki_dir / "clients" / name
        creds = grpc.ssl_channel_credentials(
            (d / "ca.crt").read_bytes(), (d / "tls.key").read_bytes(), (d / "tls.crt").read_bytes())
        opts = [("grpc.max_send_message_length", max_message_bytes)] if max_message_bytes else []
        self.channel = grpc.aio.secure_channel(f"localhost:{port}", creds, options=opts)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.out: asyncio.Queue = asyncio.Queue()

    async def open(self, methods=("fedit",), revision=TRAINING_REVISION):
        await self.stub.Register(pb.RegisterRequest(card=card_to_pb(CARD), training_methods=list(methods)))

        async def gen():
            while (m := await self.out.get()) is not None:
                yield m
        self.call = self.stub.Session(gen())
        self.out.put_nowait(pb.ClientMessage(hello=pb.Hello(protocol_revision=revision)))
        assert (await self.call.read()).WhichOneof("body") == "welcome"

    def update(self, rid, tensors, n=5, **kw):
        self.out.put_nowait(pb.ClientMessage(report=pb.ScoreReport(round_id=rid, update=pb.ParameterUpdate(
            tensors=tensors, num_examples=n, **kw))))

    async def next(self, kind, timeout=10):
        while True:
            msg = await asyncio.wait_for(self.call.read(), timeout)
            if msg.WhichOneof("body") == kind:
                return getattr(msg, kind)

    async def close(self):
        self.out.put_nowait(None)
        await self.channel.close()


def test_malformed_and_oversized_updates_get_a_status_naming_the_field(pki_dir):
    code = lambda name: grpc.StatusCode[name].value[0]  # noqa: E731

    async def main():
        # alice trains slowly, so the round stays open while dave (raw) misbehaves
        server, clients, tasks = await _start(pki_dir, {"alice": FakeTrainer(1.0, delay=2.0)},
                                              max_message_bytes=64 * 1024)
        raw = RawTrainer(pki_dir, "dave", server.port, max_message_bytes=1 << 20)
        try:
            await raw.open()
            await server.wait_for_trainers(2, "fedit", timeout=10)
            rnd = asyncio.create_task(server.run_training_round(PARAMS, "fedit", {}, update_names=[A],
                                                                value_bound=100.0, max_num_examples=1000,
                                                                timeout=10))
            task = await raw.next("training_task")
            rid = task.round_id
            assert task.method == "fedit" and list(task.update_names) == [A]
            got = decode_tensors(task.parameters, {A: (2, 3), B: (4, 2)}, "task.parameters")
            assert np.array_equal(got[A], PARAMS[A])
            for tensors, n, field_path, words in BAD_UPDATES:
                raw.update(rid, tensors, n)
                ack = await raw.next("ack")
                assert ack.code == code("INVALID_ARGUMENT") and ack.field == field_path, (field_path, ack)
                assert words in ack.message
            raw.out.put_nowait(pb.ClientMessage(report=pb.ScoreReport(round_id=rid, plain=pb.PlainScores(
                scores=[1.0]))))
            ack = await raw.next("ack")
            assert ack.code == code("INVALID_ARGUMENT") and ack.field == "report.plain"
            raw.update(rid, [_t(A, np.full((2, 3), 7.0))], 9, epsilon_charged=-1.0)
            ack = await raw.next("ack")
            assert ack.field == "report.update.epsilon_charged"
            raw.update(rid, [_t(A, np.full((2, 3), 7.0))], 9)
            assert (await raw.next("ack")).code == 0
            raw.update(rid, [_t(A, np.full((2, 3), 8.0))], 9)  # replay while the round is open
            assert (await raw.next("ack")).code == code("ALREADY_EXISTS")
            out = await rnd
            assert out.ok and set(out.responders) == {"alice", "dave"}
            assert np.array_equal(out.reports["dave"].tensors[A], np.full((2, 3), 7.0, np.float32))
            assert out.reports["dave"].num_examples == 9
            rejected = server.metrics.value("mor_reports_rejected_total", {"code": "INVALID_ARGUMENT"})
            assert rejected >= len(BAD_UPDATES) + 2
            # an update sent for a scoring round is refused by name as well
            raw.update("r999999-deadbeef", [_t(A)])
            ack = await raw.next("ack")
            assert ack.code == code("NOT_FOUND") and ack.field == "report.round_id"
            # a message over the server's max_message_bytes never reaches validation: the transport ends the
            # session with RESOURCE_EXHAUSTED
            rnd = asyncio.create_task(server.run_training_round(PARAMS, "fedit", {}, participants=["dave"],
                                                                timeout=5))
            rid = (await raw.next("training_task")).round_id
            raw.update(rid, [_t(A, data=b"\0" * (200 * 1024))])
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw.next("ack")
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            out = await rnd
            assert not out.ok and "dave" in out.dropped
            # a broadcast that cannot fit the server's limit is refused before anything is sent
            with pytest.raises(ValueError, match="max_message_bytes"):
                await server.run_training_round({A: np.zeros((200, 200), np.float32)}, "fedit", {})
        finally:
            await raw.close()
            await _stop(server, clients, tasks)

    asyncio.run(main())


def test_training_methods_and_revision_gate_who_trains(pki_dir):
    async def main():
        server, clients, tasks = await _start(pki_dir, {"alice": FakeTrainer(1.0)})
        try:
            bad = RawTrainer(pki_dir, "bob", server.port)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await bad.stub.Register(pb.RegisterRequest(card=card_to_pb(CARD), training_methods=["fedavg"]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "training_methods[0]" in e.value.details()
            await bad.close()
            old = RawTrainer(pki_dir, "carol", server.port)
            await old.open(methods=("fedit",), revision=2)  # announces fedit but speaks revision 2
            plain = _client(pki_dir, "dave", server, None)  # an SDK client without a trainer
            tasks.append(asyncio.create_task(plain.run()))
            clients.append(plain)
            await server.wait_for_clients(3, timeout=10)
            assert server.online_trainers("fedit") == ["alice"]
            assert server.online_trainers("fedcmp") == ["alice"]
            out = await server.run_training_round(PARAMS, "fedit", {}, participants=["alice", "carol", "dave"],
                                                  min_clients=1, timeout=5)
            assert out.ok and out.responders == ("alice",)
            assert "does not train fedit" in out.dropped["carol"] and "does not train" in out.dropped["dave"]
            await old.close()
        finally:
            await _stop(server, clients, tasks)

    asyncio.run(main())
