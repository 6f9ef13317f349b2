"""Tasksets of Prime Intellect's `verifiers` (0.4+, the `verifiers.v1` API) as stacklab envs.

A recipe names one in `rl.envs` (and the evaluation in `eval.agent_envs`) as `verifiers:SPEC`:

* `verifiers:ID`: an installed verifiers taskset package, loaded as verifiers loads it
  (`vf.load_taskset` with the taskset's own config class at its defaults);
* `verifiers:pkg.module:ATTR` or `verifiers:path/to/file.py:ATTR`: `ATTR` is a `vf.Taskset`
  (or a single-agent `vf.Env`) built in Python, a `Taskset` subclass (built with its config's
  defaults), or a function returning either, called with `split="train"` / `split="eval"`
  when it takes a `split` parameter and with no arguments otherwise (a relative file path is
  read from the working directory).

An episode is one turn, played by stacklab's own sampler, in stacklab's chat format:

* **Opening**: the task's `system_prompt` as a system message, then its `prompt` (a string
  becomes one user message; a list of messages, few-shot turns included, is kept in order),
  which is how verifiers' own chat harness opens a conversation.
* **Reward**: the reply's content goes into a `vf.Trace` (the opening, then the reply as a
  sampled assistant message) and the task's own `Task.score` runs on it with no runtime, as
  `vf replay` re-scores a trace offline: every `@vf.reward` method and config-plugged reward
  is called, and the reward is their weighted sum (`trace.reward`); the scores of each reward
  and metric go in `info`. No model client, sandbox or network is involved.
* **Stacklab's conventions hold**: a reply with a tool call (there are no tools) or a broken
  tool-call block is malformed and earns 0 without scoring, and a reward function that raises
  ends that episode with reward 0 and the error in `info["error"]` (see `envs/base.py`),
  logged once per env, instead of stopping the batch.

**Splits.** A factory that takes `split` makes its own train and eval tasks. Otherwise a task
is held out iff the hash of its `Task.key` falls below `EVAL_FRACTION`, the rule stacklab's
own tasks follow, so training and evaluation never share a task.

**Not supported** (refused when the env loads, with a one-line error naming it): tools
(`Task.toolsets`, `Taskset.toolsets`), tasks that need a container (`NEEDS_CONTAINER`) or a
runtime to score (a reward or metric with a required `runtime` parameter), LLM judges
(`TaskConfig.judges`), sync reward functions (verifiers awaits them), tasks with no prompt
(the user opens), image content, prompts with tool calls or tool messages, and any `vf.Env`
other than the single-agent one (multi-agent, user simulation, OpenEnv, ...): verifiers plays
those through a harness program talking to a served model, not turn by turn.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import random
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from stacklab.data.chat import parse_assistant
from stacklab.data.mixture import is_heldout
from stacklab.data.tasks import Split
from stacklab.envs.base import Environment, Message, StepResult
from stacklab.errors import StacklabError

PREFIX = "verifiers:"
EVAL_FRACTION = 0.2  # share of a split-less taskset's tasks held out for evaluation
READ_LIMIT = 1_000_000  # tasks read at most from an infinite taskset
CHUNK = 64  # episodes rolled out together by `evaluate_env`

logger = logging.getLogger(__name__)


class VerifiersEnvError(StacklabError):
    """A verifiers env that cannot be loaded or uses what the adapter does not support."""


def is_verifiers_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _vf(name: str) -> Any:
    try:
        import verifiers.v1 as vf
    except ImportError as e:
        raise VerifiersEnvError(
            f"env {name!r} needs the verifiers package (>= 0.4): pip install 'stacklab[envs]' "
            f"({type(e).__name__}: {e})"
        ) from None
    return vf


@dataclass
class VerifiersTask:
    """One verifiers task with its opening messages in stacklab's chat format."""

    task: Any  # the vf.Task
    opening: list[Message]
    question: str  # the last opening message's text
    answer: str  # the task data's `answer`, if it has one ("" otherwise)


