"""The worked example outside stacklab (examples/): a plain-PyTorch character model whose
contributions are git branches of its own repository and one TOML patch, decided by a full
round through the external runner, as docs/integrate.md walks through it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from stacklab.integrate.engine import integrate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_the_chartrainer_round_decides_among_its_branches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_trainer_repo.py"), str(tmp_path / "trainer")],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    # The trainer does not know stacklab: nothing in it imports it.
    for source in (tmp_path / "trainer").glob("*.py"):
        assert "stacklab" not in source.read_text()
    shutil.copytree(EXAMPLES / "chartrainer_round", tmp_path / "round")
    # The round's command says `python`: the one with torch, as the walkthrough sets PATH.
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "round" / "out"
    result = integrate(tmp_path / "round" / "round.yaml", out, console=Console(file=io.StringIO()))
    d = result.decision
    assert d.runs.failed == 0
    assert d.selected == ["bigger-lr", "deeper", "gelu", "no-dropout"]
    assert d.decision("softsign").kind == "conflict"
    assert d.decision("softsign").reason.startswith(
        "conflicts with gelu: both change model.py line 25 (a choice group)"
    )
    assert d.decision("tidy-data").status == "shelved"
    assert d.code.changes is not None
    assert set(d.code.changes) == {"bigger-lr", "deeper", "gelu", "softsign", "tidy-data"}
    assert d.code.changes["bigger-lr"].files == ["train.toml"]
    (check,) = d.guardrail_checks
    assert check.metric == "tokens_per_s" and check.state == "held"
    # Each run read a TOML config with the baseline's comments, in its own merged tree.
    some_run = next((out / "runs").iterdir())
    assert (some_run / "recipe.toml").read_text().lstrip().startswith("#")
    assert json.loads((out / "decision.json").read_text())["selected"] == d.selected
