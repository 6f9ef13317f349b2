"""Scale ladders in the simulation suite: the stand-in trainer's per-rung truth, and the engine.

A ladder's verdicts are only as good as the truth they are checked against, so the fast
tests pin that the stand-in trainer (tests/integrate_sim/objective.py) reads a rung's truth
from the recipe it is given, applies the learning-rate curve, and still gives the old
scenarios bit-identical metrics (the recorded benchmark figures depend on them); and that
the brute-force truth of tests/integrate_sim/ladder.py is the trainer's noise-free mean.
The engine tests run ladder_basic() through a real round: a change that flips between rungs
is shelved with both rungs named, one that holds is accepted, within the budget.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

import integrate_sim.ladder as ladder_script
from integrate_sim.ladder import (
    Outcome,
    best_at,
    rung_truth,
    table,
    true_metric_at,
    true_utility_at,
)
from integrate_sim.objective import simulate
from integrate_sim.scenarios import (
    PATTERNS,
    RUNGS,
    SCALE_KEY,
    LadderScenario,
    Scenario,
    ground_truth,
    kitchen_sink,
    ladder_basic,
    ladder_random,
    lr_confound,
    small,
    write_round,
)
from stacklab.integrate.engine import integrate
from stacklab.recipe import load_recipe

TINY: dict[str, Any] = load_recipe("tiny-grpo").model_dump(mode="json")


def recipe_for(scenario: Scenario, ids: set[str] | frozenset[str], rung: str | None) -> dict:
    """The resolved recipe a run of `ids` at `rung` gets: tiny + the rung's patch + theirs."""
    recipe = copy.deepcopy(TINY)
    patch: dict[str, Any] = {}
    if rung is not None:
        patch.update(next(r for r in scenario.scales if r["name"] == rung)["patch"])
    for cid in ids:
        _, key, value = scenario.contributions[cid]
        patch[key] = value
    for key, value in patch.items():
        *parents, last = key.split(".")
        node = recipe
        for part in parents:
            node = node[part]
        node[last] = value
    return recipe


def noiseless(truth: dict[str, Any]) -> dict[str, Any]:
    """The scenario JSON with every metric's run noise and seed shift set to zero."""
    truth = copy.deepcopy(truth)
    blocks = [truth["metrics"], *truth.get("scale", {}).get("metrics", {}).values()]
    for metrics in blocks:
        for spec in metrics.values():
            spec["noise"] = spec["seed_sd"] = 0.0
    return truth


def noiseless_runs(truth: dict[str, Any]) -> dict[str, Any]:
    """The scenario JSON with run noise off and the per-seed shift kept."""
    truth = copy.deepcopy(truth)
    for metrics in [truth["metrics"], *truth["scale"]["metrics"].values()]:
        for spec in metrics.values():
            spec["noise"] = 0.0
    return truth


# ---------------------------------------------------------------------------- the stand-in


def test_old_scenarios_give_the_metrics_they_gave_before_scale_keys() -> None:
    """Values computed before objective.py knew rungs or lr curves: same noise draws."""
    sink, plain = ground_truth(kitchen_sink(0)), ground_truth(small())
    both = {"qkn", "lrup"}
    assert simulate(TINY, 0, sink) == {"quality": 10.49137045888619, "speed": 103.1702052641201}
    assert simulate(TINY, 7, sink) == {"quality": 9.761299684406586, "speed": 97.93051819462978}
    assert simulate(recipe_for(kitchen_sink(0), both, None), 3, sink) == {
        "quality": 11.647756059084617,
        "speed": 102.6959412468832,
    }
    assert simulate(TINY, 0, plain) == {"quality": 5.491370458886189}
    assert simulate(recipe_for(small(), {"alpha", "beta"}, None), 3, plain) == {
        "quality": 6.576028223556505
    }


def test_simulate_reads_the_rungs_truth_from_the_recipe() -> None:
    s = ladder_basic()
    truth = noiseless(ground_truth(s))
    for rung, flip in (("s", 0.5), ("m", -0.5)):
        base = simulate(recipe_for(s, set(), rung), 0, truth)["quality"]
        with_flip = simulate(recipe_for(s, {"flip"}, rung), 0, truth)["quality"]
        assert with_flip - base == pytest.approx(flip)
    # A depth the scale block does not list (or no depth at all) gets the top-level truth.
    odd = recipe_for(s, {"emerge"}, None)
    odd["model"]["depth"] = 3
    assert simulate(odd, 0, truth)["quality"] == pytest.approx(10.6)
    del odd["model"]["depth"]
    assert simulate(odd, 0, truth)["quality"] == pytest.approx(10.6)


