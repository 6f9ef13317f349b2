"""MoE layer forward + backward: our sorted grouped dispatch vs a per-expert loop.

The per-expert loop (route, then for each expert gather its tokens with an index lookup, run
its MLP, scatter-add back) is the common simple implementation. Both sides run on the same
weights and inputs, alternating, and the script prints the median time of each and the ratio.

    python benchmarks/moe_dispatch.py [--tokens 4096] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from stacklab.model.moe import MoE
from stacklab.recipe import MoEConfig


def loop_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Route like `moe`, then run every expert on its gathered tokens, one at a time."""
    cfg = moe.cfg
    logits = x @ moe.router.weight.T
    scores = logits.softmax(-1)
    weights, chosen = torch.topk(scores, cfg.top_k, dim=-1)  # [N, k]
    weights = weights / weights.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for e in range(cfg.num_experts):
        token, slot = torch.where(chosen == e)
        rows = x[token]
        hidden = F.silu(rows @ moe.gate_proj[e].T) * (rows @ moe.up_proj[e].T)
        y = y.index_add(0, token, (hidden @ moe.down_proj[e].T) * weights[token, slot, None])
    return y


def time_fwd_bwd(fn, moe: MoE, x: torch.Tensor) -> float:
    moe.zero_grad(set_to_none=True)
    start = time.perf_counter()
    fn(x).square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"N={args.tokens} D={args.d_model} F={args.expert_hidden}")  # fmt: skip
    print(f"{'experts':>7} {'top-k':>5} {'ours ms':>8} {'loop ms':>8} {'speed-up':>8}")
    for experts, top_k in [(8, 2), (8, 8), (32, 4), (64, 2), (64, 8)]:
        torch.manual_seed(0)
        cfg = MoEConfig(enabled=True, num_experts=experts, top_k=top_k)
        moe = MoE(args.d_model, args.expert_hidden, cfg, init_std=0.02).train()
        x = torch.randn(args.tokens, args.d_model, requires_grad=True)
        ours, loop = [], []
        for _ in range(args.repeats + 1):  # the first round warms up both
            ours.append(time_fwd_bwd(moe, moe, x))
            loop.append(time_fwd_bwd(functools.partial(loop_forward, moe), moe, x))
        o, lp = statistics.median(ours[1:]), statistics.median(loop[1:])
        print(f"{experts:>7} {top_k:>5} {o * 1e3:>8.1f} {lp * 1e3:>8.1f} {lp / o:>7.2f}x")


if __name__ == "__main__":
    main()
