"""Re-run a cheap, representative subset of the rows recorded in benchmarks/RESULTS.md and
fail on drift (``make check-results``; not part of CI: about 6 minutes of one CPU core).

The rows, the command that produced each, the commit and versions it was recorded at, the
recorded value and its tolerance live in ``benchmarks/results/reference_rows.json``.  Rows
that share a command are measured by one run of it.  Every command runs in a fresh
process on one thread (``OMP_NUM_THREADS=1``, plus ``--threads 1`` where the script takes
it) with ``src/`` of this checkout first on ``PYTHONPATH``, writing into a temporary
folder; the recorded files under ``benchmarks/results/`` are never touched.

Exit status: 0 when every row is within its tolerance, 1 when a row drifted or a command
failed, 2 when the reference file is malformed.  ``--list`` prints the rows and commands
without running anything.  ``--record`` writes the measured values back into the reference
file with this checkout's commit and library versions (refused on a dirty tree): for a
deliberate re-recording only, after the drift has been explained in RESULTS.md.

Usage: python benchmarks/check_results.py [--only ID ...] [--list] [--threads N]
       [--reference FILE] [--report FILE] [--keep DIR] [--record]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "benchmarks" / "results" / "reference_rows.json"
#: fields every reference row must carry
ROW_FIELDS = ("id", "results", "command", "output", "select", "metric", "value", "tolerance", "recorded")
_HEX = re.compile(r"^[0-9a-f]{7,40}$")


class ReferenceError(ValueError):
    """The reference file does not say what a row needs (command, commit, value, tolerance...)."""


def load_reference(path: Path = REFERENCE) -> dict[str, Any]:
    """The parsed reference file, validated by :func:`validate`."""
    data = json.loads(Path(path).read_text())
    validate(data)
    return data


def validate(data: dict[str, Any]) -> None:
    """Raise :class:`ReferenceError` unless every row names its command (a script of this
    repository and its arguments), the output file and the selector of its row there, the
    metric, a finite recorded value, a relative tolerance in (0, 0.01), the commit (hex) and
    versions it was recorded at, and unique ids."""
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ReferenceError("reference file has no 'rows' list")
    seen = set()
    for i, row in enumerate(rows):
        where = f"row {i} ({row.get('id', '?')})"
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ReferenceError(f"{where}: missing {', '.join(missing)}")
        if row["id"] in seen:
            raise ReferenceError(f"{where}: duplicate id")
        seen.add(row["id"])
        cmd = row["command"]
        if not (isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd)):
            raise ReferenceError(f"{where}: command must be a list of strings")
        if not (REPO / cmd[0]).is_file():
            raise ReferenceError(f"{where}: command's script {cmd[0]} is not in the repository")
        if "--out" in cmd:
            raise ReferenceError(f"{where}: command must not set --out (the checker writes to a temporary folder)")
        if not isinstance(row["select"], dict) or not row["select"]:
            raise ReferenceError(f"{where}: select must be a non-empty object")
        value = row["value"]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ReferenceError(f"{where}: value must be a finite number")
        tol = row["tolerance"]
        if not isinstance(tol, dict) or not isinstance(tol.get("rel"), (int, float)) or not 0 < tol["rel"] < 0.01:
            raise ReferenceError(f"{where}: tolerance must be {{'rel': r}} with 0 < r < 0.01")
        if not tol.get("why"):
            raise ReferenceError(f"{where}: tolerance must say why ('why')")
        rec = row["recorded"]
        if not isinstance(rec, dict) or not _HEX.match(str(rec.get("commit", ""))):
            raise ReferenceError(f"{where}: recorded.commit must be a git commit id")
        if not isinstance(rec.get("versions"), dict) or "transformers" not in rec["versions"]:
            raise ReferenceError(f"{where}: recorded.versions must name at least transformers")


def plan(data: dict[str, Any], only: list[str] | None = None) -> list[tuple[tuple[str, ...], str, list[dict]]]:
    """``[(command, output file, rows)]``: the rows grouped by command, in file order, so each
    command runs once.  ``only`` keeps the named row ids (unknown ids raise)."""
    rows = data["rows"]
    if only:
        unknown = set(only) - {r["id"] for r in rows}
        if unknown:
            raise ReferenceError(f"unknown row id(s): {', '.join(sorted(unknown))}")
        rows = [r for r in rows if r["id"] in only]
    groups: dict[tuple[str, ...], tuple[str, list[dict]]] = {}
    for r in rows:
        key = tuple(r["command"])
        out, members = groups.setdefault(key, (r["output"], []))
        if out != r["output"]:
            raise ReferenceError(f"{r['id']}: same command as another row but a different output file")
        members.append(r)
    return [(cmd, out, members) for cmd, (out, members) in groups.items()]


def pick(rows: list[dict], select: dict[str, Any]) -> dict | None:
    """The one row whose fields equal ``select`` (numbers compared as floats), or None."""
    def same(a, b):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return float(a) == float(b)
        return a == b
    hits = [r for r in rows if all(same(r.get(k), v) for k, v in select.items())]
    return hits[0] if len(hits) == 1 else None


def compare(row: dict, measured: float | None) -> dict[str, Any]:
    """``{"id", "reference", "measured", "rel_diff", "tolerance", "ok"}`` for one row."""
    ref, tol = float(row["value"]), float(row["tolerance"]["rel"])
    if measured is None:
        return {"id": row["id"], "reference": ref, "measured": None, "rel_diff": None, "tolerance": tol, "ok": False}
    rel = abs(measured - ref) / abs(ref)
    return {"id": row["id"], "reference": ref, "measured": measured, "rel_diff": rel, "tolerance": tol,
            "ok": rel <= tol}


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_command(cmd: tuple[str, ...], out_dir: Path, threads: int) -> tuple[int, float, float, str]:
    """Run one reference command into ``out_dir``; ``(exit status, wall seconds, CPU seconds,
    output tail)``.  CPU seconds (user + system of the child) do not depend on what else
    the machine runs: on one thread they are the wall time of an idle machine."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    args = [sys.executable, str(REPO / cmd[0]), *cmd[1:], "--out", str(out_dir)]
    t0, c0 = time.time(), _children_cpu()
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    tail = (r.stdout + r.stderr)[-3000:]
    return r.returncode, time.time() - t0, _children_cpu() - c0, tail


