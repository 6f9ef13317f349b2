"""lm-evaluation-harness over a stacklab run: `StacklabLM`, registered as lm-eval's `stacklab`.

lm-eval (EleutherAI's lm-evaluation-harness) asks a model three kinds of question; this adapter
answers them with the run's own model and tokenizer, no export to transformers needed:

* **loglikelihood** `(context, continuation)` → `(log p(continuation | context), is_greedy)`:
  the sum of the model's log-probabilities of the continuation's tokens, and whether each of
  them is the argmax at its position. Used by multiple-choice tasks (acc, acc_norm).
* **loglikelihood_rolling** `(text,)` → `log p(text)`: the whole text scored in windows of the
  model's context, each token predicted once (lm-eval's rolling windows), for perplexity.
* **generate_until** `(context, {"until": [...], "max_gen_toks": N, ...})` → text: greedy
  continuation (sampled if the task sets `do_sample: true`), cut before the first stop string.

**Tokens.** Every context starts with the document-boundary token `<|endoftext|>`, as every
document does in the pretraining stream and as stacklab's own task evaluation asks
(`evals.objectives.encode_prompts`); `boundary=False` drops it, which reproduces lm-eval's
`hf` model on the exported checkpoint (no BOS; an empty context still gets `<|endoftext|>`).
Special-token strings inside the text are encoded as plain text. A (context, continuation)
pair is split as lm-eval's HF model splits it: trailing spaces of the context move to the
continuation, the whole string is encoded, and the continuation is what follows the encoded
context's length.

**Truncation** (the model sees at most `max_seq_len` positions, L):

* loglikelihood: the tokens `[boundary] + context + continuation` are cut from the *left* to
  their last L + 1 (lm-eval's HF rule); the model reads the first L of those and scores the
  continuation. A continuation longer than L tokens is an error.
* generate_until: the prompt keeps its last L - max_gen_toks tokens, leaving room for the
  answer (the HF rule). A request whose `max_gen_toks` leaves less than half the window is
  given L // 2 new tokens instead, with a warning.
* loglikelihood_rolling: windows of L tokens, nothing truncated.

Truncation drops the boundary token with the oldest context.

**Batching.** Requests are sorted longest first and run `batch_size` at a time. Scoring runs
one forward per batch, right-padded (the causal mask keeps padding out of every real
position), with the output head applied to the scored positions only. Generation goes through
`model.generation.generate` (left-padded, KV cache). A row's result never depends on what else
is in its batch, beyond float rounding.

**Stopping.** Generation stops at `<|endoftext|>` or `<|im_end|>`, or at a token whose text
contains a stop string (so a stop string inside one token ends decoding at once); a stop string
spread over several tokens is found when the text is cut, after up to `max_gen_toks` tokens.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

from stacklab.data.tokenizer import EOT_ID, IM_END, PAD_ID, load_tokenizer
from stacklab.errors import StacklabError
from stacklab.model.generation import eval_mode, generate
from stacklab.model.transformer import Transformer
from stacklab.train.checkpoint import load_model, run_model_dir
from stacklab.train.distributed import local_device

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")  # bundled tasks: stacklab_arith, ...
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
_KNOWN_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


@register_model("stacklab")
class StacklabLM(LM):
    """A stacklab model and tokenizer as an lm-eval model.

    From a run directory (`StacklabLM("runs/tiny")`, or on lm-eval's command line after
    importing this module: `--model stacklab --model_args run=runs/tiny,stage=sft`), or from a
    model and tokenizer in memory (`StacklabLM(model=m, tokenizer=tok)`).
    """

    def __init__(
        self,
        run: str | Path | None = None,
        stage: str | None = None,
        *,
        model: Transformer | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        device: str | torch.device | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        boundary: bool | str = True,
        seed: int = 0,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; not used
    ) -> None:
        super().__init__()
        if (run is None) == (model is None):
            raise ValueError("StacklabLM needs either a run directory or a model (not both)")
        if run is not None:
            run = Path(run)
            if not (run / "tokenizer").exists():
                raise StacklabError(
                    f"{run} has no tokenizer/: is it a run directory written by build?"
                )
            model = load_model(run_model_dir(run, stage))
            tokenizer = load_tokenizer(run / "tokenizer")
        if tokenizer is None:
            raise ValueError("StacklabLM(model=...) needs its tokenizer too")
        assert model is not None
        self._device = local_device() if device is None else torch.device(device)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.run = run
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.boundary = boundary if isinstance(boundary, bool) else boundary.lower() == "true"
        self.generator = torch.Generator(self._device).manual_seed(int(seed))
        self.end_ids = {EOT_ID}
        im_end = tokenizer.token_to_id(IM_END)
        if im_end is not None:
            self.end_ids.add(im_end)
        self._token_texts: list[str] | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------- properties

    @property
    def max_length(self) -> int:
        """The model's context, L: the most positions one forward may see."""
        return self.model.cfg.max_seq_len

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    @property
    def tokenizer_name(self) -> str:
        return f"stacklab:{self.run or 'in-memory'}"

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records under `config` in its results."""
        return {
            "model_num_parameters": self.model.num_params(),
            "model_dtype": str(self.model.embed.weight.dtype),
            "max_length": self.max_length,
            "run": str(self.run) if self.run is not None else None,
            "boundary_token": self.boundary,
        }

    # ------------------------------------------------------------------- tokens

    def tok_encode(self, text: str) -> list[int]:
        return self.tok_encode_batch([text])[0]

    def tok_encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, special-token strings encoded as plain text."""
        if not texts:
            return []
        previous = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = True
        try:
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        finally:
            self.tokenizer.encode_special_tokens = previous
        return [enc.ids for enc in encodings]

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens with the boundary token first, continuation tokens), split the way
        lm-eval's HF model splits them (see the module docstring)."""
        prefix = [EOT_ID] if self.boundary or not context else []
        if not context:
            return prefix, self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok_encode_batch([context + continuation, context])
        return prefix + ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------- loglikelihood

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = self.score_tokens([ctx + cont for ctx, cont in pairs], [len(c) for _, c in pairs])
        for req, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[list[int]] = []  # every window of every request, each row scored alone
        scored: list[int] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=EOT_ID,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(ctx + cont)
                scored.append(len(cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score_tokens(windows, scored), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def score_tokens(
        self, sequences: Sequence[list[int]], n_scored: Sequence[int]
    ) -> list[tuple[float, bool]]:
        """For each token sequence, the summed log-probability of its last `n_scored` tokens
        given the ones before, and whether each is the model's argmax. A sequence longer than
        L + 1 tokens keeps its last L + 1."""
        L = self.max_length
        rows = []
        for seq, n in zip(sequences, n_scored, strict=True):
            if n > L:
                raise ValueError(f"a continuation of {n} tokens exceeds the model's context {L}")
            if n == 0:
                rows.append(None)
                continue
            if len(seq) > L + 1:
                self._warn_once(
                    "truncate", f"a request of {len(seq)} tokens is cut from the left to {L + 1}"
                )
            seq = seq[-(L + 1) :]
            rows.append((seq[:-1], seq[-n:]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(
            (i for i, r in enumerate(rows) if r is not None), key=lambda i: -len(rows[i][0])
        )
        device = self._device
        with eval_mode(self.model):
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                width = len(rows[batch[0]][0])
                ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
                scored = torch.zeros(len(batch), width, dtype=torch.bool)
                targets: list[int] = []
                for b, i in enumerate(batch):
                    inp, cont = rows[i]
                    ids[b, : len(inp)] = torch.tensor(inp)
                    scored[b, len(inp) - len(cont) : len(inp)] = True
                    targets += cont
                ids, scored = ids.to(device), scored.to(device)
                logits = self.model(ids, logits=scored).logits  # [N scored, V]
                logprobs = F.log_softmax(logits.float(), dim=-1)
                target = torch.tensor(targets, device=device)
                picked = logprobs.gather(-1, target[:, None])[:, 0].double()
                greedy = logprobs.argmax(-1) == target
                offset = 0
                for i in batch:
                    n = len(rows[i][1])
                    part = slice(offset, offset + n)
                    results[i] = (float(picked[part].sum()), bool(greedy[part].all()))
                    offset += n
        return results

    # ------------------------------------------------------------------- generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # one generate() setting per group
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1] or {}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1] or {})
            texts = self._generate([requests[i].args[0] for i in members], kwargs)
            for i, text in zip(members, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: list[str], kwargs: dict[str, Any]) -> list[str]:
        unknown = sorted(set(kwargs) - _KNOWN_GEN_KWARGS)
        if unknown:
            self._warn_once("kwargs", f"generate_until ignores the generation kwargs {unknown}")
        until = kwargs.get("until") or []
        until = [s for s in ([until] if isinstance(until, str) else until) if s]
        L = self.max_length
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        if max_new < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_new}")
        if max_new > L // 2:
            self._warn_once(
                "max_gen_toks",
                f"max_gen_toks {max_new} leaves the prompt less than half of the model's "
                f"context ({L}); generating at most {L // 2} tokens",
            )
            max_new = L // 2
        sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1)) > 0
        options: dict[str, Any] = {"temperature": 0.0}
        if sample:
            options = {
                "temperature": float(kwargs.get("temperature", 1.0)),
                "top_k": int(kwargs["top_k"]) if kwargs.get("top_k") else None,
                "top_p": float(kwargs["top_p"]) if kwargs.get("top_p") is not None else None,
                "generator": self.generator,
            }
        stop_ids = self.end_ids | self._tokens_containing(until)
        prefix = [EOT_ID] if self.boundary else []
        prompts = []
        for ids in self.tok_encode_batch(contexts):
            prompt = (prefix + ids)[-(L - max_new) :]
            prompts.append(prompt or [EOT_ID])  # an empty prompt still needs one token
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            outs = generate(
                self.model, [prompts[i] for i in batch], max_new, stop_ids=stop_ids, **options
            )
            for i, gen in zip(batch, outs, strict=True):
                tokens = gen.tokens
                if gen.stop_token is not None and gen.stop_token not in self.end_ids:
                    tokens = [*tokens, gen.stop_token]  # its text holds a stop string
                texts[i] = cut_at_stop(self.tok_decode(tokens), until)
        return texts

    def _tokens_containing(self, until: Iterable[str]) -> set[int]:
        """Ids of the tokens whose text contains one of the stop strings."""
        until = list(until)
        if not until:
            return set()
        if self._token_texts is None:
            V = self.tokenizer.get_vocab_size()
            self._token_texts = self.tokenizer.decode_batch(
                [[i] for i in range(V)], skip_special_tokens=False
            )
        return {i for i, t in enumerate(self._token_texts) if any(s in t for s in until)}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def cut_at_stop(text: str, until: Iterable[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for stop in until:
        at = text.find(stop) if stop else -1
        if at != -1:
            end = min(end, at)
    return text[:end]


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes "auto", "auto:N" or a number as text: "auto" is the default here."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise StacklabError(f"batch size must be >= 1, got {size}")
    return size


# --------------------------------------------------------------------------- running tasks


def task_manager(names: list[str], include_paths: Sequence[str | Path] = ()) -> Any:
    """An lm-eval TaskManager that knows every name in `names`, bundled tasks included.

    Indexing lm-eval's own ~15k task configs takes seconds, so the bundled and included folders
    are tried alone first. A name known nowhere is a one-line error with the closest names.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(p) for p in include_paths)]
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise StacklabError(f"--include-path {p}: no such directory")
    local = TaskManager(include_path=paths, include_defaults=False)
    if not _unknown(names, local.all_tasks):
        return local
    full = TaskManager(include_path=paths)
    missing = _unknown(names, full.all_tasks)
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, full.all_tasks, n=5, cutoff=0.6)
            hints.append(f"{name!r} (close: {', '.join(close)})" if close else repr(name))
        raise StacklabError(f"unknown lm-eval task {'; '.join(hints)}")
    return full


def _unknown(names: list[str], known: list[str]) -> list[str]:
    """The names (glob patterns allowed) that match no task, group or tag."""
    known_set = set(known)
    return [
        n for n in names
        if not (n in known_set or (any(c in n for c in "*?[") and fnmatch.filter(known, n)))
    ]  # fmt: skip


def run_tasks(
    lm: StacklabLM,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    include_paths: Sequence[str | Path] = (),
    num_fewshot: int | None = None,
    manager: Any = None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on `tasks`; its results dict (no per-sample logs).

    `manager` is a `task_manager(tasks, include_paths)` made beforehand, e.g. to check the
    task names before loading the model."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(tasks, include_paths)
    names = [m for n in tasks for m in (fnmatch.filter(manager.all_tasks, n) or [n])]
    # lm-eval advertises --metadata for every task with a data loader; ours take none.
    task_log = logging.getLogger("lm_eval.api.task")
    task_log.addFilter(_quiet_custom_dataset)
    try:
        results = simple_evaluate(
            model=lm,
            tasks=list(dict.fromkeys(names)),
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            log_samples=False,
            batch_size=lm.batch_size,
            device=str(lm.device),
        )
    finally:
        task_log.removeFilter(_quiet_custom_dataset)
    assert results is not None  # None only on a non-zero rank of a distributed run
    return results


def _quiet_custom_dataset(record: logging.LogRecord) -> bool:
    return "Custom kwargs can be passed" not in str(record.msg)


def result_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for each metric of each task and group in `results`."""
    rows = []
    for section in ("groups", "results"):
        for task, metrics in sorted(results.get(section, {}).items()):
            for key, value in metrics.items():
                # "metric,filter" keys only: not name, alias or sample_len
                if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                    continue
                metric, _, filt = key.partition(",")
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                name = metric if filt == "none" else f"{metric} ({filt})"
                err = float(stderr) if isinstance(stderr, int | float) else math.nan
                rows.append((task, name, float(value), err if math.isfinite(err) else None))
    return rows


def results_json(results: dict[str, Any]) -> str:
    """The results as JSON text (numpy values and functions in task configs made plain)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
