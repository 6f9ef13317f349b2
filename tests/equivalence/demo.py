"""Is the demo round's outcome unchanged by a refactor? Two checks on real builds.

A demo round cannot be compared file to file between two invocations: one of its objectives
is `pretrain/tokens_per_s`, a wall-clock rate that moves with the machine's load, and the
search follows the numbers it sees. So the check is split in what can be exact:

* `metrics OLD NEW`: every run both rounds trained (same subset, same seed) has the same
  deterministic metrics, bit for bit (every metric but rates and times): the training code
  computes the same models.
* `replay OLD OLD_CODE`: the current engine re-decides the round from OLD's run store, with
  OLD's runs taken as current (their code fingerprint is computed on the old checkout
  OLD_CODE, so nothing is stale and nothing is trained), into a copy of OLD; its
  decision.json must equal OLD's: the engine, record and report decide and write the same.

    python -m tests.equivalence.demo metrics /tmp/eq/demo_old /tmp/eq/demo_new
    python -m tests.equivalence.demo replay /tmp/eq/demo_old /tmp/golden
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any
from unittest import mock

TIMING = ("seconds", "tokens_per_s", "mfu", "peak_flops", "per_s")


def deterministic(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def store_runs(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(subset, seed) → metrics of every finished run in `out/runs.db`."""
    with sqlite3.connect(out / "runs.db") as db:
        rows = db.execute("select subset, seed, metrics from runs where status = 'done'")
        return {(s, seed): json.loads(m) for s, seed, m in rows if m}


def compare_metrics(old: Path, new: Path) -> int:
    a, b = store_runs(old), store_runs(new)
    shared = sorted(set(a) & set(b))
    differ = []
    for key in shared:
        da, db = deterministic(a[key]), deterministic(b[key])
        if da != db:
            names = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
            differ.append(f"{key}: {', '.join(names)}")
    print(f"{len(a)} runs in {old}, {len(b)} in {new}, {len(shared)} trained by both")
    for line in differ:
        print("differs:", line)
    if not shared:
        print("no run in common")
        return 1
    print(
        "deterministic metrics: "
        + ("identical" if not differ else f"{len(differ)} runs differ")
        + f" ({len(deterministic(a[shared[0]]))} metrics a run)"
    )
    return 1 if differ else 0


def replay(old: Path, old_code: Path) -> int:
    import stacklab
    from stacklab.integrate import provenance, workspace
    from stacklab.integrate.engine import integrate

    with mock.patch.object(stacklab, "__file__", str(old_code / "src/stacklab/__init__.py")):
        fingerprint = provenance.builtin_fingerprint.__wrapped__()
    out = old.parent / f"{old.name}.replay"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(old, out, ignore=shutil.ignore_patterns("decision.json", "report.*"))
    with mock.patch.object(workspace, "builtin_fingerprint", lambda: fingerprint):
        integrate("demo", out)
    before = json.loads((old / "decision.json").read_text())
    after = json.loads((out / "decision.json").read_text())
    for record in (before, after):  # built-in files: the same file in another checkout
        for key in ("round_file", "baseline"):
            record[key] = record[key].split("/src/stacklab/")[-1]
    if before != after:
        keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        print(f"decision.json differs in: {', '.join(keys)}")
        return 1
    same_md = (old / "report.md").read_text() == (out / "report.md").read_text()
    print(f"decision.json identical (runs: {after['runs']}); replayed into {out}")
    print("report.md " + ("identical" if same_md else "differs"))
    return 0 if same_md else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("metrics", help="the same deterministic metrics for shared runs")
    m.add_argument("old", type=Path)
    m.add_argument("new", type=Path)
    r = sub.add_parser("replay", help="the current engine re-decides OLD's store")
    r.add_argument("old", type=Path)
    r.add_argument("old_code", type=Path, help="a checkout of the code that trained OLD")
    args = parser.parse_args(argv)
    if args.cmd == "metrics":
        return compare_metrics(args.old, args.new)
    return replay(args.old, args.old_code)


if __name__ == "__main__":
    sys.exit(main())
