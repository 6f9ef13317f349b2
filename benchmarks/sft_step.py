"""One SFT step on the tiny recipe: the output head at every position vs at trained ones only.

SFT trains only the assistant's tokens of packed chat rows, a small share of each row's
positions. `chat_loss` (train/sft.py) runs the output head and its softmax at those positions
only (`logits=mask`); the peer is the model's plain training forward with every position's
logits and `cross_entropy(ignore_index=-100)`, which is what SFT did before. Both sides train
the same packed rows of the tiny recipe's SFT data (arithmetic chats and tool-use
demonstrations, tokenized by a BPE trained in seconds) on the tiny architecture with seeded
random weights, with AdamW; the steps alternate between the two sides so load on the machine
hits both alike. Before timing, both sides' loss and gradients are checked to agree.

    python benchmarks/sft_step.py [--steps 20] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stacklab.model.transformer import build_model
from stacklab.recipe import load_recipe
from stacklab.train.sft import chat_loss, sft_conversations
from stacklab.train.sft_data import pack_sft

sys.path.insert(0, str(Path(__file__).parent))
from rl_step import quick_tokenizer


def full_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """The peer: logits at every position, the loss over the trained ones."""
    out = model(inputs, targets)
    return out.loss, out.aux_loss


def timed_step(loss_fn, model, optimizer, inputs, targets) -> float:
    start = time.perf_counter()
    loss, aux = loss_fn(model, inputs, targets)
    (loss + aux).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe("tiny")
    cfg = recipe.sft
    tok = quick_tokenizer(recipe)
    rows = pack_sft(tok, sft_conversations(recipe)[:4000], cfg.seq_len, seed=0)
    trained = (rows.targets != -100).float().mean().item()
    torch.manual_seed(0)
    model = build_model(recipe.model.build(), tok.get_vocab_size())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    # Same computation first: loss and gradients of both sides on one batch.
    inputs, targets = rows.inputs[: cfg.batch_size], rows.targets[: cfg.batch_size]
    grads = []
    for fn in (full_loss, chat_loss):
        loss, aux = fn(model, inputs, targets)
        (loss + aux).backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (full_l, full_g), (ours_l, ours_g) = grads
    torch.testing.assert_close(ours_l, full_l)
    for a, b in zip(ours_g, full_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    times: dict[str, list[float]] = {"full logits": [], "trained positions": []}
    n = rows.inputs.shape[0]
    for step in range(args.steps + 2):  # two warm-up rounds, not counted
        idx = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % n
        for name, fn in (("full logits", full_loss), ("trained positions", chat_loss)):
            seconds = timed_step(fn, model, optimizer, rows.inputs[idx], rows.targets[idx])
            if step >= 2:
                times[name].append(seconds)

    medians = {k: statistics.median(v) for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["full logits"], times["trained positions"], strict=True)]
    result = {
        "batch": f"{cfg.batch_size} x {cfg.seq_len}",
        "trained_share": round(trained, 4),
        "threads": args.threads,
        "steps": args.steps,
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "speedup_median_of_paired_ratios": round(statistics.median(ratios), 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
