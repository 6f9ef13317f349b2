"""The integration engine end to end, on synthetic ground truth, through the external runner.

A stand-in trainer (tests/integrate_sim/objective.py) turns recipe settings into metrics with
known main effects, a conflicting pair, a gain that vanishes in combination, a guardrail
violation, a choice group and seed noise. The engine must find the true best subset, shelve
the rest for the right reasons, resume after SIGKILL without repeating a finished run, and
keep going past runs that crash, hang or report no metrics.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from integrate_sim.scenarios import Scenario, kitchen_sink, small, write_round
from stacklab.cli import main as cli_main
from stacklab.integrate.engine import integrate
from stacklab.integrate.round import RoundError
from stacklab.integrate.store import RunStore

ENGINE = "import sys; from stacklab.cli import main; sys.exit(main())"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def shelved_kinds(decision: dict) -> dict[str, str]:
    return {d["id"]: d["kind"] for d in decision["decisions"] if d["status"] == "shelved"}


def full_factorial_runs(s: Scenario, seeds: int) -> int:
    """Allowed subsets (one per choice group) x seeds: what exhaustive search would cost."""
    keys = Counter(key for _, key, _ in s.contributions.values())
    free = sum(1 for n in keys.values() if n == 1)
    groups = [n for n in keys.values() if n > 1]
    return 2**free * math.prod(n + 1 for n in groups) * seeds


def log_counts(log: Path) -> Counter[tuple[str, int]]:
    lines = log.read_text().split() if log.exists() else []
    return Counter((h, int(s)) for h, s in zip(lines[::2], lines[1::2], strict=True))


# --------------------------------------------------------------------------- recovery


def test_kitchen_sink_recovers_the_best_subset_and_every_reason(tmp_path: Path) -> None:
    scenario = kitchen_sink(seed=0, noise=0.1)
    log = tmp_path / "runs.log"
    round_file = write_round(tmp_path / "round", scenario, budget=200, log=log)
    console = quiet()
    result = integrate(round_file, tmp_path / "out", console=console)
    d = result.decision

    assert set(d["selected"]) == scenario.best
    assert shelved_kinds(d) == scenario.kinds
    reasons = d["shelved"]
    assert reasons["wsd"].startswith("conflicts with lrup: interaction quality -")
    assert reasons["dapo"].startswith("conflicts with gspo: both set rl.loss (a choice group)")
    assert reasons["bigbatch"].startswith(
        "regresses speed beyond its guardrail (>= 0.9 x baseline)"
    )
    assert reasons["dedup"].startswith("gain vanishes in combination: alone quality +")
    assert reasons["warm"].startswith("no measurable gain: quality ")

    # Far below exhaustive search; every run counted once; nothing failed.
    runs = d["runs"]
    assert runs["total"] == runs["executed"] + runs["reused"] + runs["failed"]
    assert (runs["failed"], runs["reused"]) == (0, 0)
    assert runs["total"] <= d["runs"]["budget"] == 200
    assert runs["total"] < full_factorial_runs(scenario, 3) / 3
    assert sum(log_counts(log).values()) == runs["executed"]  # no run trained twice
    assert max(log_counts(log).values()) == 1

    # decision.json contract (DESIGN.md) and the credit table: the only place for authors.
    on_disk = json.loads((tmp_path / "out" / "decision.json").read_text())
    assert on_disk == json.loads(json.dumps(d))
    assert set(on_disk["credit"]) == set(scenario.contributions)
    assert all(set(v) == {"quality", "utility"} for v in on_disk["credit"].values())
    authors = {f"author-of-{c}" for c in scenario.contributions}
    assert {row["author"] for row in on_disk["credit_table"]} == authors
    text = json.dumps({k: v for k, v in on_disk.items() if k != "credit_table"})
    assert not any(a in text for a in authors)
    # Credit adds up: Shapley values of the final model sum to its predicted gain.
    final_sum = sum(on_disk["credit"][c]["quality"] for c in on_disk["selected"])
    fit = result.views.full["quality"]
    gain = fit.predict_delta({scenario_index(result, c) for c in on_disk["selected"]})[0]
    assert final_sum == pytest.approx(gain, abs=1e-9)

    # Blind while running: the terminal and the store know blind ids only.
    said = console.file.getvalue()  # type: ignore[attr-defined]
    assert "c-" in said
    for cid in scenario.contributions:
        assert cid not in said.replace(str(tmp_path), "")
    blind = set(result.round.blind.values())
    with RunStore(f"sqlite:///{tmp_path / 'out' / 'runs.db'}") as store:
        assert all(set(r.subset) <= blind for r in store.runs())
    page = (tmp_path / "out" / "report.html").read_text()
    # Effects of quality and speed, quality's interactions, the Pareto front, credit.
    assert page.count("<svg") == 5
    assert "conflicts with lrup" in (tmp_path / "out" / "report.md").read_text()


def scenario_index(result, cid: str) -> int:
    return result.round.ids.index(cid)


@pytest.mark.slow
def test_recovery_rate_over_scenarios(tmp_path: Path) -> None:
    """Other effect sizes and noise draws: right subset and reasons in most scenarios.

    At this noise the weakest gain (dedup, about 2 sd of one run) is sometimes not measurable
    alone on 3 seeds, and is then shelved as "no measurable gain" instead of "vanishes".
    """
    outcomes = []
    for seed in range(1, 7):
        scenario = kitchen_sink(seed=seed, noise=0.15)
        round_file = write_round(tmp_path / f"r{seed}", scenario, budget=200)
        d = integrate(round_file, tmp_path / f"out{seed}", console=quiet()).decision
        best = set(d["selected"]) == scenario.best
        outcomes.append((best, shelved_kinds(d) == scenario.kinds, d["runs"]["total"]))
    assert sum(best for best, _, _ in outcomes) >= 5, outcomes
    assert sum(reasons for _, reasons, _ in outcomes) >= 4, outcomes
    assert max(n for _, _, n in outcomes) <= 200


# --------------------------------------------------------------------------- resume


def run_engine(round_file: Path, out: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", ENGINE, "integrate", str(round_file), "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small scenario's decision, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    round_file = write_round(root / "round", small(), budget=80)
    return integrate(round_file, root / "out", console=quiet()).decision


def comparable(decision: dict) -> dict:
    return {k: v for k, v in decision.items() if k != "round_file"}


@pytest.mark.parametrize(
    "kill_after", [7, pytest.param(40, marks=pytest.mark.slow)], ids=["screening", "confirmation"]
)
def test_resume_after_sigkill_same_decision_no_run_repeated(
    tmp_path: Path, reference: dict, kill_after: int
) -> None:
    scenario = small()
    log = tmp_path / "runs.log"
    scenario.extra["kill_engine_after"] = kill_after
    round_file = write_round(tmp_path / "round", scenario, budget=80, log=log)
    out = tmp_path / "out"

    assert run_engine(round_file, out) == -9  # killed by the kill_after-th finished run
    with RunStore(f"sqlite:///{out / 'runs.db'}", reset_stale=False) as store:
        done_before = {(r.recipe_hash, r.seed) for r in store.runs(status="done")}
    assert 0 < len(done_before) < reference["runs"]["total"]
    assert not (out / "decision.json").exists()

    assert run_engine(round_file, out) == 0
    resumed = json.loads((out / "decision.json").read_text())
    assert comparable(resumed) == comparable(reference)
    counts = log_counts(log)
    assert all(counts[k] == 1 for k in done_before)  # no finished run trained again
    with RunStore(f"sqlite:///{out / 'runs.db'}") as store:
        final = {(r.recipe_hash, r.seed) for r in store.runs(status="done")}
    assert set(counts) == final
    assert not list((out / "runs").glob(".*.tmp-*"))


def test_a_second_round_reuses_every_run_of_the_first(tmp_path: Path, reference: dict) -> None:
    """Content addressing across rounds: same recipes and seeds are never trained again."""
    log = tmp_path / "runs.log"
    first = write_round(tmp_path / "a", small(), budget=80, log=log, name="first")
    second = write_round(tmp_path / "b", small(), budget=80, log=log, name="second")
    out = tmp_path / "out"
    a = integrate(first, out, console=quiet()).decision
    trained = sum(log_counts(log).values())
    assert cli_main(["integrate", str(second), "--out", str(out)]) == 0
    b = json.loads((out / "decision.json").read_text())
    assert sum(log_counts(log).values()) == trained
    assert (b["runs"]["executed"], b["runs"]["reused"]) == (0, a["runs"]["total"])
    assert (b["selected"], b["shelved"]) == (a["selected"], a["shelved"])
    assert (a["selected"], a["shelved"]) == (reference["selected"], reference["shelved"])


# --------------------------------------------------------------------------- bad input


def test_round_goes_on_past_crashes_hangs_and_missing_metrics(tmp_path: Path) -> None:
    scenario = Scenario(
        contributions={
            "good": ("architecture", "model.qk_norm", False),
            "crashy": ("optimizer", "optim.lr", 0.006),
            "hangy": ("optimizer", "optim.warmup_steps", 40),
            "partial": ("optimizer", "optim.schedule", "wsd"),
        },
        metrics={
            "quality": {"base": 5.0, "main": {"good": 0.8}, "noise": 0.1, "seed_sd": 0.3},
            "speed": {"base": 100.0, "noise": 1.0},
        },
        objectives=[{"metric": "quality"}],
        guardrails=[{"metric": "speed", "kind": "ratio", "threshold": 0.9}],
        extra={"crash": ["crashy"], "hang": ["hangy"], "drop": {"partial": "speed"}},
    )
    round_file = write_round(tmp_path / "round", scenario, budget=60, timeout_s=1.5, workers=2)
    d = integrate(round_file, tmp_path / "out", console=quiet()).decision
    assert d["selected"] == ["good"]
    reasons = d["shelved"]
    assert reasons["crashy"].startswith(
        "every run with it failed: exit status 1; stderr ends: boom"
    )
    assert reasons["hangy"].startswith("every run with it failed: timed out after 1.5s")
    assert reasons["partial"].startswith(
        "every run with it failed: metrics.json has no metric 'speed' (has: quality)"
    )
    assert d["runs"]["failed"] > 0
    with RunStore(f"sqlite:///{tmp_path / 'out' / 'runs.db'}") as store:
        failed = store.runs(status="failed")
        assert failed and all(r.metrics is None and r.error for r in failed)
        assert len(store.runs(status="done")) == d["runs"]["executed"]


def test_budget_below_the_screening_design_is_refused(tmp_path: Path) -> None:
    round_file = write_round(tmp_path / "round", small(), budget=20)
    with pytest.raises(RoundError, match=r"budget 20 is below .* need: 36"):
        integrate(round_file, tmp_path / "out", console=quiet())
