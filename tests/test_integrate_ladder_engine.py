"""Scale ladders in the engine: the round format's checks, the pieces of ladder.py with exact
numbers, resuming a killed ladder, measured costs and learning-rate tuning.

The simulated verdicts across rungs (a gain that flips, one that emerges) are in
tests/test_integrate_ladder.py; the Ray executor runs a ladder in tests/test_integrate_ray.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from integrate_sim.scenarios import small, write_round
from stacklab.integrate.engine import integrate
from stacklab.integrate.ladder import _on_shared_seeds, _pattern, _tau_interval
from stacklab.integrate.record import DecisionRecord
from stacklab.integrate.round import RoundError, load_round
from stacklab.integrate.store import RunStore
from test_integrate_simulation import (
    comparable,
    config_and_seed,
    log_counts,
    read_decision,
    run_engine,
)

RUNGS = [
    {"name": "s", "patch": {"model.depth": 2}},
    {"name": "m", "patch": {"model.depth": 4}, "cost": 2},
]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def edit(round_file: Path, **changes: Any) -> Path:
    spec = yaml.safe_load(round_file.read_text())
    spec.update(changes)
    round_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return round_file


# --------------------------------------------------------------------------- the format


def test_rungs_load_with_their_shares_and_costs(tmp_path: Path) -> None:
    rnd = load_round(write_round(tmp_path, small(), budget=100, scales=RUNGS))
    assert [(r.name, r.cost, r.cost_source, r.share) for r in rnd.rungs] == [
        ("s", 1.0, "default", 0.25),
        ("m", 2.0, "given", 0.75),
    ]
    three = [*RUNGS, {"name": "l", "patch": {"model.depth": 6}, "share": 0.2}]
    rnd = load_round(write_round(tmp_path / "three", small(), budget=100, scales=three))
    assert [r.share for r in rnd.rungs] == pytest.approx([0.25, 0.55, 0.2])
    assert rnd.rungs[2].cost is None and rnd.rungs[2].cost_source == "measured"
    assert load_round(write_round(tmp_path / "none", small(), budget=100)).rungs == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"scales": [{"name": "s", "patch": {"optim.lr": 0.001}}]},
            r"scales\[0\] \(s\): patch key 'optim.lr' overlaps 'optim.lr', which .*beta.yaml "
            "sets; a rung would overwrite the contribution",
        ),
        (
            {"scales": [{"name": "s", "patch": {"model.dpeth": 2}}]},
            r"scales\[0\] \(s\): patch: .*model.dpeth",
        ),
        (
            {"scales": [{"name": "s", "patch": {"model.depth": 2}}] * 2},
            "rung name 's' repeats",
        ),
        (
            {"scales": [{**r, "share": 0.7} for r in RUNGS]},
            "the shares add up to 1.4, more than 1",
        ),
        (
            {"lr_tuning": {"key": "optim.lr", "factors": [0.5, 2]}},
            "lr_tuning: needs scales: with two rungs or more",
        ),
        (
            {"scales": RUNGS[:1], "lr_tuning": {"key": "optim.lr", "factors": [0.5, 2]}},
            r"lr_tuning: needs two rungs or more",
        ),
        (
            {"scales": RUNGS, "lr_tuning": {"key": "optim.schedule", "factors": [0.5, 2]}},
            r"lr_tuning.key: optim.schedule is 'cosine' at rung m; it must be a positive number",
        ),
        (
            {"scales": RUNGS, "lr_tuning": {"key": "optim.lr", "factors": [1, 1]}},
            r"factors repeat",
        ),
        (
            {"scales": [{"name": "s", "patch": {}}]},
            r"scales.0.patch",
        ),
    ],
    ids=[
        "overlaps-a-contribution",
        "unknown-key",
        "repeated-name",
        "shares-above-1",
        "lr-without-scales",
        "lr-with-one-rung",
        "lr-not-a-number",
        "lr-factors-repeat",
        "empty-patch",
    ],
)
def test_a_bad_ladder_is_refused_at_load_naming_the_key(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    round_file = edit(write_round(tmp_path, small(), budget=100), **changes)
    with pytest.raises(RoundError, match=message):
        load_round(round_file)


# --------------------------------------------------------------------------- exact pieces


def test_patterns_read_the_first_and_last_rung() -> None:
    assert _pattern(["+"]) == "one rung"
    assert _pattern(["+", "+"]) == "holds"
    assert _pattern(["0", "0"]) == "holds"
    assert _pattern(["+", "-"]) == "flips"
    assert _pattern(["-", "+"]) == "flips"
    assert _pattern(["+", "0"]) == "fades"
    assert _pattern(["0", "+"]) == "emerges"
    assert _pattern(["0", "-"]) == "changes"
    assert _pattern(["+", "0", "+"]) == "holds"
    assert _pattern(["+", "?"]) == "undecided"  # an open end claims nothing about transfer
    assert _pattern(["?", "+"]) == "undecided"


@pytest.mark.slow
def test_kendall_tau_between_rungs_with_a_seed_bootstrap() -> None:
    same = [{0: 1.0, 1: 1.2}, {0: 2.0, 1: 2.1}, {0: 3.0, 1: 3.3}]
    assert _tau_interval(same, same) == [1.0, 1.0, 1.0]  # no resample reorders them
    reversed_ = [{5: 3.0, 6: 3.1}, {5: 2.0, 6: 2.2}, {5: 1.0, 6: 0.9}]
    assert _tau_interval(same, reversed_) == [-1.0, -1.0, -1.0]
    # Two recipes swap places on one seed: tau is 1/3 on the means, the interval spans it.
    noisy = [{0: 1.0, 1: 3.4}, {0: 2.0, 1: 2.0}, {0: 3.0, 1: 3.0}]
    est, low, high = _tau_interval(same, noisy)  # type: ignore[misc]
    assert est == pytest.approx(1 / 3)
    assert low is not None and high is not None and low < est <= high == 1.0
    assert _tau_interval(same[:2], same[:2]) is None  # fewer than 3 recipes: no tau
    # Means are taken on the seeds every recipe ran: a recipe's extra seeds would rank seeds.
    uneven = [{0: 1.0, 1: 1.0, 2: 9.0}, {0: 2.0, 1: 2.0}, {1: 3.0, 0: 3.0}]
    assert _on_shared_seeds(uneven) == [{0: 1.0, 1: 1.0}, {0: 2.0, 1: 2.0}, {0: 3.0, 1: 3.0}]
    assert _on_shared_seeds([{0: 1.0}, {1: 2.0}]) == []


# --------------------------------------------------------------------------- whole rounds


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> DecisionRecord:
    root = tmp_path_factory.mktemp("ladder-reference")
    round_file = write_round(root / "round", small(), budget=120, scales=RUNGS)
    return integrate(round_file, root / "out", console=quiet()).decision


@pytest.mark.slow
def test_a_ladder_decides_at_its_top_rung_and_reports_transfer(
    reference: DecisionRecord,
) -> None:
    d = reference
    ladder = d.ladder
    assert ladder is not None
    assert [r.name for r in ladder.rungs] == ["s", "m"]
    s, m = ladder.rungs
    assert s.units_used + m.units_used == ladder.units_used <= 120
    assert m.units_used == 2 * m.runs and s.units_used == s.runs
    assert m.chosen == s.final and m.runs > 0
    assert set(d.selected) == {"alpha", "beta"}
    for cid in ("alpha", "beta"):  # the same truth at both rungs: the gain holds
        x = d.decision(cid)
        assert x.rung == "m" and x.transfer is not None and x.transfer.pattern == "holds"
        assert [r.rung for r in x.transfer.rungs] == ["s", "m"]
        assert x.reason.startswith("at rung m: gain inside the final recipe")
    # delta conflicts with beta (at every rung): shelved wherever it was last compared
    delta = d.decision("delta")
    assert delta.status == "shelved" and delta.kind in ("conflict", "vanishes", "no_transfer")
    (agreement,) = ladder.agreement
    assert agreement.from_ == "s" and agreement.to == "m" and agreement.subsets >= 3
    assert agreement.verdicts_confirmed <= agreement.verdicts_compared
    assert {b.rung for b in d.batches} == {"s", "m"}


@pytest.mark.slow
def test_a_killed_ladder_resumes_with_no_run_repeated(
    tmp_path: Path, reference: DecisionRecord
) -> None:
    """Killed at the top rung (the 50th finished run: the first rung uses about 40)."""
    scenario = small()
    log = tmp_path / "runs.log"
    scenario.extra["kill_engine_after"] = 50
    round_file = write_round(tmp_path / "round", scenario, budget=120, scales=RUNGS, log=log)
    out = tmp_path / "out"
    assert run_engine(round_file, out) == -9
    with RunStore(f"sqlite:///{out / 'runs.db'}", reset_stale=False) as store:
        done_before = {config_and_seed(r) for r in store.runs(status="done")}
        depths = {r.recipe["model"]["depth"] for r in store.runs(status="done")}
    assert depths == {2, 4}, "the kill must land at the top rung"
    assert run_engine(round_file, out) == 0
    assert comparable(read_decision(out)) == comparable(reference)
    counts = log_counts(log)
    assert all(counts[k] == 1 for k in done_before)


@pytest.mark.slow
def test_a_measured_cost_prices_the_rung_from_run_times(tmp_path: Path) -> None:
    rungs = [RUNGS[0], {"name": "m", "patch": {"model.depth": 4}}]
    round_file = write_round(tmp_path / "round", small(), budget=120, scales=rungs)
    d = integrate(round_file, tmp_path / "out", console=quiet()).decision
    assert d.ladder is not None
    m = d.ladder.rungs[1]
    assert m.cost_source == "measured" and m.cost > 0
    assert m.budget_runs == int(m.budget_units // m.cost)
    assert any(b.purpose == "probe" and b.rung == "m" for b in d.batches)


@pytest.mark.slow
def test_lr_tuning_shelves_a_change_that_only_moves_the_learning_rate(tmp_path: Path) -> None:
    """beta sets optim.lr to 0.006, the top of the grid: at the top rung every recipe but the
    baseline runs at the chosen recipe's best lr, so beta changes nothing there."""
    round_file = write_round(
        tmp_path / "round",
        small(),
        budget=120,
        scales=RUNGS,
        lr_tuning={"key": "optim.lr", "factors": [0.5, 1.0, 2.0], "seeds": 2},
    )
    d = integrate(round_file, tmp_path / "out", console=quiet()).decision
    assert d.ladder is not None and d.ladder.lr_tuning is not None
    tuning = d.ladder.lr_tuning
    assert tuning.key == "optim.lr" and tuning.rung == "m"
    assert tuning.values == pytest.approx([0.0015, 0.003, 0.006])
    assert len(tuning.seeds) == 2 and {"alpha", "beta"} <= set(tuning.recipe)
    beta, alpha = d.decision("beta"), d.decision("alpha")
    assert beta.status == "shelved" and beta.kind == "lr_only"
    assert "only a learning-rate change" in beta.reason
    assert alpha.status == "accepted" and alpha.rung == "m"
    grid = [b for b in d.batches if b.purpose == "lr-grid"]
    assert [b.lr for b in grid] == pytest.approx(tuning.values)
    confirm_seeds = {s for b in d.batches if b.purpose == "confirmation" for s in b.seeds}
    assert not set(tuning.seeds) & confirm_seeds  # the grid's seeds judge nothing


