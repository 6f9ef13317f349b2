"""Pretraining: next-token prediction on the packed shards, data-parallel under torchrun.

The loop itself (resume, NaN guard, log, checkpoints) is the `Trainer`'s (trainer.py); this
module is pretraining's `TrainModule`: where its batches come from and what one step is.

* **One step = one global batch**: `grad_accum` micro-batches of `batch_size` rows on each of
  `world_size` ranks. Each micro-batch's loss is divided by `grad_accum` before backward, so
  the gradient is the mean over the global batch, whatever the split (DDP averages ranks).
* **The loader's position is part of the checkpoint** (a pure function of seed, epoch and
  step), with the tokens seen, so a resumed run reads exactly the batches it would have read.
* **Honest speed.** MFU divides the model's training FLOPs per token (`flops_per_token`)
  times tokens per second by a peak measured on this machine at start (a float32 matmul on
  CPU, bf16 on GPU): a number to compare runs on one machine, not a vendor's datasheet.

Run it directly, or across processes with torchrun:

    python -m stacklab.train.pretrain --recipe R.yaml --shards SHARDS --out WORK
    torchrun --nproc_per_node 2 -m stacklab.train.pretrain --recipe R.yaml ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stacklab.data.loader import ShardLoader
from stacklab.data.shards import read_index
from stacklab.errors import StacklabError
from stacklab.model.moe import MoE
from stacklab.model.transformer import Transformer, build_model
from stacklab.pipeline import Metrics, Stage, StageContext
from stacklab.progress import console
from stacklab.recipe import Recipe, load_recipe
from stacklab.train import distributed as D
from stacklab.train.checkpoint import seed_everything
from stacklab.train.optim import build_optimizer
from stacklab.train.schedule import build_scheduler, lr_factor
from stacklab.train.trainer import Loop, OnStep, OptimizerStep, Trainer, TrainModule, TrainRun


def pretrain(
    recipe: Recipe, shard_dir: str | Path, work_dir: str | Path, *, on_step: OnStep | None = None
) -> Metrics:
    """Train `recipe`'s model on `shard_dir`'s train split; checkpoints and logs in `work_dir`.

    Resumes from the newest complete checkpoint in `work_dir/checkpoints`. Writes
    `work_dir/metrics.jsonl` and `work_dir/final/` (see `checkpoint.load_model`). `on_step`
    (step, model) runs after each completed step, on every rank. Rank and world size come
    from torchrun's environment (`distributed.init_distributed`).
    """
    world = D.init_distributed()
    shard_dir, work_dir = Path(shard_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    D.check_parallel(recipe, world)
    index = read_index(shard_dir)
    vocab_size, seq_len = index["vocab_size"], index["seq_len"]
    if seq_len > recipe.model.max_seq_len:
        raise StacklabError(
            f"shards have seq_len {seq_len}, more than model.max_seq_len "
            f"{recipe.model.max_seq_len}; raise model.max_seq_len"
        )
    cfg = recipe.pretrain
    peak = measure_peak_flops(world.device)  # before seeding: it must not touch the RNGs
    seed_everything(recipe.seed)
    raw = build_model(recipe.model.build(), vocab_size).to(world.device)
    raw.set_activation_checkpointing(cfg.activation_checkpointing)
    wrapped = D.wrap_model(raw, world, cfg.parallel)  # before the optimizer: FSDP shards `raw`
    optimizer = build_optimizer(raw, recipe.optim)
    scheduler = build_scheduler(optimizer, cfg.steps, recipe.optim)
    loader = ShardLoader(
        shard_dir, "train", cfg.batch_size, recipe.seed, world.rank, world.world_size
    )
    module = PretrainModule(recipe, raw, wrapped, loader, world, seq_len, peak)
    loop = Loop(cfg.steps, cfg.log_every, cfg.ckpt_every, recipe.optim.grad_clip)
    trainer = Trainer(
        module, raw, optimizer, scheduler, loop, work_dir=work_dir, world=world, recipe=recipe
    )
    run = trainer.fit(on_step)
    # A peak measured while something else loaded the machine is too low (MFU above 1 has
    # been seen); measuring again at the end and keeping the better figure halves that risk.
    peak = max(peak, measure_peak_flops(world.device))
    return _summary(raw, run, module.tokens, module.flops_per_token, peak, world.world_size)


class PretrainModule(TrainModule):
    """Pretraining's steps: `grad_accum` micro-batches from the shard loader, then one update."""

    name = "pretrain"
    hint = "lower optim.lr or raise optim.warmup_steps"

    def __init__(
        self,
        recipe: Recipe,
        raw: Transformer,
        wrapped: nn.Module,
        loader: ShardLoader,
        world: D.World,
        seq_len: int,
        peak_flops: float,
    ) -> None:
        cfg = recipe.pretrain
        self.recipe, self.raw, self.loader, self.world = recipe, raw, loader, world
        self.wrapped = wrapped  # DDP/FSDP, or `raw` in a world of one
        self.model = torch.compile(wrapped) if cfg.compile else wrapped
        self.autocast = _autocast(world.device, cfg.dtype)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * world.world_size * seq_len
        self.flops_per_token = raw.flops_per_token(seq_len)
        self.peak_flops = peak_flops
        self.tokens = 0
        self._window: tuple[int, float] | None = None  # (step, time) of the last log
        self._step = 0  # the step just trained, and its results (device scalars)
        self._loss = self._aux = self._grad_norm = torch.zeros(())

    def step(self, step: int, optimizer_step: OptimizerStep) -> None:
        if self._window is None:  # the session's first step
            self._window = (step - 1, time.perf_counter())
        cfg, device = self.recipe.pretrain, self.world.device
        micro = (_to(self.loader.next_batch(), device) for _ in range(cfg.grad_accum))
        self._loss, self._aux = train_step(
            self.model, self.wrapped, micro, cfg.grad_accum, self.autocast
        )
        self._grad_norm = optimizer_step(self._loss)
        self.tokens += self.tokens_per_step
        self._step = step

    def record(self) -> dict[str, float]:
        recipe, step, world = self.recipe, self._step, self.world
        stats = D.all_reduce(torch.stack([self._loss, self._aux]), world).tolist()
        last_step, last_time = self._window or (0, 0.0)
        now = time.perf_counter()
        tokens_per_s = (step - last_step) * self.tokens_per_step / (now - last_time)
        self._window = (step, now)
        lr_scale = lr_factor(step - 1, recipe.pretrain.steps, recipe.optim)
        record = {
            "loss": stats[0],
            "lr": recipe.optim.lr * lr_scale,
            "grad_norm": self._grad_norm.item(),
            "tokens": self.tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * world.world_size),
            "aux_loss": stats[1],
        }
        if recipe.optim.name == "muon":
            record["lr_muon"] = recipe.optim.muon.lr * lr_scale
        for i, moe in _moe_layers(self.raw):  # counts of this step, summed over ranks
            record[f"moe/{i}/imbalance"] = moe.load_stats()["imbalance"]
        return record

    def describe(self, record: dict[str, float]) -> str:
        return (
            f"pretrain loss {record['loss']:.3f} · {record['tokens_per_s']:,.0f} tok/s · "
            f"MFU {record['mfu']:.1%}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.tokens = state["tokens"]


def train_step(
    model: nn.Module,
    wrapped: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    grad_accum: int,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[Tensor, Tensor]:
    """Forward and backward `grad_accum` micro-batches; return their mean loss and aux loss.

    `wrapped` is the DDP/FSDP module (gradients sync only on the last micro-batch), `model`
    the callable (possibly compiled) form of it. Both results are detached device scalars.
    """
    losses, aux_losses = [], []
    for i, (inputs, targets) in enumerate(batches):
        with D.gradient_sync(wrapped, enabled=i == grad_accum - 1):
            with autocast():
                # Loss only: the head is fused with the loss and no logits are kept.
                out = model(inputs, targets, logits=None)
            ((out.loss + out.aux_loss) / grad_accum).backward()
        losses.append(out.loss.detach())
        aux_losses.append(out.aux_loss.detach().float())
    return torch.stack(losses).mean(), torch.stack(aux_losses).mean()


def measure_peak_flops(device: torch.device, repeats: int = 5) -> float:
    """Achievable matmul FLOP/s of one device: float32 1024² on CPU, bf16 8192² on GPU.

    Best of `repeats` timed products after one warm-up; uses its own generator, so the
    global random state is untouched.
    """
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)

    def seconds() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    seconds()  # warm-up
    best = min(seconds() for _ in range(repeats))
    return 2 * n**3 / best


# --------------------------------------------------------------------------- summary


def _summary(
    model: Transformer,
    run: TrainRun,
    tokens: int,
    flops_per_token: float,
    peak: float,
    world_size: int,
) -> Metrics:
    """The run's flat metrics; speed over every session's training time, peak per device."""
    tokens_per_s = tokens / run.seconds if run.seconds else 0.0
    return {
        "pretrain/final_loss": run.final("loss"),
        "pretrain/tokens": tokens,
        "pretrain/tokens_per_s": round(tokens_per_s, 1),
        "pretrain/mfu": round(flops_per_token * tokens_per_s / (peak * world_size), 5),
        "pretrain/params": model.num_params(),
        "pretrain/active_params": model.num_params(active=True),
        "pretrain/peak_flops": peak,
        "pretrain/seconds": round(run.seconds, 3),
    }


def _moe_layers(model: Transformer) -> list[tuple[int, MoE]]:
    """(layer index, MoE) of every MoE layer."""
    return [(i, b.mlp) for i, b in enumerate(model.layers) if isinstance(b.mlp, MoE)]


def _autocast(device: torch.device, dtype: str) -> Callable[[], AbstractContextManager[Any]]:
    """bf16 autocast on GPU (dtype auto) or when asked for; float32 otherwise."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def _to(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


# --------------------------------------------------------------------------- the stage


def run_pretrain(ctx: StageContext) -> Metrics:
    metrics = pretrain(ctx.recipe, ctx.inputs["shards"], ctx.out)
    # A finished stage is never resumed; its checkpoints (weights + twice as much optimizer
    # state, twice) would only fill the cache. A kill right here just retrains, identically.
    shutil.rmtree(ctx.out / "checkpoints", ignore_errors=True)
    return metrics


def pretrain_config(recipe: Recipe) -> dict[str, Any]:
    return {
        "model": recipe.model.model_dump(mode="json"),
        "optim": recipe.optim.model_dump(mode="json"),
        # Activation checkpointing changes memory and time, never the result: runs with and
        # without it share the stage's cache.
        "pretrain": recipe.pretrain.model_dump(mode="json", exclude={"activation_checkpointing"}),
        "seed": recipe.seed,
    }


PRETRAIN_STAGE = Stage(
    "pretrain", 1, ("tokenizer", "shards"), pretrain_config, run_pretrain, resumable=True
)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stacklab.train.pretrain",
        description="Pretrain a recipe's model on built shards; resumes from WORK's newest "
        "checkpoint. Under torchrun every process trains its share of each global batch.",
        epilog="example: torchrun --nproc_per_node 2 -m stacklab.train.pretrain "
        "--recipe tiny --shards runs/demo/shards --out runs/pretrain",
    )
    parser.add_argument("--recipe", required=True, help="recipe file or built-in name")
    parser.add_argument("--shards", required=True, type=Path, help="a shards stage's folder")
    parser.add_argument(
        "--out", required=True, type=Path, metavar="WORK", help="work dir: checkpoints, logs"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    world = D.init_distributed()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        metrics = pretrain(recipe, args.shards, args.out)
    except StacklabError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    finally:
        D.shutdown_distributed()
    if world.is_main:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
