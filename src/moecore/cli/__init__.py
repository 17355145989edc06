"""The ``moecore`` command line. The arguments of every sub-command are declared, torch-free,
in :mod:`moecore.cli.commands`; each sub-command runs in its own module (``compress_cmd``,
``stats_cmd``, ...) exposing ``run(args)``, imported only after the command line has parsed,
so ``--help`` and a mistyped flag answer without importing torch or transformers.  This module
only dispatches and turns errors into one line.

Exactly the errors the user can cause or fix are caught: :class:`~moecore.errors.MoecoreError`
(a bad setting, a missing or corrupt input, an unwritable output or a full disk, ...) prints
``moecore CMD: error: ...`` and exits 2.  Any other exception (also a bare ``ValueError`` or
``OSError``) is a bug and keeps its traceback; ``MOECORE_DEBUG=1`` shows the traceback of a
MoecoreError too.

A reader that stops early (``moecore plan --json | head``) closes the pipe: the command ends
quietly with the status a shell gives a SIGPIPE (141), not with a ``BrokenPipeError``
traceback.  Ctrl-C (SIGINT) and, during a command that installs a handler for it, SIGTERM end
with one line saying what was kept (``moecore compress``: the finished layers and ``--resume``)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from moecore.errors import MoecoreError, first_line
from moecore.version import __version__

from .commands import add_commands


def build_parser() -> argparse.ArgumentParser:
    """The ``moecore`` argument parser; each sub-command's namespace names the module that runs
    it (``args.module``, a module of this package with ``run(args)``)."""
    parser = argparse.ArgumentParser(prog="moecore", description="Compress Mixture-of-Experts LLMs.")
    parser.add_argument("--version", action="version", version=f"moecore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    return parser


def command_runner(args: argparse.Namespace):
    """The ``run`` function of the module that runs ``args.command`` (imported now: torch and
    the rest load here, after the command line has parsed)."""
    return importlib.import_module(f"moecore.cli.{args.module}").run


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moecore`` console script; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        rc = int(command_runner(args)(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except BrokenPipeError:
        return _broken_pipe()
    except KeyboardInterrupt as exc:
        print(f"moecore: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except MoecoreError as exc:
        if os.environ.get("MOECORE_DEBUG"):
            raise
        msg = first_line(exc)
        print(f"moecore {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _broken_pipe() -> int:
    """stdout's reader went away: point stdout at /dev/null so that the interpreter's final
    flush does not raise again, and exit like a process killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