@functools.cache
def _file_module(path: str) -> Any:
    """A standalone .py file as a module, once per resolved path (as verifiers does)."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"no file {path}")
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(f"_stacklab_vf_{resolved.stem}_{tag}", resolved)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pydantic look their module up
    spec.loader.exec_module(module)
    return module


def import_target(target: str) -> Any:
    """The module of a `pkg.module` or `path/to/file.py` target (a file: once per path)."""
    return _file_module(target) if target.endswith(".py") else importlib.import_module(target)


def _build(name: str, spec: str, split: Split, vf: Any) -> tuple[Any, bool]:
    """The object `spec` names, and whether it made `split`'s tasks itself."""
    if ":" not in spec:
        config = vf.taskset_config_type(spec)(id=spec)
        if vf.environment_class(spec) is not vf.SingleAgentEnv:
            raise VerifiersEnvError(
                f"env {name!r}: taskset {spec!r} comes with its own vf.Env "
                f"({vf.environment_class(spec).__name__}), which is not supported: only "
                "single-agent, single-turn tasksets are"
            )
        return vf.load_taskset(config), False
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ValueError(f"expected MODULE:ATTR or FILE.py:ATTR after {PREFIX!r}, got {spec!r}")
    obj = getattr(import_target(target), attr)
    if isinstance(obj, type) and issubclass(obj, vf.Taskset):
        from verifiers.v1.utils.generic import concrete_type

        config_cls = concrete_type(obj, vf.TasksetConfig, origin=vf.Taskset) or vf.TasksetConfig
        return obj(config_cls()), False
    if callable(obj) and not isinstance(obj, vf.Taskset | vf.Env):
        if "split" in inspect.signature(obj).parameters:
            return obj(split=split), True
        return obj(), False
    return obj, False


def load_taskset(name: str, split: Split) -> tuple[Any, bool]:
    """The `vf.Taskset` env `name` names, and whether it is `split`'s own (not to be split)."""
    spec = name.removeprefix(PREFIX)
    if not is_verifiers_name(name) or not spec:
        raise VerifiersEnvError(f"env {name!r}: expected {PREFIX}ID or {PREFIX}MODULE:ATTR")
    vf = _vf(name)
    try:
        obj, own_split = _build(name, spec, split, vf)
    except VerifiersEnvError:
        raise
    except Exception as e:
        raise VerifiersEnvError(
            f"env {name!r} does not resolve: {type(e).__name__}: {_one_line(e)}"
        ) from None
    if isinstance(obj, vf.Env):
        if type(obj).run is not vf.SingleAgentEnv.run:
            raise VerifiersEnvError(
                f"env {name!r} is a {type(obj).__name__} with its own run() (multi-agent, user "
                "simulation, OpenEnv, ...), which is not supported: only single-agent, "
                "single-turn tasksets are"
            )
        obj = obj.taskset
    if not isinstance(obj, vf.Taskset):
        raise VerifiersEnvError(
            f"env {name!r} gave a {type(obj).__name__}, not a vf.Taskset or single-agent vf.Env"
        )
    tools = obj.toolsets(obj.config)
    if tools:
        raise VerifiersEnvError(
            f"env {name!r}: taskset tools ({', '.join(type(t).__name__ for t in tools)}) are "
            "not supported"
        )
    return obj, own_split


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _requires_runtime(fn: Any) -> bool:
    param = inspect.signature(fn).parameters.get("runtime")
    return param is not None and param.default is inspect.Parameter.empty


def _content(name: str, content: Any, vf: Any) -> str:
    if isinstance(content, str):
        return content
    if any(not isinstance(part, vf.TextContentPart) for part in content or []):
        raise VerifiersEnvError(f"env {name!r}: image content is not supported")
    return "\n".join(part.text for part in content or [])  # as vf's content_text joins


def opening_messages(name: str, data: Any, vf: Any) -> list[Message]:
    """The task's opening as verifiers' chat harness sends it: system prompt, then prompt."""
    if data.prompt is None:
        raise VerifiersEnvError(
            f"env {name!r}: a task with no prompt (the user opens) is not supported"
        )
    messages: list[Message] = []
    if data.system_prompt:
        messages.append({"role": "system", "content": data.system_prompt})
    if isinstance(data.prompt, str):
        return [*messages, {"role": "user", "content": data.prompt}]
    for message in data.prompt:
        if message.role == "tool" or getattr(message, "tool_calls", None):
            raise VerifiersEnvError(
                f"env {name!r}: prompts with tool calls or tool messages are not supported"
            )
        messages.append({"role": message.role, "content": _content(name, message.content, vf)})
    return messages


