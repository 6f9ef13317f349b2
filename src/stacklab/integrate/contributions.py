"""Contributions: proposed changes to the baseline recipe, each a small patch with an author.

A contribution is one YAML file:

    id: muon
    area: optimizer
    summary: Muon for the hidden weight matrices
    citation: Jordan et al. 2024, "Muon: an optimizer for hidden layers"
    author: alice
    patch:
      optim.name: muon

It is checked against the round's baseline when it is loaded, not when its first run fails an
hour later: every patch key must exist in the baseline recipe, and the patched recipe must
validate. Patch values are kept in their validated JSON form (`3e-3` becomes 0.003, a section
becomes the whole section with its defaults), so that equal settings compare equal and a
patch means the same thing whichever order patches are applied in.

Two contributions that set one setting to different values cannot both go into the model:
they are in one choice group, and a subset is allowed only if it takes at most one member of
each group.

During a round, reports show blind ids (`c-1a2b3c`), never ids or authors, so that evidence is
read without knowing whose work it is; `reveal` maps them back for the final credit table.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stacklab.errors import RecipeError, StacklabError
from stacklab.recipe import Recipe, canonical_hash, get_dotted, recipe_from_dict

Area = Literal["data", "architecture", "optimizer", "rl", "agent", "systems"]

_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class ContributionError(StacklabError):
    """A contribution file, or a combination of contributions, is invalid."""


class Contribution(BaseModel):
    """One proposed patch to the baseline recipe, with who proposed it and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="slug: lowercase letters, digits, '-' and '_'")
    area: Area
    summary: str = Field(description="one line")
    citation: str | None = Field(None, description="where the idea comes from, if published")
    patch: dict[str, Any] = Field(description="dotted recipe key -> value")
    author: str
    source: Path = Field(description="the file it was read from (set by the loader)")

    @field_validator("id")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _ID.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a slug (lowercase letters, digits, '-' and '_', "
                "at most 64 characters, starting with a letter or digit)"
            )
        return value

    @field_validator("summary", "author")
    @classmethod
    def _one_line(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if "\n" in value:
            raise ValueError("must be one line")
        return value

    @field_validator("patch")
    @classmethod
    def _dotted_keys(cls, patch: dict[str, Any]) -> dict[str, Any]:
        if not patch:
            raise ValueError("must set at least one recipe key")
        bad = [key for key in patch if not isinstance(key, str) or not _KEY.fullmatch(key)]
        if bad:
            raise ValueError(f"keys must be dotted recipe keys like optim.lr; bad: {bad}")
        keys = sorted(patch)
        for i, outer in enumerate(keys):
            for inner in keys[i + 1 :]:
                if inner.startswith(outer + "."):
                    raise ValueError(f"keys {outer!r} and {inner!r} overlap; set only one")
        return patch


class Revealed(NamedTuple):
    """Who is behind a blind id."""

    id: str
    author: str


# --------------------------------------------------------------------------- loading


def load_contributions(paths: list[Path], baseline: Recipe) -> list[Contribution]:
    """Read and check contribution files, in the order given (a folder's files sorted by name).

    Each path is one YAML file or a folder whose `*.yaml`/`*.yml` files are read. Every error
    names the file. The returned patches hold validated values (see the module docstring).
    """
    base = baseline.to_dict()
    keys = _all_keys(base)
    seen: dict[str, Path] = {}
    loaded = []
    for file in _expand(paths):
        contrib = _read(file)
        if contrib.id in seen:
            raise ContributionError(
                f"{file}: duplicate id '{contrib.id}' (also in {seen[contrib.id]})"
            )
        seen[contrib.id] = file
        loaded.append(_check_against(contrib, base, keys))
    return loaded


def _expand(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()
            )
            if not found:
                raise ContributionError(f"{path}: folder has no *.yaml or *.yml contribution files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ContributionError(f"{path}: contribution file or folder not found")
    unique: dict[Path, Path] = {}
    for file in files:
        unique.setdefault(file.resolve(), file)
    return list(unique.values())


def _read(file: Path) -> Contribution:
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ContributionError(f"{file}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ContributionError(
            f"{file}: a contribution must be a mapping with fields {_fields()}, "
            f"got {type(raw).__name__}"
        )
    if "source" in raw:
        raise ContributionError(f"{file}: 'source' is set from the file's path, not in the file")
    try:
        return Contribution.model_validate({**raw, "source": file})
    except ValidationError as exc:
        raise ContributionError(f"{file}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    # A misspelt field also reports the real one missing: name the misspelling first.
    err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    field = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, _fields(), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown field '{field}'{hint} (valid fields: {', '.join(_fields())})"
    if err["type"] == "missing":
        return f"missing field '{field}'"
    msg = err["msg"].removeprefix("Value error, ")
    return f"field '{field}': {msg}"


def _fields() -> list[str]:
    return [name for name in Contribution.model_fields if name != "source"]


def _check_against(contrib: Contribution, base: dict[str, Any], keys: set[str]) -> Contribution:
    """Reject unknown keys and invalid values; return the patch with validated values."""
    for key in contrib.patch:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ContributionError(
                f"{contrib.source}: patch key '{key}' is not in the baseline recipe{hint}"
            )
    data = copy.deepcopy(base)
    _apply_patch(data, contrib.patch)
    try:
        patched = recipe_from_dict(data, origin=f"{contrib.source}: invalid patch").to_dict()
    except RecipeError as exc:
        raise ContributionError(str(exc)) from None
    return contrib.model_copy(update={"patch": {k: get_dotted(patched, k) for k in contrib.patch}})


def _all_keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted path into a recipe dict: sections, values and list items alike."""
    if isinstance(node, dict):
        items: Iterable[tuple[Any, Any]] = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return set()
    keys: set[str] = set()
    for part, child in items:
        key = f"{prefix}{part}"
        keys.add(key)
        keys |= _all_keys(child, key + ".")
    return keys


def _apply_patch(data: dict[str, Any], patch: dict[str, Any]) -> None:
    """Set each dotted key in a recipe dict, in place (keys are known to exist)."""
    for key in sorted(patch):
        *path, last = key.split(".")
        node: Any = data
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = copy.deepcopy(patch[key])


# --------------------------------------------------------------------------- choice groups


def conflicts(contribs: Iterable[Contribution]) -> dict[tuple[str, str], list[str]]:
    """Pairs of ids (sorted) that cannot be combined, with the recipe keys they disagree on.

    They disagree when they set one key to different values, or when one sets a section and
    the other sets something inside it to a value the section does not hold.
    """
    ordered = sorted(_by_id(contribs).values(), key=lambda c: c.id)
    found: dict[tuple[str, str], list[str]] = {}
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            keys = _disagreements(a.patch, b.patch)
            if keys:
                found[(a.id, b.id)] = keys
    return found


def _disagreements(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = set()
    for ka, va in a.items():
        for kb, vb in b.items():
            if ka == kb:
                if not _same(va, vb):
                    keys.add(ka)
            elif kb.startswith(ka + "."):
                if not _holds(va, kb[len(ka) + 1 :], vb):
                    keys.add(kb)
            elif ka.startswith(kb + ".") and not _holds(vb, ka[len(kb) + 1 :], va):
                keys.add(ka)
    return sorted(keys)


def _same(a: Any, b: Any) -> bool:
    # Canonical JSON, as in recipe hashes: `1` and `true` differ, key order does not matter.
    return canonical_hash(a) == canonical_hash(b)


def _holds(section: Any, rest: str, value: Any) -> bool:
    try:
        return _same(get_dotted(section, rest), value)
    except (KeyError, IndexError, TypeError, ValueError):
        return False


def choice_groups(contribs: Iterable[Contribution]) -> list[list[str]]:
    """Mutually exclusive sets of ids: the connected components of the conflict graph.

    Components (not just conflicting pairs) make the groups a partition, so a planner can
    enumerate allowed subsets as "at most one from each group". The price: if a conflicts
    with b and b with c, a and c are not combined either, even though they could be.
    """
    contribs = list(contribs)
    neighbours: dict[str, set[str]] = {c.id: set() for c in contribs}
    for a, b in conflicts(contribs):
        neighbours[a].add(b)
        neighbours[b].add(a)
    groups, placed = [], set()
    for start in sorted(neighbours):
        if start in placed or not neighbours[start]:
            continue
        component, frontier = {start}, [start]
        while frontier:
            for other in neighbours[frontier.pop()] - component:
                component.add(other)
                frontier.append(other)
        placed |= component
        groups.append(sorted(component))
    return sorted(groups)


def allowed(subset: AbstractSet[str], groups: list[list[str]]) -> bool:
    """True when the subset takes at most one member of every choice group."""
    return all(len(subset.intersection(group)) <= 1 for group in groups)


def apply_subset(
    baseline: Recipe, contribs: Iterable[Contribution], subset: AbstractSet[str]
) -> Recipe:
    """The baseline with the patches of `subset` applied (in id order), validated.

    Raises ContributionError for unknown ids, for a subset that takes two members of one choice
    group, and for patches that are valid alone but give an invalid recipe together.
    """
    contribs = list(contribs)
    by_id = _by_id(contribs)
    unknown = sorted(set(subset) - by_id.keys())
    if unknown:
        raise ContributionError(f"unknown contribution ids: {', '.join(unknown)}")
    clashes = [sorted(subset.intersection(g)) for g in choice_groups(contribs)]
    clashes = [c for c in clashes if len(c) > 1]
    if clashes:
        shown = "; ".join(" vs ".join(c) for c in clashes)
        raise ContributionError(f"subset takes mutually exclusive contributions: {shown}")
    data = baseline.to_dict()
    for cid in sorted(subset):
        _apply_patch(data, by_id[cid].patch)
    names = " + ".join(sorted(subset)) or "nothing"
    try:
        return recipe_from_dict(data, origin=f"baseline + {names}")
    except RecipeError as exc:
        raise ContributionError(f"invalid combination: {exc}") from None


def _by_id(contribs: Iterable[Contribution]) -> dict[str, Contribution]:
    by_id: dict[str, Contribution] = {}
    for c in contribs:
        if c.id in by_id:
            raise ContributionError(f"duplicate id '{c.id}' ({by_id[c.id].source} and {c.source})")
        by_id[c.id] = c
    return by_id


# --------------------------------------------------------------------------- blinding


def blind_ids(contribs: Iterable[Contribution]) -> dict[str, str]:
    """id -> opaque id ("c-" + 6 hex digits of a hash of id and patch), stable across runs."""
    blind = {
        c.id: "c-" + canonical_hash({"id": c.id, "patch": c.patch})[:6]
        for c in _by_id(contribs).values()
    }
    if len(set(blind.values())) != len(blind):
        raise ContributionError("two contributions got the same blind id; rename one of them")
    return blind


def reveal(contribs: Iterable[Contribution]) -> dict[str, Revealed]:
    """blind id -> (id, author): only for the final credit table, after decisions are made."""
    contribs = list(contribs)
    authors = {c.id: c.author for c in contribs}
    return {b: Revealed(cid, authors[cid]) for cid, b in blind_ids(contribs).items()}
