"""Random scenarios with exact truth, and the scoring of one engine decision against it.

The kitchen-sink scenario tests one fixed structure; a benchmark the project can trust must
show that the engine's intervals cover the truth and its verdicts are right across many
structures, not one it may have been tuned on. `random_scenario(seed)` draws 8-12
contributions that mix real gains, nulls and the ways a contribution can look good and still
not belong (a conflict, a gain that vanishes next to another, a guardrail breach, the worse
member of a choice group, a trade-off between objectives) with one that looks useless and
does belong (half of a synergy pair). Every objective has an explicit `scale: 1.0`, so a
utility unit is a metric unit and the truth is exact: `true_metric` is the stand-in
trainer's noise-free mean (tests/integrate_sim/objective.py), and `best_subsets` enumerates
every allowed subset.

`score_decision` reads the engine's decision.json and says whether its verdict is right
(the exact best subset, or at least a subset as good) and whether each interval it reports
as evidence covers the true value of what it estimates. Seeds: the benchmark uses 1000 and
up, the project's tests stay below 100, so the scenarios the engine is measured on are not
the ones it was developed against.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from integrate_sim.scenarios import Scenario

TOL = 1e-9  # utilities closer than this are equal (floating-point sums of exact effects)

# Recipe settings of the built-in tiny-grpo recipe the contributions switch, each to a value the
# baseline does not hold, and none validated against another: any combination is a valid
# recipe. Short ids say which setting, never which role (the engine must not be able to tell).
KEYS: tuple[tuple[str, str, str, Any], ...] = (
    ("qkn", "architecture", "model.qk_norm", False),
    ("untie", "architecture", "model.tie_embeddings", False),
    ("rope", "architecture", "model.rope_theta", 50000.0),
    ("initstd", "architecture", "model.init_std", 0.01),
    ("lrup", "optimizer", "optim.lr", 0.006),
    ("wsd", "optimizer", "optim.schedule", "wsd"),
    ("warm", "optimizer", "optim.warmup_steps", 40),
    ("wd", "optimizer", "optim.weight_decay", 0.05),
    ("clip", "optimizer", "optim.grad_clip", 0.5),
    ("muonlr", "optimizer", "optim.muon.lr", 0.03),
    ("dedup", "data", "data.dedup.threshold", 0.7),
    ("bigbatch", "systems", "pretrain.batch_size", 32),
    ("kl", "rl", "rl.kl_coef", 0.01),
    ("rllr", "rl", "rl.lr", 0.0001),
)
# A choice group: two contributions that set one key (the baseline has grpo).
CHOICE: tuple[tuple[str, str, str, Any], ...] = (
    ("dapo", "rl", "rl.loss", "dapo"),
    ("gspo", "rl", "rl.loss", "gspo"),
)
ROLES = ("real", "null", "vanishing", "conflict", "guardrail", "choice", "synergy", "tradeoff")
OPTIONAL = {"conflict": 1, "vanishing": 1, "guardrail": 1, "choice": 2, "synergy": 2, "tradeoff": 1}
# The reason kind the engine should give when it shelves a contribution of each role.
SHELVE_KIND = {
    "null": "no_gain",
    "vanishing": "vanishes",
    "conflict": "conflict",
    "guardrail": "guardrail",
    "choice": "conflict",
    "tradeoff": "no_gain",
}


@dataclass
class CalibrationScenario(Scenario):
    """A scenario that also knows the seed it was drawn from and each contribution's role."""

    seed: int = 0
    roles: dict[str, str] = field(default_factory=dict)  # id -> one of ROLES


# ---------------------------------------------------------------------------- the generator


