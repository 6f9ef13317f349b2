"""The RL update of one step on the tiny recipe: episodes scored in length buckets vs padded.

An RL batch of the tiny recipe mixes one-turn arithmetic episodes (~30 tokens) with
calculator (~200) and lookup (~280) episodes. `update` (rl/trainer.py) scores them with
`bucketed_logprobs`, each group of similar length at its own width; the peer is the same
update with one forward over the whole padded minibatch (`token_logprobs`), which is what the
trainer did before. The batch is synthetic but shaped like a real step's: 192 episodes (96
arithmetic, 48 of each tool; lengths drawn around the measured means, the sampled tokens at
the end of each), random advantages, the tiny architecture with seeded random weights.
Before timing, one update on each side from the same weights must give the same weights.
Sides alternate so the machine's load hits both alike.

    python benchmarks/rl_update.py [--repeats 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch

from stacklab.envs.rollout import Episode
from stacklab.model.transformer import build_model
from stacklab.recipe import load_recipe
from stacklab.rl import trainer
from stacklab.train.optim import build_optimizer
from stacklab.train.schedule import build_scheduler
from stacklab.train.trainer import OptimizerStep

# (episodes, mean length, sampled tokens) per kind, from the tiny build's RL logs.
SHAPE = [(96, 30, 4), (48, 200, 45), (48, 280, 60)]


def synthetic_batch(vocab: int, seed: int = 0) -> trainer.RolloutBatch:
    rng = random.Random(seed)
    episodes = []
    for count, mean, sampled in SHAPE:
        for _ in range(count):
            n = max(sampled + 2, int(rng.gauss(mean, mean * 0.15)))
            ids = [rng.randrange(4, vocab) for _ in range(n)]
            mask = [False] * (n - sampled) + [True] * sampled
            episodes.append(Episode([], ids, mask, [-1.0] * sampled))
    advantages = torch.randn(len(episodes), generator=torch.Generator().manual_seed(seed))
    return trainer.RolloutBatch(episodes, ["x"] * len(episodes), advantages, advantages, 0, 0, 0)


def padded(model, inputs, targets, temperature, mask):
    """The peer: one forward over the padded minibatch."""
    return trainer.token_logprobs(model, inputs, targets, temperature, mask)


def one_update(model, cfg, batch, score) -> float:
    opt = build_optimizer(model, trainer.rl_optim(cfg))
    step = OptimizerStep(model, opt, build_scheduler(opt, cfg.steps, trainer.rl_optim(cfg)), 1.0)
    real = trainer.bucketed_logprobs
    trainer.bucketed_logprobs = score
    try:
        start = time.perf_counter()
        trainer.update(model, None, step, batch, cfg, seed=0, step=1)
        return time.perf_counter() - start
    finally:
        trainer.bucketed_logprobs = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe("tiny")
    cfg = recipe.rl
    torch.manual_seed(0)
    base = build_model(recipe.model.build(), 4096)
    batch = synthetic_batch(4096)
    sides = {"padded": padded, "length buckets": trainer.bucketed_logprobs}

    # Same computation first: one update from the same weights on each side.
    after = {}
    for name, score in sides.items():
        model = copy.deepcopy(base)
        one_update(model, cfg, batch, score)
        after[name] = model.state_dict()
    for key, value in after["padded"].items():
        torch.testing.assert_close(after["length buckets"][key], value, rtol=1e-4, atol=1e-6)

    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, score in sides.items():
            times[name].append(one_update(copy.deepcopy(base), cfg, batch, score))
    ratios = [a / b for a, b in zip(times["padded"], times["length buckets"], strict=True)]
    trained = sum(sum(ep.mask) for ep in batch.episodes)
    width = max(len(ep.ids) for ep in batch.episodes)
    result = {
        "episodes": len(batch.episodes),
        "real_tokens": sum(len(ep.ids) for ep in batch.episodes),
        "padded_tokens": len(batch.episodes) * width,
        "sampled_tokens": trained,
        "threads": args.threads,
        "repeats": args.repeats,
        "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "speedup_median_of_paired_ratios": round(statistics.median(ratios), 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
