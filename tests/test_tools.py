"""Agent tools: exact arithmetic, lookup by search then get, and a toolbox that never raises."""

import os
import re
import sys
import time

import pytest

from stacklab.envs.tools import (
    CALCULATOR,
    PYTHON,
    KeyValueStore,
    Tool,
    Toolbox,
    lookup_tools,
    synthetic_store,
)


def calc(expression: str) -> str:
    return CALCULATOR({"expression": expression})


# --- calculator ---


def test_calculator_big_integer_products_are_exact():
    a, b = 123456789012345678901234567890, 987654321098765432109876543210
    assert calc(f"{a}*{b}") == str(a * b)
    assert calc("2**200 - 1") == str(2**200 - 1)
    assert calc("-(10**30) // 7") == str(-(10**30) // 7)


def test_calculator_precedence_and_python_meaning():
    assert calc("123*456 - 7") == "56081"
    assert calc("2 + 3 * 4 ** 2") == "50"
    assert calc("(2 + 3) * 4") == "20"
    assert calc("-2 ** 2") == "-4"  # power binds tighter than unary minus
    assert calc("2 ** 3 ** 2") == "512"  # right associative
    assert calc("7 / 2") == "3.5"
    assert calc("7 // 2") == "3"
    assert calc("-7 % 3") == "2"
    assert calc("1.5 * 4") == "6.0"
    assert calc("2 ** -2") == "0.25"


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("1 +", "invalid syntax"),
        ("", "invalid syntax"),
        ("x + 1", "names are not allowed ('x')"),
        ("abs(-1)", "function calls are not allowed"),
        ("__import__('os')", "function calls are not allowed"),
        ("(1).real", "attribute access is not allowed"),
        ("1 << 3", "unsupported syntax (LShift)"),
        ("1 < 2", "unsupported syntax (Compare)"),
        ("'a' * 3", "only numbers are allowed"),
        ("True + 1", "only numbers are allowed"),
        ("1 / 0", "division by zero"),
        ("5 // 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("9**9**9", "exponent larger than"),
        ("2 ** 5000", "result too large"),
        ("(10**1000) * (10**1000)", "result too large"),
        ("1e308 * 10", "result too large"),
        ("10**400 / 3", "result too large"),
        ("(-8) ** 0.5", "complex result"),
        ("-" * 2000 + "1", "longer than"),
    ],
)
def test_calculator_errors_are_short_strings(expression, reason):
    start = time.perf_counter()
    answer = calc(expression)
    assert time.perf_counter() - start < 0.1
    assert answer.startswith("error: ") and reason in answer, answer
    assert len(answer) < 100


# --- lookup ---

DOCS = {
    "python-zip": "zip pairs up items of several iterables",
    "python-map": "map applies a function to every item",
    "rust-iter": "iterators in Rust are lazy",
    "python-sorted": "sorted returns a new sorted list of items",
}


def test_search_ranks_by_weighted_overlap_and_breaks_ties_by_key():
    store = KeyValueStore(DOCS, top_k=2)
    assert store.search("how do I zip items") == ["python-zip", "python-sorted"]  # zip, then items
    assert store.search("python") == ["python-map", "python-sorted"]  # a three-way tie, by key
    assert store.search("python map items") == ["python-map", "python-sorted"]  # rare words win
    assert store.search("lazy Rust iterators") == ["rust-iter"]
    assert store.search("nothing matches here") == []
    assert store.search("") == []


def test_search_and_get_tools():
    search, get = lookup_tools(KeyValueStore(DOCS))
    assert search({"query": "sorted list"}).split("\n")[0] == "python-sorted"
    assert search({"query": "quantum"}) == "no matching documents"
    assert get({"key": "rust-iter"}) == DOCS["rust-iter"]
    assert get({"key": "python-zp"}).startswith(
        "error: no document 'python-zp' (did you mean 'python-zip', "
    )
    assert "'rust-iter'" in get({"key": "RUST-ITER"})  # case-insensitive suggestions
    assert get({"key": "xyz"}) == "error: no document 'xyz' (use search for keys)"


