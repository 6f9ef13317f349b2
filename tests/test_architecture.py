"""The layering of docs/architecture.md, enforced: which part of stacklab may import which.

Every `import stacklab.…` in src/ (at module level or inside a function, type-checking imports
included) is checked against `MAY_IMPORT`. A new import that crosses a layer fails here with
the file, the line and what the part may import; change the table (and the doc) only when the
design changes, not to make one import pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stacklab"

FOUNDATION = {"errors", "fileio", "progress", "builtin"}

# part → the other parts it may import (a dotted entry allows that module only).
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "fileio": set(),
    "progress": set(),
    "builtin": {"errors"},
    "model": FOUNDATION | {"data.tokenizer"},  # token ids; never the recipe
    "recipe": FOUNDATION | {"model.config"},  # the recipe builds the model's config
    "pipeline": FOUNDATION | {"recipe"},
    "tracking": FOUNDATION | {"recipe"},
    "data": FOUNDATION | {"recipe", "pipeline"},
    "envs": FOUNDATION | {"recipe", "data", "model"},
    "train": FOUNDATION | {"recipe", "pipeline", "tracking", "data", "model", "envs"},
    "rl": FOUNDATION | {"recipe", "pipeline", "tracking", "data", "model", "envs", "train"},
    "evals": FOUNDATION | {"recipe", "pipeline", "data", "model", "envs", "train"},
    "interop": FOUNDATION | {"recipe", "data.tokenizer", "model"},
    "stages": {"pipeline", "data", "train", "rl", "evals"},
    # The engine drives trainers through commands (runners.py): it never imports one.
    "integrate": FOUNDATION | {"", "recipe", "pipeline", "tracking"},
    # Applications: the command line and the programs it starts may use every part.
    "cli": {"*"},
    "chat": {"*"},
    "serve": {"*"},
    "bench": {"*"},
}


def part_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else ""


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module below stacklab) of every stacklab import in `tree`; `from stacklab.a
    import b` is read as `a.b` when b is a module of a (`a` otherwise)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "stacklab" and not node.module.startswith("stacklab."):
                continue
            base = node.module.removeprefix("stacklab").removeprefix(".")
            for alias in node.names:
                module = f"{base}.{alias.name}".lstrip(".")
                path = SRC.joinpath(*module.split("."))
                is_module = path.with_suffix(".py").is_file() or path.is_dir()
                found.append((node.lineno, module if is_module else base))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "stacklab" or alias.name.startswith("stacklab."):
                    found.append((node.lineno, alias.name.removeprefix("stacklab").lstrip(".")))
    return found


def allowed(part: str, module: str) -> bool:
    rules = MAY_IMPORT[part]
    if "*" in rules or module.split(".")[0] == part:
        return True
    return any(module == r or module.startswith(r + ".") if r else module == "" for r in rules)


def test_every_part_of_the_package_has_a_rule() -> None:
    parts = {part_of(p) for p in SRC.rglob("*.py")} - {""}
    assert parts - set(MAY_IMPORT) == set(), "add the new part to MAY_IMPORT and the doc"


def test_no_import_crosses_a_layer() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        part = part_of(path)
        if not part:
            continue
        for line, module in imported(ast.parse(path.read_text(encoding="utf-8"))):
            if not allowed(part, module):
                wrong.append(
                    f"{path.relative_to(SRC)}:{line} imports stacklab.{module}; "
                    f"{part} may import {', '.join(sorted(MAY_IMPORT[part])) or 'nothing'}"
                )
    assert wrong == []


@pytest.mark.parametrize(
    ("part", "module", "ok"),
    [
        ("model", "recipe", False),
        ("model", "data.tokenizer", True),
        ("model", "data.chat", False),
        ("integrate", "train.pretrain", False),
        ("integrate", "", True),
        ("recipe", "model.config", True),
        ("recipe", "model.transformer", False),
        ("train", "train.optim", True),
    ],
)
def test_the_rule_reads_dotted_entries_as_one_module(part: str, module: str, ok: bool) -> None:
    assert allowed(part, module) is ok
