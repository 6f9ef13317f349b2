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
  soon as every row has stopped, the only host synchronisation per step.

Sampling (`sample_next`) is a pure function of the logits: greedy at temperature 0, otherwise
softmax(logits / temperature) restricted by top-k and then top-p (nucleus; Holtzman et al.
2020), the order Hugging Face applies them in. For RL, `return_logprobs` reports each chosen
token's log-probability under the model's unmodified distribution (temperature 1, no
filtering), the quantity a trainer recomputes from the policy's logits, whatever temperature
or filter the rollout sampled with.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stacklab.data.tokenizer import EOT_ID, PAD_ID
from stacklab.model.transformer import Transformer


@dataclass
class Generation:
    """One row's continuation."""

    tokens: list[int]  # generated tokens, without the stop token
    stop_token: int | None  # the stop token that ended the row; None: ran out of tokens
    # Log-probability of each sampled token, the stop token last when there is one
    # (len(tokens) + 1 entries then); None unless asked for.
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
    logits = logits.float() / temperature
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
) -> list[Generation]:
    """Continue every prompt by up to `max_new_tokens` tokens, in one batch.

    Each row ends at its first token in `stop_ids`. Runs in eval mode under
    `torch.inference_mode()` and puts the model back in the mode it was in. A seeded
    `generator` (on the model's device) makes sampling reproducible.
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
        new = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        logprobs = torch.empty(batch, max_new_tokens, device=device)
        cache = model.new_cache(batch, max_len=fed)
        # Only the last position's logits are used: skip the head's matmul for the others.
        out = model(
            ids, cache=cache, positions=positions, key_mask=key_mask[:, :longest], last_only=True
        )
        logits = out.logits[:, -1]  # [B, V]
        position = positions[:, -1:]  # [B, 1]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
            new[:, step] = token
            if return_logprobs:
                logprobs[:, step] = logits.float().log_softmax(-1).gather(-1, token[:, None])[:, 0]
            done |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            position = position + 1
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
