"""Hugging Face interop: exported models give our logits in `transformers`, import inverts
export exactly, and recipes without a Hugging Face counterpart are refused by name."""

import json
from pathlib import Path

import pytest
import torch

from stacklab.data.tokenizer import EOT_ID, PAD_ID, save_tokenizer, train_tokenizer
from stacklab.errors import StacklabError
from stacklab.interop import hf
from stacklab.interop.hf import export_hf, from_hf_config, import_hf
from stacklab.model.config import TransformerConfig
from stacklab.model.transformer import build_model
from stacklab.recipe import ModelConfig, TokenizerConfig
from stacklab.train.checkpoint import load_model, write_model

transformers = pytest.importorskip("transformers")
# GLM-4-MoE builds a zero-width shared MLP when there are no shared experts, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

VOCAB = 300
SMALL = {"depth": 2, "d_model": 64, "head_dim": 16, "n_heads": 4, "n_kv_heads": 2}
MOE = {"enabled": True, "num_experts": 6, "top_k": 2}
CASES = {
    "dense": {},
    "dense_untied_no_default_rope": {"tie_embeddings": False, "rope_theta": 5e5, "norm_eps": 1e-5},
    "softmax_norm_topk": {"moe": MOE | {"first_k_dense": 1}},
    "softmax_raw_topk": {"moe": MOE | {"first_k_dense": 1, "norm_topk": False}},
    "sigmoid_shared": {
        "tie_embeddings": False,
        "moe": MOE
        | {
            "router": "sigmoid",
            "balance": "aux_free",
            "num_shared_experts": 2,
            "routed_scaling": 2.5,
            "first_k_dense": 1,
        },
    },
    "sigmoid_no_qk_norm": {
        "qk_norm": False,
        "moe": MOE | {"router": "sigmoid", "norm_topk": False},
    },
}
# Ours and `transformers` agree to a few float32 ulps: at most 4.8e-7 on these models' logits
# (|logits| < 1.5) over 20 inputs each, with 1 or 2 threads. docs/model.md quotes this bound.
LOGITS_ATOL = 1e-6
ARCH = {
    "dense": "Qwen3ForCausalLM",
    "dense_untied_no_default_rope": "Qwen3ForCausalLM",
    "softmax_norm_topk": "Qwen3MoeForCausalLM",
    "softmax_raw_topk": "Qwen3MoeForCausalLM",
    "sigmoid_shared": "Glm4MoeForCausalLM",
    "sigmoid_no_qk_norm": "Glm4MoeForCausalLM",
}


def config(**fields: object) -> TransformerConfig:
    """The model config of a recipe model section with `fields` (nested dicts for moe)."""
    return ModelConfig(**fields).build()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    texts = ["def add(a, b):\n    return a + b\n", "12 + 30 = 42", "hello world"] * 20
    save_tokenizer(train_tokenizer(texts, TokenizerConfig(vocab_size=VOCAB)), folder)
    return folder


def _model(case: str) -> tuple[TransformerConfig, torch.nn.Module]:
    cfg = config(**SMALL, **CASES[case])
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    with torch.no_grad():
        for i, moe in enumerate(model.moe_layers()):
            if cfg.moe.router == "sigmoid":  # a trained selection bias, large enough to matter
                moe.expert_bias.copy_(torch.linspace(-0.3, 0.3, cfg.moe.num_experts).roll(i))
            # Train-mode forwards and bias updates must leave no trace in what is exported.
            moe.expert_counts += 5
    return cfg, model.eval()