class VerifiersSource:
    """A loaded verifiers taskset: its tasks by split, and the scoring of a reply."""

    def __init__(self, name: str, taskset: Any, own_split: bool = False) -> None:
        self.vf = _vf(name)
        self.name = name
        self.taskset = taskset
        self.own_split = own_split
        self._checked: set[type] = set()
        self._warned = False

    def _check(self, task: Any) -> None:
        """Refuse, once per task class, what single-turn offline scoring cannot do."""
        cls = type(task)
        if cls in self._checked:
            return
        problem = None
        if cls.NEEDS_CONTAINER:
            problem = f"{cls.__name__} needs a container"
        elif tools := cls.toolsets(task.config):
            problem = f"task tools ({', '.join(type(t).__name__ for t in tools)})"
        elif task.config.judges:
            problem = "LLM judges (TaskConfig.judges)"
        else:
            rewards = task.hooks("reward")
            hooks = (*task.hooks("metric"), *rewards)
            needs = [f.__name__ for f in hooks if _requires_runtime(f)]
            sync = [f.__name__ for f in hooks if not inspect.iscoroutinefunction(inspect.unwrap(f))]
            if needs:
                problem = f"scoring that needs a runtime ({', '.join(sorted(needs))})"
            elif sync:
                problem = (
                    f"a sync reward or metric ({', '.join(sorted(sync))}; verifiers awaits them)"
                )
            elif not rewards:
                problem = f"{cls.__name__} has no @vf.reward, so every reward would be 0"
        if problem is not None:
            raise VerifiersEnvError(f"env {self.name!r}: {problem} is not supported")
        self._checked.add(cls)

    def _wrap(self, task: Any) -> VerifiersTask:
        self._check(task)
        opening = opening_messages(self.name, task.data, self.vf)
        answer = getattr(task.data, "answer", None)
        return VerifiersTask(
            task, opening, opening[-1]["content"], "" if answer is None else str(answer)
        )

    def _read(self, split: Split, n: int) -> Iterator[Any]:
        """The tasks of `split`, in the taskset's order (at most `n` from an infinite one)."""
        found = 0
        for i, task in enumerate(self.taskset):
            if self.taskset.INFINITE and (found >= n or i >= READ_LIMIT):
                return
            if self.own_split or is_heldout(f"verifiers/{task.key}", EVAL_FRACTION) == (
                split == "eval"
            ):
                found += 1
                yield task

    def tasks(self, split: Split, n: int, seed: int) -> list[VerifiersTask]:
        """At most `n` tasks of `split`, drawn by `seed` when there are more."""
        try:
            tasks = list(self._read(split, n))
        except Exception as e:
            raise VerifiersEnvError(
                f"env {self.name!r}: loading its tasks failed: {type(e).__name__}: {_one_line(e)}"
            ) from None
        if not tasks:
            raise VerifiersEnvError(
                f"env {self.name!r} has no {split} tasks (a factory without a `split` "
                f"parameter has {EVAL_FRACTION:.0%} of its tasks held out by hash)"
            )
        if len(tasks) > n:
            tasks = random.Random(seed).sample(tasks, n)
        return [self._wrap(task) for task in tasks]

    def trace(self, task: VerifiersTask, reply: str) -> Any:
        """A finished one-turn `vf.Trace` of `task`: the opening, then `reply` as sampled."""
        vf = self.vf
        from verifiers.v1.graph import MessageNode
        from verifiers.v1.state import state_cls

        t = task.task
        trace = vf.Trace(
            task=vf.TraceTask(type=type(t).__name__, data=t.data, key=t.key, hash=t.hash),
            agent=vf.AgentInfo(config=vf.AgentConfig(), name="stacklab"),
            state=state_cls(type(t))(),
        )
        messages = [
            *(self._vf_message(m) for m in task.opening),
            vf.AssistantMessage(content=reply),
        ]
        for i, message in enumerate(messages):
            trace.nodes.append(
                MessageNode(
                    parent=i - 1 if i else None,
                    message=message,
                    sampled=i == len(messages) - 1,
                )
            )
        trace.stop("agent_completed")
        trace.ok = True
        return trace

    def _vf_message(self, message: Message) -> Any:
        kinds = {
            "system": self.vf.SystemMessage,
            "user": self.vf.UserMessage,
            "assistant": self.vf.AssistantMessage,
        }
        return kinds[message["role"]](content=message["content"])

    def score(self, task: VerifiersTask, reply: str) -> tuple[float, dict[str, Any]]:
        """The task's reward for `reply` and the scores of each reward and metric; raises
        (naming the env) when a reward function fails."""
        trace = self.trace(task, reply)
        try:
            _run(task.task.score(trace))
            unscored = sorted(k for k, v in trace.rewards.items() if v is None)
            if unscored:
                raise RuntimeError(f"rewards {unscored} were not scored")
        except Exception as e:
            if not self._warned:
                self._warned = True
                logger.warning("verifiers env %r: scoring failed, reward 0: %s", self.name, e)
            raise RuntimeError(f"verifiers env {self.name!r}: {_one_line(e)}") from e
        rewards = {k: v.score for k, v in trace.rewards.items() if v is not None}
        return trace.reward, {"rewards": rewards, "metrics": dict(trace.metrics)}


