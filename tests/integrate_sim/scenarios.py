"""Ground-truth scenarios for the simulation suite, written out as real round directories.

Each scenario is a baseline (the built-in tiny-grpo recipe), contributions that patch real recipe
keys (used purely as switches the stand-in trainer reads), the truth about each metric, and
what the engine should conclude: the best subset and the shelving reason of the others.

Scale scenarios (`ladder_basic`, `ladder_random`, `lr_confound`) hold one truth per rung of
a ladder (docs/integrate.md, "Decisions that hold at scale"): the rungs are the model depth
of the tiny recipe, s = 2 and m = 4 (the baseline's own), and a contribution's effect may
differ between them. Their `metrics` and `best` are the truth at the largest rung, the one a
ladder's verdicts are meant to hold at; `scale` holds every rung's truth for the stand-in
trainer, and `scales` the rungs write_round puts into round.yaml.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OBJECTIVE = Path(__file__).with_name("objective.py")


@dataclass
class Scenario:
    contributions: dict[str, tuple[str, str, Any]]  # id -> (area, recipe key, value)
    metrics: dict[str, dict[str, Any]]  # the stand-in trainer's truth (see objective.py)
    objectives: list[dict[str, Any]]
    guardrails: list[dict[str, Any]] = field(default_factory=list)
    best: set[str] = field(default_factory=set)
    kinds: dict[str, str] = field(default_factory=dict)  # shelved id -> expected reason kind
    extra: dict[str, Any] = field(default_factory=dict)  # crash / hang / drop knobs
    # The stand-in trainer's truth per rung: {"key": dotted key, "metrics": {str(value): ...}}
    scale: dict[str, Any] = field(default_factory=dict)
    scales: list[dict[str, Any]] = field(default_factory=list)  # round.yaml's rungs, if any


@dataclass
class LadderScenario(Scenario):
    """A scale scenario that also says how each contribution's effect changes with scale."""

    seed: int = 0
    patterns: dict[str, str] = field(default_factory=dict)  # id -> one of PATTERNS


def kitchen_sink(seed: int = 0, noise: float = 0.1) -> Scenario:
    """Eight contributions: three that belong, and one of each way to be shelved.

    qkn, lrup, gspo: real gains that combine. wsd: helps alone but conflicts with lrup
    (together worse than lrup alone). dedup: helps alone but its gain vanishes with qkn.
    bigbatch: helps quality but costs 20% speed (guardrail: keep 90%). warm: does nothing.
    dapo: helps, but sets rl.loss like gspo, which helps more (choice group).
    """
    rng = random.Random(seed)

    def jitter(x: float) -> float:
        return x * rng.uniform(0.85, 1.15)

    qkn, lrup, wsd, dedup = jitter(0.65), jitter(0.8), jitter(0.5), jitter(0.35)
    bigbatch, dapo, gspo = jitter(0.7), jitter(0.3), jitter(0.6)
    return Scenario(
        contributions={
            "qkn": ("architecture", "model.qk_norm", False),
            "lrup": ("optimizer", "optim.lr", 0.006),
            "wsd": ("optimizer", "optim.schedule", "wsd"),
            "dedup": ("data", "data.dedup.threshold", 0.7),
            "bigbatch": ("systems", "pretrain.batch_size", 32),
            "warm": ("optimizer", "optim.warmup_steps", 40),
            "dapo": ("rl", "rl.loss", "dapo"),
            "gspo": ("rl", "rl.loss", "gspo"),
        },
        metrics={
            "quality": {
                "base": 10.0,
                "main": {
                    "qkn": qkn,
                    "lrup": lrup,
                    "wsd": wsd,
                    "dedup": dedup,
                    "bigbatch": bigbatch,
                    "warm": 0.0,
                    "dapo": dapo,
                    "gspo": gspo,
                },
                "pairs": [["wsd", "lrup", -(wsd + 0.5)], ["dedup", "qkn", -dedup]],
                "noise": noise,
                "seed_sd": 0.3,
            },
            "speed": {"base": 100.0, "ratio": {"bigbatch": 0.8}, "noise": 1.0, "seed_sd": 2.0},
        },
        objectives=[{"metric": "quality", "direction": "max", "weight": 1.0}],
        guardrails=[{"metric": "speed", "kind": "ratio", "threshold": 0.9}],
        best={"qkn", "lrup", "gspo"},
        extra={"noise_seed": seed},
        kinds={
            "wsd": "conflict",
            "dedup": "vanishes",
            "bigbatch": "guardrail",
            "warm": "no_gain",
            "dapo": "conflict",
        },
    )


def small(noise: float = 0.1) -> Scenario:
    """Four contributions, quick to run: two gains, one null, one conflicting with a gain."""
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
                "main": {"alpha": 0.6, "beta": 0.8, "gamma": 0.0, "delta": 0.5},
                "pairs": [["beta", "delta", -1.0]],
                "noise": noise,
                "seed_sd": 0.3,
            }
        },
        objectives=[{"metric": "quality", "direction": "max"}],
        best={"alpha", "beta"},
        kinds={"gamma": "no_gain", "delta": "conflict"},
    )


