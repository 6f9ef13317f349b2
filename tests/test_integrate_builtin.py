"""A real round through the built-in runner: `stacklab build` per run, stages shared by cache.

The baseline is the demo's, shrunk to a few pretraining steps; the contributions are the
catalog's own, named as a user's round names them. This is the demo's path end to end (round
file -> builds -> metrics -> decision -> reports), and it checks that a second invocation
resumes with nothing re-run.
"""

import json
from pathlib import Path

import pytest
import yaml

from stacklab.integrate.engine import integrate
from stacklab.integrate.record import FilesCode

pytestmark = pytest.mark.slow

# The demo baseline shrunk to a few pretraining steps: a real build in seconds.
NANO = (
    "base: demo-baseline\n"
    "name: nano\n"
    "data: {mixture: {token_budget: 40000, val_token_budget: 4000}}\n"
    "tokenizer: {vocab_size: 384, train_chars: 60000}\n"
    "pretrain: {steps: 3, batch_size: 2, ckpt_every: 3}\n"
    "eval: {task_problems: 4}\n"
)


def test_round_of_real_builds_decides_and_resumes(tmp_path: Path) -> None:
    (tmp_path / "nano.yaml").write_text(NANO)
    (tmp_path / "round.yaml").write_text(
        "baseline: nano.yaml\n"
        "contributions: [muon, wsd-schedule]\n"
        "objectives: [{metric: val_bpb, direction: min, weight: 1.0}]\n"
        "guardrails: [{metric: pretrain/tokens_per_s, kind: ratio, threshold: 0.01}]\n"
        "seeds: 1\n"
        "confirm_seeds: 1\n"
        "budget: 10\n"
        "runner: {kind: builtin, cache_dir: cache, timeout_s: 300}\n"
        "executor: {kind: local, workers: 2}\n"
    )
    out = tmp_path / "out"
    result = integrate(tmp_path / "round.yaml", out)
    d = result.decision
    assert d.runs.failed == 0 and d.runs.executed >= 4
    # Each run is keyed by the stacklab version and the build code, not by the recipe alone.
    code = d.code.baseline
    assert isinstance(code, FilesCode)
    assert code.kind == "stacklab" and code.covers.startswith("stacklab 0.1.0 + ")
    assert "stacklab/train/pretrain.py" in code.files or any(
        f.endswith("train/pretrain.py") for f in code.files
    )
    assert {row.id for row in d.decisions} == {"muon", "wsd-schedule"}
    # One seed per recipe leaves no noise estimate: nothing can be shown, so nothing is
    # accepted on it (undecided, or shelved by a guardrail or a choice).
    assert d.selected == []
    assert all(row.status in ("shelved", "undecided") and row.reason for row in d.decisions)
    for name in ("decision.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    # Every finished run is a real build: its own metrics, recipe and stage links.
    run_dirs = [p for p in (out / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(run_dirs) == d.runs.executed
    for run in run_dirs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["val_bpb"] > 0 and metrics["pretrain/tokens"] == 3 * 2 * 256
        assert (run / "pretrain").exists()
    # The data stages are shared: one corpus for every run, one tokenizer per seed.
    assert len(list((tmp_path / "cache" / "corpus").glob("*/"))) == 1
    stamps = {run.name: (run / "metrics.json").stat().st_mtime_ns for run in run_dirs}
    again = integrate(tmp_path / "round.yaml", out).decision
    assert again.selected == d.selected and again.runs == d.runs
    after = [p for p in (out / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert {run.name: (run / "metrics.json").stat().st_mtime_ns for run in after} == stamps


def test_a_ladder_of_real_builds_runs_each_rung(tmp_path: Path) -> None:
    """The built-in runner under a scale ladder: each rung's patch reaches the builds."""
    (tmp_path / "nano.yaml").write_text(NANO)
    (tmp_path / "round.yaml").write_text(
        "baseline: nano.yaml\n"
        "contributions: [muon]\n"
        "objectives: [{metric: val_bpb, direction: min, weight: 1.0}]\n"
        "scales:\n"
        "  - {name: s, patch: {model.depth: 1}, share: 0.5}\n"
        "  - {name: m, patch: {model.depth: 2, pretrain.steps: 4}, cost: 2}\n"
        "seeds: 2\n"
        "confirm_seeds: 2\n"
        "budget: 36\n"
        "runner: {kind: builtin, cache_dir: cache, timeout_s: 300}\n"
        "executor: {kind: local, workers: 2}\n"
    )
    out = tmp_path / "out"
    d = integrate(tmp_path / "round.yaml", out).decision
    assert d.runs.failed == 0 and d.ladder is not None
    s, m = d.ladder.rungs
    assert s.runs > 0 and m.runs > 0 and d.ladder.units_used <= 36
    depths = set()
    for run in (p for p in (out / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")):
        metrics = json.loads((run / "metrics.json").read_text())
        steps = metrics["pretrain/tokens"] // (2 * 256)
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        depths.add((recipe["model"]["depth"], steps))
    assert depths == {(1, 3), (2, 4)}
    (muon,) = d.decisions
    assert muon.rung in ("s", "m") and muon.transfer is not None and muon.transfer.rungs
