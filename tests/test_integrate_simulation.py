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
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from integrate_sim.scenarios import Scenario, kitchen_sink, small, write_round
from stacklab.cli import main as cli_main
from stacklab.integrate.engine import integrate
from stacklab.integrate.record import ComparisonEvidence, DecisionRecord
from stacklab.integrate.round import RoundError
from stacklab.integrate.store import Run, RunStore
from stacklab.recipe import canonical_hash

ENGINE = "import sys; from stacklab.cli import main; sys.exit(main())"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def shelved_kinds(decision: DecisionRecord) -> dict[str, str]:
    return {d.id: d.kind for d in decision.decisions if d.status == "shelved"}


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


@pytest.mark.slow
def test_kitchen_sink_recovers_the_best_subset_and_every_reason(tmp_path: Path) -> None:
    scenario = kitchen_sink(seed=0, noise=0.1)
    log = tmp_path / "runs.log"
    round_file = write_round(tmp_path / "round", scenario, budget=200, log=log)
    console = quiet()
    result = integrate(round_file, tmp_path / "out", console=console)
    d = result.decision

    assert set(d.selected) == scenario.best
    assert shelved_kinds(d) == scenario.kinds
    reasons = d.shelved
    assert reasons["wsd"].startswith("conflicts with lrup: interaction quality -")
    assert reasons["dapo"].startswith("conflicts with gspo: both set rl.loss (a choice group)")
    assert reasons["bigbatch"].startswith(
        "regresses speed beyond its guardrail (>= 0.9 x baseline)"
    )
    assert reasons["dedup"].startswith("gain vanishes in combination: alone quality +")
    assert reasons["warm"].startswith("no measurable gain: quality ")

    # Far below exhaustive search; every run counted once; nothing failed.
    runs = d.runs
    assert runs.total == runs.executed + runs.reused + runs.failed
    assert (runs.failed, runs.reused) == (0, 0)
    assert runs.total <= runs.budget == 200
    assert runs.total < full_factorial_runs(scenario, 3) / 3
    assert sum(log_counts(log).values()) == runs.executed  # no run trained twice
    # The search never spends the runs held back for the confirmation.
    spent = {b.purpose: 0 for b in d.batches}
    for b in d.batches:
        spent[b.purpose] += b.recipes * len(b.seeds)
    reserve = d.confirmation.reserve
    assert reserve > 0 and spent["screening"] + spent.get("adaptive", 0) + reserve <= 200
    assert max(log_counts(log).values()) == 1

    # decision.json contract (DESIGN.md) and the credit table: the only place for authors.
    on_disk = json.loads((tmp_path / "out" / "decision.json").read_text())
    assert on_disk == d.model_dump(mode="json")
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
    """Other effect sizes and noise draws: the right subset, and reasons that are true.

    A shelving reason names what the runs showed, and the confirmation stops as soon as a
    verdict is decided, so several labels are right for some contributions: adding wsd to
    the final recipe may be shown to hurt (conflict) or only shown not to help (vanishes);
    dedup's and wsd's gains alone (2-3 sd of one run) are sometimes not measurable on 3
    seeds (no_gain); and dedup's comparison may still be open when the budget runs out.
    """
    allowed = {
        "wsd": {"conflict", "vanishes", "no_gain"},
        "dedup": {"vanishes", "no_gain", "undecided"},
        "bigbatch": {"guardrail"},
        "warm": {"no_gain"},
        "dapo": {"conflict"},
    }
    outcomes = []
    for seed in range(1, 7):
        scenario = kitchen_sink(seed=seed, noise=0.15)
        round_file = write_round(tmp_path / f"r{seed}", scenario, budget=200)
        d = integrate(round_file, tmp_path / f"out{seed}", console=quiet()).decision
        kinds = {x.id: x.kind for x in d.decisions if x.status != "accepted"}
        true = all(kinds.get(c) in ok for c, ok in allowed.items())
        outcomes.append((set(d.selected) == scenario.best, true, d.runs.total))
    assert sum(best for best, _, _ in outcomes) >= 5, outcomes
    assert sum(true for _, true, _ in outcomes) >= 5, outcomes
    assert max(n for _, _, n in outcomes) <= 200


# --------------------------------------------------------------------------- verdicts


def two_gains_and_nulls(noise: float, small_gain: float = 0.0) -> Scenario:
    """alpha and beta help (1.0 and 0.8 quality), gamma and delta do nothing; `small_gain`
    gives delta a real but small effect. Quality has scale 1: utility units are its units."""
    return Scenario(
        contributions={
            "alpha": ("architecture", "model.qk_norm", False),
            "beta": ("optimizer", "optim.lr", 0.006),
            "gamma": ("optimizer", "optim.warmup_steps", 40),
            "delta": ("optimizer", "optim.schedule", "wsd"),
        },
        metrics={
            "quality": {
                "base": 5.0,
                "main": {"alpha": 1.0, "beta": 0.8, "gamma": 0.0, "delta": small_gain},
                "noise": noise,
                "seed_sd": 0.5,
            }
        },
        objectives=[{"metric": "quality", "direction": "max", "scale": 1.0}],
        best={"alpha", "beta"},
    )


