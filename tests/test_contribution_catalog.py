"""The built-in contribution catalog loads against its baseline and forms a valid round."""

from pathlib import Path

from stacklab.integrate.contributions import apply_subset, choice_groups, load_contributions
from stacklab.integrate.round import load_round
from stacklab.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "contributions"


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
    rebuilt = apply_subset(baseline, contribs, used).to_dict()
    tiny = load_recipe("tiny").to_dict()
    assert rebuilt.pop("name") == "tiny-baseline" and tiny.pop("name") == "tiny"
    assert rebuilt == tiny


def test_catalog_round_validates(tmp_path: Path) -> None:
    """Every contribution changes the baseline and no two make each other redundant."""
    round_file = tmp_path / "round.yaml"
    round_file.write_text(
        f"baseline: {ROOT / 'recipes' / 'tiny-baseline.yaml'}\n"
        f"contributions: [{CATALOG}]\n"
        "objectives: [{metric: val_bpb, direction: min, weight: 1.0}]\n"
        "seeds: 2\n"
        "budget: 200\n"
        "runner: {kind: external, command: 'python train.py {recipe} {seed} {out}'}\n"
    )
    rnd = load_round(round_file)
    assert len(rnd.contributions) == len(list(CATALOG.glob("*.yaml")))


def test_demo_round_is_built_in() -> None:
    """`stacklab demo` runs rounds/demo.yaml: three catalog techniques on demo-baseline."""
    rnd = load_round("demo")
    assert rnd.file == (ROOT / "rounds" / "demo.yaml").resolve()
    assert rnd.ids == ["muon", "qk-norm", "wsd-schedule"]
    assert rnd.baseline.name == "demo-baseline"
    assert not rnd.baseline.sft.enabled and not rnd.baseline.rl.enabled
    assert rnd.spec.runner.kind == "builtin"
    assert "val_bpb" in rnd.metrics
    # Screening (2^3 subsets x 2 seeds) plus a confirmation batch must fit the budget.
    assert rnd.spec.budget >= 8 * len(rnd.seeds) + 3 * rnd.confirm_count
