"""The objectives a pretrained model is measured by: held-out bits per byte and task accuracy.

**val_bpb** is the held-out loss in a unit that does not depend on the tokenizer. Mean loss
per token rewards a tokenizer with short tokens as much as a better model; bits per byte
divides the total code length of the held-out text by its size in bytes:

    val_bpb = Σ_t −log₂ p(x_t | x_<t)  /  Σ_t bytes(x_t)

where t runs over the target tokens actually evaluated (every token of the held-out stream
but the first and the dropped final partial row) and bytes(x) is the length of the UTF-8 text
token x stands for. With byte-level BPE that length is fixed per token id (ByteLevel writes
each byte as one character, so it is the length of the token's string), and special tokens
stand for no bytes. Document boundaries still cost bits, as they do in the shards stage's
`shards/unigram_val_bpb`, the baseline this number must beat.

**Task accuracy** asks each task's held-out problems with greedy decoding and grades the
completion with the task's strict `verify`. A prompt starts with the document-boundary token,
as every task document does in the pretraining stream, then the prompt text (special-token
strings in it encoded as text, as in the shards). Completions are decoded with special tokens
kept, so a stray one inside an answer is wrong rather than silently removed.

**The chance level** of a task is `task_baseline/<kind>`: the accuracy of always giving the
answer that is most frequent among training problems (for arithmetic, usually "0", from
`x*0` and `x-x`). A model's accuracy means something only above it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from stacklab.data.loader import iter_eval_batches
from stacklab.data.tasks import Problem, make_generator
from stacklab.data.tokenizer import EOT_ID
from stacklab.model.generation import eval_mode, generate
from stacklab.model.transformer import Transformer
from stacklab.recipe import TaskConfig


def token_bytes(tok: Tokenizer) -> Tensor:
    """How many UTF-8 bytes each token id stands for, [V] int64; 0 for special tokens."""
    special = tok.get_added_tokens_decoder()
    sizes = torch.zeros(tok.get_vocab_size(), dtype=torch.long)
    for token, i in tok.get_vocab().items():
        if i not in special:
            sizes[i] = len(token)  # one ByteLevel character per byte
    return sizes


def val_bpb(
    model: Transformer,
    shard_dir: str | Path,
    tokenizer: Tokenizer,
    batch_size: int,
    max_batches: int = 0,
) -> float:
    """Bits per byte of the `val` split (the first `max_batches` batches; 0: all of it)."""
    sizes = token_bytes(tokenizer)
    if len(sizes) != model.vocab_size:
        raise ValueError(f"tokenizer has {len(sizes)} ids, the model {model.vocab_size}")
    device = model.embed.weight.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = 0
    with eval_mode(model):
        for i, (inputs, targets) in enumerate(iter_eval_batches(shard_dir, "val", batch_size)):
            if max_batches and i == max_batches:
                break
            logits = model(inputs.to(device)).logits  # [B, T, V]
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum"
            )
            nats += loss.double()
            n_bytes += int(sizes[targets].sum())
    if n_bytes == 0:
        raise ValueError(f"{shard_dir}: the evaluated val targets stand for no bytes")
    return float(nats) / math.log(2) / n_bytes


@dataclass(frozen=True)
class Graded:
    problem: Problem
    completion: str
    correct: bool


def grade_tasks(
    model: Transformer,
    tokenizer: Tokenizer,
    task_cfgs: Iterable[TaskConfig],
    n: int,
    seed: int,
    max_new_tokens: int,
    batch_size: int,
) -> list[Graded]:
    """Greedy answers to `n` held-out problems of each task, each graded by its `verify`."""
    graded: list[Graded] = []
    for cfg in task_cfgs:
        gen = make_generator(cfg)
        problems = gen.problems("eval", n, seed)
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            prompts = encode_prompts(tokenizer, [p.prompt for p in batch])
            outputs = generate(model, prompts, max_new_tokens, stop_ids=(EOT_ID,))
            for problem, out in zip(batch, outputs, strict=True):
                text = tokenizer.decode(out.tokens, skip_special_tokens=False)
                graded.append(Graded(problem, text, gen.verify(problem, text)))
    return graded


def accuracy_by_task(graded: Iterable[Graded]) -> dict[str, float]:
    """`task_acc/<kind>`: the share of each task's problems answered correctly."""
    right: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for g in graded:
        right[g.problem.task] += g.correct
        asked[g.problem.task] += 1
    return {f"task_acc/{kind}": right[kind] / n for kind, n in asked.items()}


def encode_prompts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`[EOT] + ids(text)` for each text, special-token strings encoded as plain text."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    return [[EOT_ID, *enc.ids] for enc in encodings]


def constant_answer_baseline(cfg: TaskConfig, n: int, seed: int, draws: int = 5000) -> float:
    """Accuracy on `n` held-out problems of always answering the commonest training answer.

    The commonest answer is estimated from `draws` problems sampled (with repetition) from the
    training split, as the pretraining stream samples them.
    """
    gen = make_generator(cfg)
    rng = random.Random(f"baseline:{seed}")
    answers: Counter[str] = Counter()
    while sum(answers.values()) < draws:
        problem = gen.sample(rng)
        if gen.split_of(problem) == "train":
            answers[problem.answer] += 1
    commonest = answers.most_common(1)[0][0]
    problems = gen.problems("eval", n, seed)
    return sum(gen.verify(p, commonest) for p in problems) / len(problems)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021, Codex).

    1 - C(n-c, k) / C(n, k): the chance that k samples drawn without replacement from the n
    include a correct one, computed as a running product so large n cannot overflow.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss
