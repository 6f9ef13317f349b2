"""One RL step on the tiny recipe (rollouts + update): tokens/s and where the time goes.

The step is the RL stage's own code: `collect` (batched rollouts in the recipe's envs, rewards,
group advantages) then `update` (the old log-probs recomputed by one forward pass, then the
minibatch AdamW steps of the recipe's loss), under deterministic algorithms as the stage runs
them. The model is the tiny recipe's architecture with seeded random weights (no 17-minute
build) and the tokenizer is trained in seconds on the arithmetic task's text plus some
standard-library source; a random policy rarely closes its turn, so episodes run to the
turn's token limit: the longest rollouts the recipe allows, a worst case for sampling.

Time is split into sampling (`collect`), the old-log-prob recompute (`update`'s no-grad
`token_logprobs` calls), the policy forward passes of the minibatches, and the rest of the
update (backward, clipping, optimizer). Steps alternate between our decoding fast path and
the model's general forward (`generate(..., fast=False)`) so the fast path's effect on the
whole step is measured in the same run; then one fast step runs under `torch.profiler`.

    python benchmarks/rl_step.py [--quick] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from stacklab.data.tasks import make_generator
from stacklab.data.tokenizer import train_tokenizer
from stacklab.envs import rollout as rollout_module
from stacklab.model import generation
from stacklab.model.transformer import build_model
from stacklab.recipe import load_recipe
from stacklab.rl import trainer
from stacklab.train.optim import build_optimizer
from stacklab.train.schedule import build_scheduler
from stacklab.train.trainer import OptimizerStep, deterministic


def quick_tokenizer(recipe: Any) -> Any:
    """A BPE tokenizer of the recipe's vocabulary size, trained in seconds."""
    texts = []
    for task in recipe.data.tasks:
        gen = make_generator(task)
        texts += [gen.render(p) for p in gen.problems("train", 2000, 0)]
    for module in (inspect, json, argparse, statistics, functools):
        texts.append(inspect.getsource(module))
    texts += ["<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n42"] * 50
    return train_tokenizer(texts, recipe.tokenizer)


