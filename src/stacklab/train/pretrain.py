"""The pretraining loop: next-token prediction on the packed shards, resumable bit-exactly.

Why it works this way:

* **A killed run continues as if it never stopped.** Everything a step depends on is in the
  checkpoint: weights, optimizer and scheduler state, the loader's position (a pure function
  of seed, epoch and step) and the random generators. On CPU deterministic algorithms are on,
  so a run SIGKILLed and started again logs the same losses, bit for bit, as one that ran
  through. Records that a killed run logged after its last checkpoint are dropped on resume.
* **One step = one global batch**: `grad_accum` micro-batches of `batch_size` rows on each of
  `world_size` ranks. Each micro-batch's loss is divided by `grad_accum` before backward, so
  the gradient is the mean over the global batch, whatever the split (DDP averages ranks).
* **A NaN stops the run, with the step's number.** The check is a device-side flag (the first
  step whose loss or gradient norm was not finite) read at the points where the loop syncs
  anyway (logging, checkpoints, and every step on CPU where syncing is free), and always
  before a checkpoint is written, so the last checkpoint on disk is the last good state.
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
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stacklab.data.loader import ShardLoader
from stacklab.data.shards import read_index
from stacklab.errors import StacklabError
from stacklab.fileio import write_atomic
from stacklab.model.moe import MoE
from stacklab.model.transformer import Transformer, build_model
from stacklab.pipeline import Metrics, Stage, StageContext
from stacklab.progress import console, progress_bar
from stacklab.recipe import Recipe, load_recipe
from stacklab.tracking import NULL, Tracker, recipe_tracker
from stacklab.tracking import require as require_trackers
from stacklab.train import distributed as D
from stacklab.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    seed_everything,
    write_model,
)
from stacklab.train.optim import build_optimizer
from stacklab.train.schedule import build_scheduler, lr_factor

METRICS_FILE = "metrics.jsonl"
FINAL_LOSS_LOGS = 5  # pretrain/final_loss: mean of the last this-many logged losses

OnStep = Callable[[int, Transformer], None]


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
    with deterministic(world.device.type == "cpu"):
        return _train(recipe, shard_dir, work_dir, world, vocab_size, seq_len, on_step)


def _train(
    recipe: Recipe,
    shard_dir: Path,
    work_dir: Path,
    world: D.World,
    vocab_size: int,
    seq_len: int,
    on_step: OnStep | None,
) -> Metrics:
    cfg = recipe.pretrain
    peak = measure_peak_flops(world.device)  # before seeding: it must not touch the RNGs
    seed_everything(recipe.seed)
    raw = build_model(recipe.model, vocab_size).to(world.device)
    raw.set_activation_checkpointing(cfg.activation_checkpointing)
    wrapped = D.wrap_model(raw, world, cfg.parallel)
    model = torch.compile(wrapped) if cfg.compile else wrapped
    optimizer = build_optimizer(raw, recipe.optim)
    scheduler = build_scheduler(optimizer, cfg.steps, recipe.optim)
    loader = ShardLoader(
        shard_dir, "train", cfg.batch_size, recipe.seed, world.rank, world.world_size
    )
    ckpt_root = work_dir / "checkpoints"
    step, tokens, seconds = _resume(ckpt_root, recipe, raw, optimizer, scheduler, loader)

    flops_per_token = raw.flops_per_token(seq_len)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world.world_size * seq_len
    autocast = _autocast(world.device, cfg.dtype)
    log = MetricsLog(work_dir, step, enabled=world.is_main, recipe=recipe)
    no_bad_step = cfg.steps + 1
    first_bad = torch.tensor(no_bad_step, device=world.device)  # first non-finite step, if any
    raw.train()

    session_start = time.perf_counter()
    window = (step, time.perf_counter())  # (step, time) of the last log
    bar = progress_bar()
    bar.disable = bar.disable or not world.is_main
    with bar, log:
        task = bar.add_task("pretrain", total=cfg.steps, completed=step)
        while step < cfg.steps:
            step += 1
            lr_scale = lr_factor(step - 1, cfg.steps, recipe.optim)
            micro = (_to(loader.next_batch(), world.device) for _ in range(cfg.grad_accum))
            loss, aux = train_step(model, wrapped, micro, cfg.grad_accum, autocast)
            grad_norm = clip_gradients(raw, recipe.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            first_bad = torch.minimum(first_bad, torch.where(finite, no_bad_step, step))
            tokens += tokens_per_step

            logging = step % cfg.log_every == 0 or step == cfg.steps
            checkpointing = step % cfg.ckpt_every == 0 or step == cfg.steps
            if logging or checkpointing or world.device.type == "cpu":
                _stop_if_diverged(first_bad, no_bad_step, world, ckpt_root)
            D.sum_expert_counts(raw, world)
            if logging:
                stats = D.all_reduce(torch.stack([loss, aux]), world).tolist()
                now = time.perf_counter()
                tokens_per_s = (step - window[0]) * tokens_per_step / (now - window[1])
                window = (step, now)
                record = {
                    "step": step,
                    "loss": stats[0],
                    "lr": recipe.optim.lr * lr_scale,
                    "grad_norm": grad_norm.item(),
                    "tokens": tokens,
                    "tokens_per_s": tokens_per_s,
                    "mfu": flops_per_token * tokens_per_s / (peak * world.world_size),
                    "aux_loss": stats[1],
                }
                if recipe.optim.name == "muon":
                    record["lr_muon"] = recipe.optim.muon.lr * lr_scale
                for i, moe in _moe_layers(raw):
                    record[f"moe/{i}/imbalance"] = moe.load_stats()["imbalance"]
                log.write(record)
                bar.update(task, description=_describe(record))
            for moe in raw.moe_layers():
                moe.update_bias()
            if checkpointing:
                model_state = D.model_state(raw)  # a collective under FSDP: every rank joins
                optim_state = D.optimizer_state(raw, optimizer)
                if world.is_main:
                    elapsed = seconds + time.perf_counter() - session_start
                    state = {
                        "scheduler": scheduler.state_dict(),
                        "loader": loader.state_dict(),
                        "tokens": tokens,
                        "seconds": elapsed,
                    }
                    save_checkpoint(ckpt_root, step, recipe.model, model_state, optim_state, state)
                D.barrier(world)
            bar.update(task, completed=step)
            if on_step is not None:
                on_step(step, raw)
    seconds += time.perf_counter() - session_start

    final_state = D.model_state(raw)
    if world.is_main:
        write_model(work_dir / "final", recipe.model, vocab_size, final_state)
    D.barrier(world)
    # A peak measured while something else loaded the machine is too low (MFU above 1 has
    # been seen); measuring again at the end and keeping the better figure halves that risk.
    peak = max(peak, measure_peak_flops(world.device))
    return _summary(raw, work_dir, tokens, seconds, flops_per_token, peak, world.world_size)


def _resume(
    ckpt_root: Path,
    recipe: Recipe,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: ShardLoader,
) -> tuple[int, int, float]:
    """Load the newest checkpoint, if any, into everything; return (step, tokens, seconds)."""
    found = latest_checkpoint(ckpt_root)
    if found is None:
        return 0, 0, 0.0
    ckpt = load_checkpoint(found, recipe.model)
    try:
        D.load_model_state(model, ckpt.model)
    except RuntimeError as exc:
        raise StacklabError(f"{found} does not fit this recipe's model: {exc}") from None
    D.load_optimizer_state(model, optimizer, ckpt.optimizer)
    scheduler.load_state_dict(ckpt.state["scheduler"])
    loader.load_state_dict(ckpt.state["loader"])
    restore_rng(ckpt)
    return ckpt.step, ckpt.state["tokens"], ckpt.state["seconds"]


def _stop_if_diverged(first_bad: Tensor, no_bad_step: int, world: D.World, ckpt_root: Path) -> None:
    """Raise if any rank saw a non-finite loss or gradient norm (syncs with the device)."""
    bad = int(D.all_reduce(first_bad.clone(), world, "min").item())
    if bad != no_bad_step:
        raise StacklabError(
            f"pretraining diverged: loss or gradient norm is NaN/Inf at step {bad}; last good "
            f"checkpoint: {latest_checkpoint(ckpt_root) or 'none'} (lower optim.lr or raise "
            "optim.warmup_steps)"
        )


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
                out = model(inputs, targets, return_logits=False)
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


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """`metrics.jsonl`, and the trackers of `recipe.log` (tracking.py), written by rank 0 only.

    On resume from step `resume_step`, records after it (logged by a killed run after its last
    checkpoint, or cut short mid-line) are dropped, so the file reads as one clean run. The
    file is the record: a tracker that fails is warned about and switched off, never fatal.
    """

    def __init__(
        self,
        work_dir: Path,
        resume_step: int,
        enabled: bool,
        prefix: str = "pretrain",
        recipe: Recipe | None = None,
    ) -> None:
        self.path = work_dir / METRICS_FILE
        self.enabled = enabled
        self.prefix = prefix
        self._file: Any = None
        self._tracker: Tracker = NULL
        if recipe is not None:  # on every rank: one stopping alone would leave others waiting
            require_trackers(recipe.log.trackers, "recipe key log.trackers")
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")
        if recipe is not None:
            self._tracker = recipe_tracker(recipe, work_dir, prefix, resume_step)

    def write(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._tracker.log(record, int(record["step"]), self.prefix)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
        self._tracker.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _summary(
    model: Transformer,
    work_dir: Path,
    tokens: int,
    seconds: float,
    flops_per_token: float,
    peak: float,
    world_size: int,
) -> Metrics:
    """The run's flat metrics; speed over every session's training time, peak per device."""
    losses = [r["loss"] for r in read_metrics(work_dir / METRICS_FILE)][-FINAL_LOSS_LOGS:]
    tokens_per_s = tokens / seconds if seconds else 0.0
    return {
        "pretrain/final_loss": round(sum(losses) / len(losses), 5) if losses else float("nan"),
        "pretrain/tokens": tokens,
        "pretrain/tokens_per_s": round(tokens_per_s, 1),
        "pretrain/mfu": round(flops_per_token * tokens_per_s / (peak * world_size), 5),
        "pretrain/params": model.num_params(),
        "pretrain/active_params": model.num_params(active=True),
        "pretrain/peak_flops": peak,
        "pretrain/seconds": round(seconds, 3),
    }


def _describe(record: dict[str, float]) -> str:
    return (
        f"pretrain loss {record['loss']:.3f} · {record['tokens_per_s']:,.0f} tok/s · "
        f"MFU {record['mfu']:.1%}"
    )


# --------------------------------------------------------------------------- helpers


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the global gradient norm to `max_norm` (0: no clipping); return the norm before."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(
            p.grad for p in model.parameters() if p.grad is not None
        )
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm


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


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms while training (on CPU); the previous setting afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled or before, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


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
