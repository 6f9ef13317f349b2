"""The training code still computes what it computed when the golden file was captured: every
logged record of tiny pretraining, SFT and RL runs, their summaries and final weights.

Within a relative 1e-6 here, so that another machine's float rounding passes;
`python -m tests.equivalence.losses compare tests/equivalence/losses_golden.json` is the
bit-exact check, for a refactoring on one machine.
"""

import json
from pathlib import Path

import pytest

from equivalence.losses import capture, decode, differences

GOLDEN = Path(__file__).parent / "equivalence" / "losses_golden.json"


@pytest.mark.slow
def test_training_records_match_the_golden_file() -> None:
    golden = decode(json.loads(GOLDEN.read_text()))
    found = differences(golden, capture(), rtol=1e-6)
    assert not found, f"{len(found)} values differ; the first: {found[0]}"
