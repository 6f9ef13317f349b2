"""Supervised fine-tuning: the pretrained model learns the chat format, the tasks and tool use.

The data (`sft_conversations`) is three kinds of conversation, all in the chat format of
`data/chat.py`:

* the training split of every `data.tasks` generator, one user turn and one answer each;
* scripted tool-use demonstrations for each of `sft.agent_envs` (`envs/suite.py`), played
  against the real tools, so every tool response in them is genuine;
* the user's own JSONL files of `{"messages": [...]}` records (`sft.data`).

`sft.phases` can split the steps into spans that each train on some of these sources only
(`Schedule`). They are packed into rows by `pack_sft`, whose targets are -100 everywhere but
on assistant tokens: the loss never trains on prompts, system text or tool responses.

`sft.pretrain_mix` mixes pretraining text back in: that share of each batch's rows are
windows of the shards' train split (`PretrainWindows`), trained with the plain next-token
loss on every token. Chat-only SFT overwrites what pretraining learned (the eval stage's
`pretrain/val_bpb` and `sft/val_bpb` show how much); replaying pretraining data during
fine-tuning is the remedy of InstructGPT's PPO-ptx (Ouyang et al. 2022).

Training is AdamW with warmup and cosine decay, in the `Trainer`'s loop (trainer.py): this
module is SFT's `TrainModule`. Batch `s` is a pure function of the seed and the step (a seeded
permutation of the rows per epoch, and one of the pretraining windows), so a checkpoint needs
only the weights, the optimizer, the scheduler and the random states, and a killed run resumes
bit-exactly like pretraining does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from stacklab.data.sources import file_fingerprint
from stacklab.data.tokenizer import load_tokenizer
from stacklab.envs.base import Message
from stacklab.envs.suite import demonstrations
from stacklab.errors import DataError, StacklabError
from stacklab.model.transformer import Transformer
from stacklab.pipeline import Metrics, Stage, StageContext
from stacklab.recipe import OptimConfig, Recipe, SFTConfig
from stacklab.train import distributed as D
from stacklab.train.checkpoint import load_model, seed_everything
from stacklab.train.optim import build_optimizer
from stacklab.train.schedule import build_scheduler
from stacklab.train.sft_data import (
    PretrainWindows,
    SFTRows,
    concat_rows,
    load_conversations,
    pack_sft,
    small_task_conversations,
    task_conversations,
)
from stacklab.train.trainer import Loop, OptimizerStep, Trainer, TrainModule, TrainRun


def sft_sources(recipe: Recipe) -> dict[str, list[list[Message]]]:
    """The SFT conversations by source, in order: `tasks`, each agent env, `data`; a source
    with no conversation is left out."""
    cfg = recipe.sft
    sources = {"tasks": task_conversations(recipe.data.tasks, cfg.task_examples, recipe.seed)}
    for name in cfg.agent_envs:
        sources[name] = demonstrations(name, cfg.agent_examples, recipe.seed)
    sources["data"] = [c for path in cfg.data for c in load_conversations(path)]
    return {name: convs for name, convs in sources.items() if convs}


_NO_DATA = "sft: no training data (sft.task_examples is 0, sft.agent_envs and sft.data empty)"


def sft_conversations(recipe: Recipe) -> list[list[Message]]:
    """Every SFT conversation of the recipe: tasks, tool demonstrations, user files."""
    conversations = [c for convs in sft_sources(recipe).values() for c in convs]
    if not conversations:
        raise StacklabError(_NO_DATA)
    return conversations


class Schedule:
    """Which packed rows each SFT step draws from: one span of steps per phase.

    Without phases every source is packed together and every step draws from all rows. With
    phases each source is packed on its own, so a phase can draw from its sources' rows only.
    Batch `s` of a phase that starts at step `p0` is `batch_indices` of step `s - p0` over
    that phase's rows: still a pure function of the seed and the step.
    """

    def __init__(self, recipe: Recipe, tokenizer: Tokenizer) -> None:
        cfg = recipe.sft
        sources = sft_sources(recipe)
        if not sources:
            raise StacklabError(_NO_DATA)
        if not cfg.phases:
            self.rows = pack_sft(
                tokenizer,
                [c for convs in sources.values() for c in convs],
                cfg.seq_len,
                recipe.seed,
            )
            self.spans = [(0, cfg.steps, torch.arange(self.rows.inputs.shape[0]))]
            return
        pools = dict(sources)  # packed in this order: the sources, then the small-sums pools
        for k in sorted({p.task_max_digits for p in cfg.phases if p.task_max_digits}):
            convs = small_task_conversations(recipe.data.tasks, k, cfg.task_examples, recipe.seed)
            if convs:
                pools[f"tasks<={k}"] = convs
        parts, ranges, start = [], {}, 0
        for name, convs in pools.items():
            try:
                parts.append(pack_sft(tokenizer, convs, cfg.seq_len, recipe.seed))
            except DataError as exc:
                raise DataError(f"sft source {name!r}: {exc}") from None
            n = parts[-1].inputs.shape[0]
            ranges[name] = torch.arange(start, start + n)
            start += n
        self.rows = concat_rows(parts)
        self.spans, first = [], 0
        for i, phase in enumerate(cfg.phases):
            names = phase.sources or list(sources)
            if phase.task_max_digits:
                names = [f"tasks<={phase.task_max_digits}" if n == "tasks" else n for n in names]
            missing = [n for n in names if n not in ranges]
            if missing:
                raise StacklabError(
                    f"sft.phases[{i}].sources: no conversations from {', '.join(missing)} "
                    f"(the recipe's sources with data: {', '.join(ranges)})"
                )
            self.spans.append((first, first + phase.steps, torch.cat([ranges[n] for n in names])))
            first += phase.steps

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Row indices of 0-based `step`."""
        for first, end, rows in self.spans:
            if first <= step < end:
                return rows[batch_indices(len(rows), batch_size, step - first, seed)]
        raise ValueError(f"step {step} is past the schedule's {self.spans[-1][1]} steps")


