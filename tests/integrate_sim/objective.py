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
"""

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

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


def simulate(recipe, seed, scenario):
    """The metrics of one run: the ground truth plus seed and run noise, deterministic."""
    on = features_on(recipe, scenario)
    # Keyed on the features alone, not the whole recipe: a new field in the recipe schema
    # must not redraw every scenario's noise (and move the recorded benchmark figures).
    features_hash = canonical_hash(sorted(on))
    world = scenario.get("noise_seed", 0)  # another scenario: other noise draws
    noise_rng = random.Random(f"{world}-{features_hash}-{seed}")
    metrics = {}
    for name, m in scenario["metrics"].items():
        value = m["base"] + sum(m.get("main", {}).get(f, 0.0) for f in on)
        value += sum(g for a, b, g in m.get("pairs", []) if a in on and b in on)
        for f in on:
            value *= m.get("ratio", {}).get(f, 1.0)
        value += random.Random(f"{world}-seed-{seed}-{name}").gauss(0.0, m.get("seed_sd", 0.0))
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
