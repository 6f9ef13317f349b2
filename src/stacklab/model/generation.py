"""Batched text generation with the model's pre-allocated KV cache.

Evaluation, chat and RL rollouts all need the same thing: continue many prompts at once,
quickly, one token per step. Re-running the whole sequence for each new token would redo all
the work already done for the tokens before it; with the KV cache each step runs the model on
one new token per row, which attends to the keys and values stored so far.

How a batch of prompts of different lengths is laid out:

* **Left padding.** Prompts are right-aligned in one `[B, longest]` block, so every row's
  next token lands in the same column and one decoding step serves all rows. `key_mask` hides
  the padding from every query, and per-row `positions` count only real tokens, so each row
  computes exactly what it would alone (the transformer's padded-batch contract).
* **One prefill, then one token per step.** Rows that hit a stop token keep being fed (their
  extra tokens are cut off afterwards), which keeps the batch rectangular; the loop ends as
  soon as every row has stopped, the only host synchronisation per step (none at all when
  there are no stop tokens).

**The decoding step's fast path.** The prefill is the model's own forward. A decoding step
runs one token per row, a batch of small matmuls that on a CPU are slowed by how the weights
stream through the caches and by per-operation overhead. `DecodeStep` computes the same step
from the same weights with fewer, larger operations: the q/k/v and the gate/up projections
each as one matmul on weights concatenated once per call, every matmul on MKL-packed weights
where the build has them (the layout `torch.compile`'s CPU freezing uses), RoPE for q and k
at once, keys and values written straight into the pre-allocated cache, and a key mask that
is a view of the padding mask (a single query needs no causal mask). On float32 it gives
bit-identical logits here (pinned by tests/test_fastpaths_sample.py); a model it does not
recognise, or one with forward hooks, takes the general forward. It is a second forward
pass, so a model feature must be written into both: the same test file decodes every field
of the model's config (a new field fails until it is listed) through both paths.

Sampling (`sample_next`) is a pure function of the logits: greedy at temperature 0, otherwise
softmax(logits / temperature) restricted by top-k and then top-p (nucleus; Holtzman et al.
2020), the order Hugging Face applies them in. For RL, `return_logprobs` reports each chosen
token's log-probability at the sampling temperature, `log_softmax(logits / temperature)`: the
distribution the token was drawn from, and exactly what the RL trainer recomputes from the
policy's logits (`rl.trainer.token_logprobs` divides by the same temperature, as verl and TRL
do), so the two differ only by float noise and the trainer's `logprob_drift` is ~0 before an
update. They are taken before any top-k/top-p filter, which the trainer does not reproduce
(RL rollouts sample unfiltered); at temperature 0 (greedy) they are the model's own
(temperature 1).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stacklab.data.tokenizer import EOT_ID, PAD_ID
from stacklab.model.layers import MLP, RMSNorm, apply_rope
from stacklab.model.moe import MoE
from stacklab.model.transformer import Attention, Block, KVCache, Transformer


@dataclass
class Generation:
    """One row's continuation."""

    tokens: list[int]  # generated tokens, without the stop token
    stop_token: int | None  # the stop token that ended the row; None: ran out of tokens
    # Log-probability of each sampled token at the sampling temperature (before top-k/top-p),
    # the stop token last when there is one (len(tokens) + 1 entries then); None unless asked.
    logprobs: list[float] | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_token is not None


