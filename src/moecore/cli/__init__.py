"""The ``moecore`` command line. The arguments of every sub-command are declared, torch-free,
in :mod:`moecore.cli.commands`; each sub-command runs in its own module (``compress_cmd``,
``stats_cmd``, ...) exposing ``run(args)``, imported only after the command line has parsed,
so ``--help`` and a mistyped flag answer without importing torch or transformers.  This module
only dispatches and turns errors into one line.

Exactly the errors the user can cause or fix are caught: :class:`~moecore.errors.MoecoreError`
(a bad setting, a missing or corrupt input, an unwritable output or a full disk, ...) prints
``moecore CMD: error: ...`` and exits 2.  Any other exception (also a bare ``ValueError`` or
``OSError``) is a bug and keeps its traceback; ``MOECORE_DEBUG=1`` shows the traceback of a
MoecoreError too."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from moecore.errors import MoecoreError
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
        return int(command_runner(args)(args) or 0)
    except KeyboardInterrupt:
        print("moecore: interrupted", file=sys.stderr)
        return 130
    except MoecoreError as exc:
        if os.environ.get("MOECORE_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"moecore {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
