"""Objectives measured by playing episodes: chat-format task accuracy, pass@k, agent success.

A post-trained model answers in the chat format, so its task accuracy is measured the way RL
trains it: one user turn in a `TaskEnv` of the held-out split, graded by the task's strict
`verify` on the reply's content. Agent environments (`envs/suite.py`) are played on their
held-out tasks with every tool live, greedily, up to the turn and token limits:
`agent_success/<env>` is the share of episodes whose final `Answer: X` is exactly right, next
to the mean turns, tool calls and malformed tool calls per episode.

pass@k samples `n` answers per problem at a temperature and applies the unbiased estimator to
the count of correct ones; greedy accuracy and pass@1 differ (one is the mode, the other the
mean of the sampling distribution), and RL typically moves pass@1 towards pass@k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from stacklab.data.tasks import Problem, make_generator
from stacklab.data.tokenizer import EOT_ID
from stacklab.envs.rollout import Episode, rollout
from stacklab.envs.suite import agent_tasks, make_env
from stacklab.envs.tasks_env import TaskEnv
from stacklab.evals.objectives import Graded, encode_prompts, pass_at_k
from stacklab.model.generation import generate
from stacklab.model.transformer import Transformer
from stacklab.recipe import EvalConfig, TaskConfig

CHUNK = 64  # episodes rolled out together


def _rollout_chunks(
    model: Transformer,
    tokenizer: Tokenizer,
    envs: list,
    tasks: list,
    *,
    max_turns: int,
    max_new_tokens: int,
    token_budget: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[Episode]:
    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    episodes: list[Episode] = []
    for start in range(0, len(envs), CHUNK):
        episodes += rollout(
            model,
            tokenizer,
            envs[start : start + CHUNK],
            tasks[start : start + CHUNK],
            max_turns=max_turns,
            max_new_tokens=max_new_tokens,
            token_budget=token_budget,
            temperature=temperature,
            generator=generator,
        )
    return episodes


def _reply(episode: Episode) -> str:
    replies = [m for m in episode.messages if m["role"] == "assistant"]
    return replies[-1]["content"] if replies else ""


def grade_chat_tasks(
    model: Transformer,
    tokenizer: Tokenizer,
    task_cfgs: list[TaskConfig],
    n: int,
    seed: int,
    max_new_tokens: int,
) -> list[Graded]:
    """Greedy one-turn chat answers to `n` held-out problems of each task, graded strictly."""
    graded: list[Graded] = []
    for cfg in task_cfgs:
        gen = make_generator(cfg)
        problems = gen.problems("eval", n, seed)
        envs = [TaskEnv(gen, "eval") for _ in problems]
        budget = model.cfg.max_seq_len
        episodes = _rollout_chunks(
            model,
            tokenizer,
            envs,
            problems,
            max_turns=1,
            max_new_tokens=min(max_new_tokens, budget - 1),
            token_budget=budget,
        )
        for problem, ep in zip(problems, episodes, strict=True):
            # A reply cut off before <|im_end|> scores 0, but its text is still worth keeping.
            sampled = [t for t, m in zip(ep.ids, ep.mask, strict=True) if m]
            text = _reply(ep) if not ep.truncated else tokenizer.decode(sampled, False)
            graded.append(Graded(problem, text, ep.reward > 0))
    return graded


def _sampled_correct(
    model: Transformer,
    tokenizer: Tokenizer,
    cfg: TaskConfig,
    problems: list[Problem],
    samples: int,
    chat: bool,
    eval_cfg: EvalConfig,
    seed: int,
) -> list[int]:
    """How many of `samples` sampled answers to each problem are correct."""
    gen = make_generator(cfg)
    repeated = [p for p in problems for _ in range(samples)]
    if chat:
        envs = [TaskEnv(gen, "eval") for _ in repeated]
        episodes = _rollout_chunks(
            model,
            tokenizer,
            envs,
            repeated,
            max_turns=1,
            max_new_tokens=eval_cfg.max_new_tokens,
            token_budget=model.cfg.max_seq_len,
            temperature=eval_cfg.pass_k_temperature,
            seed=seed,
        )
        correct = [ep.reward > 0 for ep in episodes]
    else:
        generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
        correct = []
        for start in range(0, len(repeated), CHUNK):
            chunk = repeated[start : start + CHUNK]
            outs = generate(
                model,
                encode_prompts(tokenizer, [p.prompt for p in chunk]),
                eval_cfg.max_new_tokens,
                temperature=eval_cfg.pass_k_temperature,
                stop_ids=(EOT_ID,),
                generator=generator,
            )
            for p, out in zip(chunk, outs, strict=True):
                text = tokenizer.decode(out.tokens, skip_special_tokens=False)
                correct.append(gen.verify(p, text))
    return [sum(correct[i * samples : (i + 1) * samples]) for i in range(len(problems))]


def pass_at_k_metrics(
    model: Transformer,
    tokenizer: Tokenizer,
    task_cfgs: list[TaskConfig],
    eval_cfg: EvalConfig,
    seed: int,
    chat: bool,
) -> dict[str, float]:
    """`pass@<k>/<task>` for every k of `eval.pass_k`, from `pass_k_samples` per problem."""
    metrics: dict[str, float] = {}
    n = eval_cfg.pass_k_samples
    for cfg in task_cfgs:
        problems = make_generator(cfg).problems("eval", eval_cfg.pass_k_problems, seed)
        counts = _sampled_correct(model, tokenizer, cfg, problems, n, chat, eval_cfg, seed)
        for k in eval_cfg.pass_k:
            value = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
            metrics[f"pass@{k}/{cfg.kind}"] = round(value, 6)
    return metrics


@dataclass
class AgentResult:
    env: str
    episodes: list[Episode]
    answers: list[str]  # the reference answer of each episode

    def metrics(self) -> dict[str, float]:
        n = len(self.episodes)
        errors = sum(int(ep.info.get("tool_errors", 0)) for ep in self.episodes)
        return {
            f"agent_success/{self.env}": round(sum(ep.reward > 0 for ep in self.episodes) / n, 6),
            f"agent_turns/{self.env}": round(sum(ep.turns for ep in self.episodes) / n, 4),
            f"agent_tool_calls/{self.env}": round(
                sum(ep.tool_calls for ep in self.episodes) / n, 4
            ),
            f"agent_tool_errors/{self.env}": round(errors / n, 4),
            f"agent_truncated/{self.env}": round(sum(ep.truncated for ep in self.episodes) / n, 4),
        }


def run_agents(
    model: Transformer, tokenizer: Tokenizer, cfg: EvalConfig, seed: int
) -> list[AgentResult]:
    """Every env of `eval.agent_envs` played greedily on its held-out tasks."""
    results = []
    budget = min(cfg.agent_token_budget, model.cfg.max_seq_len)
    for name in cfg.agent_envs:
        toolbox, tasks = agent_tasks(name, "eval", cfg.agent_tasks, seed)
        envs = [make_env(name, toolbox, tasks, cfg.agent_max_turns) for _ in tasks]
        episodes = _rollout_chunks(
            model,
            tokenizer,
            envs,
            tasks,
            max_turns=cfg.agent_max_turns,
            max_new_tokens=min(cfg.agent_max_new_tokens, budget - 1),
            token_budget=budget,
        )
        results.append(AgentResult(name, episodes, [t.answer for t in tasks]))
    return results