def random_scenario(seed: int) -> CalibrationScenario:
    """8-12 contributions of mixed roles, drawn from `seed` (at least 3 real gains, 2 nulls).

    Effects are in noise SDs of one run's utility (the quantity verdicts are about; with two
    objectives it combines both metrics' noise): real gains 1-3 (half of them in the 1-2
    range the power figures single out); the conflicting contribution helps alone (half to
    three quarters of its partner's gain) and together they are worse than the partner
    alone by 0.5-1; the vanishing gain (40-75% of its partner's) has an interaction with
    its partner of minus its own main effect; the guardrail breaker helps an objective by
    1-2.5 but keeps only 75-85% of "speed" (guardrail: 90%); the choice group's better
    member gains 1.5-2.5, 0.8-1.2 more than the other; the synergy pair does nothing alone
    and 1.5-3 together; the trade-off helps one objective by 1-2.5 and costs the other
    0.5-1 more. Both objectives (quality, max; loss, min) carry a weight when
    there are two. Conflict and vanishing gain have different partners, so that the
    structures do not interact and the best subset is the one they were drawn to have.
    """
    rng = random.Random(f"stacklab-calibration-{seed}")
    n = rng.randint(8, 12)
    room = n - 5
    chosen: list[str] = []
    for role in rng.sample(sorted(OPTIONAL), len(OPTIONAL)):
        if OPTIONAL[role] <= room and rng.random() < 0.6:
            chosen.append(role)
            room -= OPTIONAL[role]
    extra_real = rng.randint(0, room)
    plan = ["real"] * (3 + extra_real) + ["null"] * (2 + room - extra_real)
    plan += [r for r in chosen if r != "choice" for _ in range(OPTIONAL[r])]

    two = "tradeoff" in chosen or rng.random() < 0.3
    objectives = [{"metric": "quality", "direction": "max", "weight": 1.0, "scale": 1.0}]
    metrics: dict[str, dict[str, Any]] = {"quality": _metric(rng, 10.0)}
    if two:
        objectives[0]["weight"] = round(rng.uniform(0.5, 1.5), 2)
        objectives.append(
            {"metric": "loss", "direction": "min", "weight": round(rng.uniform(0.5, 1.5), 2)}
        )
        objectives[1]["scale"] = 1.0
        metrics["loss"] = _metric(rng, 3.0)
    sign = {o["metric"]: 1.0 if o["direction"] == "max" else -1.0 for o in objectives}
    weight = {o["metric"]: float(o["weight"]) for o in objectives}
    names = list(sign)

    keys = list(KEYS)
    rng.shuffle(keys)
    contributions: dict[str, tuple[str, str, Any]] = {}
    roles: dict[str, str] = {}
    for role in plan:
        cid, area, key, value = keys.pop()
        contributions[cid] = (area, key, value)
        roles[cid] = role
    if "choice" in chosen:
        for cid, area, key, value in CHOICE:
            contributions[cid] = (area, key, value)
            roles[cid] = "choice"

    # Effects are sized in noise sds of the utility (the quantity every verdict is about):
    # one run's utility noise is sqrt(sum_k (weight_k * sd_k)^2) with unit scales.
    sigma_u = math.sqrt(sum((weight[m] * float(metrics[m]["noise"])) ** 2 for m in names))

    def main(metric: str, cid: str, size_u: float) -> float:
        """Set cid's main effect on `metric` to a utility gain of `size_u` utility sds."""
        value = round(sign[metric] * size_u * sigma_u / weight[metric], 4)
        metrics[metric]["main"][cid] = value
        return value

    def pair(metric: str, a: str, b: str, size_u: float) -> None:
        """An interaction worth `size_u` utility sds (negative: it costs utility)."""
        value = sign[metric] * size_u * sigma_u / weight[metric]
        metrics[metric]["pairs"].append([a, b, round(value, 4)])

    ids = {role: [c for c in sorted(roles) if roles[c] == role] for role in ROLES}
    size: dict[str, float] = {}  # real gain -> its utility gain, in utility sds
    for cid in ids["real"]:
        size[cid] = rng.uniform(1.0, 3.0)
        main(rng.choice(names), cid, size[cid])
    partners: set[str] = set()  # one partner per structure, or they would interact
    for cid in ids["conflict"]:  # conflicts with the largest real gain
        partner = max(ids["real"], key=lambda c: size[c])
        partners.add(partner)
        m = rng.choice(names)
        own = size[partner] * rng.uniform(0.5, 0.75)
        main(m, cid, own)
        pair(m, cid, partner, -(own + rng.uniform(0.5, 1.0)))
    for cid in ids["vanishing"]:  # smaller than its partner's gain, or it would be the keeper
        partner = rng.choice([c for c in ids["real"] if c not in partners])
        m = rng.choice(names)
        own = size[partner] * rng.uniform(0.4, 0.75)
        main(m, cid, own)
        pair(m, cid, partner, -own)
    for cid in ids["guardrail"]:
        main(rng.choice(names), cid, rng.uniform(1.0, 2.5))
        metrics["speed"] = {"base": 100.0, "ratio": {cid: round(rng.uniform(0.75, 0.85), 3)}}
    if ids["choice"]:
        better, worse = rng.sample(ids["choice"], 2)
        m = rng.choice(names)
        ahead = rng.uniform(1.5, 2.5)
        main(m, better, ahead)
        main(m, worse, max(0.3, ahead - rng.uniform(0.8, 1.2)))
    if ids["synergy"]:
        a, b = ids["synergy"]
        pair(rng.choice(names), a, b, rng.uniform(1.5, 3.0))
    for cid in ids["tradeoff"]:
        helped, hurt = rng.sample(names, 2)
        gain = rng.uniform(1.0, 2.5)
        main(helped, cid, gain)
        main(hurt, cid, -(gain + rng.uniform(0.5, 1.0)))

    guardrails: list[dict[str, Any]] = []
    if "speed" not in metrics and rng.random() < 0.3:  # a guardrail nobody breaks
        metrics["speed"] = {"base": 100.0}
    if "speed" in metrics:
        metrics["speed"].update(noise=1.0, seed_sd=2.0)
        guardrails.append({"metric": "speed", "kind": "ratio", "threshold": 0.9})

    scenario = CalibrationScenario(
        contributions=dict(sorted(contributions.items())),
        metrics=metrics,
        objectives=objectives,
        guardrails=guardrails,
        extra={"noise_seed": seed},
        seed=seed,
        roles=dict(sorted(roles.items())),
    )
    best, _ = best_subsets(scenario)
    scenario.best = set(best)
    scenario.kinds = {
        cid: SHELVE_KIND.get(role, "?") for cid, role in scenario.roles.items() if cid not in best
    }
    return scenario