class Clock:
    """Seconds spent in `token_logprobs`, with and without gradients (wraps the trainer's)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.inner = trainer.token_logprobs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        key = "policy_forward" if torch.is_grad_enabled() else "old_logprobs"
        self.seconds[key] += time.perf_counter() - start
        return out


def one_step(
    model: Any, tok: Any, sources: Any, recipe: Any, opt: Any, sched: Any, step: int
) -> dict[str, float]:
    """One RL step of the real code path; its times and token counts."""
    cfg = recipe.rl
    clock = Clock()
    trainer.token_logprobs = clock
    try:
        t0 = time.perf_counter()
        batch, by_env = trainer.collect(model, tok, sources, cfg, recipe.seed, step)
        t1 = time.perf_counter()
        optimizer_step = OptimizerStep(model, opt, sched, cfg.grad_clip)
        trainer.update(model, None, optimizer_step, batch, cfg, recipe.seed, step)
        t2 = time.perf_counter()
    finally:
        trainer.token_logprobs = clock.inner
    every = [ep for eps in by_env.values() for ep in eps]
    sampled = sum(sum(ep.mask) for ep in every)
    trained = sum(len(ep.ids) for ep in batch.episodes)
    old, fwd = clock.seconds["old_logprobs"], clock.seconds["policy_forward"]
    return {
        "step_s": t2 - t0,
        "sampling_s": t1 - t0,
        "old_logprobs_s": old,
        "policy_forward_s": fwd,
        "backward_optimizer_s": (t2 - t1) - old - fwd,
        "sampled_tokens": sampled,
        "trained_tokens": trained,
        "episodes": len(every),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--repeats", type=int, default=3, help="steps per decoding path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 prompts x 4, 16 tokens a turn")
    parser.add_argument("--prompts", type=int, default=12, help="prompts per step")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The workload the figures in docs/benchmarks.md were measured on: 12 prompts a step,
    # shared evenly, one rollout round (the tiny recipe has since moved to 24 weighted prompts
    # with dynamic sampling); --prompts changes the count.
    fixed = ["rl.env_weights={}", "rl.dynamic_sampling=false"]
    overrides = [*fixed, f"rl.prompts_per_step={args.prompts}"]
    if args.quick:
        args.repeats = 1
        overrides = [*fixed, "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=16"]
    recipe = load_recipe(args.recipe, overrides)  # a built-in name (tiny) or a recipe file
    cfg = recipe.rl
    tok = quick_tokenizer(recipe)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model.build(), tok.get_vocab_size())
    sources = trainer.task_sources(recipe, pool=200)
    optim_cfg = trainer.rl_optim(cfg)
    opt = build_optimizer(model, optim_cfg)
    sched = build_scheduler(opt, 1000, optim_cfg)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; recipe "
        f"{args.recipe}: {model.num_params() / 1e6:.2f} M params, envs {cfg.envs}, "
        f"{cfg.prompts_per_step} prompts x {cfg.group_size}, {cfg.max_new_tokens} tokens a "
        f"turn, up to {cfg.max_turns} turns, minibatch {cfg.minibatch_size}, loss {cfg.loss}"
    )
    plain = functools.partial(generation.generate, fast=False)
    paths = {"fast": generation.generate, "plain": plain}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
    step = 0
    with deterministic(True):
        for round_ in range(args.repeats + 1):  # round 0 warms up both paths
            for name, gen in paths.items():
                rollout_module.generate = gen
                try:
                    step += 1
                    record = one_step(model, tok, sources, recipe, opt, sched, step)
                finally:
                    rollout_module.generate = generation.generate
                if round_:
                    runs[name].append(record)
        profile_table = ""
        if not args.no_profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                one_step(model, tok, sources, recipe, opt, sched, step + 1)
            profile_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)

    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    print(
        f"\n{'path':<6} {'step s':>7} {'sampling':>9} {'old logp':>9} {'fwd':>7} {'bwd+opt':>8}"
        f" {'sampled tok/s':>14} {'step tok/s':>11}"
    )
    for name, m in med.items():
        print(
            f"{name:<6} {m['step_s']:>7.2f} {m['sampling_s']:>9.2f} {m['old_logprobs_s']:>9.3f}"
            f" {m['policy_forward_s']:>7.3f} {m['backward_optimizer_s']:>8.3f}"
            f" {m['sampled_tokens'] / m['sampling_s']:>14.0f}"
            f" {m['sampled_tokens'] / m['step_s']:>11.0f}"
        )
    f = med["fast"]
    share = {k: f[k] / f["step_s"] for k in ("sampling_s", "old_logprobs_s", "policy_forward_s")}
    share["backward_optimizer_s"] = f["backward_optimizer_s"] / f["step_s"]
    print(
        f"fast step: {f['episodes']:.0f} episodes, {f['sampled_tokens']:.0f} sampled tokens, "
        f"{f['trained_tokens']:.0f} tokens trained on; time: "
        + ", ".join(f"{k[:-2]} {v:.0%}" for k, v in share.items())
    )
    # Steps differ in their tasks and weights (each is the next step of one run), so only
    # the sampling column is the fast path's effect; the other columns are noise between them.
    p = med["plain"]
    sampling_gain = (f["sampled_tokens"] / f["sampling_s"]) / (
        p["sampled_tokens"] / p["sampling_s"]
    )
    print(
        f"fast path: sampling {sampling_gain:.2f}x (sampled tokens/s), "
        f"whole step {p['step_s'] / f['step_s']:.2f}x"
    )
    if profile_table:
        print("\ntorch.profiler, one fast step, top ops by self CPU time:\n" + profile_table)
    if args.json:
        result = {
            "benchmark": "rl_step",
            "command": " ".join(["python benchmarks/rl_step.py", *sys.argv[1:]]),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "median": med,
            "time_share_fast": share,
            "sampled_tokens_per_second": f["sampled_tokens"] / f["step_s"],
            "fast_path_sampling_speedup": sampling_gain,
            "fast_path_step_speedup": med["plain"]["step_s"] / f["step_s"],
            "torch": torch.__version__,
        }
        shares = ", ".join(f"{k[:-2]} {v:.0%}" for k, v in share.items())
        result["table"] = [
            {
                "benchmark": "rl_step",
                "case": f"{args.recipe}, {f['episodes']:.0f} episodes, random weights",
                "unit": "trained tokens/s",
                "ours": f["trained_tokens"] / f["step_s"],
                "peer": None,
                "peer_name": "",
                "ratio": None,
                "goal": "record",
                "met": None,
                "note": f"step {f['step_s']:.2f} s: {shares}",
            }
        ]
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