def sft_optim(cfg: SFTConfig) -> OptimConfig:
    """The AdamW settings of SFT, in the form the optimizer and scheduler builders take."""
    return OptimConfig(
        name="adamw",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        schedule="cosine",
        warmup_steps=min(cfg.warmup_steps, cfg.steps),
        min_lr_frac=cfg.min_lr_frac,
    )


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Row indices of 0-based `step`: consecutive slices of one seeded permutation per epoch."""

    def permutation(epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed * 7919 + epoch)
        return torch.randperm(n_rows, generator=generator).tolist()

    return _epoch_slices(n_rows, batch_size, step, permutation)


WINDOW_STREAM = 1  # tags the windows' order apart from the pretraining loader's (seed, epoch)


def window_indices(n_windows: int, n: int, step: int, seed: int) -> torch.Tensor:
    """The pretraining windows of 0-based `step`, as `batch_indices` slices rows, but in an
    order of their own: numpy's generator seeded by (seed, `WINDOW_STREAM`, epoch). (Torch's
    CPU generator keeps only 32 bits of its seed, so an offset added to the chat order's seed
    could fall back on the same order.)"""

    def permutation(epoch: int) -> list[int]:
        rng = np.random.default_rng([seed, WINDOW_STREAM, epoch])
        return rng.permutation(n_windows).tolist()

    return _epoch_slices(n_windows, n, step, permutation)


def _epoch_slices(
    n_rows: int, n: int, step: int, permutation: Callable[[int], list[int]]
) -> torch.Tensor:
    """Indices `step·n .. step·n + n - 1` of the endless stream of one permutation of
    `n_rows` per epoch (`permutation(epoch)`)."""
    start = step * n
    out: list[int] = []
    while len(out) < n:
        epoch, offset = divmod(start + len(out), n_rows)
        out += permutation(epoch)[offset : offset + n - len(out)]
    return torch.tensor(out)


def sft(
    recipe: Recipe,
    tokenizer: Tokenizer,
    base: Path,
    work_dir: Path,
    shards: Path | None = None,
) -> Metrics:
    """Fine-tune the model saved in `base`; checkpoints, `metrics.jsonl` and `final/` in
    `work_dir`. Resumes from the newest checkpoint there. `shards` (the shards stage's
    folder) is read only with `sft.pretrain_mix`."""
    cfg = recipe.sft
    world = D.single_process("sft")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(base).to(world.device)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise StacklabError(
            f"sft.seq_len ({cfg.seq_len}) exceeds model.max_seq_len ({model.cfg.max_seq_len})"
        )
    schedule = Schedule(recipe, tokenizer)
    windows = None
    if cfg.pretrain_rows:
        if shards is None:
            raise StacklabError("sft.pretrain_mix needs the shards stage's folder")
        windows = PretrainWindows(shards, cfg.seq_len)
    optim_cfg = sft_optim(cfg)
    seed_everything(recipe.seed)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, cfg.steps, optim_cfg)
    module = SFTModule(model, schedule, cfg, recipe.seed, world.device, windows)
    loop = Loop(cfg.steps, cfg.log_every, cfg.ckpt_every, cfg.grad_clip)
    trainer = Trainer(
        module, model, optimizer, scheduler, loop, work_dir=work_dir, world=world, recipe=recipe
    )
    return _summary(trainer.fit(), schedule.rows, cfg)


def chat_loss(
    model: Transformer, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean next-token loss over the trained (assistant) tokens, and the MoE aux loss.

    The output head runs only where a target is trained (`logits=mask`): in packed chat rows
    that is a small share of the positions (about 15% on the tiny recipe), so the [B, T, V]
    logits and their softmax, a quarter of a step's work at a 4,096-token vocabulary, are
    never computed for the prompts, system text and tool responses. The loss is the same
    mean the full logits with `ignore_index=-100` give (tests/test_sft.py checks both).
    """
    trained = targets != -100
    out = model(inputs, logits=trained)
    loss = F.cross_entropy(out.logits.float(), targets[trained])
    return loss, out.aux_loss


