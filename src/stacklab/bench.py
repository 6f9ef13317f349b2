"""`stacklab bench`: run the benchmark scripts in benchmarks/ and print one table.

Each script runs both sides of its comparison in one process and writes, with `--json PATH`,
its results plus a `table`: a list of rows

    {"benchmark": str, "case": str, "unit": str, "ours": float, "peer": float | None,
     "peer_name": str, "ratio": float | None, "goal": str, "met": bool | None, "note": str}

This module only runs the scripts one after another (never side by side: they time
themselves), gathers the rows and prints them; it knows nothing of what they measure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stacklab.errors import StacklabError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
ROW_KEYS = ("benchmark", "case", "unit", "ours", "peer", "peer_name", "ratio", "goal", "met")


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...] = ()  # the full run
    quick: tuple[str, ...] = ("--quick",)
    threaded: bool = True  # takes --threads (torch's thread count)


SUITE: tuple[Benchmark, ...] = (
    Benchmark("train_step", "train_step.py"),
    Benchmark("moe_dispatch", "moe_dispatch.py"),
    Benchmark("sampling", "sampling.py"),
    Benchmark("rl_step", "rl_step.py"),
    # 4 scenarios and one Optuna sampler keep the suite under 10 minutes; docs/benchmarks.md
    # records the 10-scenario run with every sampler.
    Benchmark(
        "engine_search",
        "engine_search.py",
        args=("--scenarios", "4", "--samplers", "nsga2"),
        threaded=False,
    ),
)


def run_suite(
    names: list[str] | None = None,
    quick: bool = False,
    threads: int | None = None,
    timeout_s: float = 1800.0,
    log: Any = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the chosen benchmarks in order; return their table rows and the failures."""
    chosen = _choose(names)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="stacklab-bench-") as tmp:
        for bench in chosen:
            out = Path(tmp) / f"{bench.name}.json"
            argv = [sys.executable, str(BENCH_DIR / bench.script), "--json", str(out)]
            argv += list(bench.quick if quick else bench.args)
            if threads is not None and bench.threaded:
                argv += ["--threads", str(threads)]
            if log is not None:
                log(f"[bold]{bench.name}[/]: {' '.join(argv[1:])}")
            start = time.perf_counter()
            try:
                proc = subprocess.run(argv, env=env, timeout=timeout_s, text=True)
            except subprocess.TimeoutExpired:
                failures.append(f"{bench.name}: timed out after {timeout_s:.0f} s")
                continue
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                failures.append(f"{bench.name}: exit status {proc.returncode}")
                continue
            try:
                table = json.loads(out.read_text())["table"]
            except (OSError, ValueError, KeyError) as exc:
                failures.append(f"{bench.name}: no result table in its JSON ({exc})")
                continue
            for row in table:
                missing = [k for k in ROW_KEYS if k not in row]
                if missing:
                    failures.append(f"{bench.name}: a row lacks {missing}")
                    break
                rows.append({**row, "seconds": round(seconds, 1)})
    return rows, failures


def _choose(names: list[str] | None) -> list[Benchmark]:
    if not names:
        return list(SUITE)
    known = {b.name: b for b in SUITE}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StacklabError(
            f"unknown benchmark {unknown[0]!r}; the benchmarks are: {', '.join(known)}"
        )
    return [known[n] for n in names]


def fmt_number(value: float | None) -> str:
    """Three significant figures, thousands separated; blank for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, for docs/benchmarks.md."""
    lines = [
        "| benchmark | case | unit | ours | peer | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        peer = f"{fmt_number(r['peer'])} ({r['peer_name']})" if r["peer"] is not None else ""
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else ""
        lines.append(
            f"| {r['benchmark']} | {r['case']} | {r['unit']} | {fmt_number(r['ours'])} | "
            f"{peer} | {ratio} | {r['goal']} | {met} |"
        )
    return "\n".join(lines) + "\n"
