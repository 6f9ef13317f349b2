"""MoE layer forward + backward: our sorted grouped dispatch vs a per-expert loop.

The per-expert loop (route, then for each expert gather its tokens with an index lookup, run
its MLP, scatter-add back) is the common simple implementation. Both sides run on the same
weights and inputs, alternating, and the script prints the median time of each and the ratio,
over the grid 8/16/32/64 experts x top-2/4/8 (the performance issue's goal: >= 3x at 32 or more
experts). Before timing, both sides are checked to compute the same output and the same
gradients (of the input and of every expert weight).

Both sides do the same expert matmuls (three per expert, forward and two in backward), so no
implementation can beat the loop by more than the loop's time over those matmuls' time at the
machine's matmul peak (measured in the same run, before and after the grid; on CUDA the
peak is bf16's, whatever `--dtype`). The script prints that bound as "ceiling": where it is
below the goal, the goal cannot be met on this machine with these shapes, however little
else the layer does.

    python benchmarks/moe_dispatch.py [--quick] [--tokens 4096] [--repeats 7] [--threads 2]
        [--device cpu] [--dtype float32] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stacklab.model.config import MoEConfig
from stacklab.model.moe import MoE
from stacklab.train.pretrain import measure_peak_flops


def loop_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Route like `moe`, then run every expert on its gathered tokens, one at a time.

    The loop at its fastest correct form (each choice measured on CPU): the router in float32
    as ours runs it (so both pick the same experts in bf16 too), `index_select` gathers
    (their backward is an `index_add`, cheaper than advanced indexing's accumulating
    `index_put`), the routing weight applied to the expert's hidden rows before `down_proj`
    (the narrower side when F < D), and an in-place `index_add_` into one output tensor (the
    out-of-place form copied the whole output once per expert: 10-18% slower).
    """
    cfg = moe.cfg
    logits = F.linear(x.float(), moe.router.weight.float())
    weights, chosen = torch.topk(logits.softmax(-1), cfg.top_k, dim=-1)  # [N, k]
    weights = weights / weights.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for e in range(cfg.num_experts):
        token, slot = torch.where(chosen == e)
        rows = x.index_select(0, token)
        hidden = F.silu(rows @ moe.gate_proj[e].T) * (rows @ moe.up_proj[e].T)
        hidden = (hidden * weights[token, slot, None]).to(x.dtype)
        y.index_add_(0, token, hidden @ moe.down_proj[e].T)
    return y


def expert_matmul_flops(tokens: int, top_k: int, d_model: int, hidden: int) -> float:
    """FLOPs of the expert products of one forward + backward: gate, up and down projections
    over `tokens * top_k` rows, each once forward and twice backward (input and weight)."""
    return 3 * 3 * 2 * tokens * top_k * d_model * hidden


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fn, moe: MoE, x: torch.Tensor) -> float:
    moe.zero_grad(set_to_none=True)
    x.grad = None
    _sync(x.device)
    start = time.perf_counter()
    fn(x).float().square().mean().backward()
    _sync(x.device)
    return time.perf_counter() - start


def check_same(moe: MoE, x: torch.Tensor, tol: float) -> str | None:
    """None when both sides give the same output and gradients (input and every expert
    weight) to `tol` relative to the largest value; else what differs."""
    results = []
    for fn in (moe, functools.partial(loop_forward, moe)):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(x)
        y.float().square().mean().backward()
        grads = [x.grad] + [getattr(moe, n).grad for n in ("gate_proj", "up_proj", "down_proj")]
        results.append([y.detach(), *grads])
    moe.zero_grad(set_to_none=True)
    x.grad = None
    for name, a, b in zip(("output", "x.grad", "gate", "up", "down"), *results, strict=True):
        diff = (a.float() - b.float()).abs().max().item()
        scale = max(a.float().abs().max().item(), 1e-12)
        if diff > tol * scale:
            return f"{name} differs by {diff:.2e} (largest value {scale:.2e})"
    return None