def test_rungs_draw_noise_of_their_own() -> None:
    """Same truth at both rungs: with a scale block, the run noise and the seed shift differ
    between rungs (two model sizes are two models), and repeat for one rung and seed."""
    s = ladder_basic()
    truth = ground_truth(s)
    same = truth["scale"]["metrics"]["4"]
    truth["scale"]["metrics"]["2"] = same
    at_s = simulate(recipe_for(s, {"steady"}, "s"), 5, truth)["quality"]
    at_m = simulate(recipe_for(s, {"steady"}, "m"), 5, truth)["quality"]
    assert at_s != at_m
    assert simulate(recipe_for(s, {"steady"}, "s"), 5, truth)["quality"] == at_s
    # Paired by seed within a rung: the seed shift is shared by every recipe there.
    shifts = {
        ids: simulate(recipe_for(s, set(ids), "s"), 5, noiseless_runs(truth))["quality"]
        - true_metric_at(s, set(ids), "quality", "m")  # the truth is the same at both rungs
        for ids in [(), ("steady",), ("steady", "emerge")]
    }
    assert len({round(v, 12) for v in shifts.values()}) == 1
    shift_m = simulate(recipe_for(s, set(), "m"), 5, noiseless_runs(truth))["quality"] - 10.0
    assert abs(shifts[()] - shift_m) > 1e-6  # and drawn again at the other rung


def test_lr_curve_costs_loss_per_squared_factor_of_two() -> None:
    curve = {"key": "optim.lr", "best": 0.006, "loss": 0.4}
    truth = {
        "features": {"qkn": {"key": "model.qk_norm", "value": False}},
        "metrics": {"quality": {"base": 10.0, "main": {"qkn": 0.5}, "lr": curve}},
    }
    recipe = copy.deepcopy(TINY)  # lr 0.003: a factor 2 below the best
    assert simulate(recipe, 0, truth)["quality"] == pytest.approx(9.6)
    for lr, expected in ((0.006, 10.0), (0.012, 9.6), (0.0015, 10.0 - 0.4 * 4)):
        recipe["optim"]["lr"] = lr
        assert simulate(recipe, 0, truth)["quality"] == pytest.approx(expected)
    # best_with: with qkn on, the best lr is 0.012 (and qkn's own gain still counts).
    curve["best_with"] = {"qkn": 0.012}
    recipe["optim"]["lr"] = 0.012
    recipe["model"]["qk_norm"] = False
    assert simulate(recipe, 0, truth)["quality"] == pytest.approx(10.5)
    recipe["optim"]["lr"] = 0.006
    assert simulate(recipe, 0, truth)["quality"] == pytest.approx(10.1)


def test_lr_confound_looks_like_a_gain_only_at_the_baselines_lr() -> None:
    s = lr_confound()
    truth = noiseless(ground_truth(s))
    for rung in ("s", "m"):
        base = simulate(recipe_for(s, set(), rung), 0, truth)["quality"]
        lrup = simulate(recipe_for(s, {"lrup"}, rung), 0, truth)["quality"]
        assert lrup - base == pytest.approx(0.4)
        assert true_utility_at(s, {"lrup"}, rung) == pytest.approx(4.0)  # noise units
        assert true_utility_at(s, {"lrup"}, rung, tuned=True) == pytest.approx(0.0)
        assert true_utility_at(s, {"qkn"}, rung, tuned=True) == pytest.approx(5.0)
    assert best_at(s, "m") == {"qkn", "lrup"}  # at a fixed lr, lrup's gain is real
    assert best_at(s, "m", tuned=True) == s.best == {"qkn"}


# ---------------------------------------------------------------------------- the truth


@pytest.mark.parametrize("make", [ladder_basic, lr_confound, lambda: ladder_random(7)])
def test_the_brute_force_truth_is_the_stand_ins_noise_free_mean(make: Any) -> None:
    s = make()
    truth = noiseless(ground_truth(s))
    ids = sorted(s.contributions)
    for rung in ("s", "m"):
        for k in range(len(ids) + 1):
            for subset in itertools.combinations(ids, k):
                run = simulate(recipe_for(s, set(subset), rung), 0, truth)["quality"]
                assert run == pytest.approx(true_metric_at(s, subset, "quality", rung))