def test_synthetic_store_is_deterministic_and_seeded():
    assert synthetic_store(30, seed=1) == synthetic_store(30, seed=1)
    docs_a, qa_a = synthetic_store(30, seed=1)
    docs_b, qa_b = synthetic_store(30, seed=2)
    assert not set(docs_a.values()) & set(docs_b.values())
    assert not {a for _, a in qa_a} & {a for _, a in qa_b}
    with pytest.raises(ValueError):
        synthetic_store(0, seed=1)


def test_synthetic_answers_live_in_exactly_one_document_found_by_search():
    docs, questions = synthetic_store(300, seed=7)
    assert len(docs) == len(questions) == 300
    store = KeyValueStore(docs)
    for question, answer in questions:
        pattern = re.compile(rf"\b{re.escape(answer)}\b", re.IGNORECASE)
        holders = [key for key, text in docs.items() if pattern.search(text)]
        assert len(holders) == 1, (question, answer)
        assert not pattern.search(question) and not pattern.search(holders[0])
        assert store.search(question)[0] == holders[0]  # the question finds its document first


# --- toolbox ---


def failing(arguments):
    raise RuntimeError("boom")


BROKEN = Tool("broken", "Always fails.", {"type": "object", "properties": {}}, failing)
COUNT = Tool(
    "count",
    "Count to n.",
    {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "sep": {"type": "string"}},
        "required": ["n"],
    },
    lambda a: a.get("sep", " ").join(str(i) for i in range(a["n"])),
)


@pytest.fixture
def toolbox() -> Toolbox:
    return Toolbox([CALCULATOR, *lookup_tools(KeyValueStore(DOCS)), BROKEN, COUNT], max_output=50)


def test_toolbox_describe_lists_each_tool_with_its_arguments(toolbox):
    lines = toolbox.describe().split("\n")
    assert lines[0] == f"calculator(expression: string) - {CALCULATOR.description}"
    assert lines[-1] == "count(n: integer, sep: string) - Count to n."
    assert len(lines) == 5


def test_toolbox_calls_tools(toolbox):
    assert toolbox.call("calculator", {"expression": "6*7"}) == "42"
    assert toolbox.call("count", {"n": 3, "sep": ","}) == "0,1,2"
    assert toolbox.call("get", {"key": "rust-iter"}) == DOCS["rust-iter"]


@pytest.mark.parametrize(
    ("name", "arguments", "error"),
    [
        ("calc", {}, "error: unknown tool 'calc'; available: calculator, search, get, broken"),
        (None, {}, "error: unknown tool None; available:"),
        ("calculator", ["6*7"], "error: calculator: arguments must be an object, got list"),
        ("calculator", "6*7", "error: calculator: arguments must be an object, got str"),
        ("calculator", {}, "error: calculator: missing required argument 'expression'"),
        (
            "calculator",
            {"expression": "1", "precision": 3},
            "error: calculator: unexpected argument 'precision'; expected: expression",
        ),
        ("calculator", {"expression": 42}, "error: calculator: argument 'expression' must be"),
        ("count", {"n": "3"}, "error: count: argument 'n' must be integer, got str"),
        ("count", {"n": True}, "error: count: argument 'n' must be integer, got bool"),
        ("broken", {}, "error: broken failed: RuntimeError: boom"),
    ],
)
def test_toolbox_turns_every_mistake_into_an_error_string(toolbox, name, arguments, error):
    assert toolbox.call(name, arguments).startswith(error)


def test_toolbox_truncates_output(toolbox):
    answer = toolbox.call("count", {"n": 100})
    assert answer == "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 \n[output truncated]"


def test_toolbox_refuses_duplicate_names():
    with pytest.raises(ValueError):
        Toolbox([CALCULATOR, CALCULATOR])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the python tool's sandbox needs root on Linux",
)
def test_python_tool_returns_stdout():
    assert Toolbox([PYTHON]).call("python", {"code": "print(6 * 7)"}) == "42\n"
    error = Toolbox([PYTHON]).call("python", {"code": "1/0"})
    assert "ZeroDivisionError" in error and "[error: exit code 1]" in error
