"""A decoder-only transformer in the form today's open models share.

Pre-norm blocks with RMSNorm, rotary position embeddings, grouped-query attention through
`scaled_dot_product_attention`, optional QK-norm, and a SwiGLU MLP or a Mixture of Experts.
It is deliberately the Qwen3 / Qwen3-MoE / GLM-4-MoE layout, so a trained model exports to
Hugging Face `transformers` and gives the same logits (see `stacklab.interop.hf`).

One forward serves training (full causal sequences, the `is_causal` fast path), prefill and
incremental decoding with a pre-allocated KV cache, and left-padded batches of prompts of
different lengths (`key_mask` and per-row `positions`). Its one output option, `logits`,
says where the output head runs (every position, the last one, a mask of positions, or
nowhere: the loss only), since the head is the largest matmul of a small model and most
callers need only part of it; a request that cannot be honoured is an error, never ignored.
The model reads its own `TransformerConfig` (`model/config.py`), never the recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from stacklab.model.config import FastPaths, ModelDims, TransformerConfig
from stacklab.model.layers import (
    MLP,
    RMSNorm,
    apply_rope,
    fused_linear,
    linear_cross_entropy,
    rope_tables,
)
from stacklab.model.moe import MoE

# Where the output head runs: every position ("all", [B, T, V]), the last one ("last",
# [B, 1, V]), the True positions of a bool mask [B, T] ([N, V]), or nowhere (None: the loss
# only, with the head fused into it).
LogitsAt: TypeAlias = Literal["all", "last"] | Tensor | None


@dataclass
class ModelOutput:
    logits: Tensor | None  # as `logits` asked: [B, T, V], [B, 1, V], [N, V], or None
    loss: Tensor | None  # mean cross-entropy over targets != -100; None without targets
    aux_loss: Tensor  # MoE load-balancing terms, 0 for dense models


class KVCache:
    """Keys and values of every layer, pre-allocated for `max_len` positions."""

    def __init__(
        self, dims: ModelDims, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (dims.n_layers, batch, dims.n_kv_heads, max_len, dims.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, KV, T, hd] after the filled part; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, dims: ModelDims, fast: FastPaths) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = dims.n_heads, dims.n_kv_heads, dims.head_dim
        self.fused = fast.fused
        d = dims.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(
        self,
        x: Tensor,  # [B, T, D]
        cos: Tensor,  # [B or 1, 1, T, hd]
        sin: Tensor,
        mask: Tensor | None,  # [B, 1, T, S] bool (True = attend), or None for plain causal
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        B, T, _ = x.shape
        if self.fused:
            q, k, v = fused_linear(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(
        self, cfg: TransformerConfig, dims: ModelDims, layer: int, fast: FastPaths
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dims.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, dims, fast)
        self.mlp_norm = RMSNorm(dims.d_model, cfg.norm_eps)
        moe = cfg.moe
        self.mlp: MLP | MoE
        if moe.enabled and layer >= moe.first_k_dense:
            self.mlp = MoE(dims.d_model, dims.expert_hidden, moe, cfg.init_std, fast)
        else:
            self.mlp = MLP(dims.d_model, dims.ffn_hidden)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The model of `cfg` over `vocab_size` tokens, computing with the `fast` paths."""

    def __init__(
        self, cfg: TransformerConfig, vocab_size: int, fast: FastPaths | None = None
    ) -> None:
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(
                f"Transformer needs a TransformerConfig, got {type(cfg).__name__} "
                "(a recipe's model section builds one: recipe.model.build())"
            )
        fast = fast or FastPaths()
        self.cfg, self.dims, self.vocab_size, self.fast = cfg, cfg.dims(), vocab_size, fast
        d = self.dims.d_model
        self.embed = nn.Embedding(vocab_size, d)
        self.layers = nn.ModuleList(
            Block(cfg, self.dims, i, fast) for i in range(self.dims.n_layers)
        )
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(self.dims.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of keeping them.

        Trades about one extra forward per step for memory: only the blocks' inputs are kept.
        Applies to training forwards with gradients and no KV cache; results are unchanged.
        """
        self.activation_checkpointing = enabled

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2·layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.dims.n_layers)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                is_out = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                nn.init.normal_(p, mean=0.0, std=out_std if is_out else std)

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        targets: Tensor | None = None,  # [B, T], -100 = ignore
        *,
        cache: KVCache | None = None,
        positions: Tensor | None = None,  # [B, T]; default: cache.length + arange(T)
        key_mask: Tensor | None = None,  # [B, S] bool, S = cached + T; False = padding
        logits: LogitsAt = "all",
    ) -> ModelOutput:
        """Run the model; `logits` says where the output head runs (see `LogitsAt`).

        * `"all"`: logits at every position, [B, T, V]; with `targets`, also their loss.
        * `"last"`: the last position's only, [B, 1, V] (decoding: prefill and each step).
        * a bool mask [B, T]: the True positions' only, [N, V] (RL and lm-eval score only
          some tokens).
        * `None`: no logits, only the loss of `targets`, the head fused with the
          cross-entropy so the [B, T, V] logits never exist at once (training).

        `targets` are scored at every position, so they go with `"all"` or `None` only.
        """
        _check_logits_request(targets, logits)
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            if past + T > self.cfg.max_seq_len:
                raise ValueError(f"{past + T} positions exceed max_seq_len {self.cfg.max_seq_len}")
            positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos = self.rope_cos[positions].unsqueeze(1)  # [B, 1, T, hd]
        sin = self.rope_sin[positions].unsqueeze(1)
        mask = self._mask(B, T, past, key_mask, input_ids.device)

        x = self.embed(input_ids)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                x = _checkpointed(layer, x, cos, sin, mask, i)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        if logits is None:
            assert targets is not None  # _check_logits_request
            # Training: the [B, T, V] logits are never materialised (layers.linear_cross_entropy).
            h = self.norm(x)
            chunk = self.fast.logits_chunk_elements if self.fast.fused else None
            loss = linear_cross_entropy(
                h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1), chunk
            )
            return ModelOutput(logits=None, loss=loss, aux_loss=self._aux_loss(x))
        if isinstance(logits, Tensor):  # e.g. RL scores only sampled tokens: no head elsewhere
            x = x[logits]
        elif logits == "last":
            x = x[:, -1:]
        out = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                out.float().view(-1, out.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
        return ModelOutput(logits=out, loss=loss, aux_loss=self._aux_loss(x))

    @staticmethod
    def _mask(
        B: int, T: int, past: int, key_mask: Tensor | None, device: torch.device
    ) -> Tensor | None:
        """None selects SDPA's causal fast path; otherwise a [B, 1, T, past+T] boolean mask."""
        if past == 0 and key_mask is None:
            return None
        q_pos = torch.arange(past, past + T, device=device)
        k_pos = torch.arange(past + T, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None]).expand(B, T, past + T)
        if key_mask is not None:
            # A padding query would see no key at all (and SDPA would return NaN that spreads
            # through later layers' values), so every query may always see itself.
            allowed = allowed & key_mask[:, None, :] | (k_pos[None, :] == q_pos[:, None])
        return allowed.unsqueeze(1)

    def _aux_loss(self, x: Tensor) -> Tensor:
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else x.new_zeros(())

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoE)]

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.dims, batch, max_len or self.cfg.max_seq_len, p.dtype, p.device)

    def num_params(self, active: bool = False) -> int:
        """Parameters (tied weights once); `active`: only the top-k routed experts count."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for moe in self.moe_layers():
                per_expert = sum(p[0].numel() for p in (moe.gate_proj, moe.up_proj, moe.down_proj))
                total -= (moe.cfg.num_experts - moe.cfg.top_k) * per_expert
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N + 12·L·H·hd·T (forward and backward).

        N counts the active matmul parameters: every weight except the embedding lookup, with
        the output head counted even when tied (it is a real matmul), and only the top-k
        routed experts of each MoE layer. The second term is attention's score and value
        products over a context of `seq_len` (Kaplan et al. 2020; PaLM appendix B).
        """
        d = self.dims
        n = self.num_params(active=True) - self.embed.weight.numel()
        n += self.lm_head.weight.numel()
        return 6.0 * n + 12.0 * d.n_layers * d.n_heads * d.head_dim * seq_len


