"""Every bad client message gets a precise status naming the field; the server keeps running for everyone else."""

import asyncio
import math

import grpc
import pytest

from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from mor.wire import card_to_pb

from fedutil import CARD, LengthScorer, federation, make_items


class RawClient:
    """Speaks the wire protocol directly, so tests can send what a well-behaved SDK never would."""

    def __init__(self, pki_dir, name, port):
        d = pki_dir / "clients" / name
        creds = grpc.ssl_channel_credentials(
            (d / "ca.crt").read_bytes(), (d / "tls.key").read_bytes(), (d / "tls.crt").read_bytes())
        self.channel = grpc.aio.secure_channel(f"localhost:{port}", creds)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.out: asyncio.Queue = asyncio.Queue()

    async def open(self, card=CARD):
        await self.stub.Register(pb.RegisterRequest(card=card_to_pb(card)))

        async def gen():
            while (m := await self.out.get()) is not None:
                yield m
        self.call = self.stub.Session(gen())
        self.send(pb.ClientMessage(hello=pb.Hello()))
        msg = await self.call.read()
        assert msg.WhichOneof("body") == "welcome"

    def send(self, msg):
        self.out.put_nowait(msg)

    async def next(self, kind, timeout=10):
        while True:
            msg = await asyncio.wait_for(self.call.read(), timeout)
            if msg.WhichOneof("body") == kind:
                return getattr(msg, kind)

    def report(self, round_id, scores):
        self.send(pb.ClientMessage(report=pb.ScoreReport(round_id=round_id, plain=pb.PlainScores(scores=scores))))

    async def close(self):
        self.out.put_nowait(None)
        await self.channel.close()


def code(name):
    return grpc.StatusCode[name].value[0]


def test_bad_reports_get_precise_statuses(pki_dir, png_bytes):
    async def main():
        # bob is slow, so the round stays open while dave (raw) misbehaves
        async with federation(pki_dir, names=("alice", "bob"), scorers={"bob": LengthScorer(delay=1.5)}) as (server, _, _):
            raw = RawClient(pki_dir, "dave", server.port)
            await raw.open()
            await server.wait_for_clients(3)
            items = make_items(png_bytes, n=3, k=2)
            rnd = asyncio.create_task(server.run_round(items, min_clients=3, timeout=10))
            task = await raw.next("task")
            rid = task.round_id
            good = [1.0] * 6

            raw.report(rid, [1.0] * 5)
            ack = await raw.next("ack")
            assert ack.code == code("INVALID_ARGUMENT") and ack.field == "report.plain.scores"
            assert "5 values" in ack.message and "expects 6" in ack.message

            raw.report(rid, [1.0, math.nan, 1.0, 1.0, 1.0, 1.0])
            ack = await raw.next("ack")
            assert ack.code == code("INVALID_ARGUMENT") and ack.field == "report.plain.scores[1]"

            raw.report(rid, [1.0, 1.0, math.inf, 1.0, 1.0, 1.0])
            ack = await raw.next("ack")
            assert ack.code == code("INVALID_ARGUMENT") and ack.field == "report.plain.scores[2]"

            raw.report("r999999-deadbeef", good)
            ack = await raw.next("ack")
            assert ack.code == code("NOT_FOUND") and ack.field == "report.round_id"

            raw.send(pb.ClientMessage(report=pb.ScoreReport(round_id=rid)))
            ack = await raw.next("ack")
            assert ack.code == code("INVALID_ARGUMENT") and ack.field == "report.payload"

            raw.send(pb.ClientMessage(report=pb.ScoreReport(
                round_id=rid, dp=pb.NoisedScores(scores=good, clip=1, noise_multiplier=1))))
            ack = await raw.next("ack")
            assert ack.code == code("INVALID_ARGUMENT") and ack.field == "report.dp"

            raw.report(rid, good)
            ack = await raw.next("ack")
            assert ack.code == 0

            raw.report(rid, [9.0] * 6)  # replay while the round is still open
            ack = await raw.next("ack")
            assert ack.code == code("ALREADY_EXISTS")

            out = await rnd
            assert out.ok and set(out.responders) == {"alice", "bob", "dave"}
            assert out.reports["dave"] == good, "a rejected replay must not overwrite the accepted report"
            assert out.reports["alice"] == [len(c) for it in items for c in it.candidates]

            raw.report(rid, good)  # late: the round is closed
            ack = await raw.next("ack")
            assert ack.code == code("DEADLINE_EXCEEDED")

            # a report for a round dave is not part of is refused and does not touch it
            rnd2 = asyncio.create_task(server.run_round(items, participants=["alice", "bob"], timeout=10))
            await asyncio.sleep(0.2)
            rid2 = next(iter(server.book.open))
            raw.report(rid2, good)
            ack = await raw.next("ack")
            assert ack.code == code("PERMISSION_DENIED")
            out2 = await rnd2
            assert out2.ok and "dave" not in out2.reports
            assert server.metrics.value("mor_reports_rejected_total", {"code": "INVALID_ARGUMENT"}) == 5
            await raw.close()
    asyncio.run(main())


