"""Shared pieces of the command lines (``mor``, ``mor server``, ``mor client``): argument validators, a parser whose
errors are one line, a help formatter that shows defaults, and the ``main`` wrapper every CLI runs under.

One module although over 400 lines: it is the single place every CLI takes its command-line conventions from (one
import, one error format for the parser, the wrapper and some 25 validators of a dozen lines each, and
``docs/architecture.md`` sends every new flag validator here).

Every numeric, host and path flag is checked by argparse (``type=``) before any work starts; a bad value ends the
command with one line on stderr naming the flag and what to give instead, and exit code 2. Expected errors raised
later (a corrupt ledger, a missing credential) are printed as one line with exit code 2 too; Ctrl-C prints one line
and exits with 130. Only a bug prints a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import re
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["ArgumentParser", "verbose_everywhere", "VERBOSE_HELP", "HelpFormatter", "RawHelpFormatter", "UsageError",
           "run_main", "one_line", "int_range", "float_range", "positive_int", "non_negative_int", "positive_float",
           "non_negative_float", "open_unit_interval", "fraction", "unit_interval", "port", "bind_host", "host_name", "host_list",
           "host_port", "client_name", "partition_name", "existing_file", "existing_dir", "output_file", "output_dir", "dir_path",
           "csv_choices", "device"]


class UsageError(Exception):
    """A user-fixable problem; printed as one line (exit code 2)."""


# ------------------------------------------------------------------------------------------------ parser, help


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after a flag's help, except where there is nothing to show (None, False, [])."""

    def _get_help_string(self, action):
        h, d = action.help or "", action.default
        if "%(default)" in h or "(default:" in h or d is None or d is False or d is argparse.SUPPRESS or d == []:
            return h
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return h + " (default: %(default)s)"
        return h


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter that keeps the description's line breaks (for descriptions with examples)."""


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser (and, through ``add_subparsers``, sub-parsers) whose errors are one line, exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


#: help of ``-v``/``--verbose``, the same in every command
VERBOSE_HELP = "log progress (INFO; `join` also prints every event)"


