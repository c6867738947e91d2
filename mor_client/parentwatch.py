"""Exit when the orchestrating parent process is gone (``mor demo``, a test harness, a supervisor).

An orchestrator that starts ``mor client join`` / ``mor client train`` as child processes sets the environment
variable ``MOR_PARENT_PID`` to its own pid. The child then

* asks Linux to send it ``SIGTERM`` when its parent dies (``prctl(PR_SET_PDEATHSIG)`` through ctypes; nothing
  happens on other systems), and
* runs a daemon thread that polls ``os.getppid()`` every ``interval`` seconds (the portable fallback, and a second
  line on Linux: a child re-parented to init or a subreaper sees its parent pid change).

Either way the child gets ``SIGTERM`` (``mor client join`` stops its session and closes its audit log with a final
checkpoint; ``mor client train`` simply ends, its output was not committed yet) and, if it is still alive ``grace``
seconds later, it exits hard with status 143. A child whose parent died before the watch was armed exits at once.

Linux sends the death signal when the parent *thread* that forked the child exits: orchestrators must start these
children from a thread that lives as long as they do (``mor demo`` uses its main thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

ENV = "MOR_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parent_gone(expected: int) -> None:
    """Terminate this process: SIGTERM to ourselves (graceful handlers run), then a hard exit after the grace."""
    print(f"mor-client: parent process {expected} is gone; exiting", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def watch_parent(expected: int | None = None, *, interval: float = 0.5, grace: float = 15.0) -> bool:
    """Arm the parent-death watch for parent pid ``expected`` (default: ``$MOR_PARENT_PID``; nothing if unset).

    Returns True when a watch was armed. Exits the process (status 143) at once if the parent is already gone.
    """
    if expected is None:
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return False
        try:
            expected = int(raw)
        except ValueError:
            print(f"mor-client: ignoring {ENV}={raw!r} (not a pid)", file=sys.stderr, flush=True)
            return False
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != expected:  # the parent died before the watch was armed (or we were not its child)
        print(f"mor-client: parent process {expected} is gone; exiting", file=sys.stderr, flush=True)
        os._exit(143)

    def loop() -> None:
        while os.getppid() == expected:
            time.sleep(interval)
        _parent_gone(expected)
        time.sleep(grace)
        os._exit(143)

    threading.Thread(target=loop, name="mor-parent-watch", daemon=True).start()
    return True


__all__ = ["ENV", "watch_parent"]
