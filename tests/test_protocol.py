"""The wire contract of docs/protocol.md, checked over loopback mTLS with a raw client (no SDK behaviour)."""

import asyncio
import json

import grpc
import pytest

from mor.v1 import federation_pb2 as pb
from mor.wire import PROTOCOL_REVISION, card_to_pb

from fedutil import CARD, federation, make_items
from test_wire_validation import RawClient


def _register(raw, card_pb):
    return raw.stub.Register(pb.RegisterRequest(card=card_pb, sdk_version="raw-test/1"))


@pytest.mark.parametrize("patch,field", [
    ({"card_json": "not json"}, "card.card_json"),
    ({"card_json": "[1, 2]"}, "card.card_json"),
    ({"privacy_unit": "banana"}, "card.privacy_unit"),
    ({"privacy_unit": ""}, "card.privacy_unit"),
    ({"training_examples": -3}, "card.training_examples"),
])
def test_register_rejects_invalid_cards_naming_the_field(pki_dir, patch, field):
    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            raw = RawClient(pki_dir, "dave", server.port)
            card = card_to_pb(CARD)
            for k, v in patch.items():
                setattr(card, k, v)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _register(raw, card)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in e.value.details()
            card = card_to_pb(CARD)  # the same client with a valid card is accepted
            assert json.loads(card.card_json)["architecture"] == CARD["architecture"]
            await _register(raw, card)
            await raw.close()
    asyncio.run(main())


def test_second_session_replaces_the_first_with_aborted_and_a_reason(pki_dir):
    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            first = RawClient(pki_dir, "dave", server.port)
            await first.open()
            second = RawClient(pki_dir, "dave", server.port)
            await second.open()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await first.next("task", timeout=10)
            assert e.value.code() == grpc.StatusCode.ABORTED
            assert "replaced by a newer session" in e.value.details()
            assert server.online_clients() == ["dave"]  # the newer session stays
            await first.close()
            await second.close()
    asyncio.run(main())


def test_plain_scores_outside_the_declared_range_are_rejected(pki_dir, png_bytes):
    async def main():
        async with federation(pki_dir, names=(), max_abs_score=50.0) as (server, _, _):
            raw = RawClient(pki_dir, "dave", server.port)
            await raw.open()
            items = make_items(png_bytes, n=2, k=2)
            rnd = asyncio.create_task(server.run_round(items, timeout=10))
            task = await raw.next("task")
            assert task.score_bound == 50.0
            raw.report(task.round_id, [1.0, 1e300, 2.0, 3.0])
            ack = await raw.next("ack")
            assert ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert ack.field == "report.plain.scores[1]" and "declared range" in ack.message
            raw.report(task.round_id, [1.0, -50.0, 2.0, 3.0])
            assert (await raw.next("ack")).code == 0
            out = await rnd
            assert out.ok and out.reports["dave"] == [1.0, -50.0, 2.0, 3.0]
            await raw.close()
    asyncio.run(main())


def test_dp_scores_outside_clip_plus_20_sigma_are_rejected(pki_dir, png_bytes):
    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            raw = RawClient(pki_dir, "dave", server.port)
            await raw.open({**CARD, "supported_modes": ["dp"]})
            items = make_items(png_bytes, n=1, k=4)
            rnd = asyncio.create_task(server.run_round(items, mode="dp", timeout=10, dp_clip=1.0,
                                                       dp_noise_multiplier=0.5))
            task = await raw.next("task")
            bound = 1.0 + 20 * 0.5 * 2 * 1.0 * 4 ** 0.5
            assert task.score_bound == pytest.approx(bound)

            def dp(scores):
                raw.send(pb.ClientMessage(report=pb.ScoreReport(round_id=task.round_id, dp=pb.NoisedScores(
                    scores=scores, clip=1.0, noise_multiplier=0.5, epsilon_charged=1.0))))
            dp([0.0, 0.0, 0.0, bound * 1.01])
            ack = await raw.next("ack")
            assert ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and ack.field == "report.dp.scores[3]"
            dp([0.5, -bound, 3.0, 0.0])
            assert (await raw.next("ack")).code == 0
            assert (await rnd).ok
            await raw.close()
    asyncio.run(main())


def test_version_negotiation_at_hello(pki_dir):
    async def main():
        async with federation(pki_dir, names=(), min_protocol_revision=2) as (server, _, _):
            raw = RawClient(pki_dir, "dave", server.port)
            await raw.stub.Register(pb.RegisterRequest(card=card_to_pb(CARD)))

            async def old_hello():
                yield pb.ClientMessage(hello=pb.Hello(sdk_version="old/0.0.1"))  # revision unset = 1
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in raw.stub.Session(old_hello()):
                    pass
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "protocol_revision is 1" in e.value.details() and "2.." in e.value.details()

            async def new_hello():
                yield pb.ClientMessage(hello=pb.Hello(sdk_version="new/9", protocol_revision=99))
                await asyncio.sleep(0.5)
            async for msg in raw.stub.Session(new_hello()):
                w = msg.welcome
                assert (w.protocol_revision, w.min_protocol_revision, w.max_protocol_revision) == \
                    (PROTOCOL_REVISION, 2, PROTOCOL_REVISION)
                break
            await raw.close()
    asyncio.run(main())


def test_heartbeat_is_echoed_not_acked(pki_dir):
    async def main():
        async with federation(pki_dir, names=()) as (server, _, _):
            raw = RawClient(pki_dir, "dave", server.port)
            await raw.open()
            raw.send(pb.ClientMessage(heartbeat=pb.Heartbeat(unix_ms=1)))
            msg = await asyncio.wait_for(raw.call.read(), 5)
            assert msg.WhichOneof("body") == "heartbeat" and msg.heartbeat.unix_ms > 1_600_000_000_000
            await raw.close()
    asyncio.run(main())


def test_reflection_v1_and_v1alpha_and_plaintext_health_port(pki_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2

    async def main():
        async with federation(pki_dir, names=(), health_port=0) as (server, _, _):
            assert server.health_port
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as ch:  # no certificate
                resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                resp = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="mor.v1.Federation"))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as e:  # nothing but health on the plaintext port
                    await ch.unary_unary("/mor.v1.Federation/Register",
                                         request_serializer=pb.RegisterRequest.SerializeToString,
                                         response_deserializer=pb.RegisterResponse.FromString)(pb.RegisterRequest())
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            raw = RawClient(pki_dir, "dave", server.port)
            for svc in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
                call = raw.channel.stream_stream(
                    f"/{svc}/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)

                async def reqs():
                    yield reflection_pb2.ServerReflectionRequest(list_services="")
                    yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="mor.v1.Federation")
                got = [r async for r in call(reqs())]
                names = {s.name for s in got[0].list_services_response.service}
                assert {"mor.v1.Federation", "grpc.health.v1.Health", svc} <= names, (svc, names)
                assert got[1].file_descriptor_response.file_descriptor_proto
            await raw.close()

        async with federation(pki_dir, names=()) as (server, _, _):
            assert server.health_port is None  # off by default
    asyncio.run(main())


def test_serve_health_port_flag_answers_probes_without_a_certificate(pki_dir):
    import re
    import signal
    import subprocess
    import sys

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc = subprocess.Popen([sys.executable, "-m", "mor_server.apps.cli", "serve", "--pki", str(pki_dir), "--port", "0",
                             "--health-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"plaintext health on :(\d+)", line)
        assert m, line
        with grpc.insecure_channel(f"127.0.0.1:{m.group(1)}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="mor.v1.Federation"),
                                                        timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]
