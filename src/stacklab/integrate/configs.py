"""Baselines: the configuration that contributions' patches apply to.

A round's baseline is either a stacklab recipe (`RecipeBaseline`) or, for a round with an
external runner, any YAML, JSON or TOML file (`FileBaseline`, the format taken from the
extension). Both offer the same interface (`Baseline`):

- `keys()`: every dotted path into the baseline (sections, values and list items alike:
  `model.depth`, `data.sources.0.weight`); a patch may set only these.
- `check(patch, source)`: rejects unknown keys (naming the contribution file, with close-key
  suggestions) and values the baseline cannot hold; returns the patch in canonical form
  (for a recipe the validated JSON values, so `3e-3` becomes 0.003 and a section the whole
  section with its defaults; for a file the plain JSON-like values).
- `apply(patches)`: `(data, text)` after applying the patches in order: `data` the plain,
  JSON-like content (what a run's identity hashes), `text` the patched file in the baseline's
  own format (what `{recipe}` receives, written as `recipe<suffix>`).

A patch key names a value, a section or a list item; setting a section replaces it whole.
"""

from __future__ import annotations

import copy
import datetime as dt
import difflib
import json
import math
import re
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import tomlkit
import tomlkit.exceptions
import tomlkit.items
import yaml

from stacklab.errors import RecipeError, StacklabError
from stacklab.recipe import Recipe, canonical_hash, get_dotted, recipe_from_dict

Format = Literal["yaml", "json", "toml"]
FORMATS: dict[str, Format] = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml"}


class ContributionError(StacklabError):
    """A contribution file, or a combination of contributions, is invalid."""


class ConfigError(StacklabError):
    """A baseline config file cannot be read: unknown format, not parseable, not a mapping."""


class Baseline(ABC):
    """What contributions' patches apply to (see the module docstring)."""

    name: str  # for messages: the recipe's or the file's name
    suffix: str  # the format's extension: what `{recipe}` is written as (".yaml", ".toml")
    label: str  # in "is not in the baseline <label>": "recipe", or the file's name

    @abstractmethod
    def data(self) -> dict[str, Any]:
        """The unpatched content as plain, JSON-like data (a fresh copy)."""

    def keys(self) -> set[str]:
        """Every dotted path a patch may set."""
        return set(self._keys)

    @cached_property
    def _keys(self) -> frozenset[str]:
        return frozenset(all_keys(self.data()))

    def check(self, patch: Mapping[str, Any], source: Path) -> dict[str, Any]:
        """The patch in canonical form; ContributionError naming `source` if it is invalid."""
        for key in patch:
            if key not in self._keys:
                close = difflib.get_close_matches(key, sorted(self._keys), n=3, cutoff=0.6)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ContributionError(
                    f"{source}: patch key '{key}' is not in the baseline {self.label}{hint}"
                )
        return self._check_values(patch, source)

    def _require_keys(self, patches: Sequence[Mapping[str, Any]], origin: str) -> None:
        """Patches were checked against a baseline: this one may differ (a branch edited it)."""
        for patch in patches:
            for key in patch:
                if key not in self._keys:
                    raise ContributionError(
                        f"{origin}: patch key '{key}' is not in the baseline {self.label}"
                    )

    @abstractmethod
    def _check_values(self, patch: Mapping[str, Any], source: Path) -> dict[str, Any]:
        """`check` once every key is known to exist."""

    @abstractmethod
    def apply(
        self, patches: Sequence[Mapping[str, Any]], origin: str = "baseline"
    ) -> tuple[dict[str, Any], str]:
        """(data, text) after applying checked patches in order; `origin` names the result
        in errors ("baseline + a + b")."""


# --------------------------------------------------------------------------- recipes