def test_ladder_basic_truth_differs_between_rungs() -> None:
    s = ladder_basic()
    assert [r["name"] for r in s.scales] == ["s", "m"] and s.scales == list(RUNGS)
    assert s.scale["key"] == SCALE_KEY and set(s.scale["metrics"]) == {"2", "4"}
    assert rung_truth(s, "m") == s.metrics  # the top-level truth is the largest rung's
    assert best_at(s, "s") == {"steady", "flip", "shrink"}
    assert best_at(s, "m") == s.best == {"steady", "emerge"}
    # shrink still gains at m, a fifth of a noise sd: below min_effect, so not in the best.
    assert 0 < true_utility_at(s, {"shrink"}, "m") < 0.5
    assert best_at(s, "m", min_effect=0.0) == {"steady", "emerge", "shrink"}
    assert set(s.kinds) == set(s.contributions) - s.best


@pytest.mark.parametrize("seed", range(20))
def test_ladder_random_structure(seed: int) -> None:
    s = ladder_random(seed)
    assert isinstance(s, LadderScenario) and s.seed == seed
    assert 4 <= len(s.contributions) <= 6 and set(s.patterns) == set(s.contributions)
    assert set(s.patterns.values()) <= set(PATTERNS)
    assert "holds" in s.patterns.values()
    assert {"flips", "fades", "emerges"} & set(s.patterns.values())
    keys = [key for _, key, _ in s.contributions.values()]
    assert len(set(keys)) == len(keys) and SCALE_KEY not in keys and "optim.lr" not in keys
    assert not s.guardrails and s.extra == {"noise_seed": seed}
    small_main = rung_truth(s, "s")["quality"]["main"]
    large_main = rung_truth(s, "m")["quality"]["main"]
    for cid, pattern in s.patterns.items():
        at_s, at_m = small_main[cid] / 0.1, large_main[cid] / 0.1  # in noise sds
        helps_s = 1.0 - 1e-6 <= at_s <= 3.0 + 1e-6
        helps_m = 1.0 - 1e-6 <= at_m <= 3.0 + 1e-6
        expected = {
            "holds": helps_s and helps_m,
            "flips": helps_s and -2.0 - 1e-6 <= at_m <= -0.5 + 1e-6,
            "fades": helps_s and at_m == 0.0,
            "emerges": at_s == 0.0 and helps_m,
            "null": at_s == 0.0 and at_m == 0.0,
        }[pattern]
        assert expected, (cid, pattern, at_s, at_m)
    assert (
        best_at(s, "m") == s.best == {c for c, p in s.patterns.items() if p in ("holds", "emerges")}
    )
    again = ladder_random(seed)
    assert (again.contributions, again.scale, again.patterns) == (
        s.contributions,
        s.scale,
        s.patterns,
    )


def test_write_round_puts_the_rungs_into_round_yaml(tmp_path: Path) -> None:
    s = ladder_basic()
    spec = yaml.safe_load(write_round(tmp_path / "a", s, budget=100).read_text())
    assert spec["scales"] == list(RUNGS)
    truth = json.loads((tmp_path / "a" / "scenario.json").read_text())
    assert truth["scale"]["key"] == SCALE_KEY
    only_m = [dict(RUNGS[-1])]
    spec = yaml.safe_load(write_round(tmp_path / "b", s, budget=100, scales=only_m).read_text())
    assert spec["scales"] == only_m
    spec = yaml.safe_load(write_round(tmp_path / "c", small(), budget=100).read_text())
    assert "scales" not in spec  # a scenario without rungs writes the round it always did
    assert "scale" not in json.loads((tmp_path / "c" / "scenario.json").read_text())


def test_ladder_table_scores_by_pattern() -> None:
    patterns = {"a": "holds", "b": "flips"}
    common: dict[str, Any] = {"seed": 1, "patterns": patterns, "units": 400.0, "seconds": 1.0}
    rows = [
        Outcome(
            mode="ladder",
            selected=frozenset({"a"}),
            best=frozenset({"a"}),
            right={"a": True, "b": True},
            runs=180,
            **common,
        ),
        Outcome(
            mode="m only",
            selected=frozenset({"a", "b"}),
            best=frozenset({"a"}),
            right={"a": True, "b": False},
            runs=100,
            **common,
        ),
        Outcome(
            mode="m only",
            selected=frozenset(),
            best=frozenset({"a"}),
            right={},
            runs=0,
            refused="rung m's share of the budget (50 runs) is below what screening needs",
            **common,
        ),
    ]
    lines = table(rows, 400).splitlines()
    ladder = next(line for line in lines if line.startswith("| ladder "))
    m_only = next(line for line in lines if line.startswith("| m only "))
    assert "| 2/2 (100%) | 1/1 (100%) | 1/1 (100%) |" in ladder
    assert m_only.startswith("| m only | 1 | 1 | 1/2 (50%) | 1/1 (100%) | 0/1 (0%) |")
    assert not any(line.startswith("| s only ") for line in lines)


