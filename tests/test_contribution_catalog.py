"""The built-in contribution catalog loads against its baseline and forms a valid round."""

import copy
from pathlib import Path

import pytest

from stacklab.builtin import CONTRIBUTIONS_DIR as CATALOG
from stacklab.builtin import ROUNDS_DIR
from stacklab.integrate.contributions import apply_subset, choice_groups, load_contributions
from stacklab.integrate.round import RoundError, load_round
from stacklab.recipe import load_recipe


def test_catalog_loads_with_citations_and_one_choice_group() -> None:
    baseline = load_recipe("tiny-baseline")
    contribs = load_contributions([CATALOG], baseline)
    assert len(contribs) >= 8
    assert all(c.citation and c.author == "stacklab" for c in contribs)
    assert {c.area for c in contribs} >= {"data", "architecture", "optimizer", "rl", "agent"}
    assert choice_groups(contribs) == [["dapo-clip-higher", "gspo"]]


def test_the_baseline_plus_the_techniques_tiny_uses_is_tiny() -> None:
    """tiny-baseline takes out exactly the catalog techniques that `tiny` uses, no more."""
    baseline = load_recipe("tiny-baseline")
    contribs = load_contributions([CATALOG], baseline)
    used = {"minhash-dedup", "muon", "qk-norm", "tool-use-sft", "dynamic-sampling"}
    used.add("dapo-clip-higher")  # chosen by the built-in round post-training
    rebuilt = apply_subset(baseline, contribs, used).to_dict()
    tiny = load_recipe("tiny").to_dict()
    assert rebuilt.pop("name") == "tiny-baseline" and tiny.pop("name") == "tiny"
    assert rebuilt == tiny


def test_catalog_round_validates(tmp_path: Path) -> None:
    """Every contribution changes the baseline and no two make each other redundant."""
    round_file = tmp_path / "round.yaml"
    round_file.write_text(
        "baseline: tiny-baseline\n"
        f"contributions: [{CATALOG}]\n"
        "objectives: [{metric: val_bpb, direction: min, weight: 1.0}]\n"
        "seeds: 2\n"
        "budget: 200\n"
        "runner: {kind: external, command: 'python train.py {recipe} {seed} {out}'}\n"
    )
    rnd = load_round(round_file)
    assert len(rnd.contributions) == len(list(CATALOG.glob("*.yaml")))


def test_demo_round_is_built_in() -> None:
    """`stacklab demo` runs the built-in round demo: three catalog techniques on demo-baseline."""
    rnd = load_round("demo")
    assert rnd.file == (ROUNDS_DIR / "demo.yaml").resolve()
    assert rnd.ids == ["muon", "qk-norm", "wsd-schedule"]
    assert rnd.baseline.name == "demo-baseline"
    assert not rnd.baseline.sft.enabled and not rnd.baseline.rl.enabled
    assert rnd.spec.runner.kind == "builtin"
    assert "val_bpb" in rnd.metrics
    # Screening (2^3 subsets x 2 seeds) plus a confirmation batch must fit the budget.
    assert rnd.spec.budget >= 8 * len(rnd.seeds) + 3 * rnd.confirm_count


def test_round_names_catalog_contributions(tmp_path: Path) -> None:
    """A bare name is a file beside the round if there is one, else a built-in contribution."""
    (tmp_path / "muon").write_text(
        "id: my-muon\narea: optimizer\nsummary: s\nauthor: me\npatch: {optim.name: muon}\n"
    )
    round_file = tmp_path / "round.yaml"
    head = "baseline: tiny-baseline\nobjectives: [{metric: val_bpb}]\nbudget: 9\n"
    head += "runner: {kind: external, command: 'python t.py {recipe} {seed} {out}'}\n"
    round_file.write_text(head + "contributions: [qk-norm, wsd-schedule]\n")
    rnd = load_round(round_file)
    assert rnd.ids == ["qk-norm", "wsd-schedule"]
    assert rnd.contributions[0].source == CATALOG / "qk-norm.yaml"
    round_file.write_text(head + "contributions: [muon, qk-norm]\n")
    assert load_round(round_file).ids == ["my-muon", "qk-norm"]
    round_file.write_text(head + "contributions: [qk-nrom]\n")
    # the miss names where it looked, the likely built-in, and every built-in
    miss = r"contributions: contribution file not found: .*qk-nrom; did you mean the built-in"
    with pytest.raises(RoundError, match=miss + r" contribution 'qk-norm'\? \(built-in .*gspo"):
        load_round(round_file)


def test_post_training_round_is_built_in() -> None:
    """`stacklab integrate post-training`: the tiny build's RL loss, GRPO against the choice
    group of DAPO and GSPO, decided on the agents and arithmetic with val_bpb guarded. Its
    baseline is tiny with GRPO, and the DAPO subset it chose is the tiny recipe itself."""
    rnd = load_round("post-training")
    assert rnd.file == (ROUNDS_DIR / "post-training.yaml").resolve()
    assert rnd.ids == ["dapo-clip-higher", "gspo"]
    assert choice_groups(rnd.contributions) == [["dapo-clip-higher", "gspo"]]
    assert rnd.baseline.name == "tiny-grpo"
    assert rnd.baseline.rl.enabled and rnd.baseline.rl.loss == "grpo"
    chosen = copy.deepcopy(rnd.workspace.resolve(frozenset({0}), {}, {}).data)
    tiny = load_recipe("tiny").to_dict()
    assert chosen.pop("name") == "tiny-grpo" and tiny.pop("name") == "tiny"
    tiny.pop("seed")  # each run sets its own
    assert chosen == tiny
    assert rnd.spec.runner.kind == "builtin"
    assert {"agent_success/lookup", "task_acc/arithmetic", "agent_success/calculator"} <= set(
        rnd.metrics
    )
    assert [g.metric for g in rnd.spec.guardrails] == ["val_bpb"]
    # Each subset differs from tiny in the RL loss alone, so it reuses tiny's SFT.
    for index, loss in enumerate(("dapo", "gspo")):
        data = copy.deepcopy(rnd.workspace.resolve(frozenset({index}), {}, {}).data)
        assert data["rl"]["loss"] == loss
        data["rl"]["loss"] = "grpo"
        assert data == rnd.workspace.resolve(frozenset(), {}, {}).data
    # Screening (3 recipes x the seeds) and one confirmation look (3 recipes) fit the budget.
    assert rnd.spec.budget >= 3 * len(rnd.seeds) + 3 * rnd.confirm_count
