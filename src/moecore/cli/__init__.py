"""The ``moecore`` command line. Each sub-command lives in its own module exposing
``register(subparsers)``; this module only dispatches and turns errors into one line.

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

# sub-command modules, in the order `moecore --help` lists them
COMMAND_MODULES = ["compress_cmd", "stats_cmd", "plan_cmd", "export_cmd", "eval_cmd", "distill_cmd", "recover_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecore", description="Compress Mixture-of-Experts LLMs.")
    parser.add_argument("--version", action="version", version=f"moecore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"moecore.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moecore`` console script; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
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
