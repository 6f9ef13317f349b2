"""The built-in recipes, rounds and contribution catalog, shipped inside the package.

They are package data, so an installed wheel carries them and `stacklab build tiny` or
`stacklab demo` works from any directory, not only from a checkout. Anywhere a recipe, round
or contribution file is asked for, its bare name (`tiny`, `demo`, `muon`) finds it here.
Round files name their baseline and contributions by name, so a copy of one works anywhere.

`resolve` is the one place that turns what a user wrote into a file, so every kind of file is
found by the same rules and a miss lists the same things: the file itself first (relative to
the file that names it, if any), then a built-in of that name.

Wheels install unpacked, so these are real directories (never inside a zip).
"""

from __future__ import annotations

import difflib
from importlib.resources import files
from pathlib import Path
from typing import Literal

from stacklab.errors import StacklabError

BUILTIN_DIR = Path(str(files(__name__)))
RECIPES_DIR = BUILTIN_DIR / "recipes"
ROUNDS_DIR = BUILTIN_DIR / "rounds"
CONTRIBUTIONS_DIR = BUILTIN_DIR / "contributions"

Kind = Literal["recipe", "round", "contribution"]
_DIRS: dict[str, Path] = {
    "recipe": RECIPES_DIR,
    "round": ROUNDS_DIR,
    "contribution": CONTRIBUTIONS_DIR,
}


def names(kind: Kind) -> list[str]:
    """The bare names of the built-in files of `kind`, sorted."""
    return sorted(p.stem for p in _DIRS[kind].glob("*.yaml"))


def resolve(
    kind: Kind,
    name_or_path: str | Path,
    *,
    beside: Path | None = None,
    error: type[StacklabError] = StacklabError,
) -> Path:
    """The file a user means by `name_or_path`, a path or the bare name of a built-in.

    A path is taken relative to `beside` (the folder of the file that names it) when given,
    else to the working directory. A contribution may also be a folder of files. Only a bare
    name (no suffix, no folder) falls back to the built-in of that name, so a file beside
    always wins over a built-in. A miss raises `error` listing the built-ins.
    """
    given = Path(name_or_path)
    path = beside / given if beside is not None else given
    if path.is_file() or (kind == "contribution" and path.is_dir()):
        return path
    bare = given.suffix == "" and len(given.parts) == 1
    builtin = _DIRS[kind] / f"{given}.yaml"
    if bare and builtin.is_file():
        return builtin
    known = names(kind)
    close = difflib.get_close_matches(str(given), known, n=1, cutoff=0.6) if bare else []
    hint = f"; did you mean the built-in {kind} {close[0]!r}?" if close else ""
    raise error(
        f"{kind} file not found: {path}{hint} (built-in {kind}s: {', '.join(known) or 'none'})"
    )