def _load_hf(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("case", list(CASES))
def test_export_gives_the_same_logits_in_transformers(
    case: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    cfg, model = _model(case)
    out = export_hf(cfg, VOCAB, model.state_dict(), tokenizer_dir, tmp_path / "hf")
    theirs = _load_hf(out)
    assert type(theirs).__name__ == ARCH[case]
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= LOGITS_ATOL
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not list(tmp_path.glob(".hf.tmp-*"))


@pytest.mark.parametrize("case", list(CASES))
def test_import_then_export_round_trips_exactly(
    case: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    cfg, model = _model(case)
    first = export_hf(cfg, VOCAB, model.state_dict(), tokenizer_dir, tmp_path / "first")
    cfg2, vocab2, state2, tok = import_hf(first)
    assert (vocab2, tok) == (VOCAB, first)
    assert cfg2.dims() == cfg.dims()
    ours = model.state_dict()
    if cfg.tie_embeddings:
        del ours["lm_head.weight"]  # one tensor under two names; import returns it once
    assert sorted(state2) == sorted(ours)
    assert all(torch.equal(state2[name], ours[name]) for name in ours)

    second = export_hf(cfg2, vocab2, state2, tok, tmp_path / "second")
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (first / name).read_text() == (second / name).read_text()
    a, b = _tensors(first), _tensors(second)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("case", ["dense", "sigmoid_shared"])
def test_import_reads_a_model_saved_by_transformers(case: str, tmp_path: Path) -> None:
    """A model made and saved by `transformers` itself, stored as our checkpoint, gives its
    logits (GLM-4-MoE with a random selection bias; Qwen3 with a tied head)."""
    arch, fields = hf.hf_config(_model(case)[0], VOCAB)
    config_class = {"Qwen3ForCausalLM": "Qwen3Config", "Glm4MoeForCausalLM": "Glm4MoeConfig"}
    config = getattr(transformers, config_class[arch])(**fields)
    torch.manual_seed(3)
    theirs = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, buf in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.2)
    theirs.eval().save_pretrained(tmp_path / "hf")

    cfg, vocab, state, tok = import_hf(tmp_path / "hf")
    assert (vocab, tok) == (VOCAB, None)
    write_model(tmp_path / "ours", cfg, vocab, state)
    ours = load_model(tmp_path / "ours").eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= LOGITS_ATOL


def test_export_writes_tokenizer_and_generation_settings(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    cfg, model = _model("dense")
    out = export_hf(cfg, VOCAB, model.state_dict(), tokenizer_dir, tmp_path / "hf")
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (EOT_ID, PAD_ID) == (0, 1)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    assert tok.decode(tok("x = 12\n")["input_ids"]) == "x = 12\n"


def test_transformers_4_config_keys_are_read() -> None:
    """Checkpoints saved by transformers 4.x keep rope_theta at the top and say num_experts."""
    cfg, _ = _model("softmax_raw_topk")
    _, fields = hf.hf_config(cfg, VOCAB)
    old = {k: v for k, v in fields.items() if k != "rope_parameters"}
    old |= {"model_type": "qwen3_moe", "rope_theta": cfg.rope_theta, "rope_scaling": None}
    assert from_hf_config(old) == from_hf_config(fields | {"model_type": "qwen3_moe"})


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"qk_norm": False}, "model.qk_norm=false"),
        ({"qk_norm": False, "moe": MOE}, "model.qk_norm=false"),
        ({"moe": MOE | {"num_shared_experts": 1}}, "model.moe.num_shared_experts=1"),
        ({"moe": MOE | {"routed_scaling": 2.0}}, "model.moe.routed_scaling=2.0"),
    ],
)
def test_export_refuses_recipes_without_a_counterpart(overrides: dict, named: str) -> None:
    cfg = config(**SMALL | overrides)
    with pytest.raises(StacklabError, match=named.replace(".", r"\.")):
        hf.hf_architecture(cfg)


def test_export_refuses_a_selection_bias_with_the_softmax_router(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    cfg = config(**SMALL, moe=MOE | {"balance": "aux_free"})
    model = build_model(cfg, VOCAB)
    # Untrained, the bias is zero and changes nothing, so the export is exact.
    export_hf(cfg, VOCAB, model.state_dict(), tokenizer_dir, tmp_path / "ok")
    with torch.no_grad():
        model.moe_layers()[1].expert_bias[0] = 0.01
    with pytest.raises(StacklabError, match=r"layers\.1\.mlp\.expert_bias .*aux_free"):
        export_hf(cfg, VOCAB, model.state_dict(), tokenizer_dir, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_export_refuses_unknown_tensors_and_existing_folders(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    cfg, model = _model("dense")
    state = model.state_dict() | {"layers.0.attn.q_proj.bias": torch.zeros(64)}
    with pytest.raises(StacklabError, match=r"no Hugging Face counterpart: layers\.0\.attn"):
        export_hf(cfg, VOCAB, state, tokenizer_dir, tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    with pytest.raises(StacklabError, match="already exists"):
        export_hf(cfg, VOCAB, model.state_dict(), tokenizer_dir, tmp_path / "taken")


def test_export_refuses_settings_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands in for a field added to TransformerConfig after this module was written.
    monkeypatch.setattr(hf, "_MODEL_FIELDS", hf._MODEL_FIELDS - {"norm_eps"})
    hf.hf_architecture(TransformerConfig(**SMALL))  # at its default it changes nothing
    with pytest.raises(StacklabError, match=r"model\.norm_eps=1e-05"):
        hf.hf_architecture(TransformerConfig(**SMALL, norm_eps=1e-5))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"hidden_act": "gelu"}, 'hidden_act="gelu"'),
        ({"use_sliding_window": True}, "use_sliding_window=true"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type='yarn'"),
        ({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\]"),
        ({"num_hidden_layers": 4, "decoder_sparse_step": 2}, "makes layers \\[0, 2\\] dense"),
    ],
)
def test_import_refuses_configs_it_cannot_build(change: dict, named: str) -> None:
    cfg, _ = _model("softmax_norm_topk")
    _, fields = hf.hf_config(cfg, VOCAB)
    with pytest.raises(StacklabError, match=named):
        from_hf_config(fields | {"model_type": "qwen3_moe"} | change)


def test_import_refuses_partial_rotary_and_expert_groups() -> None:
    cfg, _ = _model("sigmoid_shared")
    _, fields = hf.hf_config(cfg, VOCAB)
    glm = fields | {"model_type": "glm4_moe"}
    half = glm | {"rope_parameters": glm["rope_parameters"] | {"partial_rotary_factor": 0.5}}
    with pytest.raises(StacklabError, match=r"partial_rotary_factor=0\.5"):
        from_hf_config(half)
    with pytest.raises(StacklabError, match="topk_group=1 with n_group=4"):
        from_hf_config(glm | {"n_group": 4})
