"""The calibration benchmark's scenario generator and scoring (tests/integrate_sim/calibration.py).

The benchmark's verdict on the engine is only as good as its truth: these tests pin that the
generated scenarios have the structure they claim (and load as valid rounds), that the best
subset is computed exactly, and that a decision is scored right: coverage per interval, the
exact / as-good verdicts and accepted nulls. No engine runs here: seconds, not minutes.
"""

from __future__ import annotations

import pytest

from integrate_sim.calibration import (
    ROLES,
    CalibrationScenario,
    allowed_subsets,
    best_subsets,
    evidence_truth,
    feasible,
    random_scenario,
    score_decision,
    true_metric,
    true_utility,
)
from integrate_sim.scenarios import write_round
from stacklab.integrate.round import load_round

SEEDS = range(1000, 1060)
IN_BEST = {"real": True, "synergy": True, "null": False, "vanishing": False}
IN_BEST |= {"conflict": False, "guardrail": False, "tradeoff": False}


def test_scenarios_differ_by_seed_and_repeat_for_one():
    a, b = random_scenario(1000), random_scenario(1001)
    assert (a.contributions, a.metrics) != (b.contributions, b.metrics)
    again = random_scenario(1000)
    assert (again.contributions, again.metrics, again.roles) == (
        a.contributions,
        a.metrics,
        a.roles,
    )
    assert a.extra["noise_seed"] == 1000 and b.extra["noise_seed"] == 1001


@pytest.mark.parametrize("seed", SEEDS)
def test_scenario_structure(seed):
    s = random_scenario(seed)
    roles = list(s.roles.values())
    assert 8 <= len(s.contributions) <= 12 and set(s.roles) == set(s.contributions)
    assert roles.count("real") >= 3 and roles.count("null") >= 2 and set(roles) <= set(ROLES)
    assert all(o["scale"] == 1.0 and o["weight"] > 0 for o in s.objectives)
    for metric in s.metrics.values():
        assert 0.2 <= metric["noise"] <= 0.8 or metric["base"] == 100.0  # speed: fixed noise
    for cid, role in s.roles.items():
        if role in IN_BEST:
            assert (cid in s.best) == IN_BEST[role], (cid, role)
        if role == "null":
            assert all(cid not in m.get("main", {}) for m in s.metrics.values())
            assert all(cid not in p[:2] for m in s.metrics.values() for p in m.get("pairs", []))
    choice = [c for c, r in s.roles.items() if r == "choice"]
    assert len(choice) in (0, 2) and len(set(choice) & s.best) == (1 if choice else 0)
    if "tradeoff" in roles:
        assert {o["metric"] for o in s.objectives} == {"quality", "loss"}
    if "guardrail" in roles:
        assert s.guardrails == [{"metric": "speed", "kind": "ratio", "threshold": 0.9}]
    keys = [key for _, key, _ in s.contributions.values()]
    assert len(set(keys)) == len(keys) - (1 if choice else 0)  # only a choice group shares


@pytest.mark.slow
def test_every_role_appears_and_the_rounds_load(tmp_path):
    seen: set[str] = set()
    loaded = 0
    for seed in SEEDS:
        s = random_scenario(seed)
        if set(s.roles.values()) <= seen:
            continue
        seen |= set(s.roles.values())
        rnd = load_round(write_round(tmp_path / str(seed), s, budget=160))  # must not raise
        assert sorted(rnd.ids) == sorted(s.contributions)
        assert len(rnd.groups) == (1 if "choice" in s.roles.values() else 0)
        loaded += 1
    assert seen == set(ROLES) and loaded >= 2


def hand_made() -> CalibrationScenario:
    """g1 and g2 gain; z is null; v vanishes next to g1; gb breaks the speed guardrail;
    c1 / c2 are a choice group (c2 better); s1 + s2 gain only together."""
    return CalibrationScenario(
        contributions={
            "g1": ("optimizer", "optim.lr", 0.006),
            "g2": ("architecture", "model.qk_norm", False),
            "z": ("optimizer", "optim.warmup_steps", 40),
            "v": ("data", "data.dedup.threshold", 0.7),
            "gb": ("systems", "pretrain.batch_size", 32),
            "c1": ("rl", "rl.loss", "dapo"),
            "c2": ("rl", "rl.loss", "gspo"),
            "s1": ("rl", "rl.kl_coef", 0.01),
            "s2": ("optimizer", "optim.grad_clip", 0.5),
        },
        metrics={
            "quality": {
                "base": 10.0,
                "main": {"g1": 1.0, "g2": 0.5, "v": 0.4, "gb": 0.8, "c1": 0.3, "c2": 0.6},
                "pairs": [["v", "g1", -0.4], ["s1", "s2", 0.7]],
                "noise": 0.3,
            },
            "speed": {"base": 100.0, "ratio": {"gb": 0.8}, "noise": 1.0},
        },
        objectives=[{"metric": "quality", "direction": "max", "weight": 1.0, "scale": 1.0}],
        guardrails=[{"metric": "speed", "kind": "ratio", "threshold": 0.9}],
        roles={
            "g1": "real",
            "g2": "real",
            "z": "null",
            "v": "vanishing",
            "gb": "guardrail",
            "c1": "choice",
            "c2": "choice",
            "s1": "synergy",
            "s2": "synergy",
        },
    )


