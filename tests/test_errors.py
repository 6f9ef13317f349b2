"""The one translator from pydantic errors to one-line messages, on a small model of its own."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stacklab.errors import describe_validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Local(_Strict):
    kind: Literal["local"]
    workers: int = 1


class Remote(_Strict):
    kind: Literal["remote"]
    address: str


class Inner(_Strict):
    depth: int = Field(1, ge=1)


class Spec(_Strict):
    name: str
    seeds: list[int] | int = 3
    runner: Annotated[Local | Remote, Field(discriminator="kind")] = Local(kind="local")
    inner: Inner | None = None
    source: str = "set by the loader"


def message(raw: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(ValidationError) as info:
        Spec.model_validate(raw)
    return describe_validation_error(info.value, Spec, **kwargs)


def test_unknown_key_comes_first_with_a_suggestion_and_the_valid_keys() -> None:
    # "nmae" also makes "name" missing: the misspelling is what to report
    assert message({"nmae": "x"}, hidden=["source"]) == (
        "unknown key 'nmae'; did you mean 'name'? "
        "(valid keys: name, seeds, runner, inner) [+1 more]"
    )
    assert message({"name": "x", "runner": {"kind": "local", "workerz": 2}}, noun="field") == (
        "unknown field 'runner.workerz'; did you mean 'workers'? (valid fields: kind, workers)"
    )


def test_union_labels_are_dropped_from_the_key() -> None:
    assert message({"name": "x", "seeds": [1, "a"]}).startswith(
        "key 'seeds.1': Input should be a valid integer"
    )
    assert message({"name": "x", "runner": {"kind": "remote"}}) == "missing key 'runner.address'"
    assert message({"name": "x", "inner": {"depth": 0}}) == (
        "key 'inner.depth': Input should be greater than or equal to 1 (got 0)"
    )


def test_discriminator_errors() -> None:
    assert message({"name": "x", "runner": {"kind": "ssh"}}) == (
        "key 'runner': unknown 'kind' 'ssh'; valid: 'local', 'remote'"
    )
    assert message({"name": "x", "runner": {}}) == "key 'runner': needs a 'kind'"
