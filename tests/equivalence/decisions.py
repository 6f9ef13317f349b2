"""Every decision.json a set of simulated rounds writes, captured, to prove that a change to the
integration engine changed no decision.

A refactoring of the engine (how decision.json is built, typed or formatted) should move code,
not verdicts. This script runs simulated rounds end to end through the engine's public entry
point, `integrate`, with the stand-in trainer of the test suite (tests/integrate_sim/): a
scenario per kind of verdict and evidence (accepted, shelved for each reason, undecided,
failed runs, guardrails of both kinds, a conflict named by a measured interaction, choice
groups, two objectives, a ladder with given costs, a ladder with lr_tuning), and keeps each
round's decision.json and report.md:

    python tests/equivalence/decisions.py capture DIR   # before the change (old code)
    python tests/equivalence/decisions.py compare DIR   # after it: the same decision.json

`compare` runs the same rounds with the code on the path now (into DIR.new), demands exact
equality of each normalized decision.json (same keys in the same order, same values of the
same JSON types) and prints the first difference; report.md differences are printed, not
failed (a deliberate change of formatting shows there). `--only NAME,...` runs some rounds.

Normalized, because they differ between any two runs of the same code: the folder the rounds
run in and the folder of the stacklab package (absolute paths, in `round_file` and
`baseline`), both replaced by a placeholder. Nothing else is: rounds run in a fixed folder,
the stand-in trainer is copied next to each round file so the code fingerprint does not hold
the checkout's path, no round measures a rung's cost from run times (wall clock), and the
trainers run with a fixed PYTHONHASHSEED (without it the stand-in trainer's metrics, hence
every interval, move in their last bit from one run to the next, old code or new).
decision.json holds no timestamps or durations.

Run it against another checkout with that checkout's code first on the path:

    cd /old && PYTHONPATH=/old/src:/old python /new/tests/equivalence/decisions.py capture DIR
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import stacklab

ROOT = Path(stacklab.__file__).resolve().parents[2]  # the checkout whose code runs
sys.path.insert(0, str(ROOT / "tests"))  # integrate_sim, from the same checkout

from integrate_sim import scenarios as sim  # noqa: E402
from integrate_sim.calibration import random_scenario  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "stacklab-equivalence-decisions"
RUNGS = [
    {"name": "s", "patch": {"model.depth": 2}},
    {"name": "m", "patch": {"model.depth": 4}, "cost": 2},
]
LR_TUNING = {"key": "optim.lr", "factors": [0.5, 1.0, 2.0], "seeds": 2}


@dataclass(frozen=True)
class Case:
    """One simulated round: its scenario and the round file's settings."""

    name: str
    scenario: Callable[[], sim.Scenario]
    budget: int
    extra: dict[str, Any]


def _crashing() -> sim.Scenario:
    """small(), where every run with gamma crashes: shelved as failed."""
    s = sim.small()
    s.extra["crash"] = ["gamma"]
    return s


def _two_objectives() -> sim.Scenario:
    """small() with a second objective (min, its own scale and weight) and a min_delta
    guardrail on a lower-is-better metric that delta breaks."""
    s = sim.small()
    s.metrics["loss"] = {
        "base": 3.0,
        "main": {"alpha": -0.05, "beta": -0.1, "gamma": 0.0, "delta": 0.4},
        "noise": 0.05,
        "seed_sd": 0.1,
    }
    s.objectives = [
        {"metric": "quality", "direction": "max", "weight": 2.0},
        {"metric": "loss", "direction": "min", "weight": 0.5, "scale": 0.1},
    ]
    s.guardrails = [{"metric": "loss", "kind": "min_delta", "threshold": -0.2, "direction": "min"}]
    return s


CASES: tuple[Case, ...] = (
    Case("small", sim.small, 80, {}),
    Case("kitchen_sink", lambda: sim.kitchen_sink(seed=0, noise=0.1), 200, {}),
    Case("undecided", lambda: sim.small(noise=0.6), 45, {}),
    Case("failed_runs", _crashing, 80, {}),
    Case("two_objectives", _two_objectives, 90, {}),
    Case("calibration_1003", lambda: random_scenario(1003), 120, {}),
    Case("ladder", sim.small, 120, {"scales": RUNGS}),
    Case("ladder_lr_tuning", sim.small, 120, {"scales": RUNGS, "lr_tuning": LR_TUNING}),
    Case("ladder_basic", sim.ladder_basic, 200, {}),
)