# ---------------------------------------------------------------------------- the engine


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.mark.slow
def test_ladder_shelves_a_change_that_flips_and_keeps_one_that_holds(tmp_path: Path) -> None:
    """ladder_basic: flip helps the depth-2 model and hurts the depth-4 one. A round at s
    alone would take it; the ladder measures it again at m, on seeds of its own, and shelves
    it there with both rungs in the reason, inside the budget in cost units."""
    scenario = ladder_basic()
    budget = 200
    round_file = write_round(tmp_path / "round", scenario, budget=budget)
    d = integrate(round_file, tmp_path / "out", console=quiet()).decision

    flip = d.decision("flip")
    assert flip.status == "shelved" and flip.kind == scenario.kinds["flip"]
    assert flip.rung == "m" and flip.transfer is not None
    assert re.search(r"\bat s\b", flip.reason) and re.search(r"\bat m\b", flip.reason)
    assert flip.transfer.pattern == "flips" and flip.transfer.sign_changed
    verdicts = {r.rung: r.verdict for r in flip.transfer.rungs}
    assert verdicts == {"s": "accept", "m": "harm"}
    seeds = {r.rung: set(r.seeds) for r in flip.transfer.rungs}
    assert not seeds["s"] & seeds["m"]  # the larger rung runs on seeds of its own

    steady = d.decision("steady")
    assert steady.status == "accepted" and steady.rung == "m"
    assert steady.transfer is not None and steady.transfer.pattern == "holds"
    assert "steady" in d.selected and "flip" not in d.selected
    assert "shrink" not in d.selected  # a fifth of a noise sd at m: not worth keeping
    assert {x.rung for x in d.decisions} <= {"s", "m"}

    ladder = d.ladder
    assert ladder is not None
    assert ladder.units_used <= budget == ladder.budget_units
    rungs = {r.name: r for r in ladder.rungs}
    assert (rungs["s"].cost, rungs["m"].cost) == (1.0, 4.0)
    assert sum(r.units_used for r in ladder.rungs) == ladder.units_used
    assert "flip" in rungs["s"].chosen  # a round at s alone would have taken it


@pytest.mark.slow
def test_lr_tuning_shelves_a_change_that_only_moves_the_learning_rate(tmp_path: Path) -> None:
    """lr_confound: lrup only moves optim.lr to its best value. At the baseline's learning
    rate that is a real gain, and a ladder without lr_tuning takes it; with lr_tuning both
    recipes run at their best learning rate at m, where lrup changes nothing."""
    scenario = lr_confound()
    plain = write_round(tmp_path / "plain", scenario, budget=200)
    d = integrate(plain, tmp_path / "plain-out", console=quiet()).decision
    assert set(d.selected) == best_at(scenario, "m") == {"qkn", "lrup"}

    tuning = {"key": "optim.lr", "factors": [0.5, 1.0, 2.0], "seeds": 2}
    tuned = write_round(tmp_path / "tuned", scenario, budget=200, lr_tuning=tuning)
    d = integrate(tuned, tmp_path / "tuned-out", console=quiet()).decision
    assert set(d.selected) == scenario.best == best_at(scenario, "m", tuned=True)
    lrup = d.decision("lrup")
    assert lrup.status == "shelved" and lrup.kind == scenario.kinds["lrup"]
    assert lrup.rung == "m"
    assert d.ladder is not None and d.ladder.lr_tuning is not None
    lr = d.ladder.lr_tuning
    assert lr.rung == "m" and lr.baseline.best == lr.final.best == 0.006
    assert d.ladder.units_used <= 200


@pytest.mark.slow
def test_the_ladder_script_runs_every_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """python -m tests.integrate_sim.ladder, on one small scenario: three rounds through the
    engine, one markdown row each, every contribution scored."""
    assert ladder_script.main(["--scenarios", "1", "--first-seed", "14", "--budget", "200"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
    assert {"ladder", "m only", "s only"} <= set(rows)
    for mode in ("ladder", "m only", "s only"):
        assert rows[mode].startswith(f"| {mode} | 1 | 0 | ") and "/4 (" in rows[mode]
        assert f"seed 14 {mode}: selected" in err