def _checkpointed(
    block: Block, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, i: int
) -> Tensor:
    """`block(x, ...)` under activation checkpointing (non-reentrant).

    The recomputation in backward runs the block's forward a second time; an MoE block must
    not count its tokens twice, so it is told which run is the replay.
    """
    moe = block.mlp if isinstance(block.mlp, MoE) else None
    runs = 0

    def run(x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        nonlocal runs
        runs += 1
        if moe is None:
            return block(x, cos, sin, mask, None, i)
        moe.replaying = runs > 1
        try:
            return block(x, cos, sin, mask, None, i)
        finally:
            moe.replaying = False

    return checkpoint(run, x, cos, sin, mask, use_reentrant=False)


def _check_logits_request(targets: Tensor | None, logits: LogitsAt) -> None:
    """Refuse a `forward` request that could not be honoured as asked."""
    if isinstance(logits, Tensor):
        if logits.dtype != torch.bool:
            raise ValueError(f"a logits mask must be bool, got {logits.dtype}")
    elif logits not in ("all", "last", None):
        raise ValueError(f"logits must be 'all', 'last', a bool mask or None, got {logits!r}")
    elif logits is None and targets is None:
        raise ValueError("logits=None asks for the loss only, which needs targets")
    scored_everywhere = logits is None or (isinstance(logits, str) and logits == "all")
    if targets is not None and not scored_everywhere:
        raise ValueError(
            "targets are scored at every position: use logits='all', or None for the loss only"
        )


def build_model(
    cfg: TransformerConfig, vocab_size: int, fast: FastPaths | None = None
) -> Transformer:
    return Transformer(cfg, vocab_size, fast)
