"""The RL stage: group rollouts in environments, verifiable rewards, a GRPO-family update.

One step:

1. **Sample.** `prompts_per_step` training tasks, shared among the sources of `rl.envs` in
   proportion to `rl.env_weights` (evenly by default; `tasks`: each `data.tasks` generator is
   a source, one turn; `calculator`, `lookup`: tool-using agents), each played `group_size`
   times at `temperature` by `rollout`, env by env.
2. **Score.** Each episode's reward comes from its environment (strict: 1 for the right answer
   in the fixed format, else 0), plus DAPO's soft overlong penalty when `overlong_buffer > 0`.
   With `dynamic_sampling`, groups whose rewards are all equal are dropped and more prompts
   are sampled, up to `max_sampling_rounds` rollout rounds, to refill the batch.
3. **Advantages** are group-relative (`group_advantages`, scaled per `rl.advantage`; unset,
   the loss's own: none for dr_grpo, the group std for the others).
4. **Update.** The log-probs of the sampled tokens under the policy before the update
   (`old_logp`) are recomputed once by a full forward pass at `temperature`, the footing the
   sampler reports them on (the ratio is then exactly 1 at the first minibatch, whatever
   numerical drift the KV-cache sampler had; the drift is logged as `logprob_drift`). Then
   `epochs` passes over the batch in shuffled minibatches of `minibatch_size` episodes, each
   an AdamW step on `LOSSES[rl.loss]` plus `kl_coef` times the k3 KL to the frozen starting
   model. Only sampled tokens are in the mask: prompts, tool responses and padding never
   enter the loss.

The loop around the steps (resume, NaN guard, log, MoE balance, checkpoints) is the
`Trainer`'s (`train/trainer.py`); `RLModule` is RL's step, and its minibatch updates go
through the trainer's `OptimizerStep`. Everything a step draws (tasks, the sampler's
generator, the minibatch order) is seeded by (seed, step), so a checkpoint needs only
weights, optimizer and scheduler, and a run killed between checkpoints resumes bit-exactly,
rollouts included (`tests/test_resume_kill.py`). Every step is logged to `metrics.jsonl`:
reward, accuracy per env, response length, entropy, KL, clip fraction, the dropped and
uninformative group fractions, turns, tool calls, and where the time went (sampling vs
update).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from stacklab.data.tasks import make_generator
from stacklab.data.tokenizer import PAD_ID, load_tokenizer
from stacklab.envs.base import Environment
from stacklab.envs.rollout import Episode, rollout
from stacklab.envs.suite import agent_tasks, make_env
from stacklab.envs.tasks_env import TaskEnv
from stacklab.errors import StacklabError
from stacklab.model.transformer import Transformer
from stacklab.pipeline import Metrics, Stage, StageContext
from stacklab.recipe import OptimConfig, Recipe, RLConfig
from stacklab.rl.advantages import group_advantages, informative_groups, overlong_penalty
from stacklab.rl.losses import LOSSES, kl_k3
from stacklab.train import distributed as D
from stacklab.train.checkpoint import final_model_dir, load_model, seed_everything
from stacklab.train.optim import build_optimizer
from stacklab.train.schedule import build_scheduler
from stacklab.train.trainer import Loop, OptimizerStep, Trainer, TrainModule, TrainRun, mean_of

POOL_SIZE = 2000  # training tasks per environment that steps sample from
CISPO_EPS_HIGH = 0.28  # our default upper bound of CISPO's weight when the recipe sets none


# --------------------------------------------------------------------------- environments


@dataclass
class TaskSource:
    """One environment of RL: a name, a pool of training tasks, and a factory of fresh envs
    (episodes run in parallel, so each needs its own environment object)."""

    name: str
    tasks: list[Any]
    new_env: Any  # () -> Environment
    weight: float = 1.0  # relative share of each step's prompts


def task_sources(recipe: Recipe, pool: int = POOL_SIZE) -> list[TaskSource]:
    """The training tasks of every env in `rl.envs`: `tasks` is one source per data.tasks."""
    cfg = recipe.rl
    sources = []
    for name in cfg.envs:
        if name == "tasks":
            for task_cfg in recipe.data.tasks:
                gen = make_generator(task_cfg)
                # At most half the training split, so distinct problems are quick to draw.
                train_size = gen.space_size() * (1 - gen.eval_fraction)
                problems = gen.problems(
                    "train", max(1, min(pool, int(train_size / 2))), recipe.seed + 1
                )

                def new_task_env(gen: Any = gen) -> Environment:
                    return TaskEnv(gen, "train")

                sources.append(
                    TaskSource(task_cfg.kind, problems, new_task_env, cfg.env_weights.get(name, 1))
                )
        else:
            toolbox, tasks = agent_tasks(name, "train", pool, recipe.seed + 1)

            def new_tool_env(name: str = name, toolbox: Any = toolbox) -> Environment:
                return make_env(name, toolbox, [], cfg.max_turns)

            sources.append(TaskSource(name, tasks, new_tool_env, cfg.env_weights.get(name, 1)))
    if not sources:
        raise StacklabError("rl.envs names 'tasks' but data.tasks is empty")
    return sources


def share(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainders (ties: earlier first);
    equal weights give near-equal counts, the larger ones first."""
    whole = sum(weights)
    quotas = [total * w / whole for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


# --------------------------------------------------------------------------- one batch


@dataclass
class RolloutBatch:
    """Episodes of informative and dropped groups, flattened, with their group advantages."""

    episodes: list[Episode]
    env_names: list[str]
    advantages: Tensor  # [B]
    rewards: Tensor  # [B], shaped (with any overlong penalty)
    groups_sampled: int
    groups_dropped: int
    groups_uninformative: int


def collect(
    model: Transformer,
    tokenizer: Tokenizer,
    sources: list[TaskSource],
    cfg: RLConfig,
    seed: int,
    step: int,
) -> tuple[RolloutBatch, dict[str, list[Episode]]]:
    """Roll out one step's groups; return the training batch and every episode by env."""
    by_env: dict[str, list[Episode]] = defaultdict(list)
    kept_eps: list[Episode] = []
    kept_names: list[str] = []
    kept_rewards: list[Tensor] = []
    sampled = dropped = uninformative = 0
    max_len = min(cfg.max_turns * cfg.max_new_tokens, cfg.token_budget)
    device = model.embed.weight.device  # the sampler's generator lives there
    for i, (source, n_prompts) in enumerate(
        zip(sources, share(cfg.prompts_per_step, [s.weight for s in sources]), strict=True)
    ):
        if n_prompts == 0:
            continue
        have = 0
        for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            rng = random.Random(f"{seed}/{step}/{i}/{round_}")
            tasks = rng.sample(source.tasks, min(n_prompts - have, len(source.tasks)))
            group_tasks = [t for t in tasks for _ in range(cfg.group_size)]
            envs = [source.new_env() for _ in group_tasks]
            generator = torch.Generator(device).manual_seed(rng.getrandbits(62))
            episodes = rollout(
                model,
                tokenizer,
                envs,
                group_tasks,
                max_turns=cfg.max_turns,
                max_new_tokens=cfg.max_new_tokens,
                token_budget=cfg.token_budget,
                temperature=cfg.temperature,
                generator=generator,
            )
            by_env[source.name] += episodes
            rewards = torch.tensor([ep.reward for ep in episodes]).view(len(tasks), cfg.group_size)
            if cfg.overlong_buffer > 0:
                lengths = torch.tensor([sum(ep.mask) for ep in episodes]).view_as(rewards)
                rewards = rewards + overlong_penalty(
                    lengths, max_len, min(cfg.overlong_buffer, max_len)
                )
            informative = informative_groups(rewards)
            sampled += len(tasks)
            uninformative += int((~informative).sum())
            keep = informative if cfg.dynamic_sampling else torch.ones_like(informative)
            dropped += int((~keep).sum())
            for g in keep.nonzero().flatten().tolist():
                if have == n_prompts:
                    break
                kept_eps += episodes[g * cfg.group_size : (g + 1) * cfg.group_size]
                kept_names += [source.name] * cfg.group_size
                kept_rewards.append(rewards[g])
                have += 1
            if have == n_prompts:
                break
    if kept_rewards:
        rewards = torch.stack(kept_rewards)
        advantages = group_advantages(rewards, cfg.advantage_scale).flatten()
        flat = rewards.flatten()
    else:
        advantages = flat = torch.zeros(0)
    batch = RolloutBatch(kept_eps, kept_names, advantages, flat, sampled, dropped, uninformative)
    return batch, by_env


def pad_episodes(episodes: list[Episode]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded `inputs`, `targets` [B, L-1], the sampled-token `mask` of the targets, and
    the sampler's own log-probs laid out on it (0 elsewhere)."""
    width = max(len(ep.ids) for ep in episodes)
    ids = torch.full((len(episodes), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(episodes), width), dtype=torch.bool)
    sampler_logp = torch.zeros((len(episodes), width))
    for i, ep in enumerate(episodes):
        ids[i, : len(ep.ids)] = torch.tensor(ep.ids)
        mask[i, : len(ep.mask)] = torch.tensor(ep.mask)
        sampler_logp[i, mask[i]] = torch.tensor(ep.logprobs, dtype=torch.float32)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:], sampler_logp[:, 1:]


def token_logprobs(
    model: Transformer,
    inputs: Tensor,
    targets: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """log π(target | prefix) [B, T] at the sampling temperature, the token entropies [B, T],
    and the MoE aux loss. With `mask`, only those positions are scored (the others are 0):
    the output head and the softmax over the vocabulary then run on sampled tokens only."""
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    out = model(inputs, logits=mask)
    logp_all = F.log_softmax(out.logits.float() / temperature, dim=-1)  # [N, V]
    picked = logp_all.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    entropy_n = -(logp_all.exp() * logp_all).sum(-1)
    logp = targets.new_zeros(targets.shape, dtype=picked.dtype).masked_scatter(mask, picked)
    entropy = targets.new_zeros(targets.shape, dtype=entropy_n.dtype).masked_scatter(
        mask, entropy_n.detach()
    )
    return logp, entropy, out.aux_loss


BUCKET_WIDTH = 64  # episodes are scored in groups whose lengths round up to the same multiple


def length_buckets(lengths: Tensor, granularity: int = BUCKET_WIDTH) -> list[Tensor]:
    """Row indices grouped by `lengths` rounded up to `granularity`, shortest group first;
    rows of length 0 are left out."""
    rounded = (lengths + granularity - 1) // granularity
    return [(rounded == r).nonzero().squeeze(1) for r in rounded.unique().tolist() if r > 0]


def bucketed_logprobs(
    model: Transformer,
    inputs: Tensor,
    targets: Tensor,
    temperature: float,
    mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """`token_logprobs` of a right-padded batch, scored in groups of similar length.

    A batch mixes one-turn arithmetic episodes of ~30 tokens with tool episodes of ~300, and
    one forward pass pads them all to the longest. Scoring each `length_buckets` group at its
    own width skips nearly all of that padding: the same log-probs and entropies at every
    sampled position (a row's tokens never see another row's), in a fraction of the work
    (docs/benchmarks.md). The MoE aux loss is the groups' mean weighted by sampled tokens.
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    lengths = torch.where(mask, positions + 1, 0).amax(1)  # through the last sampled token
    logp = torch.zeros(targets.shape, device=targets.device)
    entropy = torch.zeros(targets.shape, device=targets.device)
    aux, counted = logp.new_zeros(()), mask.sum().clamp(min=1)
    for rows in length_buckets(lengths):
        width = int(lengths[rows].max())
        part = (inputs[rows, :width], targets[rows, :width], mask[rows, :width])
        lp, ent, part_aux = token_logprobs(model, *part[:2], temperature, part[2])
        logp = logp.index_put((rows,), F.pad(lp, (0, logp.shape[1] - width)))
        entropy[rows, :width] = ent
        aux = aux + part_aux * part[2].sum() / counted
    return logp, entropy, aux


def loss_kwargs(cfg: RLConfig) -> dict[str, Any]:
    """The clip settings of `cfg.loss` from the recipe; unset ones keep the loss's defaults."""
    kwargs: dict[str, Any] = {}
    if cfg.loss in ("grpo", "dr_grpo"):
        if cfg.eps_low is not None:
            kwargs["eps"] = cfg.eps_low
        if cfg.loss == "dr_grpo":
            kwargs["max_len"] = min(cfg.max_turns * cfg.max_new_tokens, cfg.token_budget)
        return kwargs
    if cfg.eps_low is not None:
        kwargs["eps_low"] = cfg.eps_low
    if cfg.eps_high is not None:
        kwargs["eps_high"] = cfg.eps_high
    elif cfg.loss == "cispo":
        kwargs["eps_high"] = CISPO_EPS_HIGH
    return kwargs


def update(
    model: Transformer,
    ref: Transformer | None,
    optimizer_step: OptimizerStep,
    batch: RolloutBatch,
    cfg: RLConfig,
    seed: int,
    step: int,
) -> dict[str, float]:
    """`epochs` passes of minibatch updates (`optimizer_step`) on the batch; the mean of each
    logged statistic."""
    device = model.embed.weight.device
    inputs, targets, mask, sampler_logp = (t.to(device) for t in pad_episodes(batch.episodes))
    advantages = batch.advantages.to(device)
    model.eval()  # no dropout exists, but be explicit: the old policy is scored as it sampled
    with torch.no_grad():
        old_logp, entropy, _ = bucketed_logprobs(model, inputs, targets, cfg.temperature, mask)
        ref_logp = (
            bucketed_logprobs(ref, inputs, targets, cfg.temperature, mask)[0] if ref else None
        )
    model.train()
    counted = mask.sum().clamp(min=1)
    stats: dict[str, list[float]] = defaultdict(list)
    stats["entropy"].append(float((entropy * mask).sum() / counted))
    stats["logprob_drift"].append(float(((old_logp - sampler_logp).abs() * mask).sum() / counted))
    loss_fn, kwargs = LOSSES[cfg.loss], loss_kwargs(cfg)
    order_gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    size = len(batch.episodes)
    for _ in range(cfg.epochs):
        order = torch.randperm(size, generator=order_gen)
        for start in range(0, size, cfg.minibatch_size):
            idx = order[start : start + cfg.minibatch_size]
            if not mask[idx].any():
                continue  # episodes cut off before their first sampled token
            width = int(mask[idx].any(0).nonzero().max()) + 1  # trim common right padding
            mb = (inputs[idx, :width], targets[idx, :width], mask[idx, :width])
            logp, _, aux = bucketed_logprobs(model, mb[0], mb[1], cfg.temperature, mb[2])
            loss, loss_stats = loss_fn(
                logp, old_logp[idx, :width], advantages[idx], mb[2], **kwargs
            )
            total = loss + aux
            if ref_logp is not None:
                kl = kl_k3(logp, ref_logp[idx, :width], mb[2])
                total = total + cfg.kl_coef * kl
                stats["kl_ref"].append(kl.item())
            total.backward()
            stats["grad_norm"].append(float(optimizer_step(total)))
            stats["loss"].append(loss.item())
            stats["kl_old"].append(float(kl_k3(logp.detach(), old_logp[idx, :width], mb[2])))
            for key, value in loss_stats.items():
                stats[key].append(float(value))
    return {key: sum(v) / len(v) for key, v in stats.items()}


def episode_stats(batch: RolloutBatch, by_env: dict[str, list[Episode]]) -> dict[str, float]:
    """Reward, accuracy per env, lengths, turns and tool calls of one step's rollouts."""
    every = [ep for eps in by_env.values() for ep in eps]
    record: dict[str, float] = {
        "reward": sum(ep.reward for ep in every) / len(every),
        "resp_len": sum(sum(ep.mask) for ep in every) / len(every),
        "turns": sum(ep.turns for ep in every) / len(every),
        "tool_calls": sum(ep.tool_calls for ep in every) / len(every),
        "truncated_frac": sum(ep.truncated for ep in every) / len(every),
        "dropped_frac": batch.groups_dropped / max(1, batch.groups_sampled),
        "uninformative_frac": batch.groups_uninformative / max(1, batch.groups_sampled),
        "episodes_trained": len(batch.episodes),
    }
    for name, eps in by_env.items():
        record[f"acc/{name}"] = sum(ep.reward > 0 for ep in eps) / len(eps)
    return record


# --------------------------------------------------------------------------- the loop


def rl_optim(cfg: RLConfig) -> OptimConfig:
    return OptimConfig(
        name="adamw",
        lr=cfg.lr,
        weight_decay=0.0,
        grad_clip=cfg.grad_clip,
        schedule="constant",
        warmup_steps=cfg.warmup_steps,
    )


def train_rl(recipe: Recipe, tokenizer: Tokenizer, base: Path, work_dir: Path) -> Metrics:
    """RL from the model in `base`; checkpoints, `metrics.jsonl` and `final/` in `work_dir`."""
    cfg = recipe.rl
    world = D.single_process("rl")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(base).to(world.device)
    if cfg.token_budget > model.cfg.max_seq_len:
        raise StacklabError(
            f"rl.token_budget ({cfg.token_budget}) exceeds model.max_seq_len "
            f"({model.cfg.max_seq_len})"
        )
    ref = None
    if cfg.kl_coef > 0:
        ref = load_model(base).to(world.device).eval().requires_grad_(False)
    sources = task_sources(recipe)
    seed_everything(recipe.seed)  # the random states checkpoints save: the same in every process
    optim_cfg = rl_optim(cfg)
    optimizer = build_optimizer(model, optim_cfg)
    updates_per_step = cfg.epochs * -(-cfg.prompts_per_step * cfg.group_size // cfg.minibatch_size)
    scheduler = build_scheduler(optimizer, cfg.steps * updates_per_step, optim_cfg)
    module = RLModule(model, ref, tokenizer, sources, cfg, recipe.seed)
    loop = Loop(cfg.steps, 1, cfg.ckpt_every, cfg.grad_clip)  # every RL step is logged
    trainer = Trainer(
        module, model, optimizer, scheduler, loop, work_dir=work_dir, world=world, recipe=recipe
    )
    return summary(trainer.fit(), cfg)


class RLModule(TrainModule):
    """RL's step: roll out a batch (`collect`), then `epochs` passes of minibatch updates."""

    name = "rl"
    hint = "lower rl.lr"

    def __init__(
        self,
        model: Transformer,
        ref: Transformer | None,
        tokenizer: Tokenizer,
        sources: list[TaskSource],
        cfg: RLConfig,
        seed: int,
    ) -> None:
        self.model, self.ref, self.tokenizer, self.sources = model, ref, tokenizer, sources
        self.cfg, self.seed = cfg, seed
        self._record: dict[str, float] = {}

    def step(self, step: int, optimizer_step: OptimizerStep) -> None:
        t0 = time.perf_counter()
        batch, by_env = collect(self.model, self.tokenizer, self.sources, self.cfg, self.seed, step)
        t1 = time.perf_counter()
        record = episode_stats(batch, by_env)
        record["lr"] = optimizer_step.scheduler.get_last_lr()[0]  # at this step's first update
        if batch.episodes:
            record.update(
                update(self.model, self.ref, optimizer_step, batch, self.cfg, self.seed, step)
            )
        record["sample_seconds"] = t1 - t0
        record["update_seconds"] = time.perf_counter() - t1
        self._record = record

    def record(self) -> dict[str, float]:
        return self._record

    def describe(self, record: dict[str, float]) -> str:
        accs = " ".join(f"{k[4:]} {v:.2f}" for k, v in record.items() if k.startswith("acc/"))
        return f"rl reward {record['reward']:.2f} · {accs}"


def summary(run: TrainRun, cfg: RLConfig) -> Metrics:
    records = run.records
    metrics: Metrics = {
        "rl/first_reward": run.first("reward"),
        "rl/final_reward": run.final("reward"),
        "rl/final_entropy": run.final("entropy"),
        "rl/dropped_frac": mean_of(records, "dropped_frac"),
        "rl/steps": cfg.steps,
        "rl/seconds": round(run.seconds, 3),
        "rl/sample_seconds": round(sum(r.get("sample_seconds", 0.0) for r in records), 3),
        "rl/update_seconds": round(sum(r.get("update_seconds", 0.0) for r in records), 3),
    }
    for key in sorted({k for r in records for k in r if k.startswith("acc/")}):
        metrics[f"rl/first_{key}"] = run.first(key)
        metrics[f"rl/final_{key}"] = run.final(key)
    return metrics


# --------------------------------------------------------------------------- the stage


def run_rl(ctx: StageContext) -> Metrics:
    if not ctx.recipe.rl.enabled:
        return {}
    tokenizer = load_tokenizer(ctx.inputs["tokenizer"])
    base = final_model_dir(ctx.inputs, ("sft", "pretrain"))
    metrics = train_rl(ctx.recipe, tokenizer, base, ctx.out)
    shutil.rmtree(ctx.out / "checkpoints", ignore_errors=True)
    return metrics


def rl_config(recipe: Recipe) -> dict[str, Any]:
    if not recipe.rl.enabled:
        return {"enabled": False}
    return {
        "rl": recipe.rl.model_dump(mode="json"),
        "tasks": [t.model_dump(mode="json") for t in recipe.data.tasks],
        "seed": recipe.seed,
    }


RL_STAGE = Stage("rl", 1, ("tokenizer", "pretrain", "sft"), rl_config, run_rl, resumable=True)
