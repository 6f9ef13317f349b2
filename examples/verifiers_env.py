"""A verifiers (>= 0.4) environment that stacklab trains on: the tiny model's arithmetic.

Each task is one of stacklab's arithmetic problems (`data.tasks`' generator, its own train and
eval splits), asked as verifiers asks it: a system prompt, optional few-shot turns, then the
problem. The rubric is the task's two `@vf.reward` methods: `exact` (1.0 for exactly the
answer) and `digits` (weight 0.1: the share of the reply that is digits, a format reward that
separates wrong answers from non-answers).

Train on it with stacklab RL, naming this file in the recipe:

    rl:
      enabled: true
      envs: ["verifiers:examples/verifiers_env.py:load_environment"]

or build the taskset in Python and hand it over: `load_environment(split="eval")` is an
ordinary `vf.Taskset`. `load_environment` takes `split`, so stacklab asks it for its train and
eval tasks; a factory without one is split by task hash.
"""

from __future__ import annotations

from collections.abc import Iterator

import verifiers.v1 as vf

from stacklab.data.tasks import ArithmeticGenerator, Split
from stacklab.recipe import ArithmeticTask

SYSTEM = None  # the tiny model was fine-tuned without one; set a string to send one


class ArithmeticData(vf.TaskData):
    answer: str


class ArithmeticTaskVF(vf.Task[ArithmeticData]):
    @vf.reward
    async def exact(self, task: ArithmeticData, trace: vf.Trace) -> float:
        return float(trace.last_reply == task.answer)

    @vf.reward(weight=0.1)
    async def digits(self, trace: vf.Trace) -> float:
        reply = trace.last_reply
        return sum(c.isdigit() for c in reply) / len(reply) if reply else 0.0


class ArithmeticConfig(vf.TasksetConfig):
    split: Split = "train"
    n: int | None = None  # problems of the split; None: 60 train, 16 eval (of ~80 and ~20)
    seed: int = 0
    max_digits: int = 1
    few_shot: int = 0  # solved problems before the question, as user/assistant turns


class ArithmeticTaskset(vf.Taskset[ArithmeticTaskVF, ArithmeticConfig]):
    def load(self) -> Iterator[ArithmeticTaskVF]:
        cfg = self.config
        gen = ArithmeticGenerator(
            ArithmeticTask(ops=["+"], min_digits=1, max_digits=cfg.max_digits, eval_fraction=0.2)
        )
        shots = [
            message
            for p in gen.problems("train", cfg.few_shot, cfg.seed + 1)
            for message in (vf.UserMessage(content=p.prompt), vf.AssistantMessage(content=p.answer))
        ]
        n = cfg.n if cfg.n is not None else (60 if cfg.split == "train" else 16)
        for p in gen.problems(cfg.split, n, cfg.seed):
            prompt = [*shots, vf.UserMessage(content=p.prompt)] if shots else p.prompt
            data = ArithmeticData(prompt=prompt, system_prompt=SYSTEM, answer=p.answer, id=p.key)
            yield ArithmeticTaskVF(data, cfg.task)


def load_environment(split: Split = "train", **kwargs: object) -> ArithmeticTaskset:
    """The taskset of `split` (stacklab passes "train" or "eval")."""
    return ArithmeticTaskset(ArithmeticConfig(split=split, **kwargs))


__all__ = ["ArithmeticTaskset", "load_environment"]
