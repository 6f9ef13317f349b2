"""Export a stacklab model to Hugging Face `transformers`, and import one back.

Our transformer is deliberately the layout of three open model families, so a model crosses
over by renaming tensors, not by approximating anything:

* dense → `Qwen3ForCausalLM`;
* MoE with the softmax router → `Qwen3MoeForCausalLM`;
* MoE with the sigmoid router (selection bias, shared experts, routed scaling) →
  `Glm4MoeForCausalLM`.

A recipe setting that the target cannot express (no QK-norm for Qwen3, shared experts with a
softmax router, ...) is refused with an error naming the setting: an exported model must give
the same logits, or not be exported. This is the one module that knows Hugging Face's names.

Tensors (ours → theirs; `p` is gate_proj, up_proj or down_proj):

    embed.weight                          model.embed_tokens.weight
    layers.{i}.attn_norm.weight           model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.{q,k,v,o}_proj.weight model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.attn.{q,k}_norm.weight     model.layers.{i}.self_attn.{q,k}_norm.weight
    layers.{i}.mlp_norm.weight            model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.p.weight (dense)       model.layers.{i}.mlp.p.weight
    layers.{i}.mlp.router.weight [E, D]   model.layers.{i}.mlp.gate.weight
    layers.{i}.mlp.expert_bias [E]        model.layers.{i}.mlp.gate.e_score_correction_bias (GLM)
    layers.{i}.mlp.p [E, out, in]         model.layers.{i}.mlp.experts.{e}.p.weight, one per expert
    layers.{i}.mlp.shared.p.weight        model.layers.{i}.mlp.shared_experts.p.weight (GLM)
    norm.weight                           model.norm.weight
    lm_head.weight (untied only)          lm_head.weight

Experts are written one tensor per expert, the layout of every published MoE checkpoint:
`transformers` 5 fuses them into 3-D `experts.gate_up_proj` / `experts.down_proj` on load and
splits them again on save. Settings (TransformerConfig → config.json): depth → num_hidden_layers,
d_model → hidden_size, n_heads / n_kv_heads / head_dim → num_attention_heads /
num_key_value_heads / head_dim, ffn_hidden → intermediate_size (also the dense layers of an
MoE model), max_seq_len → max_position_embeddings, rope_theta → rope_parameters (default
RoPE over the whole head), norm_eps → rms_norm_eps, tie_embeddings → tie_word_embeddings,
init_std → initializer_range; moe.top_k → num_experts_per_tok, expert_hidden →
moe_intermediate_size, norm_topk → norm_topk_prob; first_k_dense → Qwen3-MoE's
mlp_only_layers [0, k) or GLM's first_k_dense_replace; GLM also takes use_qk_norm,
n_shared_experts (its shared MLP is n × moe_intermediate_size wide, as ours), and
routed_scaling_factor, with n_group = topk_group = 1.

Writing config.json needs `transformers` (its config classes know the current file format);
importing needs only the JSON and safetensors files. Both directions speak the model's own
`TransformerConfig`; an imported config.json is validated as a recipe `model` section, so a
model stacklab cannot build is refused with the field that prevents it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import Tensor

from stacklab.data.tokenizer import EOT_ID, HF_CONFIG_FILE, PAD_ID, TOKENIZER_FILE
from stacklab.errors import StacklabError, describe_validation_error
from stacklab.fileio import staging_dir
from stacklab.model.config import TransformerConfig
from stacklab.recipe import ModelConfig

QWEN3 = "Qwen3ForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
GLM4_MOE = "Glm4MoeForCausalLM"
MODEL_TYPES = {"qwen3": QWEN3, "qwen3_moe": QWEN3_MOE, "glm4_moe": GLM4_MOE}

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

_PROJS = ("gate_proj", "up_proj", "down_proj")
# Tensors of every block, ours → theirs, both under the block's prefix.
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
}
_QK_NORM = {f"attn.{p}_norm.weight": f"self_attn.{p}_norm.weight" for p in "qk"}
_DENSE_MLP = {f"mlp.{p}.weight": f"mlp.{p}.weight" for p in _PROJS}
_SHARED = {f"mlp.shared.{p}.weight": f"mlp.shared_experts.{p}.weight" for p in _PROJS}
_ROUTER = {"mlp.router.weight": "mlp.gate.weight"}
_SELECTION_BIAS = {"mlp.expert_bias": "mlp.gate.e_score_correction_bias"}

# TransformerConfig fields this module translates; the rest only shape training (aspect only
# through d_model, which dims() resolves). A field added later with a non-default value is
# refused rather than silently dropped.
_MODEL_FIELDS = {
    "depth", "aspect", "head_dim", "d_model", "n_heads", "n_kv_heads", "ffn_hidden",
    "max_seq_len", "rope_theta", "qk_norm", "tie_embeddings", "norm_eps", "init_std", "moe",
}  # fmt: skip
_MOE_FIELDS = {
    "enabled", "num_experts", "top_k", "expert_hidden", "router", "norm_topk", "routed_scaling",
    "num_shared_experts", "first_k_dense", "balance", "aux_loss_coef", "z_loss_coef",
    "bias_update_rate",
}  # fmt: skip


_GLM_HAS = "it has no such setting (GLM-4-MoE, for model.moe.router=sigmoid, has)"

# --------------------------------------------------------------------------- export


def hf_architecture(cfg: TransformerConfig) -> str:
    """The Hugging Face class that computes exactly what `cfg` does, or a StacklabError."""
    _check_known_fields(cfg)
    moe = cfg.moe
    if not moe.enabled:
        arch = QWEN3
    elif moe.router == "softmax":
        arch = QWEN3_MOE
        if moe.num_shared_experts:
            _refuse(arch, "model.moe.num_shared_experts", moe.num_shared_experts, _GLM_HAS)
        if moe.routed_scaling != 1.0:
            _refuse(arch, "model.moe.routed_scaling", moe.routed_scaling, _GLM_HAS)
    else:
        return GLM4_MOE
    if not cfg.qk_norm:
        _refuse(arch, "model.qk_norm", False, "it always applies q_norm and k_norm")
    return arch


def hf_config(cfg: TransformerConfig, vocab_size: int) -> tuple[str, dict[str, Any]]:
    """The architecture and the keyword arguments of its `transformers` config class."""
    arch = hf_architecture(cfg)
    d, moe = cfg.dims(), cfg.moe
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": d.d_model,
        "intermediate_size": d.ffn_hidden,
        "num_hidden_layers": d.n_layers,
        "num_attention_heads": d.n_heads,
        "num_key_value_heads": d.n_kv_heads,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": EOT_ID,
        "pad_token_id": PAD_ID,
    }
    if arch != QWEN3:
        fields |= {
            "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": d.expert_hidden,
            "norm_topk_prob": moe.norm_topk,
        }
    if arch == QWEN3_MOE:
        fields |= {
            "num_experts": moe.num_experts,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(moe.first_k_dense)),
        }
    if arch == GLM4_MOE:
        rope["partial_rotary_factor"] = 1.0
        fields |= {
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.num_shared_experts,
            "routed_scaling_factor": moe.routed_scaling,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": moe.first_k_dense,
            "use_qk_norm": cfg.qk_norm,
            "num_nextn_predict_layers": 0,
        }
    return arch, fields


def to_hf_state_dict(cfg: TransformerConfig, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our tensors under Hugging Face names, experts split one tensor per expert."""
    arch = hf_architecture(cfg)
    ours = dict(state_dict)
    # A tied head is the embedding under a second name; a different tensor is a mistake.
    head = ours.pop("lm_head.weight", None) if cfg.tie_embeddings else None
    if head is not None and not torch.equal(head, ours.get("embed.weight", head)):
        raise StacklabError(
            "model.tie_embeddings=true, but the state dict's lm_head.weight differs "
            "from embed.weight"
        )
    hf = {theirs: _take(ours, name, "the state dict") for name, theirs in _names(cfg, arch)}
    for i in _moe_layers(cfg):
        for p in _PROJS:
            stacked = _take(ours, f"layers.{i}.mlp.{p}", "the state dict")  # [E, out, in]
            for e in range(cfg.moe.num_experts):
                hf[f"model.layers.{i}.mlp.experts.{e}.{p}.weight"] = stacked[e].clone()
        if arch == QWEN3_MOE:
            bias = _take(ours, f"layers.{i}.mlp.expert_bias", "the state dict")
            if bias.any():
                raise StacklabError(
                    f"cannot export to {arch}: layers.{i}.mlp.expert_bias is non-zero "
                    f"(model.moe.balance={cfg.moe.balance}) and its softmax router has no "
                    "selection bias; use model.moe.router=sigmoid (GLM-4-MoE) for aux_free"
                )
        if arch == GLM4_MOE and not cfg.moe.num_shared_experts:
            # GLM-4-MoE always builds a shared MLP; zero width makes it add nothing.
            hf |= _empty_shared(i, cfg.dims().d_model, hf["model.embed_tokens.weight"].dtype)
    if ours:
        raise StacklabError(
            f"cannot export to {arch}: the state dict has tensors with no Hugging Face "
            f"counterpart: {', '.join(sorted(ours))}"
        )
    return hf