def verbose_everywhere(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept ``-v``/``--verbose`` after any sub-command too (``mor client join -v``), not only before it.

    The root parser defines the flag (default False); every sub-parser below it gets a copy whose default is
    SUPPRESS, so leaving it out after the sub-command does not reset a ``-v`` given before it."""
    help_text = VERBOSE_HELP

    def walk(p, root):
        if not root and not any("--verbose" in a.option_strings for a in p._actions):
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=help_text)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in dict.fromkeys(a.choices.values()):  # aliases map to the same parser
                    walk(sub, False)

    walk(parser, True)
    return parser


def one_line(msg) -> str:
    """The message on one line (newlines folded), for stderr."""
    return " ".join(str(msg).split())


#: Exceptions that mean bad input rather than a bug: printed as one line, exit code 2.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UsageError, ValueError, OSError, sqlite3.DatabaseError,
                                                    TimeoutError)


def _package(err: ImportError) -> str:
    """The top-level package an ImportError is about (``opacus`` for ``opacus.accountants``)."""
    return (err.name or "").split(".")[0] or str(err)


def loaded_errors(*specs: str) -> tuple[type, ...]:
    """Exception classes named ``"module:Class"``, from modules already imported (an error of a module that was never
    imported cannot have been raised, and importing it here could need an extra this install lacks)."""
    out = []
    for spec in specs:
        mod, _, name = spec.partition(":")
        m = sys.modules.get(mod)
        cls = getattr(m, name, None) if m is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            out.append(cls)
    return tuple(out)


def missing_extra(prog: str, err: ImportError, extra: str) -> UsageError:
    """The one-line error for a command whose optional dependencies are not installed."""
    return UsageError(f"{prog} needs the {extra} extra ({_package(err)} is not installed): "
                      f"pip install 'mor[{extra}]'")


def register_missing(subparsers, name: str, help: str, err: ImportError, extra: str,
                     flags: Iterable[str] = ()) -> None:
    """A stand-in sub-command for a lean install: it accepts ``flags`` and ends with :func:`missing_extra`."""
    p = subparsers.add_parser(name, help=f"{help} (needs: pip install 'mor[{extra}]')")
    for flag in flags:
        p.add_argument(flag, nargs="?", help=f"see `{p.prog} --help` once the {extra} extra is installed")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)

    def missing(args):
        raise missing_extra(p.prog, err, extra)

    p.set_defaults(func=missing)


def interrupted(prog: str) -> int:
    """The one line printed after Ctrl-C; returns exit code 130 (128 + SIGINT)."""
    try:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
    except Exception:  # stderr already gone: nothing left to tell
        pass
    return 130


def run_main(prog: str, parse: Callable[[], argparse.Namespace], *,
             expected: Iterable[type] | Callable[[], Iterable[type]] = ()) -> int:
    """Run a CLI: ``parse()`` returns the namespace, whose ``func(args)`` is the command.

    Returns the exit code instead of raising SystemExit (so ``main(argv)`` is testable): 0/1 from the command, 2 for
    a usage error (argparse's or an expected exception, one line on stderr), 130 after Ctrl-C (one line).
    ``expected`` (or a function returning it, called only when an exception arrives, so heavy modules are imported
    inside the Ctrl-C guard) adds the CLI's own user-error classes to :data:`EXPECTED_ERRORS`.
    """
    try:
        args = parse()
        return int(args.func(args) or 0)
    except SystemExit as e:  # argparse (--help, a bad flag) or a command that exits by itself
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        return interrupted(prog)
    except ModuleNotFoundError as e:  # an optional dependency of this command is not installed (a lean install)
        print(f"{prog}: error: {_package(e)} is not installed, and this command needs it: pip install 'mor[all]' "
              "(or the extra named in README, 'Client SDK')", file=sys.stderr, flush=True)
        logging.getLogger("mor.cli").info("where the error above came from (shown with -v)", exc_info=True)
        return 2
    except Exception as e:
        errors = tuple(expected() if callable(expected) else expected) + EXPECTED_ERRORS
        if not isinstance(e, errors):
            raise  # a bug: keep the traceback
        print(f"{prog}: error: {one_line(e) or type(e).__name__}", file=sys.stderr, flush=True)
        logging.getLogger("mor.cli").info("where the error above came from (shown with -v)", exc_info=True)
        return 2


# ------------------------------------------------------------------------------------------------ validators


def _named(fn, name: str):
    fn.__name__ = name  # argparse names the type in its fallback message
    return fn


def _number(text: str, kind: type, what: str):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and math.isnan(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (either bound optional)."""
    what = ("an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
            + (f" <= {hi}" if hi is not None and lo is None else "")
            + (f" in {lo}..{hi}" if lo is not None and hi is not None else ""))

    def check(text: str) -> int:
        v = _number(text, int, what)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return _named(check, what)


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
                allow_inf: bool = False) -> Callable[[str], float]:
    """A real number in the interval (bounds optional, open or closed); NaN always and inf unless allowed refused."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    what = "a number" + (" " + " and ".join(parts) if parts else "") + (" (or 'inf')" if allow_inf else "")

    def check(text: str) -> float:
        v = _number(text, float, what)
        if math.isinf(v) and not (allow_inf and v > 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return _named(check, what)


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0, lo_open=True)
non_negative_float = float_range(0)
#: (0, 1): a delta, a probability that must not be 0 or 1
open_unit_interval = float_range(0, 1, lo_open=True, hi_open=True)
#: [0, 1): a fraction of items
fraction = float_range(0, 1, hi_open=True)
#: [0, 1]: a share that may be all (e.g. every preference pair flipped)
unit_interval = float_range(0, 1)
port = int_range(0, 65535)

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _check_host_syntax(text: str) -> str:
    h = text.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        ipaddress.ip_address(h)
        return h
    except ValueError:
        pass
    labels = h.rstrip(".").split(".")
    if not h or len(h) > 253 or not all(_LABEL.match(x) for x in labels):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or IP address")
    if all(x.isdigit() for x in labels):  # looks like an IPv4 address but is not one (e.g. 999.1.1.1)
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid IP address")
    return h


def host_name(text: str) -> str:
    """A syntactically valid host name or IP address (not resolved)."""
    return _check_host_syntax(text)


def bind_host(text: str) -> str:
    """A host this machine can listen on: a valid IP address, or a name that resolves (e.g. localhost)."""
    h = _check_host_syntax(text)
    try:
        socket.getaddrinfo(h, None)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise argparse.ArgumentTypeError(f"{text!r} does not resolve ({e}); give an IP address of this machine, "
                                         "e.g. 127.0.0.1 or 0.0.0.0") from None
    return h


def host_list(text: str) -> str:
    """Comma-separated host names / IP addresses (at least one); returned normalised, still comma-separated."""
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise argparse.ArgumentTypeError("expected comma-separated host names or IP addresses, got nothing")
    for h in hosts:
        _check_host_syntax(h)
    return ",".join(hosts)


def host_port(text: str) -> str:
    """HOST:PORT (an IPv6 address in brackets, ``[::1]:50051``)."""
    host, sep, p = text.rpartition(":")
    if not sep or not host or not p:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. localhost:50051, got {text!r}")
    try:
        n = int(p)
    except ValueError:
        n = -1
    if not 0 < n <= 65535:
        raise argparse.ArgumentTypeError(f"port in {text!r} must be 1..65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"write an IPv6 address in brackets, e.g. [::1]:{p}, got {text!r}")
    _check_host_syntax(host)
    return text


def client_name(text: str) -> str:
    """A federation member's name (its certificates' Common Name): the PKI's rule, checked at parse time."""
    from privacy.pki import PKIError, check_name

    try:
        return check_name(text)
    except PKIError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