def _metric(rng: random.Random, base: float) -> dict[str, Any]:
    return {
        "base": base,
        "main": {},
        "pairs": [],
        "noise": round(rng.uniform(0.2, 0.8), 3),
        "seed_sd": round(rng.uniform(0.1, 0.5), 3),
    }


# ---------------------------------------------------------------------------- the truth


def true_metric(scenario: Scenario, ids: Iterable[str], metric: str) -> float:
    """The noise-free mean of `metric` with `ids` on, as objective.py computes it:
    (base + main effects + pairwise interactions) x the ratios of the features on."""
    on = set(ids)
    m = scenario.metrics[metric]
    value = m["base"] + sum(m.get("main", {}).get(f, 0.0) for f in on)
    value += sum(g for a, b, g in m.get("pairs", []) if a in on and b in on)
    for f in on:
        value *= m.get("ratio", {}).get(f, 1.0)
    return float(value)


def _scale(scenario: Scenario, objective: Mapping[str, Any]) -> float:
    """The objective's utility unit: its own scale, else the metric's run noise (the engine
    estimates that one; only calibration scenarios, whose scales are explicit, are exact)."""
    scale = objective.get("scale") or scenario.metrics[objective["metric"]].get("noise") or 1.0
    return float(scale)


def utility_delta(
    scenario: Scenario,
    a: Iterable[str],
    b: Iterable[str],
    scales: Mapping[str, float] | None = None,
) -> float:
    """True U(a) - U(b): sum of weight x sign x (T(a) - T(b)) / scale over the objectives."""
    a, b = set(a), set(b)
    total = 0.0
    for o in scenario.objectives:
        metric = o["metric"]
        scale = (scales or {}).get(metric) or _scale(scenario, o)
        sign = 1.0 if o.get("direction", "max") == "max" else -1.0
        diff = true_metric(scenario, a, metric) - true_metric(scenario, b, metric)
        total += float(o.get("weight", 1.0)) * sign * diff / scale
    return total