def record(path: Path, data: dict[str, Any], results: list[dict], prov: dict[str, Any], threads: int) -> None:
    """Write each measured value into its reference row, with the commit, versions, date and
    thread count it was measured at (tolerances and commands are left as they are)."""
    measured = {r["id"]: r for r in results if r["measured"] is not None}
    keep = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "hqq", "python")
    for row in data["rows"]:
        if row["id"] in measured:
            row["value"] = measured[row["id"]]["measured"]
            row["recorded"] = {"commit": prov["git"]["commit"], "date": time.strftime("%Y-%m-%d", time.gmtime()),
                               "threads": threads, "versions": {k: prov["versions"].get(k) for k in keep},
                               **({"note": row["recorded"]["note"]} if row["recorded"].get("note") else {})}
    validate(data)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def with_threads(cmd: tuple[str, ...], threads: int) -> tuple[str, ...]:
    """``cmd`` with its ``--threads`` value replaced by ``threads`` (when it has one)."""
    c = list(cmd)
    if "--threads" in c:
        c[c.index("--threads") + 1] = str(threads)
    return tuple(c)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--only", nargs="+", metavar="ID", help="check only these row ids")
    ap.add_argument("--list", action="store_true", help="print rows and commands, run nothing")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per command (default 1, as the reference values were recorded; another count "
                         "changes the summation order, see the tolerances)")
    ap.add_argument("--report", type=Path, default=None, help="write the comparison as JSON here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the commands' outputs in this folder")
    ap.add_argument("--record", action="store_true",
                    help="write the measured values, this commit and the versions into the reference file")
    args = ap.parse_args(argv)
    try:
        data = load_reference(args.reference)
        groups = plan(data, args.only)
    except (ReferenceError, json.JSONDecodeError, OSError) as exc:
        print(f"check_results: {args.reference}: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for cmd, out, rows in groups:
            print("python " + " ".join(with_threads(cmd, args.threads)))
            for r in rows:
                print(f"    {r['id']}: {r['metric']} {r['value']} ± {r['tolerance']['rel']:.0e} rel "
                      f"(recorded at {r['recorded']['commit'][:10]}; {r['results']})")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import provenance

    prov = provenance(code=REPO / "src" / "moecore")  # the code the commands run, not this process's import
    if args.record and (prov["git"]["commit"] is None or prov["git"]["dirty"]):
        print("check_results: --record needs a clean checkout (commit first): the rows must name their commit",
              file=sys.stderr)
        return 2
    results, failures, t_all, cpu_all = [], [], time.time(), 0.0
    with tempfile.TemporaryDirectory(prefix="check-results-") as tmp:
        base = args.keep or Path(tmp)
        for i, (cmd, out, rows) in enumerate(groups):
            cmd = with_threads(cmd, args.threads)
            out_dir = base / f"run{i}"
            out_dir.mkdir(parents=True, exist_ok=True)
            print(f"[{i + 1}/{len(groups)}] python {' '.join(cmd)}", flush=True)
            rc, secs, cpu, tail = run_command(cmd, out_dir, args.threads)
            cpu_all += cpu
            produced = []
            if rc == 0 and (out_dir / out).is_file():
                produced = json.loads((out_dir / out).read_text())["rows"]
            else:
                failures.append(f"command failed (exit {rc}): python {' '.join(cmd)}\n{tail}")
            for r in rows:
                hit = pick(produced, r["select"])
                res = compare(r, None if hit is None else float(hit[r["metric"]]))
                res.update(seconds=round(secs, 1), cpu_seconds=round(cpu, 1), command=list(cmd))
                results.append(res)
                status = "ok" if res["ok"] else "DRIFT" if res["measured"] is not None else "MISSING"
                measured = "—" if res["measured"] is None else f"{res['measured']:.6f}"
                rel = "" if res["rel_diff"] is None else f"rel diff {res['rel_diff']:.1e}"
                print(f"    {status:7s} {r['id']}: recorded {res['reference']:.6f}, now {measured} {rel} "
                      f"(tolerance {res['tolerance']:.0e})", flush=True)
            print(f"    ({secs:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
    total = time.time() - t_all
    bad = [r for r in results if not r["ok"]]
    if args.report:
        args.report.write_text(json.dumps({"meta": {"seconds_total": round(total, 1), "cpu_seconds_total":
                                                    round(cpu_all, 1), "threads": args.threads, "provenance": prov},
                                           "rows": results}, indent=1) + "\n")
    if args.record and not failures:
        record(args.reference, data, results, prov, args.threads)
        print(f"recorded {sum(r['measured'] is not None for r in results)} rows into {args.reference}")
        return 0
    for f in failures:
        print(f, file=sys.stderr)
    drift = f"; drifted or missing: {', '.join(r['id'] for r in bad)}" if bad else ""
    print(f"check_results: {len(results) - len(bad)} of {len(results)} rows within tolerance "
          f"({total:.0f} s wall, {cpu_all:.0f} s CPU){drift}")
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