client_name.__name__ = "client name"


def partition_name(text: str) -> str:
    """A partition of the embedded federation split: client0, client1, ..."""
    if not (text.startswith("client") and text[len("client"):].isdigit()):
        raise argparse.ArgumentTypeError(f"expected client0, client1, ... (a client of the federation split), "
                                         f"got {text!r}")
    return text


partition_name.__name__ = "partition"


def existing_file(text: str) -> Path:
    """A path to an existing regular file (readable)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot be read ({e.strerror})") from None
    return p


def existing_dir(text: str) -> Path:
    """A path to an existing directory."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a directory")
    return p


def _check_parents(p: Path, text: str) -> None:
    for a in p.parents:
        if a.exists():
            if not a.is_dir():
                raise argparse.ArgumentTypeError(f"{text}: {a} is a file, not a directory")
            return


def output_file(text: str) -> Path:
    """A file to create or update: not a directory, and no ancestor of it is a file."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
    _check_parents(p, text)
    return p


def output_dir(text: str) -> Path:
    """A directory to create or fill: not an existing file, and no ancestor of it is a file."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a directory")
    _check_parents(p, text)
    return p


#: a directory path that may not exist yet (the command says what to run if it is missing); never a file
dir_path = output_dir


def csv_choices(choices: Iterable[str]) -> Callable[[str], str]:
    """Comma-separated values, each one of ``choices`` (at least one); returned normalised, still comma-separated."""
    allowed = tuple(choices)

    def check(text: str) -> str:
        vals = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad)) or 'nothing'} given; choose from "
                                             f"{','.join(allowed)} (comma-separated)")
        return ",".join(vals)

    return _named(check, "comma-separated choices")


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def device(text: str) -> str:
    """A torch device name: cpu, cuda, cuda:N or mps."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text