@pytest.mark.slow
def test_nulls_are_never_kept_and_every_verdict_has_evidence(tmp_path: Path) -> None:
    for seed in (11, 12):
        scenario = two_gains_and_nulls(noise=0.1)
        scenario.extra["noise_seed"] = seed
        round_file = write_round(tmp_path / f"r{seed}", scenario, budget=80)
        d = integrate(round_file, tmp_path / f"out{seed}", console=quiet()).decision
        assert set(d.selected) == {"alpha", "beta"}, d.shelved
        assert d.undecided == {}
        kinds = shelved_kinds(d)  # a null's gain alone can look real on 3 seeds (2.5%)
        assert set(kinds) == {"gamma", "delta"}
        assert set(kinds.values()) <= {"no_gain", "vanishes"}
        for row in d.decisions:
            assert row.evidence, row
            first = row.evidence[0]
            assert isinstance(first, ComparisonEvidence)
            est, low, high = first.utility
            assert est is not None and low is not None and high is not None
            if row.status == "accepted":  # the interval shown is the one that decided
                assert first.comparison == "loo" and low > 0 and est >= d.min_effect
                assert row.id not in first.b and row.id in first.a
            elif row.kind == "no_gain":  # alone, inside the choice, or added with runs left
                assert first.comparison in ("alone", "loo", "added") and low <= 0 <= high
        assert d.noise_floor["quality"] == pytest.approx(0.1, rel=0.5)
        assert d.confirmation.levels[-1] == pytest.approx(1 - 0.75 * 0.05)


@pytest.mark.slow
def test_a_real_but_small_gain_is_shelved_as_too_small(tmp_path: Path) -> None:
    """delta's gain (0.15, significant at this noise) is below the round's min_effect (0.4)."""
    scenario = two_gains_and_nulls(noise=0.05, small_gain=0.15)
    round_file = write_round(tmp_path / "r", scenario, budget=80, min_effect=0.4)
    d = integrate(round_file, tmp_path / "out", console=quiet()).decision
    assert set(d.selected) == {"alpha", "beta"}
    assert d.min_effect == 0.4
    assert shelved_kinds(d)["delta"] == "too_small"
    assert d.shelved["delta"].startswith("gain too small to keep: alone quality +0.1")
    assert d.shelved["delta"].endswith("below min_effect 0.4 utility")


@pytest.mark.slow
def test_too_few_runs_leave_a_verdict_undecided_and_more_runs_decide_it(tmp_path: Path) -> None:
    """At this noise 45 runs cannot settle a 1-sd gain: it is undecided, with the runs that
    would settle it, never "no measurable gain". Twice the runs decide it, and rightly."""
    scenario = two_gains_and_nulls(noise=0.8)
    scenario.extra["noise_seed"] = 3
    small_round = write_round(tmp_path / "a", scenario, budget=45)
    d = integrate(small_round, tmp_path / "out-a", console=quiet()).decision
    assert d.undecided, d.shelved
    for cid, reason in d.undecided.items():
        assert re.search(r"^undecided: .*about \d+ more runs would settle it$", reason), reason
        assert cid not in d.selected and cid not in d.shelved
    big_round = write_round(tmp_path / "b", scenario, budget=400)
    big = integrate(big_round, tmp_path / "out-b", console=quiet()).decision
    assert big.undecided == {}
    assert set(big.selected) == {"alpha", "beta"}


@pytest.mark.slow
def test_a_guardrail_is_judged_on_the_final_recipe(tmp_path: Path) -> None:
    """fast and lean each keep 94% of speed (guardrail: 90%): either alone is fine, both
    together keep 88%. Neither is shelved for its own cost; the recipe with both is refused."""
    scenario = Scenario(
        contributions={
            "fast": ("architecture", "model.qk_norm", False),
            "lean": ("optimizer", "optim.lr", 0.006),
        },
        metrics={
            "quality": {"base": 5.0, "main": {"fast": 1.0, "lean": 0.6}, "noise": 0.05},
            "speed": {
                "base": 100.0,
                "ratio": {"fast": 0.94, "lean": 0.94},
                "noise": 0.3,
                "seed_sd": 2.0,
            },
        },
        objectives=[{"metric": "quality", "direction": "max", "scale": 1.0}],
        guardrails=[{"metric": "speed", "kind": "ratio", "threshold": 0.9}],
    )
    round_file = write_round(tmp_path / "r", scenario, budget=80)
    d = integrate(round_file, tmp_path / "out", console=quiet()).decision
    assert d.selected == ["fast"]
    assert shelved_kinds(d) == {"lean": "guardrail"}
    assert "in combination" in d.shelved["lean"]
    (check,) = d.guardrail_checks
    assert check.state == "held" and (check.margin[1] or 0) > 0


# --------------------------------------------------------------------------- resume


