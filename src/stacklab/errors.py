"""Errors that reach the user.

Every failure caused by the user's input (a recipe, a data file, an override) is raised as a
`StacklabError` whose message is one line that names the bad key, file or value and, where it
can, what would be valid. The CLI prints that line and exits non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Collection, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


class StacklabError(Exception):
    """A problem with the user's input, explained in one line."""


class RecipeError(StacklabError):
    """The recipe, or an override applied to it, is invalid."""


class DataError(StacklabError):
    """A data source, shard or derived data file is missing, empty or corrupt."""


# --------------------------------------------------------------------------- validation errors
#
# Recipes, rounds, contribution files and imported model configs are all pydantic models read
# from files people write by hand. pydantic's own report is a multi-line list with internal
# paths (`runner.external.command`, `seeds.list[int].0`); a user needs one line that names the
# key as they wrote it and, for a misspelling, what they meant. One translator keeps those
# messages alike everywhere.


def describe_validation_error(
    exc: ValidationError,
    model: type[BaseModel],
    *,
    noun: str = "key",
    hidden: Collection[str] = (),
) -> str:
    """One line for a pydantic error raised while validating `model`.

    It reports one error (an unknown key first: a misspelt key also makes the real one
    missing), names its dotted key as written in the file (pydantic's union labels dropped),
    suggests close valid keys for an unknown one, shows a bad value, and counts the rest.
    `noun` is what the file calls its keys ("key", "field"); `hidden` are model fields a file
    may not set, left out of the suggestions.
    """
    errors = exc.errors()
    err = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    loc = tuple(err["loc"])
    path, node = _walk(model, loc[:-1]) if err["type"] == "extra_forbidden" else _walk(model, loc)
    where = ".".join(path)
    msg = " ".join(err["msg"].removeprefix("Value error, ").split())
    more = f" [+{len(errors) - 1} more]" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        key = ".".join([*path, str(loc[-1])])
        valid = [f for f in _fields(node) if f not in hidden]
        return f"unknown {noun} '{key}'" + suggest(str(loc[-1]), valid, noun) + more
    if err["type"] == "missing":
        return f"missing {noun} '{where}'{more}"
    ctx = err.get("ctx", {})
    if err["type"] == "union_tag_invalid":
        msg = (
            f"unknown {ctx.get('discriminator', 'kind')} {ctx.get('tag')!r}; "
            f"valid: {ctx.get('expected_tags')}"
        )
    elif err["type"] == "union_tag_not_found":
        msg = f"needs a {ctx.get('discriminator', 'kind')}"
    elif "input" in err and not isinstance(err["input"], dict | BaseModel):
        shown = repr(err["input"])
        custom = err["type"] in ("value_error", "assertion_error")  # our own message
        if not (custom and shown in msg):
            msg += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return (f"{noun} '{where}': {msg}" if where else msg) + more


def suggest(word: str, valid: Sequence[str], noun: str = "key") -> str:
    """'; did you mean 'x'? (valid keys: ...)' for an unknown `word`, or '' if none are valid.

    One guess, the closest: a second weaker one is noise next to the full list."""
    if not valid:
        return ""
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid {noun}s: {', '.join(valid)})"


def _walk(model: Any, loc: tuple[Any, ...]) -> tuple[list[str], Any]:
    """The parts of `loc` a user wrote (union labels dropped) and the type `loc` leads to."""
    path: list[str] = []
    node: Any = model
    for part in loc:
        node, label = _step(node, part)
        if not label:
            path.append(str(part))
    return path, node


def _step(node: Any, part: Any) -> tuple[Any, bool]:
    """Move one `loc` step down the type tree; report whether the step was a union label."""
    node = _unwrap(node)
    origin = get_origin(node)
    if origin in (Union, types.UnionType):
        members = [_unwrap(m) for m in get_args(node) if m is not type(None)]
        if len(members) == 1:  # Optional[X]: pydantic adds no label
            return _step(members[0], part)
        # pydantic labels the member it tried: a discriminator's tag or the member's name
        for member in members:
            if _is_tag(member, part) or _label(member) == part:
                return member, True
        return Any, True
    if origin in (list, tuple, set, frozenset):
        return get_args(node)[0] if get_args(node) else Any, False
    if origin is dict:
        return get_args(node)[1] if get_args(node) else Any, False
    if isinstance(node, type) and issubclass(node, BaseModel):
        if part in node.model_fields:
            return node.model_fields[part].annotation, False
        if _is_tag(node, part):  # a one-member discriminated union still adds its tag
            return node, True
    return Any, False


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _label(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and get_origin(tp) is None else str(tp)


def _is_tag(member: Any, part: Any) -> bool:
    """Whether `part` is the value of a single-value Literal field of the model `member`."""
    if not (isinstance(member, type) and issubclass(member, BaseModel)):
        return False
    for field in member.model_fields.values():
        if get_origin(field.annotation) is Literal and get_args(field.annotation) == (part,):
            return True
    return False


def _fields(node: Any) -> list[str]:
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []
