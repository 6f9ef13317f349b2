"""Contributions: proposed changes to the baseline, each a patch and/or a git ref, with an author.

A contribution is one YAML file:

    id: muon
    area: optimizer
    summary: Muon for the hidden weight matrices
    citation: Jordan et al. 2024, "Muon: an optimizer for hidden layers"
    author: alice
    patch:
      optim.name: muon

The baseline is a stacklab recipe or, for a round with an external runner, any YAML, JSON or
TOML config file (`stacklab.integrate.configs`). A contribution may also, or instead, carry
`git: REF`, a branch, tag or commit of the round's repository: its code change. It needs a
patch, a git ref, or both; merging the refs, and the conflicts between them, are the engine's
business, not this module's.

It is checked against the round's baseline when it is loaded, not when its first run fails an
hour later: every patch key must exist in the baseline, and the patched recipe must validate
(a config file must be able to hold the values: TOML has no null). Patch values are kept in
canonical form (for a recipe the validated JSON form: `3e-3` becomes 0.003, a section becomes
the whole section with its defaults), so that equal settings compare equal and a patch means
the same thing whichever order patches are applied in.

Two contributions that set one setting to different values cannot both go into the model:
they are in one choice group, and a subset is allowed only if it takes at most one member of
each group.

During a round, reports show blind ids (`c-1a2b3c`), never ids or authors, so that evidence is
read without knowing whose work it is; authors appear only in the final credit table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stacklab.errors import describe_validation_error
from stacklab.integrate.configs import Baseline, ContributionError, RecipeBaseline
from stacklab.recipe import Recipe, canonical_hash, get_dotted

Area = Literal["data", "architecture", "optimizer", "rl", "agent", "systems"]
T = TypeVar("T", int, str)  # node labels of a graph: indices or ids

_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_REF = re.compile(r"[^\s-]\S*")

__all__ = [
    "Contribution",
    "ContributionError",
    "apply_subset",
    "as_baseline",
    "blind_ids",
    "choice_groups",
    "conflicts",
    "load_contributions",
    "patch_subset",
]


class Contribution(BaseModel):
    """One proposed change to the baseline (a patch, a git ref, or both), with who proposed it
    and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="slug: lowercase letters, digits, '-' and '_'")
    area: Area
    summary: str = Field(description="one line")
    citation: str | None = Field(None, description="where the idea comes from, if published")
    git: str | None = Field(
        None, description="a branch, tag or commit of the round's repository: the code change"
    )
    patch: dict[str, Any] = Field(
        default_factory=dict, description="dotted key of the baseline -> value"
    )
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

    @field_validator("git", mode="before")
    @classmethod
    def _quoted(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            # `git: 1234567` or `git: 8e10` (a short hash): YAML already made it a number.
            raise ValueError(f"YAML read the ref as the number {value!r}: quote it")
        return value

    @field_validator("git")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not _REF.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a git ref (a branch, tag or commit: no spaces, "
                "not starting with '-')"
            )
        return value

    @field_validator("patch")
    @classmethod
    def _dotted_keys(cls, patch: dict[str, Any]) -> dict[str, Any]:
        if not patch:
            raise ValueError("must set at least one recipe key (leave it out for git: alone)")
        bad = [key for key in patch if not isinstance(key, str) or not _KEY.fullmatch(key)]
        if bad:
            raise ValueError(f"keys must be dotted recipe keys like optim.lr; bad: {bad}")
        keys = sorted(patch)
        for i, outer in enumerate(keys):
            for inner in keys[i + 1 :]:
                if inner.startswith(outer + "."):
                    raise ValueError(f"keys {outer!r} and {inner!r} overlap; set only one")
        return patch

    @model_validator(mode="after")
    def _changes_something(self) -> Contribution:
        if not self.patch and self.git is None:
            raise ValueError("a contribution needs a patch:, a git: ref, or both")
        return self


# --------------------------------------------------------------------------- loading


def load_contributions(paths: list[Path], baseline: Baseline | Recipe) -> list[Contribution]:
    """Read and check contribution files, in the order given (a folder's files sorted by name).

    Each path is one YAML file or a folder whose `*.yaml`/`*.yml` files are read. Every error
    names the file. The returned patches hold canonical values (see the module docstring).
    A git ref is only checked for its form here: whether it exists is the engine's check.
    """
    base = as_baseline(baseline)
    seen: dict[str, Path] = {}
    loaded = []
    for file in _expand(paths):
        contrib = _read(file)
        if contrib.id in seen:
            raise ContributionError(
                f"{file}: duplicate id '{contrib.id}' (also in {seen[contrib.id]})"
            )
        seen[contrib.id] = file
        loaded.append(_check_against(contrib, base))
    return loaded


def as_baseline(baseline: Baseline | Recipe) -> Baseline:
    """A Baseline as is; a Recipe wrapped in a RecipeBaseline."""
    return RecipeBaseline(baseline) if isinstance(baseline, Recipe) else baseline


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
        why = describe_validation_error(exc, Contribution, noun="field", hidden=["source"])
        raise ContributionError(f"{file}: {why}") from None


def _fields() -> list[str]:
    return [name for name in Contribution.model_fields if name != "source"]


def _check_against(contrib: Contribution, baseline: Baseline) -> Contribution:
    """Reject unknown keys and invalid values; return the patch with canonical values."""
    if not contrib.patch:
        return contrib
    return contrib.model_copy(update={"patch": baseline.check(contrib.patch, contrib.source)})


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
    """Mutually exclusive sets of ids: the connected components of the conflict graph."""
    contribs = list(contribs)
    return components([c.id for c in contribs], list(conflicts(contribs)))


def components(nodes: Iterable[T], pairs: Iterable[tuple[T, T]]) -> list[list[T]]:
    """The connected components of the graph of `pairs` that have more than one node, each
    sorted, in sorted order.

    Components (not just conflicting pairs) make choice groups a partition, so a planner can
    enumerate allowed subsets as "at most one from each group". The price: if a conflicts
    with b and b with c, a and c are not combined either, even though they could be.
    """
    neighbours: dict[T, set[T]] = {node: set() for node in nodes}
    for a, b in pairs:
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


def apply_subset(
    baseline: Recipe, contribs: Iterable[Contribution], subset: AbstractSet[str]
) -> Recipe:
    """The baseline recipe with the patches of `subset` applied (in id order), validated.

    Raises ContributionError for unknown ids, for a subset that takes two members of one choice
    group, and for patches that are valid alone but give an invalid recipe together.
    """
    patches, origin = _subset_patches(contribs, subset)
    return RecipeBaseline(baseline).patched(patches, origin)


def patch_subset(
    baseline: Baseline | Recipe, contribs: Iterable[Contribution], subset: AbstractSet[str]
) -> tuple[dict[str, Any], str]:
    """(data, text) of any baseline with the patches of `subset` applied, in id order.

    `data` is plain JSON-like data (for the run's identity), `text` the patched file in the
    baseline's format (written as `recipe<baseline.suffix>`). Members without a patch change
    nothing here. Errors as for `apply_subset`.
    """
    patches, origin = _subset_patches(contribs, subset)
    return as_baseline(baseline).apply(patches, origin)


def _subset_patches(
    contribs: Iterable[Contribution], subset: AbstractSet[str]
) -> tuple[list[dict[str, Any]], str]:
    """The patches of `subset` in id order, and "baseline + a + b" to name the result."""
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
    names = " + ".join(sorted(subset)) or "nothing"
    return [by_id[cid].patch for cid in sorted(subset)], f"baseline + {names}"


def _by_id(contribs: Iterable[Contribution]) -> dict[str, Contribution]:
    by_id: dict[str, Contribution] = {}
    for c in contribs:
        if c.id in by_id:
            raise ContributionError(f"duplicate id '{c.id}' ({by_id[c.id].source} and {c.source})")
        by_id[c.id] = c
    return by_id


# --------------------------------------------------------------------------- blinding


def blind_ids(contribs: Iterable[Contribution]) -> dict[str, str]:
    """id -> opaque id ("c-" + 6 hex digits of a hash of id, patch and git ref), stable across
    runs. The git ref enters the hash only when set, so patch-only contributions keep the blind
    ids they had before contributions could carry one."""
    blind = {}
    for c in _by_id(contribs).values():
        hashed: dict[str, Any] = {"id": c.id, "patch": c.patch}
        if c.git is not None:
            hashed["git"] = c.git
        blind[c.id] = "c-" + canonical_hash(hashed)[:6]
    if len(set(blind.values())) != len(blind):
        raise ContributionError("two contributions got the same blind id; rename one of them")
    return blind
