"""What a model is, as plain frozen dataclasses the model code reads, and how it computes.

The model is a library: export, chat, the server, a benchmark or a notebook build one from a
checkpoint with no recipe in sight. So its configuration lives here, next to the code that
reads it, with no dependency on the recipe schema (pydantic, YAML, hashing). The recipe's
`model` section is the user-facing side: it validates what a person writes, names the key
that is wrong, and hashes the section for the stage cache; `recipe.ModelConfig.build()`
turns it into the `TransformerConfig` below (the OLMo-core pattern of a typed config with a
`build()`). The fields and defaults are the section's, one for one, so a checkpoint's
`model.json` holds exactly what the recipe section dumps (`to_dict`), and old and new
checkpoints read each other (tests/test_checkpoint.py pins both directions).

`FastPaths` is the other kind of setting: *how* the forward computes, never *what*. Each
option gives the plain computation's result up to float rounding; tests turn them off per
model to compare (tests/test_fastpaths_train.py, tests/test_moe.py). They are not stored in
checkpoints: a loaded model computes with the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of Experts in the MLP of every layer from `first_k_dense` on (see `moe.py`)."""

    enabled: bool = False
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None  # default: the dense hidden size / top_k
    router: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = True  # renormalise the top-k weights to sum to 1
    routed_scaling: float = 1.0  # scale of the routed experts' sum
    num_shared_experts: int = 0  # experts every token goes through
    first_k_dense: int = 0  # the first k layers keep a dense MLP
    balance: Literal["aux_loss", "aux_free"] = "aux_loss"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001  # router z-loss (ST-MoE)
    bias_update_rate: float = 0.001  # aux_free: the selection bias's step per update


@dataclass(frozen=True)
class ModelDims:
    """Every size of a model, resolved from the `depth` dial and any explicit settings."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    expert_hidden: int


@dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU or MoE.

    `depth` is the one dial: layers = depth, width = depth × `aspect`, heads of `head_dim`.
    Any size set explicitly wins over the derived one; `dims()` resolves them all.
    """

    depth: int = 4
    aspect: int = 64  # d_model = depth × aspect unless set
    head_dim: int = 64
    d_model: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None  # default: half the query heads
    ffn_hidden: int | None = None  # default: 8/3 d_model, rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10_000.0
    qk_norm: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    def dims(self) -> ModelDims:
        d_model = self.d_model or self.depth * self.aspect
        n_heads = self.n_heads or max(1, d_model // self.head_dim)
        n_kv = self.n_kv_heads or max(1, n_heads // 2)
        if n_heads % n_kv:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
        ffn = self.ffn_hidden or 64 * -(-(8 * d_model // 3) // 64)
        expert = self.moe.expert_hidden or max(8, ffn // self.moe.top_k)
        return ModelDims(
            n_layers=self.depth,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=self.head_dim,
            ffn_hidden=ffn,
            expert_hidden=expert,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (`moe` nested): what a checkpoint's model.json holds."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FastPaths:
    """How the forward computes; each option changes results by float rounding at most.

    * `fused`: one matmul for the attention's q/k/v projections; the output head fused with
      the cross-entropy when only the loss is asked for (`logits=None`); in MoE layers the
      routing weights applied before `down_proj` (on the narrower rows). Off: the plain,
      textbook computation, the reference the fast paths are tested against.
    * `grouped_mm`: MoE experts in one grouped matmul where torch and the device have it
      (else a loop over the experts' slices, one host synchronisation per layer).
    * `logits_chunk_elements`: logits per chunk of the fused head + loss (8 MB in float32).
    """

    fused: bool = True
    grouped_mm: bool = True
    logits_chunk_elements: int = 1 << 21