# ---------------------------------------------------------------------------- scale ladders

SCALE_KEY = "model.depth"
# The ladder's rungs: the tiny recipe at depth 2 (cost 1) and at its own depth 4 (cost 4).
RUNGS: tuple[dict[str, Any], ...] = (
    {"name": "s", "patch": {SCALE_KEY: 2}, "cost": 1},
    {"name": "m", "patch": {SCALE_KEY: 4}, "cost": 4},
)
PATTERNS = ("holds", "flips", "fades", "emerges", "null")
# Switches of the tiny recipe for random ladder scenarios: one key each, none optim.lr (a
# round with lr_tuning overrides that one), none the scale key (a rung would overwrite it).
LADDER_KEYS: tuple[tuple[str, str, str, Any], ...] = (
    ("qkn", "architecture", "model.qk_norm", False),
    ("untie", "architecture", "model.tie_embeddings", False),
    ("rope", "architecture", "model.rope_theta", 50000.0),
    ("initstd", "architecture", "model.init_std", 0.01),
    ("wsd", "optimizer", "optim.schedule", "wsd"),
    ("warm", "optimizer", "optim.warmup_steps", 40),
    ("wd", "optimizer", "optim.weight_decay", 0.05),
    ("clip", "optimizer", "optim.grad_clip", 0.5),
    ("dedup", "data", "data.dedup.threshold", 0.7),
    ("bigbatch", "systems", "pretrain.batch_size", 32),
)


def rung_value(rung: dict[str, Any]) -> str:
    """The stand-in trainer's name for a rung: str() of its value at the scale key."""
    return str(rung["patch"][SCALE_KEY])


def _quality(main: dict[str, float], noise: float = 0.1, **more: Any) -> dict[str, Any]:
    """A rung's metrics: one, quality (base 10, seed sd 0.3), with these main effects."""
    spec = {"base": 10.0, "main": main, "pairs": [], "noise": noise, "seed_sd": 0.3, **more}
    return {"quality": spec}


def _ladder(
    contributions: dict[str, tuple[str, str, Any]],
    truth: dict[str, dict[str, Any]],  # rung name -> that rung's metrics
    **fields: Any,
) -> dict[str, Any]:
    """The fields every scale scenario shares: rungs, per-rung truth, top = the largest."""
    top = RUNGS[-1]["name"]
    return {
        "contributions": contributions,
        "metrics": truth[top],
        "objectives": [{"metric": "quality", "direction": "max"}],
        "scale": {
            "key": SCALE_KEY,
            "metrics": {rung_value(r): truth[r["name"]] for r in RUNGS},
        },
        "scales": [dict(r) for r in RUNGS],
        **fields,
    }


def ladder_basic() -> LadderScenario:
    """Four contributions whose effect at the small rung is not their effect at the large one.

    In quality units (noise sd 0.1, seed sd 0.3), at s / at m: steady +0.6 / +0.6 (holds),
    flip +0.5 / -0.5 (helps small models, hurts the larger one), emerge 0 / +0.6 (only the
    larger model gains), shrink +0.9 / +0.02 (a big gain that fades to a fifth of a noise
    sd, below the default min_effect of half one). A single-scale round at s would take
    {steady, flip, shrink}; the truth at m is {steady, emerge}.
    """
    contributions = {
        "steady": ("architecture", "model.qk_norm", False),
        "flip": ("optimizer", "optim.schedule", "wsd"),
        "emerge": ("data", "data.dedup.threshold", 0.7),
        "shrink": ("systems", "pretrain.batch_size", 32),
    }
    truth = {
        "s": _quality({"steady": 0.6, "flip": 0.5, "emerge": 0.0, "shrink": 0.9}),
        "m": _quality({"steady": 0.6, "flip": -0.5, "emerge": 0.6, "shrink": 0.02}),
    }
    return LadderScenario(
        **_ladder(contributions, truth),
        best={"steady", "emerge"},
        kinds={"flip": "no_transfer", "shrink": "no_transfer"},
        patterns={"steady": "holds", "flip": "flips", "emerge": "emerges", "shrink": "fades"},
    )


