"""The SDK's memory and work stay bounded whatever the server does: a server that floods tasks gets
RESOURCE_EXHAUSTED refusals beyond ``max_pending_tasks`` (never more scorer calls at once), and a server that stops
reading ends the session instead of growing the client's send queue."""

import asyncio
import threading
import time

import grpc
import pytest

from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from mor_client import FederationClient
from mor_client.client import _Outbox


class _FloodServer(pb_grpc.FederationServicer):
    """A hostile server: welcomes the client, then sends 40 plain tasks at once and records what comes back."""

    def __init__(self):
        self.replies: list = []

    async def Register(self, request, context):
        return pb.RegisterResponse(client_id="flooded", max_message_bytes=16 << 20)

    async def Session(self, request_iterator, context):
        async def read():
            async for msg in request_iterator:
                self.replies.append(msg)

        reader = asyncio.ensure_future(read())
        yield pb.ServerMessage(welcome=pb.Welcome(client_id="flooded", session_id="s", protocol_revision=2))
        item = pb.Item(item_id="i0", image=b"\x89PNG", question="q?", candidates=["a", "b"])
        for i in range(40):
            yield pb.ServerMessage(task=pb.ScoringTask(round_id=f"r{i}", items=[item], timeout_ms=20000,
                                                       mode=pb.PRIVACY_MODE_PLAIN))
        await asyncio.sleep(3.0)
        reader.cancel()


class _SlowScorer:
    def __init__(self):
        self.lock = threading.Lock()
        self.running = self.peak = self.calls = 0

    def score(self, items):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.3)
        with self.lock:
            self.running -= 1
        return [[0.5 for _ in it.candidates] for it in items]


def test_a_task_flood_gets_refusals_beyond_the_bound_not_unbounded_work():
    async def main():
        servicer = _FloodServer()
        server = grpc.aio.server()
        pb_grpc.add_FederationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        scorer = _SlowScorer()
        client = FederationClient(f"127.0.0.1:{port}", None, scorer, insecure_client_id="flooded",
                                  card={"architecture": "x", "parameter_count": 1}, max_pending_tasks=4,
                                  max_attempts=1)
        run = asyncio.ensure_future(client.run())
        await asyncio.sleep(2.5)
        await client.stop()
        try:
            await asyncio.wait_for(run, 5)
        except Exception:
            pass
        await server.stop(0)
        return servicer.replies, scorer

    replies, scorer = asyncio.run(main())
    refusals = [m.refusal for m in replies if m.WhichOneof("body") == "refusal"]
    reports = [m.report for m in replies if m.WhichOneof("body") == "report"]
    assert scorer.peak <= 4, f"{scorer.peak} scorer calls ran at once with max_pending_tasks=4"
    assert len(refusals) >= 30 and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for r in refusals)
    assert "client busy" in refusals[0].reason
    assert 1 <= len(reports) <= 10


def test_a_full_outbox_ends_the_session_instead_of_growing():
    ended = []

    async def main():
        q = _Outbox(3, lambda: ended.append(True))
        for i in range(10):
            q.put_nowait(i)  # never raises: the session is ended instead
        return q.qsize()

    assert asyncio.run(main()) == 3 and len(ended) == 7


def test_bounds_are_validated():
    with pytest.raises(ValueError, match="max_pending_tasks"):
        FederationClient("x:1", None, _SlowScorer(), insecure_client_id="a", card={}, max_pending_tasks=0)