class SFTModule(TrainModule):
    """SFT's steps: one batch of packed rows (`Schedule`), loss on assistant tokens only.

    With `windows` (`sft.pretrain_mix`), `cfg.pretrain_rows` of the batch's rows are
    pretraining windows instead, and the step's loss is `(1 - w) · chat loss + w · LM loss`
    with `w` their share of the rows. Each loss is the mean over its own rows' trained
    tokens: a chat row trains only what the assistant wrote (a few tokens of each short
    conversation), a window every token, so one mean over the whole batch would give the
    pretraining rows nearly all of the gradient whatever the share. The two parts go forward
    and backward one after the other, so the step holds one part's activations at a time.
    `loss` stays the chat loss (comparable with and without the mix); `lm_loss` is logged too.
    """

    name = "sft"
    hint = "lower sft.lr"

    def __init__(
        self,
        model: Transformer,
        schedule: Schedule,
        cfg: SFTConfig,
        seed: int,
        device: torch.device,
        windows: PretrainWindows | None = None,
    ) -> None:
        self.model, self.schedule, self.cfg = model, schedule, cfg
        self.seed, self.device, self.windows = seed, device, windows
        self._loss = self._lm_loss = self._grad_norm = torch.zeros(())
        self._lr = 0.0

    def step(self, step: int, optimizer_step: OptimizerStep) -> None:
        if self.windows is not None:
            self._mixed_step(step, optimizer_step, self.windows)
            return
        rows = self.schedule.rows
        idx = self.schedule.batch(step - 1, self.cfg.batch_size, self.seed)
        inputs, targets = rows.inputs[idx].to(self.device), rows.targets[idx].to(self.device)
        self._lr = optimizer_step.scheduler.get_last_lr()[0]  # the rate this step trains with
        loss, aux_loss = chat_loss(self.model, inputs, targets)
        (loss + aux_loss).backward()
        self._grad_norm = optimizer_step(loss)
        self._loss = loss.detach()

    def _mixed_step(
        self, step: int, optimizer_step: OptimizerStep, windows: PretrainWindows
    ) -> None:
        n_lm = self.cfg.pretrain_rows
        w = n_lm / self.cfg.batch_size
        rows = self.schedule.rows
        idx = self.schedule.batch(step - 1, self.cfg.batch_size - n_lm, self.seed)
        inputs, targets = rows.inputs[idx].to(self.device), rows.targets[idx].to(self.device)
        self._lr = optimizer_step.scheduler.get_last_lr()[0]
        loss, aux_loss = chat_loss(self.model, inputs, targets)
        ((1 - w) * (loss + aux_loss)).backward()
        picked = window_indices(windows.count, n_lm, step - 1, self.seed)
        lm_inputs, lm_targets = windows.batch(picked)
        lm = self.model(lm_inputs.to(self.device), lm_targets.to(self.device), logits=None)
        (w * (lm.loss + lm.aux_loss)).backward()
        self._grad_norm = optimizer_step((1 - w) * loss.detach() + w * lm.loss.detach())
        self._loss, self._lm_loss = loss.detach(), lm.loss.detach()

    def record(self) -> dict[str, float]:
        record = {"loss": self._loss.item(), "lr": self._lr, "grad_norm": self._grad_norm.item()}
        if self.windows is not None:
            record["lm_loss"] = self._lm_loss.item()
        return record


