"""Console entry points (``mor``, ``mor server``, ``mor client`` in pyproject.toml).

Starting a CLI imports grpc, cryptography and often torch, which can take seconds on a busy machine: the CLI's
module is imported here, inside the Ctrl-C guard, so an interrupt during start-up also ends with one line and exit
code 130 rather than a traceback. Everything else (one-line errors, exit code 2) is in each ``main``.
"""

from __future__ import annotations

import importlib
import sys

from .cliargs import interrupted


def _run(prog: str, module: str, func: str) -> int:
    try:
        return getattr(importlib.import_module(module), func)()
    except KeyboardInterrupt:
        return interrupted(prog)


def mor() -> int:
    return _run("mor", "mor_server.apps.cli", "mor_main")


def mor_server() -> int:
    return _run("mor-server", "mor_server.apps.cli", "server_main")


def mor_client() -> int:
    return _run("mor-client", "mor_client.cli", "main")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(mor())
