"""Train the character MLP and write OUT/metrics.json.

    python train.py --config train.toml --seed 0 --out runs/0

metrics.json: val_loss (held-out cross-entropy, nats per character, lower is better),
train_loss (the last step's), tokens_per_s (characters predicted per CPU second of training:
CPU time rather than wall time, so that other processes on the machine barely move it),
steps, and the training loop's cpu_s and wall_s. The results are deterministic given the
config and the seed (torch runs on one thread, or OMP_NUM_THREADS threads when that is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import tomllib
from pathlib import Path

import data
import torch
from model import CharMLP, loss_fn


def windows(ids: torch.Tensor, starts: torch.Tensor, context: int):
    """Inputs (len(starts), context) and next-character targets for windows at `starts`."""
    offsets = torch.arange(context)
    return ids[starts[:, None] + offsets], ids[starts + context]


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), in a few lines.

    Written out rather than torch.optim.AdamW, whose first use imports torch._dynamo: about a
    second, as long as the training itself.
    """

    def __init__(self, params, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            p.mul_(1 - lr * self.weight_decay)
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**self.t))


def lr_at(step: int, steps: int, peak: float, min_ratio: float) -> float:
    """Linear warmup over the first 5% of the steps, then cosine decay to min_ratio * peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model: CharMLP, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        starts = torch.arange(len(ids) - model.context)
        x, y = windows(ids, starts, model.context)
        loss = loss_fn(model(x), y).item()
    model.train()
    return loss


def train(config: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_ids, val_ids, vocab = data.load(config["eval"]["val_fraction"])
    m, t = config["model"], config["train"]
    model = CharMLP(len(vocab), m["context"], m["embed"], m["hidden"], m["dropout"])
    optim = AdamW(model.parameters(), weight_decay=t["weight_decay"])
    steps, batch = t["steps"], t["batch_size"]

    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        lr = lr_at(step, steps, t["lr"], t["min_lr_ratio"])
        starts = torch.randint(len(train_ids) - m["context"], (batch,), generator=generator)
        x, y = windows(train_ids, starts, m["context"])
        loss = loss_fn(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        optim.step(lr)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    return {
        "val_loss": evaluate(model, val_ids),
        "train_loss": loss.item(),
        "tokens_per_s": steps * batch / cpu,
        "steps": steps,
        "cpu_s": cpu,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="TOML config")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = tomllib.loads(args.config.read_text())
    metrics = train(config, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
