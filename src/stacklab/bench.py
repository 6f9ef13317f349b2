"""`stacklab bench`: run the benchmark scripts in benchmarks/ and print one table.

Each script runs both sides of its comparison in one process and writes, with `--json PATH`,
its results plus a `table`: a list of rows

    {"benchmark": str, "case": str, "unit": str, "ours": float, "peer": float | None,
     "peer_name": str, "ratio": float | None, "goal": str, "met": bool | None, "note": str}

This module only runs the scripts one after another (never side by side: they time
themselves), gathers the rows and prints them; it knows nothing of what they measure, beyond
which of `stacklab bench`'s own options each script takes (`Benchmark.options`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stacklab.errors import StacklabError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"  # a source checkout's: not shipped
ROW_KEYS = ("benchmark", "case", "unit", "ours", "peer", "peer_name", "ratio", "goal", "met")


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...] = ()  # the full run
    quick: tuple[str, ...] = ("--quick",)
    threaded: bool = True  # takes --threads (torch's thread count)
    # `stacklab bench` options passed on to this script (replacing a value in `args`)
    options: tuple[str, ...] = ()


SUITE: tuple[Benchmark, ...] = (
    Benchmark("train_step", "train_step.py"),
    Benchmark("moe_dispatch", "moe_dispatch.py"),
    Benchmark("sampling", "sampling.py"),
    Benchmark("rl_step", "rl_step.py"),
    # 4 scenarios and one Optuna sampler keep the suite under 10 minutes. `stacklab bench
    # engine_search --scenarios 10 --samplers nsga2,tpe` is the superseded kitchen-sink run
    # of docs/benchmarks.md; `--calibration --scenarios 20 --samplers tpe,nsga2` its
    # calibration run (both with OMP_NUM_THREADS=1).
    Benchmark(
        "engine_search",
        "engine_search.py",
        args=("--scenarios", "4", "--samplers", "nsga2"),
        threaded=False,
        options=("--scenarios", "--samplers", "--calibration"),
    ),
)


def run_suite(
    names: list[str] | None = None,
    quick: bool = False,
    threads: int | None = None,
    timeout_s: float = 1800.0,
    log: Any = None,
    options: Mapping[str, str | int | bool | None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the chosen benchmarks in order; return their table rows and the failures.

    `options` maps an option of OPTIONS to its value (True for a flag; None or False: not
    given); each goes to the chosen benchmarks that take it, and one that none of them takes
    is an error.
    """
    if not BENCH_DIR.is_dir():
        raise StacklabError(f"the benchmark suite runs from a source checkout: no {BENCH_DIR}")
    chosen = _choose(names)
    given = {k: v for k, v in (options or {}).items() if v is not None and v is not False}
    for flag in given:
        if not any(flag in b.options for b in chosen):
            takers = [b.name for b in SUITE if flag in b.options]
            where = ", ".join(takers) if takers else "no benchmark"
            raise StacklabError(f"{flag} applies to {where}, which is not among those chosen")
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="stacklab-bench-") as tmp:
        for bench in chosen:
            out = Path(tmp) / f"{bench.name}.json"
            argv = [sys.executable, str(BENCH_DIR / bench.script), "--json", str(out)]
            argv += with_options(
                bench.quick if quick else bench.args,
                {k: v for k, v in given.items() if k in bench.options},
            )
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


def with_options(args: tuple[str, ...], options: Mapping[str, str | int | bool]) -> list[str]:
    """`args` with each option's value replaced, or the option appended (a flag once)."""
    out = list(args)
    for flag, value in options.items():
        if value is True:
            if flag not in out:
                out.append(flag)
        elif flag in out[:-1]:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


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