def ladder_random(seed: int) -> LadderScenario:
    """4-6 contributions, each of a random pattern across the rungs s and m, drawn from `seed`.

    Effects are in noise sds (noise 0.1, seed sd 0.3; one objective, no pairs, guardrails or
    choice groups, so the best subset at a rung is exactly its contributions with a positive
    effect there), in the calibration benchmark's 1-3 range: holds: +1-3 at s and, drawn
    again, at m; flips: +1-3 at s, -(0.5-2) at m; fades: +1-3 at s, exactly 0 at m (the
    truth must not hinge on min_effect); emerges: 0 at s, +1-3 at m; null: 0 at both.
    Every scenario has at least one that holds and one whose verdict changes with scale
    (flips, fades or emerges): without one, a ladder has nothing to find.
    """
    rng = random.Random(f"stacklab-ladder-{seed}")
    n = rng.randint(4, 6)
    plan = ["holds", rng.choice(["flips", "fades", "emerges"])]
    plan += rng.choices(PATTERNS, weights=[3, 2, 2, 2, 1], k=n - 2)
    keys = rng.sample(LADDER_KEYS, n)
    noise = 0.1

    def gain() -> float:
        return round(rng.uniform(1.0, 3.0) * noise, 4)

    contributions: dict[str, tuple[str, str, Any]] = {}
    patterns: dict[str, str] = {}
    at_s: dict[str, float] = {}
    at_m: dict[str, float] = {}
    for (cid, area, key, value), pattern in zip(keys, plan, strict=True):
        contributions[cid] = (area, key, value)
        patterns[cid] = pattern
        at_s[cid] = gain() if pattern in ("holds", "flips", "fades") else 0.0
        if pattern in ("holds", "emerges"):
            at_m[cid] = gain()
        elif pattern == "flips":
            at_m[cid] = -round(rng.uniform(0.5, 2.0) * noise, 4)
        else:
            at_m[cid] = 0.0
    truth = {"s": _quality(at_s, noise), "m": _quality(at_m, noise)}
    return LadderScenario(
        **_ladder(dict(sorted(contributions.items())), truth),
        best={c for c, g in at_m.items() if g > 0},
        kinds={c: "no_gain" for c, p in patterns.items() if p == "null"},
        extra={"noise_seed": seed},
        seed=seed,
        patterns=dict(sorted(patterns.items())),
    )


def lr_confound() -> LadderScenario:
    """A contribution that only moves the learning rate, next to a real gain.

    Quality at both rungs has a learning-rate curve: best at optim.lr 0.006, -0.4 per
    squared factor-of-2 off it, so the baseline's 0.003 loses 0.4. `lrup` sets optim.lr to
    0.006 and does nothing else: at the baseline's learning rate it gains 0.4 (4 noise sds),
    and once the baseline and the chosen recipe are each run at their best learning rate
    (lr_tuning) it changes nothing. `qkn` gains 0.5 at any learning rate. best = {qkn}, with
    lr_tuning; without it, lrup's gain is real at the recipe's fixed lr and it is taken.
    """
    contributions = {
        "lrup": ("optimizer", "optim.lr", 0.006),
        "qkn": ("architecture", "model.qk_norm", False),
    }
    curve = {"key": "optim.lr", "best": 0.006, "loss": 0.4}
    truth = {rung["name"]: _quality({"qkn": 0.5}, lr=dict(curve)) for rung in RUNGS}
    return LadderScenario(
        **_ladder(contributions, truth),
        best={"qkn"},
        kinds={"lrup": "lr_only"},
        patterns={"lrup": "holds", "qkn": "holds"},
    )


def ground_truth(scenario: Scenario) -> dict[str, Any]:
    """What the stand-in trainer reads: which settings are which feature, and the metrics."""
    features = {
        cid: {"key": key, "value": value} for cid, (_, key, value) in scenario.contributions.items()
    }
    truth: dict[str, Any] = {"features": features, "metrics": scenario.metrics}
    if scenario.scale:
        truth["scale"] = scenario.scale
    return {**truth, **scenario.extra}


def write_round(
    root: Path,
    scenario: Scenario,
    budget: int,
    seeds: int | list[int] = 3,
    confirm_seeds: int = 3,
    workers: int = 2,
    timeout_s: float | None = None,
    log: Path | None = None,
    **round_extra: Any,
) -> Path:
    """Write contributions, the scenario and round.yaml under `root`; return the round file.

    A scale scenario's rungs go into round.yaml as `scales`, unless `round_extra` names its
    own (a single-rung round, say, to compare a ladder against).
    """
    root.mkdir(parents=True, exist_ok=True)
    folder = root / "contributions"
    folder.mkdir(exist_ok=True)
    for cid, (area, key, value) in scenario.contributions.items():
        doc = {
            "id": cid,
            "area": area,
            "summary": f"set {key} to {value}",
            "author": f"author-of-{cid}",
            "patch": {key: value},
        }
        (folder / f"{cid}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    truth = ground_truth(scenario)
    if log is not None:
        truth["log"] = str(log)
    (root / "scenario.json").write_text(json.dumps(truth, indent=1))
    runner: dict[str, Any] = {
        "kind": "external",
        "command": f"{sys.executable} {OBJECTIVE} {{recipe}} {{seed}} {{out}} scenario.json",
    }
    if timeout_s is not None:
        runner["timeout_s"] = timeout_s
    spec = {
        "baseline": "tiny-grpo",
        "contributions": ["contributions"],
        "objectives": scenario.objectives,
        "guardrails": scenario.guardrails,
        "seeds": seeds,
        "confirm_seeds": confirm_seeds,
        "budget": budget,
        "runner": runner,
        "executor": {"kind": "local", "workers": workers},
        **({"scales": scenario.scales} if scenario.scales else {}),
        **round_extra,
    }
    path = root / "round.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