def true_utility(scenario: Scenario, ids: Iterable[str]) -> float:
    """True utility of `ids` against the baseline (the empty subset)."""
    return utility_delta(scenario, ids, set())


def feasible(scenario: Scenario, ids: Iterable[str]) -> bool:
    """Every guardrail holds on the true means (direction: the guardrail's, else the
    objective's on that metric, else max)."""
    on = set(ids)
    directions = {o["metric"]: o.get("direction", "max") for o in scenario.objectives}
    for g in scenario.guardrails:
        metric = g["metric"]
        direction = g.get("direction") or directions.get(metric, "max")
        sign = 1.0 if direction == "max" else -1.0
        now, base = true_metric(scenario, on, metric), true_metric(scenario, set(), metric)
        if g["kind"] == "ratio":
            ok = sign * (now - g["threshold"] * base) >= 0
        else:
            ok = sign * (now - base) >= g["threshold"]
        if not ok:
            return False
    return True


def choice_groups(scenario: Scenario) -> list[list[str]]:
    """Contributions that set the same recipe key (at most one of each may be taken)."""
    by_key: dict[str, list[str]] = {}
    for cid, (_, key, _) in scenario.contributions.items():
        by_key.setdefault(key, []).append(cid)
    return [sorted(g) for g in by_key.values() if len(g) > 1]


def allowed_subsets(scenario: Scenario) -> list[frozenset[str]]:
    """Every subset taking at most one member of each choice group."""
    groups = choice_groups(scenario)
    grouped = {c for g in groups for c in g}
    free = sorted(c for c in scenario.contributions if c not in grouped)
    options: list[list[tuple[str, ...]]] = [[(), (c,)] for c in free]
    options += [[(), *((c,) for c in g)] for g in groups]
    return [frozenset(c for part in combo for c in part) for combo in itertools.product(*options)]


def best_subsets(scenario: Scenario) -> tuple[frozenset[str], float]:
    """The true best allowed, feasible subset and its utility. Ties (within 1e-9) go to the
    smallest subset, so a contribution that adds nothing is never part of the best."""
    scored = [(true_utility(scenario, s), s) for s in allowed_subsets(scenario)]
    top = max(u for u, s in scored if feasible(scenario, s))
    near = [(u, s) for u, s in scored if u >= top - TOL and feasible(scenario, s)]
    utility, best = min(near, key=lambda us: (len(us[1]), sorted(us[1])))
    return best, utility


# ---------------------------------------------------------------------------- scoring


def _interval(value: Any) -> tuple[float, float] | None:
    """[estimate, low, high] -> (low, high), or None when it is missing or not finite."""
    if not isinstance(value, list | tuple) or len(value) != 3:
        return None
    try:
        low, high = float(value[1]), float(value[2])
    except (TypeError, ValueError):
        return None
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def evidence_truth(
    scenario: Scenario, item: Mapping[str, Any], quantity: str, scales: Mapping[str, float]
) -> float | None:
    """The true value of what an evidence item estimates for one metric (or "utility"):
    T(a) - T(b), or for an interaction T(pair) - T(i) - T(j) + T(empty). None when the item
    names no comparison (e.g. a guardrail check) or the metric is unknown to the scenario."""
    if item.get("comparison") == "interaction":
        pair = item.get("pair")
        if not pair or len(pair) != 2:
            return None
        terms = [(set(pair), 1.0), ({pair[0]}, -1.0), ({pair[1]}, -1.0), (set(), 1.0)]
    elif "a" in item and "b" in item:
        terms = [(set(item["a"]), 1.0), (set(item["b"]), -1.0)]
    else:
        return None
    if quantity == "utility":
        return sum(c * utility_delta(scenario, ids, set(), scales) for ids, c in terms)
    if quantity not in scenario.metrics:
        return None
    return sum(c * true_metric(scenario, ids, quantity) for ids, c in terms)