def export_hf(
    cfg: TransformerConfig,
    vocab_size: int,
    state_dict: dict[str, Tensor],
    tokenizer_dir: Path,
    out: Path,
) -> Path:
    """Write a Hugging Face model folder at `out` that `AutoModelForCausalLM` loads.

    The folder holds config.json, generation_config.json (EOS `<|endoftext|>`, pad `<|pad|>`),
    model.safetensors, and the tokenizer's tokenizer.json and tokenizer_config.json. It is
    written under a temporary name and renamed into place, so a folder named `out` is always
    complete; an existing `out` is refused rather than overwritten.
    """
    tokenizer_dir, out = Path(tokenizer_dir), Path(out)
    if out.exists():
        raise StacklabError(f"{out} already exists; export into a new folder")
    for name in (TOKENIZER_FILE, HF_CONFIG_FILE):
        if not (tokenizer_dir / name).is_file():
            raise StacklabError(f"tokenizer file not found: {tokenizer_dir / name}")
    arch, fields = hf_config(cfg, vocab_size)
    tensors = to_hf_state_dict(cfg, state_dict)
    transformers = _transformers()
    config_class = {
        QWEN3: transformers.Qwen3Config,
        QWEN3_MOE: transformers.Qwen3MoeConfig,
        GLM4_MOE: transformers.Glm4MoeConfig,
    }[arch]
    config = config_class(**fields, dtype=tensors["model.embed_tokens.weight"].dtype)
    config.architectures = [arch]
    generation = transformers.GenerationConfig(eos_token_id=EOT_ID, pad_token_id=PAD_ID)

    with staging_dir(out, replace=False) as tmp:
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        for name in (TOKENIZER_FILE, HF_CONFIG_FILE):
            shutil.copyfile(tokenizer_dir / name, tmp / name)
    return out