def test_truth_on_a_hand_made_scenario():
    s = hand_made()
    assert true_metric(s, {"g1", "v"}, "quality") == pytest.approx(11.0)
    assert true_metric(s, {"gb", "g1"}, "speed") == pytest.approx(80.0)
    assert true_metric(s, {"gb"}, "quality") == pytest.approx(10.8)
    assert true_utility(s, {"s1", "s2"}) == pytest.approx(0.7)
    assert feasible(s, {"g1", "g2"}) and not feasible(s, {"g1", "gb"})
    assert len(allowed_subsets(s)) == 2**7 * 3  # seven free, one group of two
    best, utility = best_subsets(s)
    assert best == {"g1", "g2", "c2", "s1", "s2"} and utility == pytest.approx(2.8)


def test_best_subsets_breaks_ties_toward_the_smallest():
    s = hand_made()
    s.metrics["quality"]["main"]["c2"] = 0.3  # c1 and c2 now tie
    best, _ = best_subsets(s)
    assert best == {"g1", "g2", "c1", "s1", "s2"}  # same size: the first in id order
    s.metrics["quality"]["main"].update(c1=0.0, c2=0.0)
    best, _ = best_subsets(s)
    assert best == {"g1", "g2", "s1", "s2"}  # members that add nothing stay out


def item(comparison, level, metrics, utility=None, **where):
    return {"comparison": comparison, "seeds": [0, 1, 2], "level": level, "metrics": metrics,
            "utility": utility, **where}  # fmt: skip


def test_score_decision_counts_coverage_and_verdicts():
    s = hand_made()
    selected = ["c2", "g1", "g2", "s1", "s2", "z"]  # the best plus the null
    decision = {
        "selected": selected,
        "shelved": {"v": "vanishes", "gb": "guardrail", "c1": "conflict"},
        "scales": {"quality": 1.0},
        "decisions": [
            {
                "id": "z",
                "status": "accepted",
                "evidence": [
                    item(
                        "alone",
                        0.95,
                        {"quality": [0.1, -0.2, 0.3], "speed": [0.0, -1.0, 1.0]},
                        [0.1, -0.2, 0.3],
                        a=["z"],
                        b=[],
                    )
                ],
            },
            {
                "id": "g1",
                "status": "accepted",
                # leave-one-out truth is 1.0: this interval misses it
                "evidence": [
                    item(
                        "loo",
                        0.98765,
                        {"quality": [0.7, 0.5, 0.8]},
                        a=selected,
                        b=[c for c in selected if c != "g1"],
                    )
                ],
            },
            {
                "id": "v",
                "status": "shelved",
                "evidence": [
                    item(
                        "interaction",
                        0.95,
                        {"quality": [-0.4, -0.6, -0.1]},
                        [-0.4, -0.6, -0.1],
                        pair=["v", "g1"],
                    ),
                    item("guardrail", 0.95, {"speed": [80.0, 78.0, 82.0]}),  # no truth: skipped
                ],
            },
            {"id": "gb", "status": "shelved", "evidence": []},
            {"id": "c1", "status": "shelved"},
        ],
        "runs": {"total": 150},
    }
    score = score_decision(s, decision)
    assert not score["exact_best"] and score["optimal_utility"]
    assert score["null_or_vanishing_accepted"] == 1 and score["useless_accepted"] == ["z"]
    assert score["null_vanishing_total"] == 2
    assert (score["best_accepted"], score["best_size"]) == (5, 5)
    assert (score["real_accepted"], score["real_total"]) == (2, 2)
    assert score["undecided"] == 0 and score["runs"] == 150
    assert score["coverage_by_level"] == {
        "0.95": {"covered": 5, "total": 5},
        "0.988": {"covered": 0, "total": 1},
    }
    assert score["coverage_by_comparison"] == {
        "alone": {"covered": 3, "total": 3},
        "interaction": {"covered": 2, "total": 2},
        "loo": {"covered": 0, "total": 1},
    }
    assert score["contributions"]["v"] == {
        "role": "vanishing",
        "status": "shelved",
        "kind": "",
        "in_best": False,
        "useless_if_accepted": False,
    }


def test_score_decision_old_format_and_guardrail_breach():
    s = hand_made()
    best = ["c2", "g1", "g2", "s1", "s2"]
    old = {"selected": best, "shelved": {}, "decisions": [], "runs": {"total": 99}}
    score = score_decision(s, old)  # no evidence, undecided or scales: nothing to cover
    assert score["exact_best"] and score["optimal_utility"]
    assert score["intervals"] == [] and score["coverage_by_level"] == {}
    assert score["contributions"]["g1"]["status"] == "accepted"
    assert score["contributions"]["z"]["status"] == "missing"

    greedy = {"selected": [*best, "gb"], "undecided": {"z": "budget spent", "v": "unclear"}}
    score = score_decision(s, greedy)  # more utility, but speed falls to 80%
    assert score["selected_utility"] > score["best_utility"]
    assert not score["selected_feasible"] and not score["optimal_utility"]
    assert score["undecided"] == 2


def test_utility_truth_uses_the_decision_scales():
    s = hand_made()
    ev = {"comparison": "alone", "a": ["g1"], "b": []}
    assert evidence_truth(s, ev, "utility", {"quality": 2.0}) == pytest.approx(0.5)
    assert evidence_truth(s, ev, "utility", {}) == pytest.approx(1.0)
    assert evidence_truth(s, ev, "quality", {}) == pytest.approx(1.0)
    assert evidence_truth(s, ev, "unknown_metric", {}) is None
    pair = {"comparison": "interaction", "pair": ["s1", "s2"]}
    assert evidence_truth(s, pair, "quality", {}) == pytest.approx(0.7)
    assert evidence_truth(s, {"comparison": "guardrail"}, "speed", {}) is None
