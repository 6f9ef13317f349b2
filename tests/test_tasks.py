import itertools
import random
import re

import pytest

from stacklab.data.tasks import (
    ArithmeticGenerator,
    Problem,
    iter_task_documents,
    make_generator,
)
from stacklab.errors import DataError
from stacklab.recipe import ArithmeticTask

PROBLEM = re.compile(r"(0|[1-9][0-9]*)([+*-])(0|[1-9][0-9]*)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def gen(**kw) -> ArithmeticGenerator:
    return ArithmeticGenerator(ArithmeticTask(**kw))


def parts(problem: Problem) -> tuple[int, str, int]:
    match = PROBLEM.fullmatch(problem.key)
    assert match, problem.key
    return int(match[1]), match[2], int(match[3])


def test_format_and_answers_are_correct():
    g = gen(min_digits=1, max_digits=4)
    for p in g.problems("train", 500, seed=0) + g.problems("eval", 100, seed=0):
        a, op, b = parts(p)
        assert p.task == "arithmetic"
        assert p.prompt == f"{p.key}="
        assert p.answer == str(OPS[op](a, b))
        assert g.render(p) == p.prompt + p.answer


def test_example_text():
    p = ArithmeticGenerator(ArithmeticTask()).sample(random.Random(0))
    assert re.fullmatch(r"\d+[+*-]\d+=", p.prompt)
    assert re.fullmatch(r"-?\d+", p.answer)


def test_splits_are_disjoint_and_consistent():
    g = gen(min_digits=1, max_digits=3)
    train = g.problems("train", 2000, seed=1)
    held = g.problems("eval", 300, seed=1)
    assert len({p.key for p in train}) == 2000
    assert len({p.key for p in held}) == 300
    assert not {p.key for p in train} & {p.key for p in held}
    assert all(g.split_of(p) == "train" for p in train)
    assert all(g.split_of(p) == "eval" for p in held)


def test_split_is_pinned():
    # Eval membership must never change across machines, runs or Python versions.
    g = gen()
    split = {k: g.split_of(Problem("arithmetic", k, "", "")) for k in ["123*45", "52-0", "62*51"]}
    assert split == {"123*45": "train", "52-0": "eval", "62*51": "eval"}


def test_split_is_a_pure_function_of_the_problem():
    g = gen(eval_fraction=0.3)
    p = g.sample(random.Random(5))
    again = Problem(task=p.task, key=p.key, prompt=p.prompt, answer=p.answer)
    assert g.split_of(p) == g.split_of(again)
    share = sum(g.split_of(g.sample(random.Random(i))) == "eval" for i in range(3000)) / 3000
    assert 0.25 < share < 0.35


def test_determinism_by_seed():
    g = gen()
    assert g.problems("train", 200, seed=7) == g.problems("train", 200, seed=7)
    assert g.problems("train", 200, seed=7) != g.problems("train", 200, seed=8)
    assert g.problems("eval", 50, seed=7) == gen().problems("eval", 50, seed=7)


def test_digit_counts_respected_and_all_occur():
    g = gen(min_digits=2, max_digits=4, ops=["+"])
    seen = set()
    for p in g.problems("train", 1000, seed=0):
        a, _, b = parts(p)
        seen |= {len(str(a)), len(str(b))}
    assert seen == {2, 3, 4}


def test_one_digit_includes_zero():
    g = gen(min_digits=1, max_digits=1, ops=["*"])
    operands = {n for p in g.problems("train", 60, seed=0) for n in parts(p)[::2]}
    assert 0 in operands and operands <= set(range(10))


def test_ops_respected():
    g = gen(ops=["-"], min_digits=1, max_digits=2)
    problems = g.problems("train", 300, seed=0)
    assert {parts(p)[1] for p in problems} == {"-"}
    assert any(p.answer.startswith("-") for p in problems)


@pytest.mark.parametrize(
    "completion", ["5535", "5535\n", "5535 ", "  5535", "\n5535\nmore text", "5535\t= yes"]
)
def test_verify_accepts(completion):
    p = Problem(task="arithmetic", key="123*45", prompt="123*45=", answer="5535")
    assert gen().verify(p, completion)


@pytest.mark.parametrize(
    "completion",
    [
        "",
        " ",
        "5534",
        "5535abc",
        "5535.0",
        "5535,",
        "+5535",
        "05535",
        "55 35",
        "x5535",
        "=5535",
        "５５３５",  # fullwidth digits
        "5535\u00a0",  # a non-ASCII space is not a separator
        "\u00a05535",
        "5535" + "0" * 100_000,
        " " * 100_000 + "1",
        "9" * 1_000_000,
        None,
        5535,
        b"5535",
    ],
)
def test_verify_rejects(completion):
    p = Problem(task="arithmetic", key="123*45", prompt="123*45=", answer="5535")
    assert gen().verify(p, completion) is False


def test_verify_negative_answer():
    g = gen()
    p = Problem(task="arithmetic", key="7-80", prompt="7-80=", answer="-73")
    assert g.verify(p, "-73\n")
    assert not g.verify(p, "73")
    assert not g.verify(p, "- 73")
    assert not g.verify(p, "--73")


def test_too_small_space_raises_at_once():
    g = gen(min_digits=1, max_digits=1, ops=["+"], eval_fraction=0.5)
    with pytest.raises(DataError, match="10000 distinct train"):
        g.problems("train", 10_000, seed=0)


def test_exhausted_split_raises_and_exact_size_succeeds():
    g = gen(min_digits=1, max_digits=1, ops=["+"], eval_fraction=0.5)
    everything = [
        Problem("arithmetic", f"{a}+{b}", f"{a}+{b}=", str(a + b))
        for a, b in itertools.product(range(10), repeat=2)
    ]
    assert g.space_size() == len(everything) == 100
    train = {p.key for p in everything if g.split_of(p) == "train"}
    assert {p.key for p in g.problems("train", len(train), seed=0)} == train
    with pytest.raises(DataError, match=f"found only {len(train)}"):
        g.problems("train", len(train) + 1, seed=0)


def test_space_size():
    assert gen(min_digits=1, max_digits=3).space_size() == 3 * 1000**2
    assert gen(min_digits=2, max_digits=3, ops=["+", "+"]).space_size() == 990**2


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        gen().problems("val", 1, seed=0)


def test_make_generator():
    g = make_generator(ArithmeticTask(max_digits=2))
    assert isinstance(g, ArithmeticGenerator) and g.kind == "arithmetic"


def test_task_documents_stream():
    g = gen(min_digits=1, max_digits=1, eval_fraction=0.3)
    docs = list(itertools.islice(iter_task_documents(g, seed=3), 2000))
    assert docs == list(itertools.islice(iter_task_documents(g, seed=3), 2000))
    assert docs != list(itertools.islice(iter_task_documents(g, seed=4), 2000))
    held = {p.key for p in g.problems("eval", 10, seed=0)}
    keys = [d.id.removeprefix("task:arithmetic:") for d in docs]
    assert not held & set(keys)
    assert len(set(keys)) < len(keys)  # sampling: repeats allowed in a small space
    for doc, key in zip(docs, keys, strict=True):
        assert doc.source == "task:arithmetic"
        assert doc.id == f"task:arithmetic:{key}"
        a, op, b = parts(Problem("arithmetic", key, "", ""))
        assert doc.text == f"{key}={OPS[op](a, b)}"
