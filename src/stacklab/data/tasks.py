"""Synthetic tasks whose answers a program can check.

A task with a programmatic answer is useful at every stage of the stack: its rendered text is
pretraining data, its prompts become SFT conversations and RL episodes (the reward is
`verify`), and its held-out problems measure accuracy. All of those users go through the same
small interface, `TaskGenerator`, so a new task kind is one class and one registry entry.

Two rules keep the numbers honest:

* **Held-out problems never reach training.** A problem is in the `eval` split iff the sha256
  of `"<kind>:<key>"`, read as a number in [0, 1), is below the task's `eval_fraction`. The
  split is a pure function of the problem, so train and eval cannot overlap, whatever seed or
  sampler produced them, on any machine.
* **Grading is strict.** `verify` reads the answer from a fixed format at the very start of
  the completion; anything else scores zero, and it never raises, whatever the model wrote.

Arithmetic format (no spaces; digits are tokenized one per token):

    prompt  "123*45="      answer  "5535"      rendered text  "123*45=5535"
    prompt  "7-80="        answer  "-73"

Operands are non-negative integers without leading zeros, the operator is one of `+ - *`, and
the answer is the exact integer result (negative for some subtractions). A completion is
correct iff it is: optional ASCII whitespace, then exactly the answer's digits (`-?[0-9]+`,
so no `+`, no leading zeros, no Unicode digits), then the end of the text or whitespace.
The rendered text has no trailing newline: the document-boundary token that follows it in the
training stream is what teaches the model to stop.
"""

from __future__ import annotations

import operator
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from stacklab.data.documents import Document
from stacklab.data.mixture import is_heldout
from stacklab.errors import DataError
from stacklab.recipe import ArithmeticTask, TaskConfig

Split = Literal["train", "eval"]

# `problems()` gives up after this many draws in a row that yield nothing new. A split that
# still has unseen problems is found long before that unless those problems are vanishingly
# rare under the sampler (asking for nearly all of a large, skewed problem space).
_MAX_FRUITLESS_DRAWS = 100_000


@dataclass(frozen=True)
class Problem:
    task: str  # the task kind, e.g. "arithmetic"
    key: str  # canonical text of the problem, unique within its kind, e.g. "123*45"
    prompt: str  # what the model reads, e.g. "123*45="
    answer: str  # the reference answer in canonical form, e.g. "5535"


class TaskGenerator(ABC):
    """A family of problems: sampling, the held-out split, rendering and grading."""

    kind: ClassVar[str]
    eval_fraction: float

    @abstractmethod
    def sample(self, rng: random.Random) -> Problem:
        """One problem from either split, drawn with `rng`."""

    @abstractmethod
    def space_size(self) -> int:
        """How many distinct problems exist (both splits together)."""

    @abstractmethod
    def parse_answer(self, completion: str) -> str | None:
        """The answer at the start of `completion` in this task's format, or None."""

    def split_of(self, problem: Problem) -> Split:
        return "eval" if is_heldout(f"{self.kind}:{problem.key}", self.eval_fraction) else "train"

    def problems(self, split: Split, n: int, seed: int) -> list[Problem]:
        """`n` distinct problems of `split`, in sampling order; the same for the same seed."""
        if split not in get_args(Split):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        size = self.space_size()
        share = self.eval_fraction if split == "eval" else 1 - self.eval_fraction
        too_few = (
            f"{self.kind}: cannot draw {n} distinct {split} problems; the task has {size} "
            f"problems in all, about {round(size * share)} of them in the {split} split "
            "(ask for fewer, or widen the task)"
        )
        if n > size:
            raise DataError(too_few)
        rng = random.Random(f"{self.kind}:{split}:{seed}")
        found: dict[str, Problem] = {}
        fruitless = 0
        while len(found) < n:
            problem = self.sample(rng)
            if problem.key in found or self.split_of(problem) != split:
                fruitless += 1
                if fruitless >= _MAX_FRUITLESS_DRAWS:
                    raise DataError(f"{too_few}; found only {len(found)}")
                continue
            found[problem.key] = problem
            fruitless = 0
        return list(found.values())

    def render(self, problem: Problem) -> str:
        """The full text used for pretraining: prompt, then answer."""
        return problem.prompt + problem.answer

    def verify(self, problem: Problem, completion: str) -> bool:
        """Whether `completion` starts with the right answer in the task's strict format."""
        if not isinstance(completion, str):
            return False
        return self.parse_answer(completion) == problem.answer


_OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}
_INTEGER_ANSWER = re.compile(r"\s*(-?\d+)(?:\s|\Z)", re.ASCII)


class ArithmeticGenerator(TaskGenerator):
    """`a op b` on non-negative integers; each operand's digit count is drawn uniformly."""

    kind = "arithmetic"

    def __init__(self, cfg: ArithmeticTask) -> None:
        self.cfg = cfg
        self.eval_fraction = cfg.eval_fraction

    def sample(self, rng: random.Random) -> Problem:
        op = rng.choice(self.cfg.ops)
        a = self._operand(rng)
        b = self._operand(rng)
        key = f"{a}{op}{b}"
        return Problem(task=self.kind, key=key, prompt=f"{key}=", answer=str(_OPS[op](a, b)))

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.cfg.min_digits, self.cfg.max_digits)
        return rng.randint(_smallest(digits), 10**digits - 1)

    def space_size(self) -> int:
        operands = 10**self.cfg.max_digits - _smallest(self.cfg.min_digits)
        return len(set(self.cfg.ops)) * operands**2

    def parse_answer(self, completion: str) -> str | None:
        match = _INTEGER_ANSWER.match(completion)
        return match.group(1) if match else None


def _smallest(digits: int) -> int:
    """The smallest number written with `digits` digits (0 for one digit)."""
    return 0 if digits == 1 else 10 ** (digits - 1)


_GENERATORS: dict[str, Callable[..., TaskGenerator]] = {"arithmetic": ArithmeticGenerator}


def make_generator(cfg: TaskConfig) -> TaskGenerator:
    """The generator for one task section of a recipe, chosen by its `kind`."""
    build = _GENERATORS.get(cfg.kind)
    if build is None:
        raise DataError(f"unknown task kind {cfg.kind!r}; known: {', '.join(_GENERATORS)}")
    return build(cfg)


def iter_task_documents(gen: TaskGenerator, seed: int) -> Iterator[Document]:
    """An endless, deterministic stream of train-split problems, one rendered per document.

    Problems may repeat (this is sampling, weighted like `gen.sample`); eval problems never
    appear. The id is `task:<kind>:<key>`, so a repeated problem has a repeated id.
    """
    gen.problems("train", 1, seed)  # fails fast, rather than looping, if the split is empty
    rng = random.Random(f"{gen.kind}:documents:{seed}")
    source = f"task:{gen.kind}"
    while True:
        problem = gen.sample(rng)
        if gen.split_of(problem) == "train":
            yield Document(id=f"{source}:{problem.key}", source=source, text=gen.render(problem))