# --------------------------------------------------------------------------- import


def from_hf_config(hf: dict[str, Any]) -> tuple[str, TransformerConfig, int]:
    """The architecture, our model config and the vocabulary size of a config.json's contents."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise StacklabError(
            f"config.json: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(MODEL_TYPES)})"
        )
    arch = MODEL_TYPES[model_type]
    _expect(hf, "hidden_act", "silu")
    _expect(hf, "attention_bias", False)
    n_layers = _field(hf, "num_hidden_layers")
    n_heads = _field(hf, "num_attention_heads")
    d_model = _field(hf, "hidden_size")
    # Qwen3Config's own default is 128; the MoE classes fall back to hidden / heads.
    head_dim = hf.get("head_dim") or (128 if arch == QWEN3 else d_model // n_heads)
    model: dict[str, Any] = {
        "depth": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": _field(hf, "num_key_value_heads"),
        "head_dim": head_dim,
        "ffn_hidden": _field(hf, "intermediate_size"),
        "max_seq_len": _field(hf, "max_position_embeddings"),
        "rope_theta": _rope_theta(hf),
        "qk_norm": True,
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "norm_eps": _field(hf, "rms_norm_eps"),
        "init_std": hf.get("initializer_range", 0.02),
    }
    if arch in (QWEN3, QWEN3_MOE):
        _expect(hf, "use_sliding_window", False)
    if arch == QWEN3_MOE:
        # transformers 4 wrote num_experts; 5 writes num_local_experts.
        num_experts = hf["num_experts"] if "num_experts" in hf else _field(hf, "num_local_experts")
        model["moe"] = {
            "enabled": True,
            "router": "softmax",
            "num_experts": num_experts,
            "first_k_dense": _qwen3_moe_dense_prefix(hf, n_layers, num_experts),
            **_moe_sizes(hf, norm_topk_default=False),
        }
    if arch == GLM4_MOE:
        if hf.get("topk_group", 1) != hf.get("n_group", 1):
            raise StacklabError(
                f"config.json: topk_group={hf.get('topk_group')} with n_group={hf.get('n_group')}"
                " restricts experts to groups, which stacklab's router does not do"
            )
        model["qk_norm"] = hf.get("use_qk_norm", False)
        model["moe"] = {
            "enabled": True,
            "router": "sigmoid",
            "balance": "aux_free",  # what e_score_correction_bias is trained by
            "num_experts": _field(hf, "n_routed_experts"),
            "num_shared_experts": hf.get("n_shared_experts", 1),
            "routed_scaling": hf.get("routed_scaling_factor", 1.0),
            "first_k_dense": hf.get("first_k_dense_replace", 1),
            **_moe_sizes(hf, norm_topk_default=True),
        }
    try:
        cfg = ModelConfig(**model).build()
    except ValidationError as exc:
        why = describe_validation_error(exc, ModelConfig)
        raise StacklabError(f"config.json describes a model stacklab cannot build: {why}") from None
    return arch, cfg, _field(hf, "vocab_size")


def from_hf_state_dict(
    cfg: TransformerConfig, arch: str, tensors: dict[str, Tensor], num_mtp_layers: int = 0
) -> dict[str, Tensor]:
    """Hugging Face tensors under our names: the inverse of `to_hf_state_dict`.

    A tied head appears once, as embed.weight. GLM's multi-token-prediction layers (stored as
    extra layers after the last one) are dropped: they are not used to predict the next token.
    """
    theirs = dict(tensors)
    if cfg.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    for i in range(cfg.depth, cfg.depth + num_mtp_layers):
        for name in [n for n in theirs if n.startswith(f"model.layers.{i}.")]:
            del theirs[name]
    where = "the Hugging Face weights"
    ours = {name: _take(theirs, hf_name, where) for name, hf_name in _names(cfg, arch)}
    for i in _moe_layers(cfg):
        for p in _PROJS:
            experts = [
                _take(theirs, f"model.layers.{i}.mlp.experts.{e}.{p}.weight", where)
                for e in range(cfg.moe.num_experts)
            ]
            ours[f"layers.{i}.mlp.{p}"] = torch.stack(experts)
        if arch == QWEN3_MOE:
            ours[f"layers.{i}.mlp.expert_bias"] = torch.zeros(cfg.moe.num_experts)
        if arch == GLM4_MOE and not cfg.moe.num_shared_experts:
            for name in _SHARED.values():
                theirs.pop(f"model.layers.{i}.{name}", None)  # zero-width: adds nothing
    if theirs:
        raise StacklabError(
            f"{where} have tensors that {arch} with this config.json does not use: "
            f"{', '.join(sorted(theirs))}"
        )
    return ours


def import_hf(hf_dir: Path) -> tuple[TransformerConfig, int, dict[str, Tensor], Path | None]:
    """Read a Qwen3 / Qwen3-MoE / GLM-4-MoE folder: (config, vocab size, state dict, tokenizer).

    The state dict has our names (tied models without lm_head.weight) and the stored dtype;
    the tokenizer is the folder itself when it holds a tokenizer.json, else None.
    """
    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise StacklabError(f"not a Hugging Face model folder (no config.json): {hf_dir}")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise StacklabError(f"{config_file}: not valid JSON ({exc})") from None
    arch, cfg, vocab_size = from_hf_config(hf)
    mtp = hf.get("num_nextn_predict_layers", 0) if arch == GLM4_MOE else 0
    state_dict = from_hf_state_dict(cfg, arch, _read_weights(hf_dir), mtp)
    tokenizer = hf_dir if (hf_dir / TOKENIZER_FILE).is_file() else None
    return cfg, vocab_size, state_dict, tokenizer


# --------------------------------------------------------------------------- helpers


def _names(cfg: TransformerConfig, arch: str) -> list[tuple[str, str]]:
    """(our name, Hugging Face name) of every tensor except the routed experts."""
    moe_layers = set(_moe_layers(cfg))
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.depth):
        block = _BLOCK | (_QK_NORM if cfg.qk_norm else {})
        if i not in moe_layers:
            block |= _DENSE_MLP
        else:
            block |= _ROUTER
            if arch == GLM4_MOE:
                block |= _SELECTION_BIAS | (_SHARED if cfg.moe.num_shared_experts else {})
        pairs += [(f"layers.{i}.{a}", f"model.layers.{i}.{b}") for a, b in block.items()]
    return pairs


def _moe_layers(cfg: TransformerConfig) -> list[int]:
    return list(range(cfg.moe.first_k_dense, cfg.depth)) if cfg.moe.enabled else []


def _empty_shared(layer: int, d_model: int, dtype: torch.dtype) -> dict[str, Tensor]:
    shapes = {"gate_proj": (0, d_model), "up_proj": (0, d_model), "down_proj": (d_model, 0)}
    return {
        f"model.layers.{layer}.mlp.shared_experts.{p}.weight": torch.zeros(s, dtype=dtype)
        for p, s in shapes.items()
    }


def _take(tensors: dict[str, Tensor], name: str, where: str) -> Tensor:
    if name not in tensors:
        raise StacklabError(f"{where} has no tensor {name!r}")
    return tensors.pop(name)


def _check_known_fields(cfg: TransformerConfig) -> None:
    sections = (("model.", cfg, _MODEL_FIELDS), ("model.moe.", cfg.moe, _MOE_FIELDS))
    for prefix, section, known in sections:
        default = type(section)()
        for field in dataclasses.fields(section):
            name, value = field.name, getattr(section, field.name)
            if name not in known and value != getattr(default, name):
                raise StacklabError(
                    f"cannot export: {prefix}{name}={value!r} has no Hugging Face counterpart "
                    "that stacklab.interop.hf knows"
                )


def _refuse(arch: str, field: str, value: Any, why: str) -> None:
    shown = str(value).lower() if isinstance(value, bool) else value
    raise StacklabError(f"cannot export to {arch}: {field}={shown}, but {why}")


def _field(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise StacklabError(f"config.json has no {key!r}")
    return hf[key]


def _expect(hf: dict[str, Any], key: str, supported: Any) -> None:
    value = hf.get(key, supported)
    if value != supported:
        raise StacklabError(
            f"config.json: {key}={json.dumps(value)} is not supported by stacklab "
            f"(only {json.dumps(supported)})"
        )


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or the top-level keys (4.x)."""
    scaling = hf.get("rope_scaling") or {}
    rope = hf.get("rope_parameters") or {
        "rope_type": scaling.get("rope_type", scaling.get("type", "default")),
        "rope_theta": hf.get("rope_theta"),
        "partial_rotary_factor": hf.get("partial_rotary_factor", 1.0),
    }
    if rope.get("rope_type", "default") != "default":
        raise StacklabError(
            f"config.json: rope_type={rope['rope_type']!r} is not supported (only 'default')"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise StacklabError(
            f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} is not "
            "supported: stacklab rotates the whole head (only 1.0)"
        )
    if rope.get("rope_theta") is None:
        raise StacklabError("config.json has no 'rope_theta'")
    return float(rope["rope_theta"])