def test_oversized_message_is_refused_and_server_keeps_running(pki_dir, png_bytes):
    async def main():
        async with federation(pki_dir, names=("alice",), max_message_bytes=64 * 1024) as (server, _, _):
            raw = RawClient(pki_dir, "dave", server.port)
            await raw.open()
            raw.report("r1", [0.5] * 20000)   # ~180 KB > 64 KiB
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw.next("ack")
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await raw.close()
            out = await server.run_round(make_items(png_bytes), participants=["alice"], timeout=5)
            assert out.ok
    asyncio.run(main())


def test_invalid_card_and_first_message(pki_dir):
    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            raw = RawClient(pki_dir, "dave", server.port)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw.stub.Register(pb.RegisterRequest(card=card_to_pb({**CARD, "architecture": ""})))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "card.architecture" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw.stub.Register(pb.RegisterRequest(card=card_to_pb({**CARD, "training_delta": 1.5})))
            assert "card.training_delta" in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw.stub.Register(pb.RegisterRequest())
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "card" in e.value.details()
            await raw.stub.Register(pb.RegisterRequest(card=card_to_pb(CARD)))

            async def gen():
                yield pb.ClientMessage(heartbeat=pb.Heartbeat())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in raw.stub.Session(gen()):
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hello" in e.value.details()
            await raw.close()
    asyncio.run(main())


