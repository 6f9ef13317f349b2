"""Baselines that are any YAML/JSON/TOML file, and contributions that carry a git ref."""

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from stacklab.integrate.configs import (
    ConfigError,
    ContributionError,
    FileBaseline,
    RecipeBaseline,
)
from stacklab.integrate.contributions import (
    Contribution,
    apply_subset,
    blind_ids,
    choice_groups,
    load_contributions,
    patch_subset,
)
from stacklab.recipe import Recipe

TOML = """\
# the trainer's config
name = "small"  # shown in logs
lr = 0.001

[model]
# the network
depth = 4  # layers
width = 256

[model.rope]
theta = 10000.0  # base frequency

[[data.sources]]
path = "web"
weight = 1.0
"""


def write(folder: Path, name: str, **fields: Any) -> Path:
    body = {"id": name.split(".")[0], "area": "optimizer", "summary": "s", "author": "ann"}
    body.update(fields)
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(body))
    return path


def contrib(cid: str, patch: dict[str, Any] | None = None, git: str | None = None) -> Contribution:
    fields: dict[str, Any] = {"patch": patch} if patch is not None else {}
    return Contribution(
        id=cid, area="optimizer", summary="s", author="ann", git=git, source=Path(cid), **fields
    )


# --------------------------------------------------------------------------- file baselines


def test_toml_patch_keeps_comments_and_key_order(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    baseline = FileBaseline.load(path)
    assert (baseline.name, baseline.suffix) == ("train.toml", ".toml")
    assert {"model.rope.theta", "data.sources.0.weight", "name"} <= baseline.keys()
    wide = write(tmp_path / "c", "wide.yaml", patch={"model.width": 512})
    rope = write(tmp_path / "c", "rope.yaml", patch={"model.rope.theta": "5e5"})  # YAML 1.1
    contribs = load_contributions([wide, rope], baseline)
    assert contribs[1].patch == {"model.rope.theta": 500000.0}

    data, text = patch_subset(baseline, contribs, {"wide", "rope"})
    assert tomllib.loads(text) == data
    assert data["model"] == {"depth": 4, "width": 512, "rope": {"theta": 500000.0}}
    assert data["lr"] == 0.001 and data["data"]["sources"] == [{"path": "web", "weight": 1.0}]
    # Only the two values changed: every comment, key and blank line is where it was.
    changed = [(a, b) for a, b in zip(TOML.splitlines(), text.splitlines(), strict=True) if a != b]
    assert changed == [
        ("width = 256", "width = 512"),
        ("theta = 10000.0  # base frequency", "theta = 500000.0  # base frequency"),
    ]
    assert baseline.apply([]) == (tomllib.loads(TOML), TOML)  # the baseline is untouched


def test_toml_sections_and_list_items() -> None:
    baseline = FileBaseline.load(Path("train.toml"), TOML)
    # A section is replaced whole, key by key: the comments of the keys it keeps stay.
    data, text = baseline.apply([{"model": {"depth": 8, "heads": {"n": 4}}}])
    assert data["model"] == {"depth": 8, "heads": {"n": 4}}
    assert "depth = 8  # layers" in text and "heads = {n = 4}" in text
    # A mapping in place of a value stays in place, as an inline table.
    data, text = baseline.apply([{"name": {"a": [1, {"b": 2}]}, "data.sources.0.weight": 2}])
    assert "name = {a = [1, {b = 2}]}  # shown in logs" in text
    assert tomllib.loads(text) == data and data["data"]["sources"][0]["weight"] == 2


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_json_and_yaml_round_trip(tmp_path: Path, suffix: str) -> None:
    content = {"z": 1, "model": {"depth": 4, "acts": ["gelu", "relu"], "bias": None}, "a": True}
    path = tmp_path / f"train{suffix}"
    dump = (
        json.dumps(content, indent=2)
        if suffix == ".json"
        else yaml.safe_dump(content, sort_keys=False)
    )
    path.write_text(dump)
    baseline = FileBaseline.load(path)
    assert baseline.suffix == (".json" if suffix == ".json" else ".yaml")
    assert baseline.data() == content
    patch = baseline.check({"model.acts.1": "silu", "model.bias": 0.5}, Path("c.yaml"))
    data, text = baseline.apply([patch])
    parsed = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert parsed == data
    assert data == {"z": 1, "model": {"depth": 4, "acts": ["gelu", "silu"], "bias": 0.5}, "a": True}
    assert list(parsed) == ["z", "model", "a"]  # key order kept
    if suffix == ".json":
        assert text.startswith('{\n  "z": 1,\n  "model": {\n    "depth": 4,')
    assert baseline.data() == content  # the baseline is untouched


def test_unknown_key_in_a_toml_baseline_names_the_file_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    bad = write(tmp_path, "deep.yaml", patch={"model.detph": 6})
    with pytest.raises(ContributionError) as info:
        load_contributions([bad], FileBaseline.load(path))
    assert str(info.value).startswith(
        f"{bad}: patch key 'model.detph' is not in the baseline train.toml; "
        "did you mean 'model.depth' or "
    )


def test_values_the_format_cannot_hold(tmp_path: Path) -> None:
    toml = FileBaseline.load(Path("train.toml"), TOML)
    for patch in ({"model.depth": None}, {"model.rope": {"theta": [1, None]}}):
        with pytest.raises(
            ContributionError, match=r"^c\.yaml: patch key 'model\.\w+': TOML has no null"
        ):
            toml.check(patch, Path("c.yaml"))
    with pytest.raises(ContributionError, match=r"a date value .* quote it"):
        toml.check({"name": yaml.safe_load("2024-01-01")}, Path("c.yaml"))
    js = FileBaseline.load(Path("train.json"), '{"lr": 0.1}')
    assert js.check({"lr": None}, Path("c.yaml")) == {"lr": None}
    with pytest.raises(ContributionError, match="JSON has no inf"):
        js.check({"lr": float("inf")}, Path("c.yaml"))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("train.ini", "", "train.ini: unknown config format '.ini'; a baseline file ends in"),
        ("train.toml", "lr = = 1\n", "train.toml: not valid TOML ("),
        ("train.json", "{1", "train.json: not valid JSON ("),
        ("train.yaml", "a: [1\n", "train.yaml: not valid YAML ("),
        ("train.json", "[1]", "train.json: a baseline must be a mapping at the top level"),
    ],
)
def test_unreadable_baselines(name: str, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        FileBaseline.load(Path(name), text)
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)
    if name.endswith(".ini"):
        assert ".yaml, .yml, .json, .toml" in str(info.value)


