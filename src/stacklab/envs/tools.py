"""The tools an agent can call, and the toolbox that calls them without ever raising.

A model's tool call is untrusted input: the name may be made up, the arguments may be the wrong
shape, and the tool itself may fail. Every one of those cases comes back as a short
"error: ..." string the model can read and react to, because an agent learns to recover only
from mistakes it is shown; an exception would end the episode instead.

The tools:

- `calculator`: exact arithmetic on an expression string, evaluated over its syntax tree (no
  `eval`), with caps so that `9**9**9` is refused at once instead of running for hours;
- `search` and `get` over a `KeyValueStore` of short documents: search returns only keys, so
  reading a fact takes both calls, and `synthetic_store` makes made-up facts whose answers
  exist nowhere but in the store (a model cannot have memorized them, whatever it was trained
  on, and a different seed gives a fresh, held-out set);
- `python`: the model's code run in the jail of `stacklab.envs.sandbox`.

Each tool describes itself with a JSON-schema `parameters` object (the shape chat templates
expect), which `Toolbox` also uses to check the arguments before the call.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stacklab.envs.sandbox import run_python

MAX_TOOL_OUTPUT = 2000  # characters of a tool's answer the model is shown
MAX_EXPRESSION_CHARS = 1000
MAX_INT_BITS = 4000  # about 1200 decimal digits, well under Python's int-to-str limit
MAX_EXPONENT = 10_000

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True)
class Tool:
    """A named function of a JSON-object argument that answers with text.

    `parameters` is a JSON schema: {"type": "object", "properties": {name: {"type": ...,
    "description": ...}}, "required": [...]}.
    """

    name: str
    description: str  # one line, for the system prompt
    parameters: dict[str, Any]
    fn: Callable[[dict[str, Any]], str]

    def __call__(self, arguments: dict[str, Any]) -> str:
        return self.fn(arguments)


def _string_parameters(**descriptions: str) -> dict[str, Any]:
    """A schema of required string arguments, name -> description."""
    properties = {k: {"type": "string", "description": d} for k, d in descriptions.items()}
    return {"type": "object", "properties": properties, "required": list(descriptions)}


# --- calculator -----------------------------------------------------------------------------


class CalculatorError(ValueError):
    """A reason to refuse an expression, worded for the model."""


_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression; raises CalculatorError for anything refused.

    Numbers, + - * / // % **, unary signs and parentheses, with Python's meaning (so integer
    results are exact and `/` gives a float). Names, calls, attribute access and every other
    syntax are refused, as are integers over MAX_INT_BITS and non-finite floats.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        with warnings.catch_warnings():  # "12a3" warns before it fails; the error says enough
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:  # ValueError: a null byte in the source
        raise CalculatorError("invalid syntax") from e
    except (RecursionError, MemoryError) as e:
        raise CalculatorError("expression nested too deeply") from e
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError as e:
        raise CalculatorError("division by zero") from e
    except OverflowError as e:
        raise CalculatorError("result too large") from e
    except RecursionError as e:
        raise CalculatorError("expression nested too deeply") from e


def _evaluate(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculatorError(f"only numbers are allowed, not {value!r}")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        both_int = isinstance(left, int) and isinstance(right, int)
        if isinstance(node.op, ast.Mult) and both_int:
            _check_bits(left.bit_length() + right.bit_length() - 1)
        return _checked(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Name):
        raise CalculatorError(f"names are not allowed ({node.id!r})")
    if isinstance(node, ast.Call):
        raise CalculatorError("function calls are not allowed")
    if isinstance(node, ast.Attribute):
        raise CalculatorError("attribute access is not allowed")
    what = type(node.op if isinstance(node, ast.BinOp | ast.UnaryOp) else node).__name__
    raise CalculatorError(f"unsupported syntax ({what})")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power before computing it when its size alone would be too large."""
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        _check_bits((abs(base).bit_length() - 1) * exponent)
    if base < 0 and not float(exponent).is_integer():
        raise CalculatorError("complex result")


