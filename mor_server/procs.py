"""Client processes for the loopback demo and integration tests: start, wait for readiness, stop cleanly.

Each client runs as its own OS process (``mor-client join ...``), as it would in an institution. Output goes to a
log file per client; stopping sends SIGTERM (the client finishes its session and exits) and SIGKILL after a grace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ClientProcess:
    name: str
    argv: list[str]
    log_path: Path
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> "ClientProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Hard kill (simulates a crash: no goodbye on the stream)."""
        if self.running:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, grace: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def mor_client_argv(*args: str) -> list[str]:
    """argv running ``mor-client`` with the current interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "mor_client.cli", *args]


def stop_all(procs: list[ClientProcess]) -> None:
    for p in procs:
        if p.running:
            p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        remaining = max(0.1, deadline - time.monotonic())
        if p.proc is not None:
            try:
                p.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                p.proc.kill()
        p.stop(1)
