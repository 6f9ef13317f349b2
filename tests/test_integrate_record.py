"""decision.json as a typed record: the published schema, a real round's file read back and
checked, and the one way intervals, the utility and an interaction are computed and printed.

The rounds here are two of tests/equivalence/decisions.py's (the script that proves a change
to the engine moved no decision), so the fast suite runs the same path end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from equivalence.decisions import CASES, run_case
from stacklab.integrate.effects import interaction_contrast
from stacklab.integrate.record import ComparisonEvidence, DecisionRecord, schema_text
from stacklab.integrate.select import Objective
from stacklab.integrate.utility import utility
from stacklab.integrate.verdicts import Interval, fmt

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "decision.schema.json"


def test_the_published_schema_is_the_records():
    """docs/decision.schema.json is generated from the models: after changing them, run
    `python -m stacklab.integrate.record > docs/decision.schema.json`."""
    assert SCHEMA.read_text() == schema_text()


@pytest.fixture(scope="module", params=["small", "ladder_lr_tuning"])
def round_out(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    (case,) = [c for c in CASES if c.name == request.param]
    out, _ = run_case(case, tmp_path_factory.mktemp(case.name))
    return out


@pytest.mark.slow
def test_a_rounds_decision_json_reads_back_as_the_record(round_out: Path) -> None:
    text = (round_out / "decision.json").read_text()
    record = DecisionRecord.model_validate_json(text)
    assert record.dumps() == text  # the file is exactly the record, key order included
    # The parts read by attribute, typed all the way down.
    assert record.selected == [d.id for d in record.decisions if d.status == "accepted"]
    assert record.runs.total == record.runs.executed + record.runs.reused + record.runs.failed
    for d in record.decisions:
        assert d.evidence and (d.status == "shelved") == (d.id in record.shelved)
    first = record.decision("alpha").evidence[0]
    assert isinstance(first, ComparisonEvidence) and "alpha" in first.a
    assert set(record.credit_table[0].metrics) == {"quality", "utility"}
    assert (record.ladder is not None) == (round_out.parent.name.startswith("ladder"))


@pytest.mark.slow
def test_a_rounds_decision_json_validates_against_the_published_schema(round_out: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    decision = json.loads((round_out / "decision.json").read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(decision)
    decision["decisions"][0]["status"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(decision, json.loads(SCHEMA.read_text()))


def test_optional_parts_are_left_out_not_null() -> None:
    """A round without a ladder writes no `ladder`, `rung` or `transfer` key (not null)."""
    schema = json.loads(schema_text())
    assert "ladder" not in schema["required"]
    assert {"rung", "transfer"}.isdisjoint(schema["$defs"]["Decision"]["required"])


def test_intervals_print_one_way_in_reasons_and_reports() -> None:
    assert fmt(0.123456, 0.0451, 0.2) == "+0.123 [+0.0451, +0.2]"
    assert Interval(0.5, -math.inf, math.inf, 0.95, 1, 0).text() == "+0.5 [-inf, +inf]"
    # decision.json writes an unbounded end as null: it prints as the reason printed it.
    assert fmt(0.5, None, 0.7) == "+0.5 [-inf, +0.7]" and fmt(0.5, 0.1, None) == "+0.5 [+0.1, +inf]"
    assert fmt(None, None, None) == "n/a" and fmt(math.nan, -math.inf, math.inf) == "n/a"
    assert fmt(math.nan, 0.1, 0.2) == "n/a [+0.1, +0.2]"
    assert fmt(1e-17, -0.4, 0.4) == "+0 [-0.4, +0.4]"  # float dust where the sum is 0
    assert fmt(-0.2, -0.4, 0.0) == "-0.2 [-0.4, +0]"


def test_the_utility_is_one_formula_for_runs_predictions_and_draws() -> None:
    objectives = [Objective("acc", "max", 2.0, scale=0.5), Objective("loss", "min", 1.0, 0.25)]
    assert utility({"acc": 1.0, "loss": 0.5}, objectives) == pytest.approx(2 * 2.0 - 0.5 * 4.0)
    draws = {"acc": np.array([1.0, 0.0]), "loss": np.array([0.5, 0.25])}
    assert utility(draws, objectives) == pytest.approx([2.0, -1.0])
    assert utility({"acc": 1.0, "loss": 0.0}, objectives, {"acc": 1.0, "loss": 1.0}) == 2.0


def test_an_interaction_is_what_two_add_beyond_each_alone() -> None:
    assert interaction_contrast(1.5, 1.0, 0.8, 0.0) == pytest.approx(-0.3)
    both, first, second, base = (
        np.array(v) for v in ([3.0, 2.0], [2.0, 1.0], [1.0, 1.0], [0.5, 0.5])
    )
    assert interaction_contrast(both, first, second, base).tolist() == [0.5, 0.5]