GRID = [(e, k) for e in (8, 16, 32, 64) for k in (2, 4, 8)]
QUICK_GRID = [(8, 2), (32, 4), (64, 8)]
GOAL, GOAL_FROM_EXPERTS = 3.0, 32
# Largest difference between the sides, relative to the largest value: float32 rounds the
# same sums in another order; bf16 rounds every product's output (2^-8 relative).
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, help="tokens per layer call (default 4096)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, help="timed rounds (default 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 grid points, 1024 tokens, 2 repeats (--tokens/--repeats still apply)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    grid = QUICK_GRID if args.quick else GRID
    if args.tokens is None:
        args.tokens = 1024 if args.quick else 4096
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    peak_kind = "bf16 8192²" if device.type == "cuda" else "float32 1024²"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype} on "
        f"{device}, N={args.tokens} D={args.d_model} F={args.expert_hidden}, "
        f"median of {args.repeats}"
    )
    peak = measure_peak_flops(device)
    print(
        f"{'experts':>7} {'top-k':>5} {'ours ms':>8} {'loop ms':>8} {'speed-up':>8} {'goal':>6} "
        f"{'ceiling':>8}"
    )
    rows: list[dict[str, Any]] = []
    flops: list[float] = []  # each row's expert-matmul FLOPs
    for experts, top_k in grid:
        torch.manual_seed(0)
        cfg = MoEConfig(enabled=True, num_experts=experts, top_k=top_k)
        moe = MoE(args.d_model, args.expert_hidden, cfg, init_std=0.02)
        moe = moe.to(device=device, dtype=dtype).train()
        x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype)
        x.requires_grad_(True)
        wrong = check_same(moe, x, TOLERANCE[args.dtype])
        if wrong:
            raise SystemExit(f"{experts} experts, top-{top_k}: the sides differ: {wrong}")
        ours, loop = [], []
        for _ in range(args.repeats + 1):  # the first round warms up both
            ours.append(time_fwd_bwd(moe, moe, x))
            loop.append(time_fwd_bwd(functools.partial(loop_forward, moe), moe, x))
        o, lp = statistics.median(ours[1:]), statistics.median(loop[1:])
        goal = f">={GOAL:.0f}x" if experts >= GOAL_FROM_EXPERTS else "-"
        flops.append(expert_matmul_flops(args.tokens, top_k, args.d_model, args.expert_hidden))
        floor = flops[-1] / peak
        print(
            f"{experts:>7} {top_k:>5} {o * 1e3:>8.1f} {lp * 1e3:>8.1f} {lp / o:>7.2f}x {goal:>6} "
            f"{lp / floor:>7.2f}x",
            flush=True,
        )
        rows.append(
            {
                "benchmark": "moe_dispatch",
                "case": f"{experts} experts, top-{top_k}",
                "unit": "ms (forward+backward)",
                "ours": o * 1e3,
                "peer": lp * 1e3,
                "peer_name": "per-expert loop with index gathers",
                "ratio": lp / o,
                "goal": goal if experts >= GOAL_FROM_EXPERTS else "record",
                "met": lp / o >= GOAL if experts >= GOAL_FROM_EXPERTS else None,
            }
        )
    # The peak again at the end (the machine may have been busier at the start): each row's
    # floor and ceiling in --json come from the better one.
    best = max(peak, measure_peak_flops(device))
    print(
        f"{peak_kind} matmul peak: {peak / 1e9:.1f} GFLOP/s at the start (the ceilings "
        f"above), {best / 1e9:.1f} the better of start and end (the ceilings in --json)"
    )
    for row, row_flops in zip(rows, flops, strict=True):
        floor_ms = row_flops / best * 1e3
        row["matmul_floor_ms"], row["ceiling"] = floor_ms, row["peer"] / floor_ms
        row["note"] = (
            f"N={args.tokens} D={args.d_model} F={args.expert_hidden}, {args.dtype} on "
            f"{device.type}; ceiling {row['ceiling']:.2f}x (loop / expert matmuls at peak)"
        )
    if args.json:
        args.json.write_text(json.dumps({"table": rows}, indent=2))


if __name__ == "__main__":
    main()
