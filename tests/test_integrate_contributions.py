"""Contributions: loading and checking against the baseline, choice groups, subsets, blinding."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stacklab.errors import StacklabError
from stacklab.integrate.contributions import (
    Contribution,
    ContributionError,
    apply_subset,
    blind_ids,
    choice_groups,
    conflicts,
    load_contributions,
)
from stacklab.recipe import Recipe

BASE = Recipe()


def write(folder: Path, name: str, **fields: Any) -> Path:
    body = {
        "id": name.split(".")[0],
        "area": "optimizer",
        "summary": "a change",
        "author": "ann",
        "patch": {"optim.lr": 0.001},
    }
    body.update(fields)
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(body))
    return path


def contrib(cid: str, patch: dict[str, Any], author: str = "ann") -> Contribution:
    return Contribution(
        id=cid, area="optimizer", summary="s", author=author, patch=patch, source=Path(cid)
    )


def error(paths: list[Path]) -> str:
    with pytest.raises(ContributionError) as info:
        load_contributions(paths, BASE)
    assert isinstance(info.value, StacklabError)
    return str(info.value)


# --------------------------------------------------------------------------- loading


def test_folder_loads_sorted_with_values_in_validated_form(tmp_path: Path) -> None:
    d = tmp_path / "c"
    write(d, "b.yaml", patch={"optim.lr": "3e-3"})  # YAML 1.1 reads 3e-3 as a string
    write(d, "a.yml", area="data", citation="Rae et al. 2021", patch={"model.moe": {"top_k": 1}})
    (d / "notes.txt").write_text("ignored")
    loaded = load_contributions([d], BASE)
    assert [c.id for c in loaded] == ["a", "b"]
    a, b = loaded
    assert b.patch == {"optim.lr": 0.003}
    assert a.source == d / "a.yml" and b.source == d / "b.yaml"
    assert a.citation == "Rae et al. 2021" and b.citation is None
    # A section is replaced whole: the patch holds it with every default filled in.
    assert a.patch["model.moe"] == {**BASE.model.moe.model_dump(mode="json"), "top_k": 1}


def test_files_and_folders_mix_and_repeat_once(tmp_path: Path) -> None:
    d = tmp_path / "c"
    one = write(d, "one.yaml")
    two = write(tmp_path, "two.yaml", patch={"optim.weight_decay": 0.0})
    loaded = load_contributions([two, d, one], BASE)
    assert [c.id for c in loaded] == ["two", "one"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"author": None}, "field 'author'"),
        ({"autor": "bob"}, "unknown field 'autor'; did you mean 'author'?"),
        ({"summary": "two\nlines"}, "field 'summary': must be one line"),
        ({"summary": "  "}, "field 'summary': must not be empty"),
        ({"area": "vibes"}, "field 'area'"),
        ({"id": "Has Space"}, "field 'id': 'Has Space' is not a slug"),
        ({"patch": {}}, "field 'patch': must set at least one recipe key"),
        ({"patch": {"optim..lr": 1}}, "keys must be dotted recipe keys"),
        ({"patch": {"model.moe": {}, "model.moe.top_k": 1}}, "overlap"),
        ({"source": "elsewhere"}, "'source' is set from the file's path"),
    ],
)
def test_schema_errors_name_file_and_field(
    tmp_path: Path, fields: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path, "x.yaml", **fields)
    msg = error([path])
    assert msg.startswith(f"{path}: ")
    assert expected in msg


def test_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("id: x\narea: rl\nsummary: s\npatch: {rl.lr: 0.001}\n")
    assert error([path]) == f"{path}: missing field 'author'"
    path.write_text(path.read_text() + "autor: bob\n")
    assert error([path]).startswith(f"{path}: unknown field 'autor'; did you mean 'author'?")


def test_bad_yaml_and_non_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: [unclosed\n")
    assert error([bad]).startswith(f"{bad}: not valid YAML (")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    assert error([listed]).startswith(f"{listed}: a contribution must be a mapping")


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    assert "not found" in error([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    assert "no *.yaml or *.yml" in error([tmp_path / "empty"])


def test_duplicate_id_names_both_files(tmp_path: Path) -> None:
    first = write(tmp_path / "a", "x.yaml")
    second = write(tmp_path / "b", "x.yaml")
    assert error([first, second]) == f"{second}: duplicate id 'x' (also in {first})"


def test_unknown_patch_key_suggests_close_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", patch={"optim.lrr": 0.01})
    msg = error([path])
    assert msg.startswith(f"{path}: patch key 'optim.lrr' is not in the baseline recipe")
    assert "'optim.lr'" in msg
    # List items are addressable, but only those the baseline has.
    ok = write(tmp_path, "ok.yaml", patch={"data.sources.0.weight": 2})
    assert load_contributions([ok], BASE)[0].patch == {"data.sources.0.weight": 2.0}
    beyond = write(tmp_path, "beyond.yaml", patch={"data.sources.1.weight": 2})
    assert "patch key 'data.sources.1.weight' is not in the baseline" in error([beyond])


def test_invalid_value_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", patch={"model.depth": 0})
    msg = error([path])
    assert msg.startswith(f"{path}: invalid patch: key 'model.depth': ")
    assert "(got 0)" in msg
    wrong_type = write(tmp_path, "y.yaml", patch={"optim.name": "sgd"})
    assert f"{wrong_type}: invalid patch: key 'optim.name'" in error([wrong_type])


# --------------------------------------------------------------------------- choice groups


def test_choice_groups_are_components_of_disagreements() -> None:
    contribs = [
        contrib("lr-low", {"optim.lr": 0.001}),
        contrib("lr-high", {"optim.lr": 0.01}),
        contrib("lr-low-nowd", {"optim.lr": 0.001, "optim.weight_decay": 0.0}),
        contrib("wd-high", {"optim.weight_decay": 0.3}),
        contrib("same-a", {"model.depth": 6}),
        contrib("same-b", {"model.depth": 6}),
        contrib("solo", {"rl.lr": 0.0001}),
        contrib("seq-a", {"data.packing.seq_len": 128}),
        contrib("seq-b", {"data.packing.seq_len": 512}),
    ]
    assert conflicts(contribs) == {
        ("lr-high", "lr-low"): ["optim.lr"],
        ("lr-high", "lr-low-nowd"): ["optim.lr"],
        ("lr-low-nowd", "wd-high"): ["optim.weight_decay"],
        ("seq-a", "seq-b"): ["data.packing.seq_len"],
    }
    assert choice_groups(reversed(contribs)) == [
        ["lr-high", "lr-low", "lr-low-nowd", "wd-high"],
        ["seq-a", "seq-b"],
    ]


def test_a_section_and_a_key_inside_it() -> None:
    moe = {**BASE.model.moe.model_dump(mode="json"), "enabled": True}
    contribs = [
        contrib("moe", {"model.moe": moe}),
        contrib("topk-same", {"model.moe.top_k": moe["top_k"]}),
        contrib("topk-4", {"model.moe.top_k": 4}),
        contrib("int-vs-bool", {"model.moe.enabled": 1}),
    ]
    assert conflicts(contribs) == {
        ("int-vs-bool", "moe"): ["model.moe.enabled"],
        ("moe", "topk-4"): ["model.moe.top_k"],
        ("topk-4", "topk-same"): ["model.moe.top_k"],
    }
    groups = choice_groups(contribs)
    assert groups == [["int-vs-bool", "moe", "topk-4", "topk-same"]]


# --------------------------------------------------------------------------- subsets


def test_apply_subset() -> None:
    contribs = [
        contrib("lr", {"optim.lr": 0.01}),
        contrib("deep", {"model.depth": 6, "optim.lr": 0.01}),
        contrib("muon", {"optim.name": "muon"}),
    ]
    assert apply_subset(BASE, contribs, frozenset()) == BASE
    r = apply_subset(BASE, contribs, frozenset({"muon", "deep", "lr"}))
    assert (r.optim.name, r.optim.lr, r.model.depth) == ("muon", 0.01, 6)
    assert BASE.optim.lr == 3e-3 and BASE.model.depth == 4  # baseline untouched
    with pytest.raises(ContributionError, match="unknown contribution ids: nope"):
        apply_subset(BASE, contribs, frozenset({"nope"}))
    # With a third value for optim.lr, all three share one choice group: even the two that
    # agree are no longer combined (the price of groups being connected components).
    contribs.append(contrib("lr-low", {"optim.lr": 0.0001}))
    with pytest.raises(ContributionError, match=r"mutually exclusive contributions: deep vs lr$"):
        apply_subset(BASE, contribs, frozenset({"lr", "deep", "muon"}))
    with pytest.raises(ContributionError, match=r"contributions: deep vs lr vs lr-low$"):
        apply_subset(BASE, contribs, frozenset({"lr", "deep", "lr-low"}))


def test_apply_subset_overlapping_keys_do_not_alias() -> None:
    moe = {**BASE.model.moe.model_dump(mode="json"), "enabled": True}
    section = contrib("moe", {"model.moe": moe})
    inner = contrib("topk", {"model.moe.top_k": moe["top_k"]})
    both = apply_subset(BASE, [section, inner], frozenset({"moe", "topk"}))
    assert both == apply_subset(BASE, [section, inner], frozenset({"moe"}))
    assert both.model.moe.enabled
    assert section.patch["model.moe"] == moe  # applying never mutates a patch


def test_apply_subset_invalid_together() -> None:
    contribs = [
        contrib("top8", {"model.moe.top_k": 8}),
        contrib("experts4", {"model.moe.num_experts": 4}),
    ]
    assert apply_subset(BASE, contribs, frozenset({"top8"})).model.moe.top_k == 8
    with pytest.raises(
        ContributionError, match=r"invalid combination: baseline \+ experts4 \+ top8"
    ):
        apply_subset(BASE, contribs, frozenset({"top8", "experts4"}))


def test_duplicate_ids_rejected_everywhere() -> None:
    twins = [contrib("a", {"optim.lr": 0.1}), contrib("a", {"optim.lr": 0.2})]
    for call in (conflicts, blind_ids, lambda c: apply_subset(BASE, c, frozenset())):
        with pytest.raises(ContributionError, match="duplicate id 'a'"):
            call(twins)


# --------------------------------------------------------------------------- blinding


def test_blind_ids_are_opaque_and_stable() -> None:
    a = contrib("muon", {"optim.name": "muon"}, author="alice")
    b = contrib("deep", {"model.depth": 6}, author="bob")
    blind = blind_ids([a, b])
    assert set(blind) == {"muon", "deep"}
    assert all(re.fullmatch(r"c-[0-9a-f]{6}", v) for v in blind.values())
    assert len(set(blind.values())) == 2
    # Depends on id and patch only: not on author, summary, source or list order.
    renamed = a.model_copy(update={"author": "zed", "summary": "other", "source": Path("z")})
    assert blind_ids([b, renamed]) == blind
    assert blind_ids([contrib("muon", {"optim.name": "adamw"})])["muon"] != blind["muon"]