def sample_next(
    logits: Tensor,  # [B, V]
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of each row, [B] int64: argmax at temperature 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    # Inverse-CDF sampling: one uniform number per row, where `torch.multinomial` draws an
    # exponential per vocabulary entry (4096 times the random numbers, and the slowest op of
    # a decoding step on CPU). `right=True` never picks a token of probability 0.
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def filter_logits(
    logits: Tensor,  # [B, V]
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """The float32 logits to sample from: divided by `temperature`, filtered tokens at -inf.

    top-k keeps the k most likely tokens; top-p then keeps the smallest set of most likely
    tokens whose probability reaches p (always at least the most likely one).
    """
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature != 1:  # x / 1.0 is x exactly: skip a pass over [B, V]
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kept = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, kept.indices, kept.values)
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)  # [B, V] most likely first
        mass_before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop = mass_before >= top_p
        drop[:, 0] = False
        drop = torch.zeros_like(drop).scatter(-1, order, drop)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class DecodeStep:
    """One decoding step (one new token per row) of `model`, with fewer, larger operations.

    Computes what `model(token[:, None], cache=..., positions=..., key_mask=...)` computes,
    from the same parameters (read at construction: build one per `generate` call, never
    across an optimizer step). `DecodeStep.supports(model)` says whether the model has the
    layout this step was written for; `generate` uses the general forward otherwise.
    """

    def __init__(self, model: Transformer, batch: int) -> None:
        self.model = model
        d = model.dims
        self.n_heads, self.n_kv, self.head_dim = d.n_heads, d.n_kv_heads, d.head_dim
        weight = model.embed.weight
        pack = _MKL_PACKED and weight.device.type == "cpu" and weight.dtype == torch.float32
        self.layers = []

        def linear(w: Tensor) -> _Linear:
            return _Linear(w, batch if pack else None)

        for block in model.layers:
            attn = block.attn
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            qk_norm = None
            if attn.qk_norm:  # one weight row per q head, then per k head
                qk_norm = torch.cat(
                    [
                        attn.q_norm.weight.expand(self.n_heads, -1),
                        attn.k_norm.weight.expand(self.n_kv, -1),
                    ]
                )
            mlp = block.mlp
            gate_up = (
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                if isinstance(mlp, MLP)
                else None
            )
            down = linear(mlp.down_proj.weight) if isinstance(mlp, MLP) else None
            self.layers.append(
                (
                    block,
                    linear(qkv),
                    qk_norm,
                    linear(attn.o_proj.weight),
                    None if gate_up is None else linear(gate_up),
                    down,
                )
            )
        self.head = linear(model.lm_head.weight)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True for the exact module layout `DecodeStep` reproduces: no subclass, no bias,
        and no hooks (a forward hook on any module would be bypassed)."""
        if type(model) is not Transformer or type(model.norm) is not RMSNorm:
            return False
        if _has_hooks(model):
            return False
        for block in model.layers:
            attn = block.attn
            if type(block) is not Block or type(attn) is not Attention:
                return False
            if type(block.attn_norm) is not RMSNorm or type(block.mlp_norm) is not RMSNorm:
                return False
            if type(block.mlp) not in (MLP, MoE):
                return False
            projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
            if isinstance(block.mlp, MLP):
                projs += [block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj]
            if any(type(p) is not nn.Linear or p.bias is not None for p in projs):
                return False
            if attn.qk_norm and (
                type(attn.q_norm) is not RMSNorm or type(attn.k_norm) is not RMSNorm
            ):
                return False
        return True

    def __call__(
        self,
        token: Tensor,  # [B] int64
        position: Tensor,  # [B, 1] each row's position of `token`
        cache: KVCache,
        key_mask: Tensor,  # [B, cache.length + 1] bool, False = padding
    ) -> Tensor:
        """The next-token logits [B, V]; stores this step's keys and values in `cache`."""
        model = self.model
        n, end = cache.length, cache.length + 1
        if end > cache.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {cache.max_len}")
        B, H, KV, hd = token.shape[0], self.n_heads, self.n_kv, self.head_dim
        cos = model.rope_cos[position]  # [B, 1, hd]: broadcasts over the heads
        sin = model.rope_sin[position]
        # One query at the newest position sees every key up to it: no causal mask is
        # needed, only the padding (the general mask's "always see yourself" term is True
        # here too, since a new token is never padding).
        mask = key_mask[:, None, None, :end]
        x = model.embed(token)  # [B, D]
        for i, (block, qkv_proj, qk_norm_w, o_proj, gate_up, down) in enumerate(self.layers):
            qkv = qkv_proj(_rms(block.attn_norm, x)).view(B, H + 2 * KV, hd)
            qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
            if qk_norm_w is not None:
                qk = _rms_unscaled(qk, block.attn.q_norm.eps) * qk_norm_w
            qk = apply_rope(qk, cos, sin)
            cache.k[i, :, :, n] = qk[:, H:]
            cache.v[i, :, :, n] = v
            y = F.scaled_dot_product_attention(
                qk[:, :H, None],  # [B, H, 1, hd]
                cache.k[i, :, :, :end],
                cache.v[i, :, :, :end],
                attn_mask=mask,
                enable_gqa=KV != H,
            )
            x = x + o_proj(y.view(B, H * hd))
            h = _rms(block.mlp_norm, x)
            if gate_up is None or down is None:
                x = x + block.mlp(h)
            else:
                gate, up = gate_up(h).chunk(2, dim=-1)
                x = x + down(F.silu(gate) * up)
        cache.length = end
        return self.head(_rms(model.norm, x))


