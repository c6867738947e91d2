"""Job control of the long runs (``mor demo``, ``mor align``): SIGINT/SIGTERM handling, an exclusive lock on the
work folder, and tidy progress bars when a run stops.

Inside GRPO a signal ends the current optimizer step with a checkpoint (:class:`mor_server.alignment.grpo.GracefulStop`);
anywhere else :class:`RunInterrupted` is raised at once; a second signal interrupts at once too. A rerun of the same
command resumes (cached models and warm start, the calibrated router, GRPO from its newest complete checkpoint).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


class RunInterrupted(Exception):
    """The run got SIGINT/SIGTERM: what it started was stopped; a rerun resumes."""

    def __init__(self, signum: int, checkpoint: str | None = None, step: int | None = None):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        name = signal.Signals(signum).name
        where = (f"GRPO stopped at step {step} with {Path(checkpoint).name} saved; " if checkpoint else "")
        super().__init__(f"interrupted by {name}: {where}every process it started is stopped; rerun the same "
                         f"command to resume")


def close_progress_bars() -> None:
    """Close every open tqdm bar (before a final message, so that no bar is redrawn after it at exit)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar of a half-torn-down stage: nothing to redraw
            pass


def lock_workdir(work: Path, prog: str = "mor demo"):
    """Hold an exclusive lock on WORKDIR/.demo.lock for the whole run (released by the OS if we are killed).
    Returns the open lock file (close it to release); a second run in the same folder gets a ValueError."""
    import fcntl

    f = open(Path(work) / ".demo.lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ValueError(f"workdir {work}: another run (pid {holder}) is using it; wait for it or give another "
                         f"--workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class Signals:
    """SIGINT/SIGTERM during a run (a context manager, installed from the main thread only): inside GRPO the
    current step ends with a checkpoint (``stop``, a GracefulStop); anywhere else RunInterrupted is raised at once.
    A second signal interrupts at once too."""

    def __init__(self, stop, prog: str = "mor demo"):
        self.stop, self.prog = stop, prog
        self.signum: int | None = None
        self._old = {}

    def _handler(self, signum, frame):
        first = self.signum is None
        self.signum = signum
        if first and self.stop.active:
            print(f"{self.prog}: {signal.Signals(signum).name}: finishing the current GRPO step, saving a checkpoint "
                  "and stopping (send it again to stop at once)", file=sys.stderr, flush=True)
            self.stop.request(signal.Signals(signum).name)
            return
        raise RunInterrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def quiet(self) -> None:
        """Ignore further signals while cleaning up (the clean-up is bounded: about 20 s at most)."""
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def run_job(work: Path, prog: str, body: "Callable[[object, Signals], T]") -> T:
    """Run a long job in ``work``: hold the folder's lock, install the SIGINT/SIGTERM handlers, and call
    ``body(stop, sigs)`` (``stop``: the GracefulStop to hand to GRPO). A GRPO stopped by a signal
    (GRPOInterrupted) becomes :class:`RunInterrupted` naming its checkpoint."""
    from ..alignment.grpo import GracefulStop, GRPOInterrupted

    Path(work).mkdir(parents=True, exist_ok=True)
    lock = lock_workdir(work, prog)
    stop = GracefulStop()
    try:
        with Signals(stop, prog) as sigs:
            try:
                return body(stop, sigs)
            except GRPOInterrupted as e:
                raise RunInterrupted(sigs.signum or signal.SIGTERM, e.checkpoint, e.step) from None
    finally:
        lock.close()
