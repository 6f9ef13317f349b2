"""The recipe schema: strict validation, dotted overrides, canonical hashes."""

from pathlib import Path

import pytest

from stacklab import builtin
from stacklab.errors import RecipeError
from stacklab.recipe import (
    ArithmeticTask,
    JsonlSource,
    Recipe,
    apply_overrides,
    canonical_hash,
    load_recipe,
    recipe_from_dict,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_builtin_recipes_validate() -> None:
    names = builtin.names("recipe")
    assert "tiny" in names
    for name in names:
        assert load_recipe(name).name == name


def test_defaults_fill_every_section() -> None:
    r = Recipe()
    assert r.data.sources[0].kind == "stdlib"
    assert r.tokenizer.vocab_size == 4096
    assert set(r.to_dict()) == {
        "name",
        "seed",
        "data",
        "tokenizer",
        "model",
        "optim",
        "pretrain",
        "sft",
        "rl",
        "eval",
    }


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown key 'tokenzier'.*did you mean 'tokenizer'"):
        load_recipe(write(tmp_path, "tokenzier: {vocab_size: 512}\n"))


def test_unknown_nested_key_names_full_path(tmp_path: Path) -> None:
    text = (
        "data:\n  sources:\n    - kind: jsonl\n      name: a\n      path: a.jsonl\n      feild: t\n"
    )
    with pytest.raises(RecipeError, match=r"'data\.sources\.0\.feild'.*did you mean 'field'"):
        load_recipe(write(tmp_path, text))


def test_unknown_discriminator_lists_valid(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown 'name' 'lenght'.*'length'"):
        load_recipe(write(tmp_path, "data:\n  filters:\n    - name: lenght\n"))


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"key 'tokenizer\.vocab_size': .*valid integer.*'big'"):
        load_recipe(write(tmp_path, "tokenizer: {vocab_size: big}\n"))


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file_lists_builtins() -> None:
    with pytest.raises(RecipeError, match=r"not found: nope.*tiny"):
        load_recipe("nope")


def test_override_types_are_parsed_and_checked() -> None:
    r = apply_overrides(
        Recipe(),
        [
            "data.packing.seq_len=128",
            "data.dedup.near=false",
            "data.tasks.0.ops=['+']",
            "seed=7",
        ],
    )
    assert r.data.packing.seq_len == 128
    assert r.data.dedup.near is False
    assert r.data.tasks[0].ops == ["+"]
    assert r.seed == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.packing.seq_len=abc", r"key 'data\.packing\.seq_len': .*integer.*'abc'"),
        ("data.mixture.token_budget=0", r"key 'data\.mixture\.token_budget': .*than 0 \(got 0\)"),
        ("data.dedup.treshold=0.5", r"unknown key 'data\.dedup\.treshold'.*'threshold'"),
        ("data.sources.3.weight=1", r"list of 1 items; index it with 0\.\.0"),
        ("seed.x=1", r"seed is a value"),
        ("novalue", r"expected KEY=VALUE"),
        ("data.tasks.0.min_digits=5", r"min_digits \(5\) must not exceed max_digits \(3\)"),
    ],
)
def test_bad_override(override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        apply_overrides(Recipe(), [override])


def test_duplicate_source_names_rejected() -> None:
    raw = {"data": {"sources": [{"kind": "stdlib"}, {"kind": "stdlib"}]}}
    with pytest.raises(RecipeError, match="repeated: stdlib"):
        recipe_from_dict(raw)


def test_relative_paths_resolve_against_recipe_folder(tmp_path: Path) -> None:
    text = "data:\n  sources:\n    - {kind: jsonl, name: a, path: sub/a.jsonl}\n"
    r = load_recipe(write(tmp_path, text))
    source = r.data.sources[0]
    assert isinstance(source, JsonlSource)
    assert source.path == (tmp_path / "sub" / "a.jsonl").resolve()


def test_section_hash_is_canonical_and_local() -> None:
    a = Recipe()
    b = apply_overrides(Recipe(), ["tokenizer.vocab_size=512"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("tokenizer") != b.section_hash("tokenizer")
    assert a.hash() != b.hash()
    # Key order does not matter; values do.
    assert canonical_hash({"x": 1, "y": [1, 2]}) == canonical_hash({"y": [1, 2], "x": 1})
    assert canonical_hash({"x": 1}) != canonical_hash({"x": 2})
    # Explicitly writing a default gives the same hash as leaving it out.
    explicit = recipe_from_dict({"data": {"tasks": [ArithmeticTask().model_dump()]}})
    assert explicit.section_hash("data") == a.section_hash("data")


def test_repetition_ngram_sizes_checked() -> None:
    raw = {"data": {"filters": [{"name": "repetition", "max_top_ngram_char_frac": {0: 0.2}}]}}
    with pytest.raises(RecipeError, match=r"max_top_ngram_char_frac': .*sizes must be >= 1"):
        recipe_from_dict(raw)


def test_base_recipe_is_merged_under_the_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "base.yaml").write_text(
        "name: base\ndata:\n  sources: [{kind: jsonl, name: a, path: data/a.jsonl}]\n"
        "  packing: {seq_len: 64, rows_per_shard: 10}\ntokenizer: {vocab_size: 512}\n"
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "child.yaml").write_text(
        "base: ../base.yaml\nname: child\ndata:\n  packing: {seq_len: 128}\n"
    )
    r = load_recipe(sub / "child.yaml")
    assert r.name == "child"
    assert r.data.packing.seq_len == 128 and r.data.packing.rows_per_shard == 10
    assert r.tokenizer.vocab_size == 512
    assert r.data.sources[0].path == (tmp_path / "data" / "a.jsonl").resolve()


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_builtin_moe_variant() -> None:
    r = load_recipe("tiny-moe")
    assert r.model.moe.enabled and r.data == load_recipe("tiny").data


def test_model_section_builds_the_models_own_config_field_for_field() -> None:
    """The recipe's model section and the model's `TransformerConfig` have the same fields and
    defaults (a field added to one only fails here), and `build()` carries every value."""
    import dataclasses

    from stacklab.model.config import MoEConfig as ModelMoEConfig
    from stacklab.model.config import TransformerConfig
    from stacklab.recipe import ModelConfig, MoEConfig

    for section, config in ((ModelConfig, TransformerConfig), (MoEConfig, ModelMoEConfig)):
        assert list(section.model_fields) == [f.name for f in dataclasses.fields(config)]
    assert ModelConfig().build() == TransformerConfig()
    assert ModelConfig().model_dump(mode="json") == TransformerConfig().to_dict()
    section = load_recipe("tiny-moe", ["model.moe.router=sigmoid", "model.n_kv_heads=4"]).model
    built = section.build()
    assert built.to_dict() == section.model_dump(mode="json")
    assert built.dims() == section.dims()


# --------------------------------------------------------------------------- RL loss settings


@pytest.mark.parametrize(
    ("loss", "scale"),
    [("grpo", "group_std"), ("dr_grpo", "none"), ("dapo", "group_std"), ("cispo", "group_std")],
)
def test_unset_advantage_follows_the_loss(loss: str, scale: str) -> None:
    """Dr. GRPO does not divide by the group std: unset, `rl.advantage` is the loss's own."""
    rl = recipe_from_dict({"rl": {"loss": loss}}).rl
    assert rl.advantage is None and rl.advantage_scale == scale
    # Also through an override (the recipe goes through to_dict and back, as patches do).
    over = apply_overrides(load_recipe("tiny"), [f"rl.loss={loss}"]).rl
    assert over.advantage_scale == scale
    # An explicit choice the loss allows is kept.
    chosen = recipe_from_dict({"rl": {"loss": loss, "advantage": "batch_std"}}).rl
    assert chosen.advantage_scale == "batch_std"


def test_dr_grpo_refuses_group_std_advantages() -> None:
    with pytest.raises(RecipeError, match=r"rl\.advantage 'group_std'.*dr_grpo.*none, batch_std"):
        recipe_from_dict({"rl": {"loss": "dr_grpo", "advantage": "group_std"}})
    with pytest.raises(RecipeError, match=r"rl\.advantage 'group_std'.*dr_grpo"):
        apply_overrides(Recipe(), ["rl.loss=dr_grpo", "rl.advantage=group_std"])


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo"])
def test_eps_high_is_refused_where_the_loss_ignores_it(loss: str) -> None:
    with pytest.raises(RecipeError, match=rf"rl\.eps_high is unused by rl\.loss '{loss}'.*dapo"):
        recipe_from_dict({"rl": {"loss": loss, "eps_high": 0.28}})
    assert recipe_from_dict({"rl": {"loss": loss, "eps_low": 0.1}}).rl.eps_low == 0.1


@pytest.mark.parametrize("loss", ["dapo", "gspo", "cispo"])
def test_eps_high_is_kept_where_the_loss_reads_it(loss: str) -> None:
    assert recipe_from_dict({"rl": {"loss": loss, "eps_high": 0.3}}).rl.eps_high == 0.3


def test_rl_and_eval_may_name_a_verifiers_environment_but_sft_may_not() -> None:
    name = "verifiers:examples/verifiers_env.py:load_environment"
    recipe = load_recipe("tiny", [f'rl.envs=["{name}"]', "rl.env_weights={}"])
    assert recipe.rl.envs == [name]
    assert load_recipe("tiny", [f'eval.agent_envs=["{name}"]']).eval.agent_envs == [name]
    with pytest.raises(RecipeError, match=r"key 'rl.envs.0': 'lookpu' is not an environment"):
        load_recipe("tiny", ["rl.envs=[lookpu]"])
    with pytest.raises(RecipeError, match=r"sft.agent_envs"):
        load_recipe("tiny", [f'sft.agent_envs=["{name}"]'])
