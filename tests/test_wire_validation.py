"""Every bad client message gets a precise status naming the field; the server keeps running for everyone else."""

import asyncio
import math

import grpc
import pytest

from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from mor_client.wire import card_to_pb

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
