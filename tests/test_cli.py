"""The whole stack through the command line: build → eval → export → import → export."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import SMALL_MODEL, small_recipe
from stacklab.cli import main

MOE = {"moe": {"enabled": True, "num_experts": 4, "top_k": 2, "router": "sigmoid",
               "num_shared_experts": 1, "balance": "aux_free"}}  # fmt: skip


def build_run(tmp_path: Path, model_extra: dict | None = None) -> Path:
    sections = json.loads(json.dumps(SMALL_MODEL))
    sections["model"].update(model_extra or {})
    run = tmp_path / "run"
    code = main(
        ["build", str(small_recipe(tmp_path, sections)), "--out", str(run), "--cache-dir",
         str(tmp_path / "cache")]
    )  # fmt: skip
    assert code == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize("model_extra", [None, MOE], ids=["dense", "moe"])
def test_build_eval_export_import_round_trip(tmp_path: Path, model_extra, capsys) -> None:
    run = build_run(tmp_path, model_extra)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val_bpb", "task_acc/arithmetic", "pretrain/tokens_per_s", "pretrain/mfu"):
        assert key in metrics
    assert metrics["pretrain/tokens"] == 30 * 4 * 32
    assert (run / "eval" / "completions.jsonl").is_file()

    assert main(["eval", str(run), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["val_bpb"] == pytest.approx(metrics["val_bpb"], abs=1e-6)
    assert again["task_acc/arithmetic"] == metrics["task_acc/arithmetic"]

    hf = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(hf)]) == 0
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    arch = json.loads((hf / "config.json").read_text())["architectures"][0]
    assert arch == ("Glm4MoeForCausalLM" if model_extra else "Qwen3ForCausalLM")

    imported = tmp_path / "imported"
    assert main(["import", str(hf), "--out", str(imported)]) == 0
    hf2 = tmp_path / "hf2"
    assert main(["export", str(imported), "--format", "hf", "--out", str(hf2)]) == 0
    a, b = load_file(hf / "model.safetensors"), load_file(hf2 / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    assert main(["import", str(hf), "--out", str(imported)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().out


@pytest.mark.slow
def test_export_refusal_names_the_field(tmp_path: Path, capsys) -> None:
    run = build_run(tmp_path, {"qk_norm": False})
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    out = capsys.readouterr().out
    assert "qk_norm" in out and not (tmp_path / "hf").exists()


def test_eval_and_export_on_a_non_run_are_one_line_errors(tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: recipe file not found: ") and out.count("\n") == 1
    assert f"{tmp_path / 'recipe.yaml'}" in out
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") and out.count("\n") == 1
    assert "is it a run directory" in out and not (tmp_path / "hf").exists()
