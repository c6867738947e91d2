"""Client processes for the loopback demo and integration tests: start, wait for readiness, stop cleanly, and leave
nothing behind when the orchestrator dies.

Each client runs as its own OS process (``mor client join ...``), as it would in an institution. Output goes to a
log file per client; stopping sends SIGTERM (the client finishes its session and exits) and SIGKILL after a grace.

Nothing outlives the orchestrator:

* every child gets ``MOR_PARENT_PID`` (this process' pid), so ``mor client`` exits when its parent is gone
  (``mor_client.parentwatch``: Linux ``PR_SET_PDEATHSIG`` plus a parent-pid watchdog thread);
* with a ``pidfile``, the child's pid and argv are written next to its outputs (``<name>.pid.json``) while it runs;
  :func:`reap_stale` (called by ``mor demo`` on start) stops any process still listed there from an orchestrator
  that was killed, after checking that the pid still runs the same command line (pids are reused).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mor_client.parentwatch import ENV as PARENT_ENV

from privacy.fsutil import atomic_write_text


def _child_env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            **(extra or {}), PARENT_ENV: str(os.getpid())}


def write_pidfile(path: Path, proc: subprocess.Popen, argv: list[str], role: str) -> None:
    atomic_write_text(path, json.dumps({"pid": proc.pid, "argv": [str(a) for a in argv], "role": role,
                                        "parent": os.getpid(), "started": time.time()}))


def read_pidfile(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _cmdline(pid: int) -> list[str] | None:
    """The argv of a running process, or None if it is gone (or a zombie)."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                return None
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if sys.platform.startswith("linux"):
        return None
    try:  # no /proc (macOS, BSD): ask ps
        out = subprocess.run(["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out.split()[0].startswith("Z"):
        return None
    return out.split()[1:]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _cmdline(pid) is not None


def _same_process(pid: int, argv: list[str]) -> bool:
    cmd = _cmdline(pid)
    if cmd is None:
        return False
    if cmd == argv:
        return True
    # ps output is whitespace-split, so compare loosely there: every argument after the interpreter appears
    return Path(f"/proc/{pid}").is_dir() is False and all(a in " ".join(cmd) for a in argv[1:])


def reap_stale(pid_dir: str | Path, *, grace: float = 10.0) -> list[dict]:
    """Stop processes left by a killed orchestrator: every ``*.pid.json`` under ``pid_dir`` (recursively) whose pid
    still runs the recorded argv gets SIGTERM, then SIGKILL after ``grace`` seconds. Pidfiles are removed.
    Returns the records of the processes that were still running."""
    found = []
    for pf in sorted(Path(pid_dir).rglob("*.pid.json")):
        rec = read_pidfile(pf)
        if rec is not None and rec.get("parent") != os.getpid() and _same_process(rec["pid"], rec.get("argv", [])):
            found.append({**rec, "pidfile": str(pf)})
            try:
                os.kill(rec["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        if rec is None or rec.get("parent") != os.getpid():
            pf.unlink(missing_ok=True)
    deadline = time.monotonic() + grace
    for rec in found:
        while pid_alive(rec["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(rec["pid"]):
            try:
                os.kill(rec["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    return found


@dataclass
class ClientProcess:
    name: str
    argv: list[str]
    log_path: Path
    env: dict = field(default_factory=dict)
    pidfile: Path | None = None
    role: str = "join"
    proc: subprocess.Popen | None = None

    def start(self) -> "ClientProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=_child_env(self.env),
                                     start_new_session=True)
        if self.pidfile is not None:
            write_pidfile(self.pidfile, self.proc, self.argv, self.role)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _forget(self) -> None:
        if self.pidfile is not None and not self.running:
            self.pidfile.unlink(missing_ok=True)

    def kill(self) -> None:
        """Hard kill (simulates a crash: no goodbye on the stream)."""
        if self.running:
            self.proc.kill()
            self.proc.wait(10)
        self._forget()

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
        self._forget()
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def run_child(argv: list[str], *, pidfile: Path | None = None, role: str = "train", env: dict | None = None,
              grace: float = 10.0) -> int:
    """Run a child to completion in the foreground (output to our stdout), like ``subprocess.run``, but with the
    parent-death watch and a pidfile; if we are interrupted (signal, KeyboardInterrupt) the child is stopped too."""
    proc = subprocess.Popen(argv, env=_child_env(env))
    try:
        if pidfile is not None:
            write_pidfile(pidfile, proc, argv, role)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)


def mor_client_argv(*args: str) -> list[str]:
    """argv running ``mor client`` with the current interpreter (works without the console script on PATH)."""
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
