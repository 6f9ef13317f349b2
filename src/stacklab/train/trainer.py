"""One training loop for every stage: pretraining, SFT and RL.

A stage knows its data and its loss; the rest of training is the same for all three and lives
here, once (OLMo-core's split of a trainer from its "train module"). A stage is a
`TrainModule` whose `step` trains one step and calls the trainer's `OptimizerStep` after each
backward: once per step for pretraining (after `grad_accum` micro-batches) and SFT, several
times for RL, whose step collects rollouts and then takes `epochs` passes of minibatch
updates. `Trainer.fit` runs the loop around it:

* **A killed run continues as if it never stopped.** A checkpoint (`checkpoint.py`) holds
  everything a step depends on: weights, optimizer, scheduler, the module's own state
  (pretraining's loader position and tokens seen) and the random generators. On CPU
  deterministic algorithms are on, so a run SIGKILLed and started again logs the same records,
  bit for bit, as one that ran through (`tests/test_resume_kill.py`). Records that a killed run
  logged after its last checkpoint are dropped on resume (`log.py`).
* **A NaN stops the run, with the stage, the step and the last good checkpoint.** Every
  optimizer update folds "the loss and the gradient norm are finite" into a device-side flag,
  read where the loop syncs anyway (logging, checkpoints, and every step on CPU, where syncing
  is free) and always before a checkpoint is written, so the last checkpoint on disk is the
  last good state. A step that diverged is never logged.
* **Gradients are clipped** to a global norm (0: not clipped) before every update; the norm
  before clipping is what the logs report.
* **MoE balance, once per step.** After the step's last update, the token counts of every
  expert (summed over ranks) move the aux-loss-free selection bias, as DeepSeek-V3 updates it
  once per training step, and are reset. For RL that is once per step of rollouts, after all
  its minibatch updates; sampling runs in eval mode and counts nothing.
* **One device rule.** One process per device, chosen by `distributed.init_distributed`: the
  GPU when there is one, else the CPU. Only pretraining runs data-parallel.
* **One summary window.** A stage's final metrics (`TrainRun.final`) are the mean of its last
  `FINAL_LOGS` logged records, resumed sessions included.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stacklab.errors import StacklabError
from stacklab.model.transformer import Transformer
from stacklab.progress import progress_bar
from stacklab.recipe import Recipe
from stacklab.train import distributed as D
from stacklab.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    write_model,
)
from stacklab.train.log import METRICS_FILE, MetricsLog, read_log

FINAL_LOGS = 5  # a stage's final metrics: the mean over its last this-many logged records

OnStep = Callable[[int, Transformer], None]


class OptimizerStep:
    """One optimizer update: clip the gradients, step, advance the schedule, clear the
    gradients. Calling it with the loss just backpropagated returns the gradient norm before
    clipping and notes whether both were finite (`take_finite`)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        grad_clip: float,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip = grad_clip
        self._finite: Tensor | None = None  # all updates since the last `take_finite`

    def __call__(self, loss: Tensor) -> Tensor:
        grad_norm = clip_gradients(self.model, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        self._finite = finite if self._finite is None else self._finite & finite
        return grad_norm

    def take_finite(self) -> Tensor | None:
        """A device bool: were the losses and gradient norms of every update since the last
        call finite? None if there was no update."""
        finite, self._finite = self._finite, None
        return finite


class TrainModule(ABC):
    """What a stage gives the `Trainer`: its steps, its log records, its share of a checkpoint."""

    name: str  # the stage: the log's tracker prefix, the progress bar, errors
    hint: str  # what to change when training diverges, e.g. "lower sft.lr"

    @abstractmethod
    def step(self, step: int, optimizer_step: OptimizerStep) -> None:
        """Train 1-based step `step`: forward and backward, `optimizer_step(loss)` after each
        backward."""

    @abstractmethod
    def record(self) -> dict[str, float]:
        """The logged values of the step just trained, but its number. Called on logging
        steps only, on every rank: it may sync with the device or reduce over ranks."""

    def describe(self, record: dict[str, float]) -> str:
        """The progress bar's text after a logged record."""
        return f"{self.name} loss {record['loss']:.3f}"

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond weights, optimizer, scheduler and random states
        (JSON values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back the keys of `state_dict` from a checkpoint's state."""
        del state  # nothing beyond what the trainer restores itself


@dataclass
class TrainRun:
    """A finished run: every record it logged (resumed sessions included) and its training
    seconds over every session."""

    records: list[dict[str, Any]]
    seconds: float

    def final(self, key: str) -> float:
        """The mean of `key` over the last `FINAL_LOGS` records (those that have it)."""
        return mean_of(self.records[-FINAL_LOGS:], key)

    def first(self, key: str) -> float:
        """The mean of `key` over the first `FINAL_LOGS` records (those that have it)."""
        return mean_of(self.records[:FINAL_LOGS], key)


def mean_of(records: list[dict[str, Any]], key: str) -> float:
    """The mean of `key` over the `records` that have it, to 5 places; NaN if none has."""
    values = [r[key] for r in records if key in r]
    return round(sum(values) / len(values), 5) if values else float("nan")


@dataclass(frozen=True)
class Loop:
    """How long a stage trains and how often it logs and checkpoints (every `log_every` and
    `ckpt_every` steps, and at the last step); gradients are clipped to `grad_clip` (0: not)."""

    steps: int
    log_every: int
    ckpt_every: int
    grad_clip: float


class Trainer:
    """The loop around a `TrainModule`: resume, steps, NaN guard, log, MoE balance, checkpoints.

    `model` is the plain model the module trains (not a DDP wrapper or a compiled form):
    gradients are clipped, checkpoints and the final weights taken, and MoE layers found on it.
    Checkpoints go to `work_dir/checkpoints` every `ckpt_every` steps and at the last step,
    records to `work_dir/metrics.jsonl` every `log_every` steps and at the last step, and the
    trained model to `work_dir/final/`.
    """

    def __init__(
        self,
        module: TrainModule,
        model: Transformer,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loop: Loop,
        *,
        work_dir: Path,
        world: D.World,
        recipe: Recipe | None = None,
    ) -> None:
        self.module, self.model, self.world = module, model, world
        self.optimizer, self.scheduler = optimizer, scheduler
        self.optimizer_step = OptimizerStep(model, optimizer, scheduler, loop.grad_clip)
        self.work_dir, self.ckpt_root = Path(work_dir), Path(work_dir) / "checkpoints"
        self.steps, self.log_every, self.ckpt_every = loop.steps, loop.log_every, loop.ckpt_every
        self.recipe = recipe  # its `log` section names the trackers

    def fit(self, on_step: OnStep | None = None) -> TrainRun:
        """Train from the newest checkpoint (or from the start) to the last step, write the
        final model, and return the run. `on_step(step, model)` runs after each step, on
        every rank."""
        with deterministic(self.world.device.type == "cpu"):
            return self._fit(on_step)

    def _fit(self, on_step: OnStep | None) -> TrainRun:
        world, model, module = self.world, self.model, self.module
        step, seconds = self._resume()
        log = MetricsLog(self.work_dir, step, world.is_main, module.name, self.recipe)
        no_bad_step = self.steps + 1
        first_bad = torch.tensor(no_bad_step, device=world.device)  # first non-finite step
        model.train()

        session_start = time.perf_counter()
        bar = progress_bar()
        bar.disable = bar.disable or not world.is_main
        with bar, log:
            task = bar.add_task(module.name, total=self.steps, completed=step)
            while step < self.steps:
                step += 1
                module.step(step, self.optimizer_step)
                finite = self.optimizer_step.take_finite()
                if finite is not None:
                    first_bad = torch.minimum(first_bad, torch.where(finite, no_bad_step, step))

                logging = step % self.log_every == 0 or step == self.steps
                checkpointing = step % self.ckpt_every == 0 or step == self.steps
                if logging or checkpointing or world.device.type == "cpu":
                    self._stop_if_diverged(first_bad, no_bad_step)
                D.sum_expert_counts(model, world)
                if logging:
                    record = {"step": step, **module.record()}
                    log.write(record)
                    bar.update(task, description=module.describe(record))
                for moe in model.moe_layers():
                    moe.update_bias()
                if checkpointing:
                    self._save(step, seconds + time.perf_counter() - session_start)
                bar.update(task, completed=step)
                if on_step is not None:
                    on_step(step, model)
        seconds += time.perf_counter() - session_start

        final_state = D.model_state(model)  # a collective under FSDP: every rank joins
        if world.is_main:
            write_model(self.work_dir / "final", model.cfg, model.vocab_size, final_state)
        D.barrier(world)
        return TrainRun(read_log(self.work_dir / METRICS_FILE), seconds)

    def _resume(self) -> tuple[int, float]:
        """Load the newest checkpoint, if any, into everything; return (step, seconds)."""
        found = latest_checkpoint(self.ckpt_root)
        if found is None:
            return 0, 0.0
        ckpt = load_checkpoint(found, self.model.cfg)
        try:
            D.load_model_state(self.model, ckpt.model)
        except RuntimeError as exc:
            raise StacklabError(f"{found} does not fit this recipe's model: {exc}") from None
        D.load_optimizer_state(self.model, self.optimizer, ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        self.module.load_state_dict(ckpt.state)
        restore_rng(ckpt)
        return ckpt.step, ckpt.state["seconds"]

    def _save(self, step: int, seconds: float) -> None:
        model_state = D.model_state(self.model)  # a collective under FSDP: every rank joins
        optim_state = D.optimizer_state(self.model, self.optimizer)
        if self.world.is_main:
            state = {
                "scheduler": self.scheduler.state_dict(),
                **self.module.state_dict(),
                "seconds": seconds,
            }
            save_checkpoint(self.ckpt_root, step, self.model.cfg, model_state, optim_state, state)
        D.barrier(self.world)

    def _stop_if_diverged(self, first_bad: Tensor, no_bad_step: int) -> None:
        """Raise if any rank saw a non-finite loss or gradient norm (syncs with the device)."""
        bad = int(D.all_reduce(first_bad.clone(), self.world, "min").item())
        if bad != no_bad_step:
            raise StacklabError(
                f"{self.module.name} diverged: the loss or gradient norm is NaN/Inf at step "
                f"{bad}; last good checkpoint: {latest_checkpoint(self.ckpt_root) or 'none'} "
                f"({self.module.hint})"
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
