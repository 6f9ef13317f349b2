"""A stand-in trainer for the integration engine's simulation tests (an external runner).

    python objective.py RECIPE SEED OUT SCENARIO

Reads the resolved recipe and a scenario (JSON: which recipe settings switch which features
on, and each metric's ground truth), and writes OUT/metrics.json: base + main effects +
pairwise interactions of the features that are on, + a per-seed shift shared by every
recipe + per-run noise. Deterministic in (recipe, seed), like a real seeded training run.
Scenario knobs for failure tests: `crash` (features that make it exit 1), `hang` (sleep),
`no_metrics` (exit 0 without metrics.json), `drop` (feature -> metric left out), and
`kill_engine_after` (N): the N-th finished run SIGKILLs the engine that started it.
Every finished run appends "recipe_hash seed" to the scenario's `log`, if set.

Scale ladders (docs/integrate.md, "Decisions that hold at scale"): a change that wins on a
small model may not win on a larger one, so a scenario may hold one truth per model size.
`"scale": {"key": "model.depth", "metrics": {"2": {...}, "4": {...}}}` picks the metrics
(same shape as `metrics`) by str() of the recipe's value at `key`; a value it does not list,
or a recipe without the key, gets `metrics`. With a scale block, the run noise and the
per-seed shift are also keyed on that value: each rung is a model of its own, and two rungs
must not share noise draws (which would make them agree more than real runs do).

A metric may carry a learning-rate curve, `"lr": {"key": "optim.lr", "best": 0.003,
"loss": 0.5, "best_with": {"feature": 0.006}}`: the value gains -loss * log2(lr / best)**2,
so a recipe off its best learning rate by a factor of 2 loses `loss`. `best_with` moves the
optimum when a feature is on (several: their shifts multiply), which is how a contribution
that suits another learning rate is modelled. Scenarios without these keys draw the same
noise and give bit-identical metrics as before the keys existed.
"""

import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def dotted(data, key):
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def canonical_hash(value):
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def features_on(recipe, scenario):
    return {n for n, f in scenario["features"].items() if dotted(recipe, f["key"]) == f["value"]}


def lookup(data: Any, key: str) -> Any:
    """The recipe's value at a dotted key, or None where the recipe has no such key."""
    try:
        return dotted(data, key)
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def rung_of(recipe: dict[str, Any], scenario: dict[str, Any]) -> str | None:
    """str() of the recipe's value at the scale key, or None without a scale block."""
    scale = scenario.get("scale")
    if not scale:
        return None
    return str(lookup(recipe, scale["key"]))


def truth_at(rung: str | None, scenario: dict[str, Any]) -> dict[str, Any]:
    """The metrics dict that is the truth at `rung` (the top-level one when it is unlisted)."""
    if rung is None:
        return scenario["metrics"]
    return scenario["scale"].get("metrics", {}).get(rung, scenario["metrics"])


def best_lr(curve: dict[str, Any], on: set[str]) -> float:
    """The best learning rate with the features `on`: `best`, moved by `best_with`."""
    best = float(curve["best"])
    for feature, moved in sorted(curve.get("best_with", {}).items()):
        if feature in on:
            best *= float(moved) / float(curve["best"])
    return best


def lr_penalty(curve: dict[str, Any], lr: float, on: set[str]) -> float:
    """-loss * log2(lr / best)**2: nothing at the best learning rate, `loss` a factor 2 off."""
    return -float(curve["loss"]) * math.log2(float(lr) / best_lr(curve, on)) ** 2


def simulate(recipe, seed, scenario):
    """The metrics of one run: the ground truth plus seed and run noise, deterministic."""
    on = features_on(recipe, scenario)
    # Keyed on the features alone, not the whole recipe: a new field in the recipe schema
    # must not redraw every scenario's noise (and move the recorded benchmark figures).
    features_hash = canonical_hash(sorted(on))
    world = scenario.get("noise_seed", 0)  # another scenario: other noise draws
    rung = rung_of(recipe, scenario)
    # Without a scale block the keys are exactly the old ones (bit-identical metrics).
    at = "" if rung is None else f"-rung-{rung}"
    noise_rng = random.Random(f"{world}-{features_hash}-{seed}{at}")
    metrics = {}
    for name, m in truth_at(rung, scenario).items():
        value = m["base"] + sum(m.get("main", {}).get(f, 0.0) for f in on)
        value += sum(g for a, b, g in m.get("pairs", []) if a in on and b in on)
        if "lr" in m:
            lr = lookup(recipe, m["lr"].get("key", "optim.lr"))
            if lr is not None:
                value += lr_penalty(m["lr"], lr, on)
        for f in on:
            value *= m.get("ratio", {}).get(f, 1.0)
        seed_rng = random.Random(f"{world}-seed-{seed}-{name}{at}")
        value += seed_rng.gauss(0.0, m.get("seed_sd", 0.0))
        value += noise_rng.gauss(0.0, m.get("noise", 0.0))
        metrics[name] = value
    for feature, metric in scenario.get("drop", {}).items():
        if feature in on:
            metrics.pop(metric, None)
    return metrics


def main(recipe_path, seed, out, scenario_path):
    recipe = yaml.safe_load(Path(recipe_path).read_text())
    scenario = json.loads(Path(scenario_path).read_text())
    seed = int(seed)
    on = features_on(recipe, scenario)
    if on & set(scenario.get("crash", [])):
        print("boom: this feature crashes the trainer", file=sys.stderr)
        return 1
    if on & set(scenario.get("hang", [])):
        time.sleep(3600)
    if on & set(scenario.get("no_metrics", [])):
        return 0
    Path(out, "metrics.json").write_text(json.dumps(simulate(recipe, seed, scenario)))
    if scenario.get("log"):
        recipe_hash = canonical_hash({k: v for k, v in recipe.items() if k != "seed"})
        with open(scenario["log"], "a") as f:
            f.write(f"{recipe_hash} {seed}\n")
        if "kill_engine_after" in scenario:
            kill_after(scenario["log"], scenario["kill_engine_after"])
    return 0


def kill_after(log, count):
    """Once `count` runs have finished, SIGKILL the parent (the engine), exactly once."""
    with open(log) as f:
        finished = sum(1 for _ in f)
    if finished < count:
        return
    try:
        os.close(os.open(log + ".killed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getppid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
