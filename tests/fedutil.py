"""Helpers for loopback federation tests: a server on its own loop, clients as real FederationClients."""

from __future__ import annotations

import asyncio
import contextlib

from mor_client import ClientCredentials, FederationClient, ScoringItem
from mor_server.federation.config import ServerConfig
from mor_server.federation.server import FederationServer


class LengthScorer:
    """A deterministic scorer for transport tests: score = len(answer) + offset (the offset tells clients apart)."""

    def __init__(self, offset: float = 0.0, delay: float = 0.0):
        self.offset, self.delay = offset, delay

    def score(self, items):
        import time

        if self.delay:
            time.sleep(self.delay)
        return [[len(c) + self.offset for c in it.candidates] for it in items]


def make_items(png: bytes, n: int = 4, k: int = 2) -> list[ScoringItem]:
    return [ScoringItem(f"i{i}", png, f"what color is shape {i}?", tuple(f"ans{j}" * (j + 1) for j in range(k)))
            for i in range(n)]


CARD = {"architecture": "test-length", "parameter_count": 0, "training_epsilon": float("inf"),
        "supported_modes": ["plain"]}


def client(pki_dir, name, server: FederationServer, scorer=None, **kw) -> FederationClient:
    return FederationClient(f"localhost:{server.port}", ClientCredentials.from_dir(pki_dir / "clients" / name),
                            scorer or LengthScorer(), card=kw.pop("card", CARD), **kw)


async def start_federation(pki_dir, names, make_client=None, **server_kw):
    """Start a server and one running FederationClient per name (``make_client(pki_dir, name, server)``, default
    :func:`client`); returns ``(server, clients, tasks)`` once every client is online. End with
    :func:`stop_federation`."""
    server = FederationServer(ServerConfig(pki_dir=pki_dir, **server_kw))
    await server.start()
    make = make_client or (lambda d, n, srv: client(d, n, srv))
    clients = [make(pki_dir, n, server) for n in names]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    if names:
        await server.wait_for_clients(len(names), timeout=20)
    return server, clients, tasks


async def stop_federation(server, clients, tasks):
    for c in clients:
        await c.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.stop()


@contextlib.asynccontextmanager
async def federation(pki_dir, names=("alice", "bob", "carol"), scorers=None, **server_kw):
    server = FederationServer(ServerConfig(pki_dir=pki_dir, **server_kw))
    await server.start()
    clients = [client(pki_dir, n, server, (scorers or {}).get(n)) for n in names]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        if names:
            await server.wait_for_clients(len(names), timeout=20)
        yield server, clients, tasks
    finally:
        await stop_federation(server, clients, tasks)