def _moe_sizes(hf: dict[str, Any], norm_topk_default: bool) -> dict[str, Any]:
    return {
        "top_k": _field(hf, "num_experts_per_tok"),
        "expert_hidden": _field(hf, "moe_intermediate_size"),
        "norm_topk": hf.get("norm_topk_prob", norm_topk_default),
    }


def _qwen3_moe_dense_prefix(hf: dict[str, Any], n_layers: int, num_experts: int | None) -> int:
    """How many leading layers are dense; refused unless exactly the leading ones are."""
    step = hf.get("decoder_sparse_step", 1)
    only_mlp = set(hf.get("mlp_only_layers") or [])
    dense = [
        i for i in range(n_layers) if i in only_mlp or not (num_experts and (i + 1) % step == 0)
    ]
    if dense != list(range(len(dense))):
        raise StacklabError(
            f"config.json: mlp_only_layers={sorted(only_mlp)} with decoder_sparse_step={step} "
            f"makes layers {dense} dense; stacklab supports only the first k layers dense"
        )
    return len(dense)


def _read_weights(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of a single or sharded safetensors checkpoint."""
    single, index = hf_dir / WEIGHTS_FILE, hf_dir / WEIGHTS_INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    else:
        raise StacklabError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {hf_dir}")
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors |= load_file(file)
    return tensors


def _transformers() -> Any:
    """The `transformers` package (5.x: its config files use `rope_parameters`)."""
    try:
        import transformers
    except ImportError:
        raise StacklabError(
            "export to Hugging Face needs the `transformers` package: pip install 'stacklab[hf]'"
        ) from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise StacklabError(
            f"export needs transformers >= 5 (installed: {transformers.__version__})"
        )
    return transformers