# MKL's packed sgemm (what torch.compile's CPU freezing uses for float32 linears): the weight
# is re-laid out once in the kernel's own order, and each small-batch matmul then streams it
# faster than from the plain [out, in] layout. The results are the same sgemm's.
_MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class _Linear:
    """`F.linear(x, weight)` for inputs of `batch` rows, on MKL-packed weights when given."""

    def __init__(self, weight: Tensor, batch: int | None) -> None:
        self.weight, self.batch = weight, batch
        self.packed = None
        if batch is not None:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None or x.shape[0] != self.batch:
            return F.linear(x, self.weight)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.batch)


def _has_hooks(model: nn.Module) -> bool:
    """Whether any forward hook (global, or on any submodule) would see the general forward."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _rms(norm: RMSNorm, x: Tensor) -> Tensor:
    """`norm(x)`, as one fused op in float32 (bit-identical there); the module elsewhere."""
    if x.dtype != torch.float32:
        return norm(x)
    return torch.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def _rms_unscaled(x: Tensor, eps: float) -> Tensor:
    """RMSNorm's normalisation without its scale, computed as `RMSNorm` does."""
    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), None, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode under `torch.inference_mode()`; the model's previous mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Collection[int] = (EOT_ID,),
    pad_id: int = PAD_ID,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    fast: bool = True,
) -> list[Generation]:
    """Continue every prompt by up to `max_new_tokens` tokens, in one batch.

    Each row ends at its first token in `stop_ids`. Runs in eval mode under
    `torch.inference_mode()` and puts the model back in the mode it was in. A seeded
    `generator` (on the model's device) makes sampling reproducible. `return_logprobs` adds
    each sampled token's log-probability at `temperature` (see the module docstring).
    `fast=False` decodes with the model's general forward instead of `DecodeStep` (same
    tokens; for tests).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, longest = len(prompts), max(len(p) for p in prompts)
    # The last new token is never fed back, so the model sees at most this many positions.
    fed = longest + max_new_tokens - 1
    if fed > model.cfg.max_seq_len:
        raise ValueError(
            f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) - 1 exceeds the "
            f"model's max_seq_len ({model.cfg.max_seq_len})"
        )
    device = model.embed.weight.device
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    key_mask = torch.ones(batch, fed, dtype=torch.bool)  # False = left padding
    for i, prompt in enumerate(prompts):
        ids[i, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        key_mask[i, : longest - len(prompt)] = False
    ids, key_mask = ids.to(device), key_mask.to(device)
    positions = (key_mask[:, :longest].cumsum(-1) - 1).clamp(min=0)  # [B, longest]
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

    with eval_mode(model):
        step_fn = DecodeStep(model, batch) if fast and DecodeStep.supports(model) else None
        new = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        logprobs = torch.empty(batch, max_new_tokens, device=device)
        cache = model.new_cache(batch, max_len=fed)
        # Only the last position's logits are used: skip the head's matmul for the others.
        out = model(
            ids, cache=cache, positions=positions, key_mask=key_mask[:, :longest], logits="last"
        )
        logits = out.logits[:, -1]  # [B, V]
        position = positions[:, -1:]  # [B, 1]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
            new[:, step] = token
            if return_logprobs:
                scaled = logits.float() if temperature in (0, 1) else logits.float() / temperature
                logprobs[:, step] = scaled.log_softmax(-1).gather(-1, token[:, None])[:, 0]
            if step == max_new_tokens - 1:
                break
            if len(stops):
                done |= torch.isin(token, stops)
                if bool(done.all()):
                    break
            position = position + 1
            if step_fn is not None:
                logits = step_fn(token, position, cache, key_mask)
            else:
                seen = key_mask[:, : cache.length + 1]
                out = model(token[:, None], cache=cache, positions=position, key_mask=seen)
                logits = out.logits[:, -1]

    steps = step + 1
    rows = new[:, :steps].tolist()
    row_logprobs = logprobs[:, :steps].tolist() if return_logprobs else [None] * batch
    return [_cut(r, lp, set(stop_ids)) for r, lp in zip(rows, row_logprobs, strict=True)]


def _cut(tokens: list[int], logprobs: list[float] | None, stops: set[int]) -> Generation:
    """A row's tokens up to (not including) its first stop token."""
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    if end is None:
        return Generation(tokens, None, logprobs)
    kept = logprobs[: end + 1] if logprobs is not None else None
    return Generation(tokens[:end], tokens[end], kept)