def test_fuzzed_messages_each_get_an_ack_session_stays_open_no_traceback(pki_dir, png_bytes, caplog):
    """A few hundred random and malformed ClientMessages (seeded), aimed at an open plain round, an open SecAgg+
    round, its stage ids (``<round>/<stage>``) and junk ids: every non-heartbeat message gets exactly one Ack, the
    session stays open, the server logs no traceback, and a good report still counts afterwards."""
    import logging
    import random

    from mor_client import ReleasePolicy
    from mor_client.secagg_session import SecAggSession
    from mor.wire import card_to_pb
    from mor_client import ClientCredentials, FederationClient

    caplog.set_level(logging.DEBUG)
    rng = random.Random(14)
    sa_card = {**CARD, "supported_modes": ["plain", "secagg"]}

    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            sdk = []
            for n in ("alice", "bob", "carol"):   # slow SecAgg+ clients keep the round at its first stage
                creds = ClientCredentials.from_dir(pki_dir / "clients" / n)
                sdk.append(FederationClient(f"localhost:{server.port}", creds, LengthScorer(delay=3), card=sa_card,
                                            policy=ReleasePolicy(("plain", "secagg")),
                                            secagg_handler=SecAggSession(creds)))
            sdk_tasks = [asyncio.create_task(c.run()) for c in sdk]
            raw = RawClient(pki_dir, "dave", server.port)
            await raw.open(card=sa_card)
            await server.wait_for_clients(4)
            items = make_items(png_bytes, n=2, k=2)
            plain = asyncio.create_task(server.run_round(items, participants=["dave"], timeout=30))
            sa = asyncio.create_task(server.run_secagg_round(
                items, weights={n: [0.3, 0.3] for n in ("alice", "bob", "carol")},
                participants=["alice", "bob", "carol"], timeout=30))
            plain_rid = (await raw.next("task")).round_id
            for _ in range(50):
                sa_rid = next((k.split("/")[0] for k in server.book.open if "/" in k), None)
                if sa_rid:
                    break
                await asyncio.sleep(0.05)
            assert sa_rid, "the secagg round must be open at a stage"
            stages = ["setup", "share_keys", "collect_masked", "consistency", "unmask", "bogus", ""]
            ids = [plain_rid, sa_rid, "", "r999999-x", "\x00\xff" * 3, "a" * 300, "r/x/y"] + \
                  [f"{sa_rid}/{s}" for s in stages] + [f"{plain_rid}/setup"]

            def scores():
                pool = [0.0, 1.0, -1e308, 1e308, float("nan"), float("inf"), -float("inf"), rng.uniform(-9, 9)]
                return [rng.choice(pool) for _ in range(rng.choice([0, 1, 3, 4, 5, 200]))]

            def message():
                k = rng.randrange(10)
                rid = rng.choice(ids)
                if k == 0:
                    return pb.ClientMessage(report=pb.ScoreReport(round_id=rid, plain=pb.PlainScores(scores=scores())))
                if k == 1:
                    return pb.ClientMessage(report=pb.ScoreReport(round_id=rid, dp=pb.NoisedScores(
                        scores=scores(), clip=rng.choice([0.0, 1.0, -1.0, float("nan")]),
                        noise_multiplier=rng.choice([0.0, 1.0, 1e9]), epsilon_charged=rng.uniform(-5, 5))))
                if k == 2:
                    srid = rng.choice(ids + [rid])
                    return pb.ClientMessage(report=pb.ScoreReport(round_id=rid, secagg=pb.SecAggMessage(
                        round_id=srid, stage=rng.choice(stages), payload=rng.randbytes(rng.choice([0, 5, 300])))))
                if k == 3:
                    return pb.ClientMessage(refusal=pb.Refusal(round_id=rid, reason=rng.choice(["", "x" * 2000, "é"]),
                                                               code=rng.randrange(-5, 40),
                                                               remaining_epsilon=rng.uniform(-1, 1)))
                if k == 4:
                    return pb.ClientMessage(report=pb.ScoreReport(round_id=rid))
                if k == 5:
                    return pb.ClientMessage()
                if k == 6:
                    return pb.ClientMessage(hello=pb.Hello(sdk_version=rng.choice(["", "9.9", "\u2603"])))
                if k == 7:
                    return pb.ClientMessage(heartbeat=pb.Heartbeat(unix_ms=rng.randrange(-2**40, 2**40)))
                # a plain report aimed at a SecAgg stage id: the message that used to end the session
                return pb.ClientMessage(report=pb.ScoreReport(
                    round_id=f"{sa_rid}/{rng.choice(stages[:5])}", plain=pb.PlainScores(scores=scores())))

            msgs = [message() for _ in range(400)]
            expected = sum(m.WhichOneof("body") != "heartbeat" for m in msgs)
            for m in msgs:
                raw.send(m)
            acks = []
            while len(acks) < expected:
                acks.append(await raw.next("ack", timeout=10))
            assert all(a.code == 0 or a.message for a in acks), "every rejection says why"
            assert "dave" in server.online_clients(), "the session must stay open"
            sa_out = await sa      # the fuzz did not break the SecAgg+ round: it still completes
            assert sa_out.ok, sa_out.reason
            plain.cancel()
            # a good report for a fresh round is still accepted on the same session
            rnd = asyncio.create_task(server.run_round(items, participants=["dave"], timeout=10))
            task = await raw.next("task")
            raw.report(task.round_id, [1.0] * 4)
            assert (await raw.next("ack")).code == 0
            assert (await rnd).ok
            await raw.close()
            for c in sdk:
                await c.stop()
            await asyncio.gather(*sdk_tasks, return_exceptions=True)
    asyncio.run(main())
    server_side = [r for r in caplog.records if r.name.startswith(("mor.server", "grpc._cython"))]
    bad = [r for r in server_side if r.exc_info or "Traceback" in r.getMessage()]
    assert not bad, f"tracebacks in the server log: {[r.getMessage()[:200] for r in bad[:3]]}"
