"""Planning: which recipes to run next, so the decision is right with few runs.

Why this shape:

* **Screening first.** The baseline, each contribution alone, "all in" and leave-one-out of
  all in. Alone vs baseline measures each main effect; all-in minus leave-one-out measures
  each contribution's effect *in combination*, and the difference between the two is its
  total interaction with the others: a gain that vanishes, or a conflict, shows up here for
  about 2n + 2 recipes instead of 2^n. With choice groups "all in" is not one recipe: the
  all-in variants take member k of every group in variant k, so every contribution is in one.
* **Then adaptive batches.** After each fit, the candidates that could still beat the current
  choice by more than `margin` (probability above 1 - confidence) are the informative ones:
  a candidate never run is run (its prediction leans on unidentified interactions), a
  candidate already run is run again, with the current choice, on new seeds. When no
  candidate is left with a real chance, the decision is confident and the planner stops; the
  budget stops it otherwise. The margin makes ties decidable: a contribution that adds
  nothing leaves two candidates equal, and no number of seeds tells which of equals is better.
* **Every batch has its own seeds and re-runs the baseline on them.** Seeds pair the
  comparison (the effects model gives each seed its own intercept), and a recipe+seed is
  never run twice, so new information about a recipe needs new seeds, and the baseline is
  never compared through stale numbers.
* **The planner only proposes.** What it chooses is confirmed (or not) by direct, seed-paired
  comparisons on fresh seeds (engine.py, verdicts.py); nothing here decides a verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stacklab.integrate.effects import EffectsFit
from stacklab.integrate.select import Choice, Guardrail, Objective, choose
from stacklab.integrate.utility import UtilityDraws

Subset = frozenset[int]
MAX_CONTENDERS = 200  # candidates compared pairwise with the choice, by expected utility
PLAUSIBLY_SAFE = 0.5  # proposals need at least this chance that their guardrails hold


def all_in_variants(n: int, groups: Sequence[Sequence[int]]) -> list[Subset]:
    """Everything at once, one member per choice group; enough variants to cover each member."""
    grouped = {i for g in groups for i in g}
    free = frozenset(i for i in range(n) if i not in grouped)
    variants = max((len(g) for g in groups), default=1)
    return [free | {sorted(g)[k % len(g)] for g in groups} for k in range(variants)]


def screening_design(n: int, groups: Sequence[Sequence[int]]) -> list[Subset]:
    """Baseline, each alone, the all-in variants and leave-one-outs (no repeats).

    The first all-in variant gets every leave-one-out; the others only those of their
    choice-group members (the rest would measure the free contributions a second time, in a
    context that differs by one group member, at the cost of a whole screening column).
    """
    points: list[Subset] = [frozenset()]
    points += [frozenset({i}) for i in range(n)]
    grouped = {i for g in groups for i in g}
    for k, full in enumerate(all_in_variants(n, groups)):
        points.append(full)
        points += [full - {i} for i in sorted(full) if k == 0 or i in grouped]
    return list(dict.fromkeys(points))


def fresh_seeds(used: Iterable[int], count: int) -> list[int]:
    """`count` seeds after every seed used so far: new information, paired within the batch."""
    start = max(used, default=-1) + 1
    return list(range(start, start + count))


@dataclass(frozen=True)
class Proposal:
    """What the planner wants next, and why; empty `subsets` means the decision is confident."""

    chosen: Subset  # the best measured candidate
    table: Choice  # every candidate scored (and the Pareto front), measured or not
    subsets: list[Subset]  # besides the baseline, which every batch runs
    why: dict[Subset, str]


def propose(
    fits: Mapping[str, EffectsFit],
    objectives: Sequence[Objective],
    guardrails: Sequence[Guardrail],
    candidates: Sequence[Subset],
    measured: set[Subset],
    tried: set[Subset],
    confidence: float,
    guardrail_prob: float,
    margin: float,
    max_points: int = 3,
) -> Proposal:
    """Choose among the recipes run so far, then propose what could still beat the choice.

    The choice is made among measured candidates only: a prediction pinned down by the runs
    can still be a long, noisy chain of differences, and the best of many noisy predictions
    is an overestimate. Unmeasured candidates compete by being proposed and run. A contender
    is a candidate with P(U(candidate) > U(choice) + margin) > 1 - confidence whose
    guardrails plausibly hold (`margin` in utility units). Unmeasured contenders are proposed
    as they are; a measured one is proposed with the choice, so both get new seeds. A
    candidate `tried` but not measured (its runs failed) is not proposed again.
    """
    table = choose(fits, objectives, guardrails, candidates, guardrail_prob)
    ran = [c for c in candidates if c in measured]
    chosen = choose(fits, objectives, guardrails, ran, guardrail_prob).chosen
    util = UtilityDraws(fits, objectives)
    rows = [
        c for c in table.candidates if c.subset != chosen and c.guardrail_prob >= PLAUSIBLY_SAFE
    ]
    rows.sort(key=lambda c: (-c.expected_utility, len(c.subset), sorted(c.subset)))
    contenders: dict[Subset, float] = {}
    for c in rows[:MAX_CONTENDERS]:
        _, d = util.diff(c.subset, chosen)
        p = float(np.mean(d > margin))
        if p > 1.0 - confidence:
            contenders[c.subset] = p
    order = sorted(contenders, key=lambda s: (-contenders[s], -util(s)[0], len(s), sorted(s)))
    subsets: list[Subset] = []
    why: dict[Subset, str] = {}
    for s in order:
        if len(subsets) >= max_points:
            break
        p = contenders[s]
        if s in tried and s not in measured:
            continue
        if s not in measured:
            subsets.append(s)
            why[s] = f"never run; P(beats the current choice) = {p:.2f}"
        else:
            for t in (s, chosen):
                if t and t not in why:
                    subsets.append(t)
                    why[t] = f"run again on new seeds: P(beats the current choice) = {p:.2f}"
    return Proposal(chosen, table, subsets, why)
