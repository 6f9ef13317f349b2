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

Training is AdamW with warmup and cosine decay, in the `Trainer`'s loop (trainer.py): this
module is SFT's `TrainModule`. Batch `s` is a pure function of the seed and the step (a seeded
permutation of the rows per epoch), so a checkpoint needs only the weights, the optimizer, the
scheduler and the random states, and a killed run resumes bit-exactly like pretraining does.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
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
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out += perm[offset : offset + batch_size - len(out)].tolist()
    return torch.tensor(out)


def sft(recipe: Recipe, tokenizer: Tokenizer, base: Path, work_dir: Path) -> Metrics:
    """Fine-tune the model saved in `base`; checkpoints, `metrics.jsonl` and `final/` in
    `work_dir`. Resumes from the newest checkpoint there."""
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
    optim_cfg = sft_optim(cfg)
    seed_everything(recipe.seed)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, cfg.steps, optim_cfg)
    module = SFTModule(model, schedule, cfg, recipe.seed, world.device)
    loop = Loop(cfg.steps, cfg.log_every, cfg.ckpt_every, cfg.grad_clip)
    trainer = Trainer(
        module, model, optimizer, scheduler, loop, work_dir=work_dir, world=world, recipe=recipe
    )
    return _summary(trainer.fit(), schedule.rows, cfg)


class SFTModule(TrainModule):
    """SFT's steps: one batch of packed rows (`Schedule`), loss on assistant tokens only."""

    name = "sft"
    hint = "lower sft.lr"

    def __init__(
        self,
        model: Transformer,
        schedule: Schedule,
        cfg: SFTConfig,
        seed: int,
        device: torch.device,
    ) -> None:
        self.model, self.schedule, self.cfg = model, schedule, cfg
        self.seed, self.device = seed, device
        self._loss = self._grad_norm = torch.zeros(())
        self._lr = 0.0

    def step(self, step: int, optimizer_step: OptimizerStep) -> None:
        rows = self.schedule.rows
        idx = self.schedule.batch(step - 1, self.cfg.batch_size, self.seed)
        inputs, targets = rows.inputs[idx].to(self.device), rows.targets[idx].to(self.device)
        self._lr = optimizer_step.scheduler.get_last_lr()[0]  # the rate this step trains with
        out = self.model(inputs, targets)
        (out.loss + out.aux_loss).backward()
        self._grad_norm = optimizer_step(out.loss)
        self._loss = out.loss.detach()

    def record(self) -> dict[str, float]:
        return {"loss": self._loss.item(), "lr": self._lr, "grad_norm": self._grad_norm.item()}


def _summary(run: TrainRun, rows: SFTRows, cfg: SFTConfig) -> Metrics:
    stats = rows.stats()
    return {
        "sft/final_loss": run.final("loss"),
        "sft/conversations": stats["conversations"],
        "sft/rows": stats["rows"],
        "sft/assistant_tokens": stats["assistant_tokens"],
        "sft/dropped_too_long": stats["dropped_too_long"],
        "sft/seconds": round(run.seconds, 3),
        "sft/steps": cfg.steps,
    }


# --------------------------------------------------------------------------- the stage


def run_sft(ctx: StageContext) -> Metrics:
    if not ctx.recipe.sft.enabled:
        return {}
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"])
    metrics = sft(ctx.recipe, tokenizer, ctx.inputs["pretrain"] / "final", ctx.out)
    shutil.rmtree(ctx.out / "checkpoints", ignore_errors=True)  # a finished stage never resumes
    return metrics


def sft_config(recipe: Recipe) -> dict[str, Any]:
    if not recipe.sft.enabled:
        return {"enabled": False}
    sft = recipe.sft.model_dump(mode="json", exclude={"data"})
    for phase in sft["phases"]:  # recipes that do not use it keep their cache keys
        if phase["task_max_digits"] is None:
            del phase["task_max_digits"]
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


SFT_STAGE = Stage(
    "sft",
    1,
    ("tokenizer", "pretrain"),
    sft_config,
    run_sft,
    fingerprint=sft_fingerprint,
    resumable=True,
)