def test_patch_keys_missing_from_another_version_of_the_baseline() -> None:
    """A branch may edit the baseline file: a key gone from it is an error, not a KeyError."""
    edited = FileBaseline.load(Path("train.toml"), TOML.replace("width = 256\n", ""))
    with pytest.raises(ContributionError, match=r"^a \+ b: patch key 'model.width' is not in"):
        edited.apply([{"model.width": 512}], origin="a + b")


# --------------------------------------------------------------------------- git refs


def test_a_contribution_with_only_a_git_ref_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "rope.yaml", git=" feature/rope-scaling ")
    (loaded,) = load_contributions([path], FileBaseline.load(Path("train.toml"), TOML))
    assert (loaded.git, loaded.patch) == ("feature/rope-scaling", {})
    both = write(tmp_path, "both.yaml", git="v1.2", patch={"optim.lr": 0.01})
    (loaded,) = load_contributions([both], Recipe())
    assert (loaded.git, loaded.patch) == ("v1.2", {"optim.lr": 0.01})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "a contribution needs a patch:, a git: ref, or both"),
        ({"git": "--upload-pack=x"}, "field 'git': '--upload-pack=x' is not a git ref"),
        ({"git": "two words"}, "is not a git ref"),
        ({"git": 8e10}, "field 'git': YAML read the ref as the number 80000000000.0: quote it"),
        ({"git": "main", "patch": {}}, "field 'patch': must set at least one recipe key"),
    ],
)
def test_a_contribution_needs_a_patch_or_a_ref(
    tmp_path: Path, fields: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path, "x.yaml", **fields)
    with pytest.raises(ContributionError) as info:
        load_contributions([path], Recipe())
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_blind_ids_depend_on_the_git_ref() -> None:
    plain = contrib("rope", {"optim.lr": 0.01})
    blind = blind_ids([plain])["rope"]
    assert blind_ids([plain.model_copy(update={"git": "feature/rope"})])["rope"] != blind
    assert blind_ids([contrib("rope", git="a")]) != blind_ids([contrib("rope", git="b")])
    # Git-only contributions never disagree on patches: no choice group here.
    assert choice_groups([contrib("a", git="a"), contrib("b", git="b")]) == []


# --------------------------------------------------------------------------- recipes


def test_a_recipe_baseline_behaves_as_before(tmp_path: Path) -> None:
    recipe = Recipe()
    baseline = RecipeBaseline(recipe)
    assert baseline.suffix == ".yaml" and baseline.data() == recipe.to_dict()
    keys = baseline.keys()
    assert "optim.lr" in keys and "model.moe.top_k" in keys
    assert baseline.check({"optim.lr": "3e-3"}, Path("c.yaml")) == {"optim.lr": 0.003}
    with pytest.raises(ContributionError, match=r"^c\.yaml: invalid patch: key 'model\.depth': "):
        baseline.check({"model.depth": 0}, Path("c.yaml"))
    bad = write(tmp_path, "x.yaml", patch={"optim.lrr": 0.01})
    with pytest.raises(
        ContributionError, match=r"not in the baseline recipe; did you mean 'optim.lr'"
    ):
        load_contributions([bad], baseline)

    contribs = [contrib("lr", {"optim.lr": 0.01}), contrib("code", git="main")]
    data, text = patch_subset(recipe, contribs, {"lr", "code"})
    assert data == apply_subset(recipe, contribs, {"lr", "code"}).to_dict()
    assert yaml.safe_load(text) == data and data["optim"]["lr"] == 0.01
    top8 = [contrib("top8", {"model.moe.top_k": 8}), contrib("few", {"model.moe.num_experts": 4})]
    with pytest.raises(ContributionError, match=r"invalid combination: baseline \+ few \+ top8"):
        patch_subset(baseline, top8, {"top8", "few"})
    clash = [contrib("lo", {"optim.lr": 0.001}), contrib("hi", {"optim.lr": 0.1})]
    with pytest.raises(ContributionError, match="mutually exclusive contributions: hi vs lo"):
        patch_subset(baseline, clash, {"lo", "hi"})
