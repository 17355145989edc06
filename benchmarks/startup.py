"""Start-up time of the command line and of ``import moecore`` (issue 16), as whole processes.

Protocol: every command below is started ``-n`` times (default 5) as a fresh process, after one
warm-up round that is not counted; the commands are interleaved (round r runs all of them, in
an order rotated by r), so drift of the machine's speed hits all of them alike.  A run's time
is the wall-clock time from just before the process is started to just after it has exited
(``time.perf_counter``); its output is discarded, its exit status checked.  Reported: the
median (min, max) per command, and the targets as ratios of medians measured in the same run:

- ``moecore --help`` and ``moecore compress --help`` <= 0.5 x ``python -c "import torch"``;
- ``python -c "import moecore"`` <= 1.3 x ``python -c "import torch, transformers"``.

Exit status 1 if a target is missed (``--report-only``: always 0, unless a command failed).

Usage: python benchmarks/startup.py [-n 5] [--report-only] [--json OUT.json] [--before OLD/src]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as st
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PY = sys.executable


def moecore_cli() -> list[str]:
    """The ``moecore`` console script beside this interpreter, else ``python -m moecore``."""
    script = Path(PY).with_name("moecore")
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [PY, "-m", "moecore"]


def commands(before: Path | None = None) -> dict[str, tuple[str, list[str], int]]:
    """``{key: (label, argv, expected exit status)}``, in the order they are reported; with
    ``before`` (another moecore source tree), also ``import moecore`` and ``moecore --help``
    from that tree (through ``env``)."""
    cli = moecore_cli()
    name = "moecore" if len(cli) == 1 else "python -m moecore"
    extra = {} if before is None else {
        "import-before": (f'python -c "import moecore" ({before})', ["env", f"PYTHONPATH={before}", PY, "-c",
                                                                   "import moecore"], 0),
        "help-before": (f"{name} --help ({before})", ["env", f"PYTHONPATH={before}", *cli, "--help"], 0),
    }
    return {
        "torch": ('python -c "import torch"', [PY, "-c", "import torch"], 0),
        "transformers": ('python -c "import transformers"', [PY, "-c", "import transformers"], 0),
        "torch+transformers": ('python -c "import torch, transformers"', [PY, "-c", "import torch, transformers"], 0),
        "import": ('python -c "import moecore"', [PY, "-c", "import moecore"], 0),
        "help": (f"{name} --help", [*cli, "--help"], 0),
        "compress-help": (f"{name} compress --help", [*cli, "compress", "--help"], 0),
        "bad-flag": (f"{name} compress --bogus (mistyped flag)", [*cli, "compress", "--bogus"], 2),
    } | extra


#: (what, numerator key, denominator key, largest ratio allowed)
TARGETS = [
    ("moecore --help / import torch", "help", "torch", 0.5),
    ("moecore compress --help / import torch", "compress-help", "torch", 0.5),
    ("import moecore / import torch, transformers", "import", "torch+transformers", 1.3),
]


def time_once(argv: list[str], expected: int) -> float:
    """Wall seconds of one run of ``argv`` (output discarded); raises if its exit status is wrong."""
    t0 = time.perf_counter()
    rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    dt = time.perf_counter() - t0
    if rc != expected:
        raise SystemExit(f"{' '.join(argv)} exited {rc}, expected {expected}")
    return dt


def measure(cmds: dict[str, tuple[str, list[str], int]], runs: int) -> dict[str, list[float]]:
    """``runs`` interleaved rounds (after one warm-up round) -> the times of each command."""
    labels = list(cmds)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(-1, runs):
        order = labels[r % len(labels):] + labels[:r % len(labels)] if r >= 0 else labels
        for k in order:
            dt = time_once(*cmds[k][1:])
            if r >= 0:
                times[k].append(dt)
        if r >= 0:
            print(f"round {r + 1}/{runs} done", file=sys.stderr, flush=True)
    return times


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=5, help="timed runs per command (default 5)")
    ap.add_argument("--report-only", action="store_true", help="exit 0 even if a target is missed")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--before", type=Path, metavar="SRC",
                    help="also time import moecore and moecore --help from this source tree (e.g. an older checkout's src)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    cmds = commands(args.before.resolve() if args.before else None)
    env = {k: _version(k) for k in ("moecore", "torch", "transformers")}
    print(f"Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in env.items())
          + f", {os.cpu_count()} CPU(s), {platform.machine()}; {args.runs} interleaved runs per command "
          "after 1 warm-up round", flush=True)
    times = measure(cmds, args.runs)
    med = {k: st.median(v) for k, v in times.items()}
    width = max(len(label) for label, _, _ in cmds.values())
    print(f"\n{'command':<{width}}  median s   (min - max)")
    for k, v in times.items():
        print(f"{cmds[k][0]:<{width}}  {med[k]:8.3f}   ({min(v):.3f} - {max(v):.3f})")
    print()
    results, ok = [], True
    for what, num, den, limit in TARGETS:
        ratio = med[num] / med[den]
        met = ratio <= limit
        ok &= met
        results.append({"target": what, "ratio": ratio, "limit": limit, "met": met})
        print(f"{what}: {ratio:.3f} (target <= {limit}) {'met' if met else 'MISSED'}")
    if args.json:
        out = {"versions": env, "python": platform.python_version(), "runs": args.runs,
               "commands": {k: c[0] for k, c in cmds.items()}, "times_s": times, "median_s": med, "targets": results}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok or args.report_only else 1


if __name__ == "__main__":
    sys.exit(main())