# --------------------------------------------------------------------------- shipped rounds


def test_the_builtin_ladder_round_loads_with_its_rungs() -> None:
    rnd = load_round("ladder")
    assert [(r.name, r.cost, r.share) for r in rnd.rungs] == [("s", 1.0, 0.35), ("m", 4.0, 0.65)]
    for rung, depth in zip(rnd.rungs, (2, 3), strict=True):
        data = rnd.workspace.resolve(frozenset(), rung.patch, {"rung": rung.name}).data
        assert data["model"]["depth"] == depth


@pytest.mark.slow
def test_the_gpu_ladder_round_loads_and_its_script_needs_cuda(tmp_path: Path) -> None:
    import subprocess

    import torch

    root = Path(__file__).resolve().parents[1]
    rnd = load_round(root / "benchmarks" / "ladder_gpu.yaml")
    assert [r.name for r in rnd.rungs] == ["d4", "d8", "d12"]
    if torch.cuda.is_available():  # pragma: no cover - it would start the whole round
        pytest.skip("a CUDA device is visible: the script would run the round")
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_ladder.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_round_at_the_small_rung_alone_keeps_the_flip_the_ladder_shelves(
    tmp_path: Path,
) -> None:
    """The comparison the ladder exists for, on ladder_basic (flip: +0.5 at s, -0.5 at m), at
    one budget in cost units: the small rung alone selects it; the ladder shelves it."""
    from integrate_sim.scenarios import ladder_basic

    scenario = ladder_basic()
    small_only = [r for r in scenario.scales if r["name"] == "s"]
    decisions = {}
    for kind, rungs in [("ladder", scenario.scales), ("s-only", small_only)]:
        round_file = write_round(tmp_path / kind, scenario, budget=200, scales=rungs)
        decisions[kind] = integrate(round_file, tmp_path / kind / "out", console=quiet()).decision
    assert "flip" in decisions["s-only"].selected
    assert "flip" not in decisions["ladder"].selected
    assert "steady" in decisions["ladder"].selected