def run_engine(round_file: Path, out: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", ENGINE, "integrate", str(round_file), "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> DecisionRecord:
    """The small scenario's decision, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    round_file = write_round(root / "round", small(), budget=80)
    return integrate(round_file, root / "out", console=quiet()).decision


def config_and_seed(run: Run) -> tuple[str, int]:
    """What the stand-in trainer logs of a run: its config's hash (no seed) and the seed (the
    store's own hash also covers the trainer's code)."""
    return canonical_hash({k: v for k, v in run.recipe.items() if k != "seed"}), run.seed


def comparable(decision: DecisionRecord) -> dict:
    """decision.json but the round file's path (another folder, same round)."""
    return decision.model_dump(mode="json", exclude={"round_file"})


def read_decision(out: Path) -> DecisionRecord:
    """out/decision.json, checked against the record's types."""
    return DecisionRecord.model_validate_json((out / "decision.json").read_text())


@pytest.mark.parametrize("kill_after", [7, 40], ids=["screening", "confirmation"])
@pytest.mark.slow
def test_resume_after_sigkill_same_decision_no_run_repeated(
    tmp_path: Path, reference: DecisionRecord, kill_after: int
) -> None:
    scenario = small()
    log = tmp_path / "runs.log"
    scenario.extra["kill_engine_after"] = kill_after
    round_file = write_round(tmp_path / "round", scenario, budget=80, log=log)
    out = tmp_path / "out"

    assert run_engine(round_file, out) == -9  # killed by the kill_after-th finished run
    with RunStore(f"sqlite:///{out / 'runs.db'}", reset_stale=False) as store:
        done_before = {config_and_seed(r) for r in store.runs(status="done")}
    assert 0 < len(done_before) < reference.runs.total
    assert not (out / "decision.json").exists()

    assert run_engine(round_file, out) == 0
    resumed = read_decision(out)
    assert comparable(resumed) == comparable(reference)
    counts = log_counts(log)
    assert all(counts[k] == 1 for k in done_before)  # no finished run trained again
    with RunStore(f"sqlite:///{out / 'runs.db'}") as store:
        final = {config_and_seed(r) for r in store.runs(status="done")}
    assert set(counts) == final
    assert not list((out / "runs").glob(".*.tmp-*"))


@pytest.mark.slow
def test_a_second_round_reuses_every_run_of_the_first(
    tmp_path: Path, reference: DecisionRecord
) -> None:
    """Content addressing across rounds: same recipes and seeds are never trained again."""
    log = tmp_path / "runs.log"
    first = write_round(tmp_path / "a", small(), budget=80, log=log, name="first")
    second = write_round(tmp_path / "b", small(), budget=80, log=log, name="second")
    out = tmp_path / "out"
    a = integrate(first, out, console=quiet()).decision
    trained = sum(log_counts(log).values())
    assert cli_main(["integrate", str(second), "--out", str(out)]) == 0
    b = read_decision(out)
    assert sum(log_counts(log).values()) == trained
    assert (b.runs.executed, b.runs.reused) == (0, a.runs.total)
    assert (b.selected, b.shelved) == (a.selected, a.shelved)
    assert (a.selected, a.shelved) == (reference.selected, reference.shelved)


# --------------------------------------------------------------------------- bad input


@pytest.mark.slow
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
    assert d.selected == ["good"]
    reasons = d.shelved
    assert reasons["crashy"].startswith(
        "every run with it failed: exit status 1; stderr ends: boom"
    )
    assert reasons["hangy"].startswith("every run with it failed: timed out after 1.5s")
    assert reasons["partial"].startswith(
        "every run with it failed: metrics.json has no metric 'speed' (has: quality)"
    )
    assert d.runs.failed > 0
    with RunStore(f"sqlite:///{tmp_path / 'out' / 'runs.db'}") as store:
        failed = store.runs(status="failed")
        assert failed and all(r.metrics is None and r.error for r in failed)
        assert len(store.runs(status="done")) == d.runs.executed


def test_budget_below_the_screening_design_is_refused(tmp_path: Path) -> None:
    round_file = write_round(tmp_path / "round", small(), budget=20)
    with pytest.raises(RoundError, match=r"budget 20 is below .* need: 39"):
        integrate(round_file, tmp_path / "out", console=quiet())


@pytest.mark.slow
def test_a_guardrail_that_holds_costs_no_baseline_runs_at_later_looks(tmp_path: Path) -> None:
    """Whether a next look needs the baseline depends on the guardrails after this look.

    Budget 42 leaves room after the first look for the open comparisons but not for the
    baseline too: a round whose guardrail held at the first look must go on exactly as one
    with no guardrail (the engine used to read the guardrails of the look before, call the
    next look unaffordable and stop with runs unspent).
    """
    decisions = {}
    for kind, guards in [
        ("none", []),
        ("held", [{"metric": "quality", "kind": "min_delta", "threshold": -50.0}]),
    ]:
        scenario = small()
        scenario.guardrails = guards
        round_file = write_round(tmp_path / kind, scenario, budget=42, seeds=2, confirm_seeds=2)
        decisions[kind] = integrate(round_file, tmp_path / kind / "out", console=quiet()).decision
    held, none = decisions["held"], decisions["none"]
    assert held.guardrail_checks[0].state == "held"
    assert held.runs.total == none.runs.total == 42
    assert not held.confirmation.out_of_budget
    assert held.selected == none.selected and held.undecided == none.undecided