class RecipeBaseline(Baseline):
    """A stacklab recipe: every patched recipe is validated, and written as YAML."""

    suffix = ".yaml"
    label = "recipe"

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.name = recipe.name

    def data(self) -> dict[str, Any]:
        return self.recipe.to_dict()

    def _check_values(self, patch: Mapping[str, Any], source: Path) -> dict[str, Any]:
        try:
            patched = self._build([patch], origin=f"{source}: invalid patch").to_dict()
        except RecipeError as exc:
            raise ContributionError(str(exc)) from None
        return {key: get_dotted(patched, key) for key in patch}

    def patched(self, patches: Sequence[Mapping[str, Any]], origin: str = "baseline") -> Recipe:
        """The validated recipe; ContributionError "invalid combination: ..." if it is not."""
        try:
            return self._build(patches, origin)
        except RecipeError as exc:
            raise ContributionError(f"invalid combination: {exc}") from None

    def apply(
        self, patches: Sequence[Mapping[str, Any]], origin: str = "baseline"
    ) -> tuple[dict[str, Any], str]:
        self._require_keys(patches, origin)
        recipe = self.patched(patches, origin)
        return recipe.to_dict(), recipe.to_yaml()

    def _build(self, patches: Sequence[Mapping[str, Any]], origin: str) -> Recipe:
        data = self.recipe.to_dict()
        for patch in patches:
            set_keys(data, patch)
        return recipe_from_dict(data, origin=origin)


# --------------------------------------------------------------------------- config files

# YAML 1.1 (PyYAML) reads `3e-3` as a string; where the baseline holds a number it is meant
# as one.
_YAML11_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


class FileBaseline(Baseline):
    """A free-form YAML, JSON or TOML config file, patched and written in its own format.

    TOML is edited with tomlkit, so comments, key order and layout are kept; JSON keeps its
    key order and is written with an indent of 2; YAML is read and written with PyYAML
    (`sort_keys=False`), which keeps key order but loses comments. Patch values must be plain
    JSON-like values the format can hold: TOML has no null, JSON no NaN or infinity. A string
    that YAML 1.1 read from `3e-3` becomes a number where the baseline holds a number.
    """

    def __init__(self, path: Path, fmt: Format, text: str, content: dict[str, Any]) -> None:
        self.path = path
        self.format = fmt
        self.text = text
        self.name = self.label = path.name
        self.suffix = {"yaml": ".yaml", "json": ".json", "toml": ".toml"}[fmt]
        self._content = content  # as parsed, for YAML and JSON

    @classmethod
    def load(cls, path: Path, text: str | None = None) -> FileBaseline:
        """Read `path` (or parse `text`, e.g. the file as read from a git tree)."""
        path = Path(path)
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            valid = ", ".join(FORMATS)
            raise ConfigError(
                f"{path}: unknown config format {path.suffix or '(no extension)'!r}; "
                f"a baseline file ends in one of {valid}"
            )
        if text is None:
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read the baseline ({exc.strerror})") from None
        try:
            content = _parse(fmt, text)
        except _PARSE_ERRORS as exc:
            raise ConfigError(f"{path}: not valid {fmt.upper()} ({_one_line(exc)})") from None
        if not isinstance(content, dict):
            raise ConfigError(
                f"{path}: a baseline must be a mapping at the top level, "
                f"got {type(content).__name__}"
            )
        return cls(path, fmt, text, content)

    def data(self) -> dict[str, Any]:
        return _plain(self._content)

    def _check_values(self, patch: Mapping[str, Any], source: Path) -> dict[str, Any]:
        base = self.data()
        checked = {}
        for key, value in patch.items():
            where = f"{source}: patch key '{key}'"
            old = get_dotted(base, key)
            if (
                isinstance(value, str)
                and _YAML11_FLOAT.fullmatch(value)
                and isinstance(old, int | float)
                and not isinstance(old, bool)
            ):
                value = float(value)
            self._check_value(value, where)
            checked[key] = copy.deepcopy(value)
        try:
            self.apply([checked], origin=f"{source}: patch")
        except (ValueError, TypeError, tomlkit.exceptions.TOMLKitError) as exc:
            raise ContributionError(
                f"{source}: the patch cannot be written to {self.name} ({_one_line(exc)})"
            ) from None
        return checked

    def _check_value(self, value: Any, where: str) -> None:
        if value is None:
            if self.format == "toml":
                raise ContributionError(
                    f"{where}: TOML has no null, so {self.name} cannot hold None; "
                    "leave the key out of the patch or give a value"
                )
        elif isinstance(value, float):
            if not math.isfinite(value) and self.format == "json":
                raise ContributionError(f"{where}: JSON has no {value}")
        elif isinstance(value, list):
            for item in value:
                self._check_value(item, where)
        elif isinstance(value, dict):
            for k, item in value.items():
                if not isinstance(k, str):
                    raise ContributionError(f"{where}: mapping key {k!r} is not a string")
                self._check_value(item, where)
        elif not isinstance(value, bool | int | str):
            raise ContributionError(
                f"{where}: a {type(value).__name__} value ({value}) cannot be written to "
                f"{self.name}; quote it to set a string"
            )

    def apply(
        self, patches: Sequence[Mapping[str, Any]], origin: str = "baseline"
    ) -> tuple[dict[str, Any], str]:
        self._require_keys(patches, origin)
        if self.format == "toml":
            doc = tomlkit.parse(self.text)
            for patch in patches:
                for key in sorted(patch):
                    *path, last = key.split(".")
                    _toml_set(_walk(doc, path), last, copy.deepcopy(patch[key]))
            text = tomlkit.dumps(doc)
        else:
            content = copy.deepcopy(self._content)
            for patch in patches:
                set_keys(content, patch)
            if self.format == "json":
                text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            else:
                text = yaml.safe_dump(content, sort_keys=False, allow_unicode=True)
        # The data is what the trainer will read, checked against what the patches meant.
        meant = self.data()
        for patch in patches:
            set_keys(meant, patch)
        try:
            data = _plain(_parse(self.format, text))
        except _PARSE_ERRORS as exc:
            data, why = None, f"it does not parse back: {_one_line(exc)}"
        else:
            why = "it reads back with other values"
        if data is None or canonical_hash(data) != canonical_hash(meant):
            raise ContributionError(
                f"{origin}: the patched {self.name} cannot be written in place ({why})"
            )
        return data, text