def _check_bits(least_bits: int) -> None:
    """Refuse an integer result known to have at least this many bits."""
    if least_bits > MAX_INT_BITS:
        raise CalculatorError("result too large")


def _checked(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("result too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result too large")
    return value


def _calculator(arguments: dict[str, Any]) -> str:
    try:
        return repr(calculate(arguments["expression"]))
    except CalculatorError as e:
        return f"error: {e}"


CALCULATOR = Tool(
    "calculator",
    "exact arithmetic: numbers, + - * / // % **, parentheses",
    _string_parameters(expression="for example '123*456 - 7' or '(2**10 + 1) % 7'"),
    _calculator,
)


# --- document lookup ------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class KeyValueStore:
    """A small store of documents by key, searched by word overlap.

    A document's score for a query is the sum, over the distinct words they share (the key's
    words count as the document's), of log(N / document frequency): a word found in every
    document weighs nothing, so "the code word of project X" ranks by X, not by "the".
    Ties go to the smaller key, so results are deterministic.
    """

    def __init__(self, documents: dict[str, str], top_k: int = 3) -> None:
        self.documents = dict(documents)
        self.top_k = top_k
        self._words = {key: _words(key) | _words(text) for key, text in self.documents.items()}
        frequency: dict[str, int] = {}
        for words in self._words.values():
            for word in words:
                frequency[word] = frequency.get(word, 0) + 1
        n = len(self.documents)
        self._weight = {word: math.log(n / f) for word, f in frequency.items()}

    def search(self, query: str) -> list[str]:
        """Keys of the top_k documents sharing a weighted word with the query, best first."""
        query_words = sorted(_words(query) & self._weight.keys())
        scored = []
        for key, words in self._words.items():
            score = sum(self._weight[w] for w in query_words if w in words)
            if score > 0:
                scored.append((-score, key))
        return [key for _, key in sorted(scored)[: self.top_k]]

    def get(self, key: str) -> str | None:
        return self.documents.get(key)

    def suggest(self, key: str, n: int = 3) -> list[str]:
        """Existing keys that look like `key` (case-insensitive), closest first."""
        by_lower = {k.lower(): k for k in sorted(self.documents, reverse=True)}
        close = difflib.get_close_matches(key.lower(), list(by_lower), n=n, cutoff=0.6)
        return [by_lower[k] for k in close]


def lookup_tools(store: KeyValueStore) -> list[Tool]:
    """The `search` and `get` tools over one store."""

    def search(arguments: dict[str, Any]) -> str:
        keys = store.search(arguments["query"])
        return "\n".join(keys) if keys else "no matching documents"

    def get(arguments: dict[str, Any]) -> str:
        key = arguments["key"]
        text = store.get(key)
        if text is not None:
            return text
        close = store.suggest(key)
        hint = "did you mean " + ", ".join(map(repr, close)) if close else "use search for keys"
        return f"error: no document {key!r} ({hint})"

    return [
        Tool(
            "search",
            "keys of the documents that best match the words",
            _string_parameters(query="words to look for"),
            search,
        ),
        Tool(
            "get",
            "the document stored under a key",
            _string_parameters(key="a document key"),
            get,
        ),
    ]


# A project's attributes: (name, question word, kind of answer).
_ATTRIBUTES = [
    ("code word", "What", "word"),
    ("access number", "What", "num"),
    ("lead", "Who", "name"),
]
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
MAX_SYNTHETIC_FACTS = 9000  # access numbers are distinct four-digit numbers


def synthetic_store(n: int, seed: int) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """`n` made-up facts about made-up projects: ({key: document}, [(question, answer)]).

    One fact per document, under an opaque key ("doc-" and five consonants) that says nothing
    of its content, so a question is answerable only by `search` and then `get`. Project names,
    code words and lead names are distinct invented words, and access numbers distinct
    four-digit numbers: each answer appears in exactly one document, and never in its question.
    A project has up to three facts, so search has to weigh the attribute words too. The same
    (n, seed) always gives the same store; use different seeds for training and evaluation.
    """
    if not 0 < n <= MAX_SYNTHETIC_FACTS:
        raise ValueError(f"n must be in 1..{MAX_SYNTHETIC_FACTS}, got {n}")
    rng = random.Random(seed)
    used: set[str] = set()

    def invent(syllables: int) -> str:
        while True:
            word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
            if word not in used:
                used.add(word)
                return word

    projects = [invent(3).capitalize() for _ in range((n + 1) // 2)]
    pairs = [(p, a) for p in projects for a in range(len(_ATTRIBUTES))]
    numbers = iter(rng.sample(range(1000, 10000), n))
    values = {
        "word": lambda: invent(3),
        "num": lambda: str(next(numbers)),
        "name": lambda: invent(2).capitalize() + " " + invent(3).capitalize(),
    }
    keys: set[str] = set()
    documents, questions = {}, []
    for project, attribute in rng.sample(pairs, n):
        name, ask, kind = _ATTRIBUTES[attribute]
        answer = values[kind]()
        key = "doc-" + "".join(rng.choices(_CONSONANTS, k=5))
        while key in keys:
            key = "doc-" + "".join(rng.choices(_CONSONANTS, k=5))
        keys.add(key)
        documents[key] = f"The {name} of project {project} is {answer}."
        questions.append((f"{ask} is the {name} of project {project}?", answer))
    return dict(sorted(documents.items())), questions


# --- python ---------------------------------------------------------------------------------

PYTHON = Tool(
    "python",
    "Run a Python script in a sandbox (no files, no network, a few seconds); print results.",
    _string_parameters(code="the script; only what it prints is returned"),
    lambda arguments: run_python(arguments["code"]).as_tool_text(),
)


# --- toolbox --------------------------------------------------------------------------------


class Toolbox:
    """Tools by name: describes them for the system prompt and calls them safely."""

    def __init__(self, tools: Sequence[Tool], max_output: int = MAX_TOOL_OUTPUT) -> None:
        self.tools = {tool.name: tool for tool in tools}
        if len(self.tools) != len(tools):
            raise ValueError("tool names must be distinct")
        self.max_output = max_output

    def describe(self) -> str:
        """One line a tool: `name(arg: type, ...) - description`."""
        lines = []
        for tool in self.tools.values():
            properties = tool.parameters.get("properties", {})
            args = ", ".join(f"{name}: {spec['type']}" for name, spec in properties.items())
            lines.append(f"{tool.name}({args}) - {tool.description}")
        return "\n".join(lines)

    def call(self, name: str, arguments: object) -> str:
        """The tool's answer, or "error: ..." for anything wrong; never raises."""
        tool = self.tools.get(name) if isinstance(name, str) else None
        if tool is None:
            return f"error: unknown tool {name!r}; available: {', '.join(self.tools)}"
        problem = _argument_problem(tool, arguments)
        if problem:
            return f"error: {name}: {problem}"
        try:
            text = tool(arguments)
        except Exception as e:
            text = f"error: {name} failed: {type(e).__name__}: {e}"
        if len(text) > self.max_output:
            text = text[: self.max_output] + "\n[output truncated]"
        return text


def _argument_problem(tool: Tool, arguments: object) -> str | None:
    """What is wrong with the arguments for this tool, or None."""
    if not isinstance(arguments, dict):
        return f"arguments must be an object, got {type(arguments).__name__}"
    properties = tool.parameters.get("properties", {})
    for name in tool.parameters.get("required", []):
        if name not in arguments:
            return f"missing required argument {name!r}"
    for name, value in arguments.items():
        if name not in properties:
            return f"unexpected argument {name!r}; expected: {', '.join(properties)}"
        expected = properties[name]["type"]
        wrong_bool = isinstance(value, bool) and expected in ("integer", "number")
        if wrong_bool or not isinstance(value, _JSON_TYPES[expected]):
            return f"argument {name!r} must be {expected}, got {type(value).__name__}"
    return None