def _run(coro: Any) -> Any:
    """Run a coroutine to completion, also from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class VerifiersEnv(Environment):
    """One verifiers task, one reply, reward = the task's rubric (`Task.score`)."""

    max_turns = 1

    def __init__(self, source: VerifiersSource, tasks: Sequence[VerifiersTask] = ()) -> None:
        self.source = source
        self.tasks = list(tasks)
        self.task: VerifiersTask | None = None

    def reset(self, task: VerifiersTask | int) -> list[Message]:
        """Start on `task`: a task, or an index into this env's tasks (taken modulo)."""
        self.task = task if isinstance(task, VerifiersTask) else self.tasks[task % len(self.tasks)]
        return [dict(m) for m in self.task.opening]

    def _step(self, assistant_text: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("step before reset")
        turn = parse_assistant(assistant_text)
        info: dict[str, Any] = {"answer": self.task.answer}
        if turn.tool_calls or turn.errors:
            return StepResult([], True, 0.0, {**info, "malformed": True})
        reward, scores = self.source.score(self.task, turn.content)
        return StepResult([], True, reward, {**info, "malformed": False, **scores})


# --------------------------------------------------------------------------- suite, evaluation


def verifiers_tasks(
    name: str, split: Split, n: int, seed: int
) -> tuple[VerifiersSource, list[VerifiersTask]]:
    """`suite.agent_tasks` for a `verifiers:` env: its source and `n` tasks of `split`."""
    source = VerifiersSource(name, *load_taskset(name, split))
    return source, source.tasks(split, n, seed)


@dataclass
class VerifiersResult:
    env: str
    episodes: list[Any]  # rollout Episodes
    answers: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


def evaluate_env(
    model: Any,
    tokenizer: Tokenizer,
    name: str,
    *,
    n: int = 100,
    seed: int = 0,
    max_new_tokens: int = 48,
    token_budget: int | None = None,
    temperature: float = 0.0,
) -> VerifiersResult:
    """Play `n` held-out tasks of env `name` (greedy by default) and report the rubric:
    `agent_reward/<name>` (mean reward, unscored episodes as 0), `agent_success/<name>` (share
    of reward > 0), `agent_reward/<name>/<fn>` per reward function, `agent_truncated/<name>`."""
    from stacklab.envs.rollout import rollout

    source, tasks = verifiers_tasks(name, "eval", n, seed)
    budget = min(token_budget or model.cfg.max_seq_len, model.cfg.max_seq_len)
    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    episodes = []
    for start in range(0, len(tasks), CHUNK):
        chunk = tasks[start : start + CHUNK]
        episodes += rollout(
            model,
            tokenizer,
            [VerifiersEnv(source) for _ in chunk],
            chunk,
            max_turns=1,
            max_new_tokens=min(max_new_tokens, budget - 1),
            token_budget=budget,
            temperature=temperature,
            generator=generator,
        )
    count = len(episodes)
    metrics = {
        f"agent_reward/{name}": round(sum(ep.reward for ep in episodes) / count, 6),
        f"agent_success/{name}": round(sum(ep.reward > 0 for ep in episodes) / count, 6),
        f"agent_truncated/{name}": round(sum(ep.truncated for ep in episodes) / count, 4),
    }
    fns = {f.__name__ for f in tasks[0].task.hooks("reward")}
    fns = sorted(fns | {k for ep in episodes for k in ep.info.get("rewards", {})})
    for fn in fns:
        total = sum(ep.info.get("rewards", {}).get(fn, 0.0) for ep in episodes)
        metrics[f"agent_reward/{name}/{fn}"] = round(total / count, 6)
    return VerifiersResult(name, episodes, [t.answer for t in tasks], metrics)