def run_case(case: Case, work: Path) -> tuple[Path, float]:
    """Run one round under `work` (emptied first); (its output folder, seconds)."""
    from rich.console import Console

    from stacklab.integrate.engine import integrate

    shutil.rmtree(work, ignore_errors=True)
    scenario = case.scenario()
    round_file = sim.write_round(work / "round", scenario, budget=case.budget, **case.extra)
    # The trainer beside the round file, named by a relative path: the code fingerprint then
    # holds no checkout path, and the old and the new code's runs have the same code.
    shutil.copy(sim.OBJECTIVE, round_file.parent / "objective.py")
    text = round_file.read_text().replace(str(sim.OBJECTIVE), "objective.py")
    round_file.write_text(text)
    start = time.perf_counter()
    integrate(round_file, work / "out", console=Console(file=io.StringIO(), width=200))
    return work / "out", time.perf_counter() - start


def normalize(text: str, work: Path) -> str:
    """The paths that differ between two runs of the same code, replaced by placeholders."""
    package = Path(stacklab.__file__).resolve().parent
    return text.replace(str(work), "<work>").replace(str(package), "<stacklab>")


def run_all(dest: Path, only: Sequence[str] | None) -> None:
    # The stand-in trainer adds its features' effects in the order of a set of strings, which
    # hash randomization changes from process to process, and with it the last bit of a
    # metric: every run's trainer (a child process) gets the same string hashes.
    os.environ["PYTHONHASHSEED"] = "0"
    dest.mkdir(parents=True, exist_ok=True)
    print(f"stacklab from {stacklab.__file__}; integrate_sim from {sim.__file__}")
    for case in CASES:
        if only and case.name not in only:
            continue
        work = WORK / case.name
        out, seconds = run_case(case, work)
        for name in ("decision.json", "report.md"):
            text = normalize((out / name).read_text(), work)
            (dest / f"{case.name}.{name}").write_text(text)
        verdicts = json.loads((dest / f"{case.name}.decision.json").read_text())["decisions"]
        kinds = ", ".join(f"{d['id']}:{d['kind']}" for d in verdicts)
        print(f"{case.name}: {seconds:.1f}s; {kinds}")


def first_difference(old: Any, new: Any, path: str = "$") -> str | None:
    """Where two JSON values first differ (keys, key order, values or JSON types), or None."""
    if type(old) is not type(new):
        return f"{path}: {type(old).__name__} {old!r} != {type(new).__name__} {new!r}"
    if isinstance(old, dict):
        if list(old) != list(new):
            return f"{path}: keys {list(old)} != {list(new)}"
        for key in old:
            found = first_difference(old[key], new[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(old, list):
        for k, (a, b) in enumerate(zip(old, new, strict=False)):
            found = first_difference(a, b, f"{path}[{k}]")
            if found:
                return found
        if len(old) != len(new):
            return f"{path}: {len(old)} items != {len(new)}"
        return None
    return None if old == new or (old != old and new != new) else f"{path}: {old!r} != {new!r}"


def compare(golden: Path, only: Sequence[str] | None) -> int:
    new = golden.with_name(golden.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    run_all(new, only)
    failed = 0
    for path in sorted(golden.glob("*.decision.json")):
        name = path.name.removesuffix(".decision.json")
        if only and name not in only:
            continue
        old_text, new_text = path.read_text(), (new / path.name).read_text()
        diff = first_difference(json.loads(old_text), json.loads(new_text))
        if diff is None and old_text != new_text:
            diff = "same values, different text (formatting of numbers?)"
        if diff:
            failed += 1
            print(f"DIFFERENT {name}/decision.json: {diff}")
        else:
            print(f"same {name}/decision.json")
        old_md = (golden / f"{name}.report.md").read_text().splitlines()
        new_md = (new / f"{name}.report.md").read_text().splitlines()
        if old_md != new_md:
            print(f"report.md of {name} differs:")
            for line in difflib.unified_diff(old_md, new_md, "old", "new", n=0, lineterm=""):
                print(f"  {line}")
    print("decision.json: " + ("all identical" if not failed else f"{failed} differ"))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["capture", "compare"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--only", help="comma-separated round names", default="")
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    if args.action == "capture":
        run_all(args.dir, only)
        return 0
    return compare(args.dir, only)


if __name__ == "__main__":
    sys.exit(main())