def _summary(run: TrainRun, rows: SFTRows, cfg: SFTConfig) -> Metrics:
    stats = rows.stats()
    metrics: Metrics = {
        "sft/final_loss": run.final("loss"),
        "sft/conversations": stats["conversations"],
        "sft/rows": stats["rows"],
        "sft/assistant_tokens": stats["assistant_tokens"],
        "sft/dropped_too_long": stats["dropped_too_long"],
        "sft/seconds": round(run.seconds, 3),
        "sft/steps": cfg.steps,
    }
    if cfg.pretrain_rows:
        metrics["sft/final_lm_loss"] = run.final("lm_loss")
        metrics["sft/pretrain_rows"] = cfg.pretrain_rows
    return metrics


# --------------------------------------------------------------------------- the stage


def run_sft(ctx: StageContext) -> Metrics:
    if not ctx.recipe.sft.enabled:
        return {}
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"])
    base = ctx.inputs["pretrain"] / "final"
    metrics = sft(ctx.recipe, tokenizer, base, ctx.out, ctx.inputs["shards"])
    shutil.rmtree(ctx.out / "checkpoints", ignore_errors=True)  # a finished stage never resumes
    return metrics


def sft_config(recipe: Recipe) -> dict[str, Any]:
    if not recipe.sft.enabled:
        return {"enabled": False}
    sft = recipe.sft.model_dump(mode="json", exclude={"data"})
    for phase in sft["phases"]:  # recipes that do not use it keep their cache keys
        if phase["task_max_digits"] is None:
            del phase["task_max_digits"]
    if not sft["pretrain_mix"]:  # likewise
        del sft["pretrain_mix"]
    return {
        "sft": sft,
        "tasks": [t.model_dump(mode="json") for t in recipe.data.tasks],
        "seed": recipe.seed,
    }


def sft_fingerprint(recipe: Recipe) -> list[str]:
    """The user conversation files by content, so editing one retrains."""
    if not recipe.sft.enabled:
        return []
    return [file_fingerprint(path, "sft.data") for path in recipe.sft.data]


# `shards` is read only with `sft.pretrain_mix`. As an input it adds nothing to the key that
# `pretrain`'s key does not already cover (pretraining reads the same shards).
SFT_STAGE = Stage(
    "sft",
    1,
    ("tokenizer", "shards", "pretrain"),
    sft_config,
    run_sft,
    fingerprint=sft_fingerprint,
    resumable=True,
)