_PARSE_ERRORS = (
    yaml.YAMLError,
    json.JSONDecodeError,
    tomllib.TOMLDecodeError,
    tomlkit.exceptions.ParseError,
)


def _parse(fmt: Format, text: str) -> Any:
    if fmt == "toml":
        data = tomllib.loads(text)
        tomlkit.parse(text)  # it edits the file: it must read it too
        return data
    if fmt == "json":
        return json.loads(text)
    return yaml.safe_load(text)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _toml_set(node: Any, part: str, value: Any) -> None:
    """Set one key or item in a tomlkit container, keeping comments and layout around it.

    A mapping set onto a table updates the table key by key (so the comments of the keys
    it keeps stay); onto anything else it becomes an inline table, and a list an inline
    array (unless it replaces an array of tables with tables), so they stay in place.
    """
    key: Any = int(part) if isinstance(node, list) else _child(node, part)
    old = node[key] if isinstance(node, list) or key in node else None
    if isinstance(value, dict) and isinstance(old, dict):
        for gone in [k for k in old if k not in value]:
            del old[gone]
        for k, v in value.items():
            _toml_set(old, k, v)
    elif isinstance(value, dict):
        table = tomlkit.inline_table()
        for k, v in value.items():
            _toml_set(table, k, v)
        node[key] = table
    elif isinstance(value, list) and not (
        isinstance(old, tomlkit.items.AoT) and all(isinstance(v, dict) for v in value)
    ):
        array = tomlkit.array()
        for v in value:
            array.append(v)  # mappings become inline tables
        node[key] = array
    else:
        node[key] = value


# --------------------------------------------------------------------------- dotted keys


def all_keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted path into plain data: sections, values and list items alike."""
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
        keys |= all_keys(child, key + ".")
    return keys


def set_keys(data: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """Set each dotted key of `patch` in nested dicts and lists, in place (keys exist)."""
    for key in sorted(patch):
        *path, last = key.split(".")
        node = _walk(data, path)
        node[int(last) if isinstance(node, list) else _child(node, last)] = copy.deepcopy(
            patch[key]
        )


def _walk(data: Any, path: Sequence[str]) -> Any:
    node = data
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[_child(node, part)]
    return node


def _child(node: Any, part: str) -> Any:
    """The mapping key that `part` names (YAML may have non-string keys: `1:` or `true:`)."""
    if part in node:
        return part
    return next((k for k in node if not isinstance(k, str) and str(k) == part), part)


def _plain(value: Any) -> Any:
    """JSON-like data: dates and times as ISO strings, mapping keys as strings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