def score_decision(scenario: Scenario, decision: Mapping[str, Any]) -> dict[str, Any]:
    """Score one decision.json against the truth (see the module docstring).

    Returns: exact_best, optimal_utility, selected/best/utilities, per-contribution role and
    status, null_or_vanishing_accepted (accepted contributions whose true leave-one-out gain
    inside the selected set is <= 1e-9) and null_vanishing_total (contributions generated as
    null or vanishing), power (best_accepted of best_size: members of the true best set
    accepted; real_accepted of real_total: role "real" only), undecided, and the interval
    coverage of the evidence, by level and by comparison kind, plus every interval checked.
    """
    roles: dict[str, str] = getattr(scenario, "roles", {}) or {}
    best, best_utility = best_subsets(scenario)
    selected = frozenset(decision.get("selected", []))
    utility = true_utility(scenario, selected)
    ok = feasible(scenario, selected)

    statuses: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for d in decision.get("decisions", []):
        statuses[d["id"]] = d.get("status", "")
        kinds[d["id"]] = d.get("kind", "")
    for cid in decision.get("undecided") or {}:
        statuses.setdefault(cid, "undecided")
    for cid in decision.get("shelved") or {}:
        statuses.setdefault(cid, "shelved")
    for cid in selected:
        statuses.setdefault(cid, "accepted")
    accepted = {c for c, s in statuses.items() if s == "accepted"} | selected

    useless = sorted(
        c for c in accepted if utility_delta(scenario, selected, selected - {c}) <= TOL
    )
    contributions = {
        cid: {
            "role": roles.get(cid, "real" if cid in best else "null"),
            "status": statuses.get(cid, "missing"),
            "kind": kinds.get(cid, ""),
            "in_best": cid in best,
            "useless_if_accepted": cid in useless,
        }
        for cid in scenario.contributions
    }
    role_of = {c: v["role"] for c, v in contributions.items()}
    real = [c for c, r in role_of.items() if r == "real"]

    scales = {k: float(v) for k, v in (decision.get("scales") or {}).items()}
    intervals: list[dict[str, Any]] = []
    for d in decision.get("decisions", []):
        for item in d.get("evidence") or []:
            level = round(float(item.get("level", math.nan)), 3)
            quantities = dict(item.get("metrics") or {})
            if item.get("utility") is not None:
                quantities["utility"] = item["utility"]
            for quantity, value in quantities.items():
                bounds = _interval(value)
                truth = evidence_truth(scenario, item, quantity, scales)
                if bounds is None or truth is None:
                    continue
                low, high = bounds
                intervals.append(
                    {
                        "id": d["id"],
                        "comparison": str(item.get("comparison", "")),
                        "level": level,
                        "quantity": quantity,
                        "low": low,
                        "high": high,
                        "truth": truth,
                        "covered": low - TOL <= truth <= high + TOL,
                    }
                )

    return {
        "exact_best": selected == best,
        "optimal_utility": ok and utility >= best_utility - TOL,
        "selected": sorted(selected),
        "best": sorted(best),
        "selected_utility": utility,
        "best_utility": best_utility,
        "selected_feasible": ok,
        "contributions": contributions,
        "null_or_vanishing_accepted": len(useless),
        "useless_accepted": useless,
        "null_vanishing_total": sum(r in ("null", "vanishing") for r in role_of.values()),
        "best_accepted": len(accepted & best),
        "best_size": len(best),
        "real_accepted": len(accepted & set(real)),
        "real_total": len(real),
        "undecided": sum(s == "undecided" for s in statuses.values()),
        "runs": int((decision.get("runs") or {}).get("total", 0)),
        "intervals": intervals,
        "coverage_by_level": coverage_table(intervals, "level"),
        "coverage_by_comparison": coverage_table(intervals, "comparison"),
    }


def coverage_table(intervals: Iterable[Mapping[str, Any]], by: str) -> dict[str, dict[str, int]]:
    """{group: {"covered": k, "total": n}} of checked intervals, grouped by `by` (a key of
    each interval record: "level", "comparison" or "quantity")."""
    out: dict[str, dict[str, int]] = {}
    for rec in intervals:
        key = f"{rec[by]:g}" if isinstance(rec[by], float) else str(rec[by])
        cell = out.setdefault(key, {"covered": 0, "total": 0})
        cell["covered"] += bool(rec["covered"])
        cell["total"] += 1
    return dict(sorted(out.items()))
