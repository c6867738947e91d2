"""A synchronous, thread-safe facade of the federation server for the alignment side (TRL, the CLIs)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from .config import ServerConfig
from .rounds import RoundCancelled, RoundOutcome
from .server import FederationServer


class ServerThread:
    """Runs a :class:`FederationServer` on its own event loop in a background thread, with a synchronous facade.

    For synchronous callers such as TRL's trainer: ``with ServerThread(config) as srv: srv.run_round(items)``.
    Every call waits at most its own bound; a round still running then is *cancelled on the loop thread* and
    waited for (recorded as failed, "cancelled", clients told), so no abandoned round keeps running beside the
    next one. :meth:`cancel_all` does the same for every call in flight (e.g. from another thread).
    """

    margin_s = 5.0
    """Slack on top of a round's own deadline before its caller gives up and cancels it."""

    def __init__(self, config: ServerConfig | None = None):
        self.server = FederationServer(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mor-server", daemon=True)
        self._inflight: set[asyncio.Task] = set()

    def call(self, coro, timeout: float | None = None, *, what: str = "call"):
        """Run ``coro`` on the server's loop and wait up to ``timeout`` seconds (None: no limit). Past it the task
        is cancelled on the loop and waited for; then :class:`RoundCancelled` is raised."""
        done = threading.Event()
        box: dict = {}

        def start():
            t = self._loop.create_task(coro)
            box["task"] = t
            self._inflight.add(t)
            t.add_done_callback(lambda _t: (self._inflight.discard(_t), done.set()))

        self._loop.call_soon_threadsafe(start)
        if not done.wait(timeout):
            self._loop.call_soon_threadsafe(lambda: box["task"].cancel(f"{what} exceeded its {timeout:g} s bound"))
            if not done.wait(30):
                raise RoundCancelled(f"{what} did not stop within 30 s of being cancelled")
        t = box["task"]
        if t.cancelled():
            raise RoundCancelled(f"{what} was cancelled" + (f" after {timeout:g} s" if timeout is not None else ""))
        return t.result()

    def cancel_all(self, reason: str = "abandoned by its caller", wait: float = 30.0) -> int:
        """Cancel every call in flight on the server loop and wait until they have ended; returns how many."""
        tasks = concurrent.futures.Future()

        def cancel():
            ts = [t for t in self._inflight if not t.done()]
            for t in ts:
                t.cancel(reason)
            tasks.set_result(ts)

        self._loop.call_soon_threadsafe(cancel)
        ts = tasks.result(wait)
        end = time.monotonic() + wait
        while any(not t.done() for t in ts) and time.monotonic() < end:
            time.sleep(0.01)
        return len(ts)

    def start(self) -> int:
        self._thread.start()
        return self.call(self.server.start(), 30)

    def stop(self) -> None:
        if self._thread.is_alive():
            # calls whose caller was interrupted (a signal while it waited) end first, so that none is destroyed
            # pending with the loop
            self.cancel_all("the server is stopping", wait=10)
            self.call(self.server.stop(), 30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def run_round(self, items, *, wait_s: float | None = None, **kw) -> RoundOutcome:
        """``FederationServer.run_round``; the round ends by its own deadline inside the server. ``wait_s``
        (default: its deadline + grace + ``margin_s``) bounds the wait, after which the round is cancelled."""
        limit = wait_s if wait_s is not None else (kw.get("timeout", 30.0) + self.server.config.deadline_grace_s
                                                   + self.margin_s)
        return self.call(self.server.run_round(items, **kw), limit, what="scoring round")

    def run_secagg_round(self, items, *, wait_s: float | None = None, **kw) -> RoundOutcome:
        """``FederationServer.run_secagg_round``, bounded like :meth:`run_round` (all five stages' deadlines)."""
        if wait_s is None:
            t = kw.get("timeout", 30.0)
            st = kw.get("stage_timeout") or min(t, 10.0)
            wait_s = t + 4 * st + 5 * self.server.config.deadline_grace_s + self.margin_s
        return self.call(self.server.run_secagg_round(items, **kw), wait_s, what="secure-aggregation round")

    def wait_for_clients(self, n: int, timeout: float = 30.0, mode: str | None = None) -> list[str]:
        return self.call(self.server.wait_for_clients(n, timeout, mode))

    def online_clients(self, mode: str | None = None) -> list[str]:
        """The clients online now (supporting ``mode``), read on the server's loop: the registry and the session
        table are only ever touched by that thread, so callers on other threads (the alignment engine, TRL)
        never iterate them while the loop mutates them."""

        async def read() -> list[str]:
            return self.server.online_clients(mode)

        return self.call(read(), 30, what="online_clients")

    @property
    def metrics(self):
        """The server's :class:`~mor_server.federation.metrics.FederationMetrics` (prometheus-client is thread-safe)."""
        return self.server.metrics

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def run_training_round(self, params, method: str, hparams: dict | None = None, *, wait_s: float | None = None,
                           **kw) -> RoundOutcome:
        """``FederationServer.run_training_round``, bounded like :meth:`run_round`."""
        limit = wait_s if wait_s is not None else (kw.get("timeout", 600.0) + self.server.config.deadline_grace_s
                                                   + self.margin_s)
        return self.call(self.server.run_training_round(params, method, hparams, **kw), limit, what="training round")

    @property
    def port(self) -> int | None:
        return self.server.port

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

