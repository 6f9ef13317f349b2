"""Ground-truth scenarios for the simulation suite, written out as real round directories.

Each scenario is a baseline (the built-in tiny recipe), contributions that patch real recipe
keys (used purely as switches the stand-in trainer reads), the truth about each metric, and
what the engine should conclude: the best subset and the shelving reason of the others.
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


def ground_truth(scenario: Scenario) -> dict[str, Any]:
    """What the stand-in trainer reads: which settings are which feature, and the metrics."""
    features = {
        cid: {"key": key, "value": value} for cid, (_, key, value) in scenario.contributions.items()
    }
    return {"features": features, "metrics": scenario.metrics, **scenario.extra}


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
    """Write contributions, the scenario and round.yaml under `root`; return the round file."""
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
        "baseline": "tiny",
        "contributions": ["contributions"],
        "objectives": scenario.objectives,
        "guardrails": scenario.guardrails,
        "seeds": seeds,
        "confirm_seeds": confirm_seeds,
        "budget": budget,
        "runner": runner,
        "executor": {"kind": "local", "workers": workers},
        **round_extra,
    }
    path = root / "round.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
