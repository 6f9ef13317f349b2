"""`stacklab serve RUN`: an OpenAI-compatible HTTP server over a run's model.

Any OpenAI client (the `openai` package, LangChain, lm-eval's `local-completions`, curl) can
talk to a built or imported run:

* `GET /v1/models`: one model, named after the run directory.
* `POST /v1/chat/completions`: messages in OpenAI's shape, rendered into the run's chat format
  (`encode_chat`, the same ids as SFT, RL and `stacklab chat`); `tools` become the system
  prompt the tool-use training data has (`agent_env.system_prompt`), and a generated
  `<tool_call>` block comes back as an OpenAI tool call (`parse_assistant`). `stream: true`
  sends `chat.completion.chunk` events ending with `data: [DONE]`.
* `POST /v1/completions`: raw text in, text out, with `logprobs: k` (the chosen token's
  log-probability and the k most likely ones, under the model's own distribution) and
  `echo` (the prompt's tokens scored too; with `max_tokens: 0`, what loglikelihood evals use).

Errors keep OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 404 for an
unknown model, 400 for a bad body (one line naming the field) or an unsupported option, 400
`context_length_exceeded` with the numbers when the prompt and `max_tokens` do not fit.

**One model, one worker.** Every generation runs on a single worker thread, in the order the
requests came (a queue of one worker), so the model is never used by two requests at once,
while the event loop keeps accepting requests, answering `/v1/models` and streaming tokens.
Encoding a request happens on the event loop (`encode_chat` flips a setting of the
tokenizer, so that tokenizer never leaves the loop's thread); decoding uses a second copy
that nothing mutates.

**Decoding** is `generation.generate`'s single-row loop (prefill, then `DecodeStep` one token
at a time on the KV cache, `sample_next` for the choice), written out here so that each token
can be streamed as soon as it is sampled and scored with its top alternatives; at temperature
0 it gives exactly `generate`'s tokens (tests/test_serve.py checks it).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

from stacklab.data.chat import encode_chat, parse_assistant
from stacklab.data.tokenizer import EOT, IM_END, TOOL_CALL, load_tokenizer
from stacklab.envs.agent_env import system_prompt
from stacklab.envs.tools import Tool, Toolbox
from stacklab.errors import StacklabError
from stacklab.model.generation import DecodeStep, sample_next
from stacklab.model.transformer import Transformer
from stacklab.train.checkpoint import load_model, run_model_dir

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's chat API allows
MAX_STOPS = 4
PREFILL_CHUNK = 512  # positions per forward when scoring a prompt (echo): bounds [T, V] logits


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**error, "code": self.code}}


def _unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} is not supported by stacklab serve", param=param,
                    code="unsupported_parameter")  # fmt: skip


_TYPE_TAG = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(loc: tuple[Any, ...]) -> tuple[str, list[str]]:
    """`messages[0].content` from pydantic's loc, and the union members named in it."""
    parts: list[str] = []
    tags: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part == "body" and not parts:
            continue
        elif not _TYPE_TAG.match(str(part)) or part in _TYPE_NAMES:
            tags.append(str(part))  # a union member ('str', 'list[str]', 'ContentPart')
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts), tags


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """One line for pydantic's errors: the first bad field and what is wrong with it."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return f"the request body is not valid JSON ({detail})", None
    path, tags = _field_path(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {path}", path or None
    if path == "":
        return f"request body: {first.get('msg')}", None
    same = [e for e in errors if _field_path(tuple(e.get("loc", ())))[0] == path]
    members = [_field_path(tuple(e.get("loc", ())))[1] for e in same]
    if tags and len(same) > 1 and all(members):
        kinds = ", ".join(dict.fromkeys(m[0] for m in members))
        message = f"{path}: does not match any accepted form ({kinds})"
    else:
        message = f"{path}: {first.get('msg')}"
        if "input" in first and first.get("type") in ("literal_error", "enum"):
            message += f", got {first['input']!r}"
    more = len({_field_path(tuple(e.get("loc", ())))[0] for e in errors}) - 1
    if more > 0:
        message += f" (and {more} more invalid field{'s' if more > 1 else ''})"
    return message.replace("\n", " "), path


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Loose):
    type: str
    text: str | None = None


class FunctionCall(_Loose):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Loose):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Loose):  # loose: clients send back a response's message with its extras
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Loose):
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Loose):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None  # an extension (as in vLLM): -1 or None for no top-k filter
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted: several calls may come back anyway
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None  # accepted and ignored
    store: bool | None = None  # accepted and ignored


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


# --------------------------------------------------------------------------- the engine


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token; None: no log-probs at all
    echo: bool = False  # score the prompt's tokens too


@dataclass
class Scored:
    """A token with its log-probability (None for a prompt's first token) and the most
    likely tokens at its position, as (id, log-probability)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class Completion:
    text: str  # the generated text, cut at a stop string
    tokens: list[int]  # generated tokens, without the stop token
    finish_reason: str  # "stop" (stop token or string) or "length"
    scored: list[Scored] = field(default_factory=list)  # the tokens behind `text` (logprobs)
    offsets: list[int] = field(default_factory=list)  # where each scored token starts in text
    prompt_scored: list[Scored] = field(default_factory=list)  # echo with logprobs
    prompt_offsets: list[int] = field(default_factory=list)


class Cancelled(Exception):
    """The client went away; the worker stops generating."""


class Detokenizer:
    """Text of a growing token list, piece by piece, never splitting a UTF-8 character.

    Decodes a short window (the tokens since the last emitted piece, after those before it)
    so each token costs O(1) decoding; a window ending in an incomplete character waits for
    the next token.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix : self.read])
        now = self._decode(self.tokens[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        if self.read == len(self.tokens):
            return ""
        before = self._decode(self.tokens[self.prefix : self.read])
        now = self._decode(self.tokens[self.prefix :])
        self.prefix = self.read = len(self.tokens)
        return now[len(before) :]


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still become a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character each byte is written as in the vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Engine:
    """A run's model and tokenizer, and the one worker thread that generates with them."""

    def __init__(
        self, run: Path, *, stage: str | None = None, device: str = "cpu", name: str | None = None
    ) -> None:
        run = Path(run)
        if not (run / "tokenizer").exists():
            raise StacklabError(f"{run} has no tokenizer/: is it a run directory written by build?")
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise StacklabError(f"--device: unknown device {device!r} (e.g. cpu, cuda)") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise StacklabError("--device cuda: no CUDA device is available here")
        self.model: Transformer = load_model(run_model_dir(run, stage)).eval().to(self.device)
        self.name = name or run.resolve().name
        self.context = self.model.cfg.max_seq_len
        self.tokenizer = load_tokenizer(run / "tokenizer")  # encoding, on the event loop
        self.decoder = load_tokenizer(run / "tokenizer")  # decoding only: never mutated
        ids = {tok: self.tokenizer.token_to_id(tok) for tok in (EOT, IM_END)}
        self.eot, self.im_end = ids[EOT], ids[IM_END]
        self.chat_stops = frozenset(i for i in (self.im_end, self.eot) if i is not None)
        self.text_stops = frozenset(i for i in (self.eot,) if i is not None)
        self._special = set(self.tokenizer.get_added_tokens_decoder())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stacklab-generate")
        self.created = int(time.time())

    # ---- tokens as text

    def token_bytes(self, token: int) -> bytes:
        piece = self.decoder.id_to_token(token) or ""
        if token not in self._special and piece and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return self.decoder.decode([token], skip_special_tokens=False).encode()

    def token_text(self, token: int) -> str:
        """The token as OpenAI writes it: its text, or `bytes:\\x..` when not valid UTF-8."""
        raw = self.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    # ---- generation (on the worker thread)

    def run(
        self,
        prompt: list[int],
        params: Params,
        stop_ids: frozenset[int],
        emit: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Generate from `prompt`; `emit` gets each safe piece of text as soon as it is known
        (never a part of a stop string, never half a character)."""
        with torch.inference_mode():
            return self._run(prompt, params, stop_ids, emit, cancel)

    def _run(self, prompt, params, stop_ids, emit, cancel) -> Completion:
        model, device = self.model, self.device
        n, max_new = len(prompt), params.max_tokens
        k = params.logprobs
        result = Completion(text="", tokens=[], finish_reason="length")
        fed = n + max(max_new, 1) - 1  # the last new token is never fed back
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        cache = model.new_cache(1, max_len=fed)
        key_mask = torch.ones(1, fed, dtype=torch.bool, device=device)
        if params.echo:  # score the prompt, chunk by chunk on the cache
            if k is not None:
                result.prompt_scored.append(Scored(prompt[0], None, []))
            for start in range(0, n, PREFILL_CHUNK):
                chunk = ids[:, start : start + PREFILL_CHUNK]
                logits = model(chunk, cache=cache).logits[0]  # [T, V]
                if k is not None:
                    targets = prompt[start + 1 : start + 1 + chunk.shape[1]]
                    logp = logits[: len(targets)].float().log_softmax(-1)
                    for row, target in zip(logp, targets, strict=True):
                        result.prompt_scored.append(self._score(row, target, k))
            logits = logits[-1:]
            detok, seen_text = Detokenizer(self.decoder), 0
            for s in result.prompt_scored:
                result.prompt_offsets.append(seen_text)
                seen_text += len(detok.push(s.token))
            if max_new == 0:
                return result
        else:  # exactly generate()'s prefill
            positions = torch.arange(n, device=device)[None]
            out = model(ids, cache=cache, positions=positions, key_mask=key_mask[:, :n],
                        logits="last")  # fmt: skip
            logits = out.logits[:, -1]
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=device).manual_seed(seed)
        step_fn = DecodeStep(model, 1) if DecodeStep.supports(model) else None
        position = torch.tensor([[n - 1]], device=device)
        detok = Detokenizer(self.decoder)
        stops = [s for s in params.stop if s]
        longest_stop = max((len(s) for s in stops), default=0)
        text, emitted = "", 0
        top_k = params.top_k if params.top_k and params.top_k > 0 else None
        temperature = params.temperature
        cut = False  # the text was cut at a stop string
        for step in range(max_new):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            token_t = sample_next(logits, temperature, top_k, params.top_p, generator)
            token = int(token_t[0])
            if token in stop_ids:
                result.finish_reason = "stop"
                break
            result.tokens.append(token)
            if k is not None:
                result.scored.append(self._score(logits[0].float().log_softmax(-1), token, k))
                result.offsets.append(len(text))
            before = len(text)
            text += detok.push(token)
            if stops and len(text) > before:
                start = max(0, before - longest_stop + 1)
                found = [i for i in (text.find(s, start) for s in stops) if i != -1]
                if found:
                    text, cut = text[: min(found)], True
                    result.finish_reason = "stop"
                    break
            if emit is not None:
                safe = len(text) - _held_suffix(text, stops)
                if safe > emitted:
                    emit(text[emitted:safe])
                    emitted = safe
            if step == max_new - 1:
                break
            position = position + 1
            if step_fn is not None:
                logits = step_fn(token_t, position, cache, key_mask)
            else:
                seen = key_mask[:, : cache.length + 1]
                out = model(token_t[:, None], cache=cache, positions=position, key_mask=seen)
                logits = out.logits[:, -1]
        if not cut:  # an incomplete character at the end, or a stop string it completes
            text += detok.flush()
            found = [i for i in (text.find(s) for s in stops) if i != -1]
            if found:
                text, cut = text[: min(found)], True
                result.finish_reason = "stop"
        if emit is not None and len(text) > emitted:
            emit(text[emitted:])
        result.text = text
        if cut and k is not None:  # only the tokens whose text is (at least partly) kept
            kept = sum(1 for o in result.offsets if o < len(text))
            result.scored, result.offsets = result.scored[:kept], result.offsets[:kept]
        return result

    def _score(self, logp: torch.Tensor, token: int, k: int) -> Scored:
        top: list[tuple[int, float]] = []
        if k > 0:
            values, indices = logp.topk(k)
            top = list(zip(indices.tolist(), values.tolist(), strict=True))
        return Scored(token, float(logp[token]), top)


# --------------------------------------------------------------------------- chat mapping


def _text_content(content: str | list[ContentPart] | None, where: str, empty_ok: bool) -> str:
    if content is None:
        if empty_ok:
            return ""
        raise APIError(400, f"{where}: content is required for this role", param=where)
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _unsupported(f"{where}[{j}]", f"a {part.type!r} content part (text only)")
        texts.append(part.text)
    return "".join(texts)


def toolbox(tools: list[ToolDef]) -> Toolbox:
    """The request's tools as a `Toolbox` (whose `describe()` lists them for the prompt,
    `name(arg: type, ...) - description`); the server never calls them."""

    def kind(spec: Any) -> str:
        t = spec.get("type") if isinstance(spec, dict) else None
        if isinstance(t, list):
            return "|".join(map(str, t))
        return str(t) if t else "any"

    defined = []
    for tool in tools:
        f = tool.function
        props = f.parameters.get("properties", {})
        props = props if isinstance(props, dict) else {}
        schema = {"properties": {name: {"type": kind(spec)} for name, spec in props.items()}}
        description = " ".join(f.description.split())
        defined.append(Tool(f.name, description, schema, lambda arguments: ""))
    try:
        return Toolbox(defined)
    except ValueError as exc:  # two tools of one name
        raise APIError(400, f"tools: {exc}", param="tools") from None


def chat_messages(request: ChatRequest, use_tools: bool) -> list[dict[str, Any]]:
    """The request's messages in stacklab's chat format (what `encode_chat` takes).

    With tools, the system message is the one SFT's tool-use demonstrations and the RL agent
    environments train with (`agent_env.system_prompt`: how to call, the tool list, the
    answer line), after the client's own system text if it sent one. Without tools, the
    messages are as sent: no system message is added (SFT's task chats have none).
    """
    out: list[dict[str, Any]] = []
    call_ids: list[list[str | None]] = []  # per message: the ids of its tool calls
    for i, m in enumerate(request.messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        text = _text_content(m.content, f"{where}.content", empty_ok=role == "assistant")
        ids: list[str | None] = []
        if role == "assistant":
            calls = []
            for j, call in enumerate(m.tool_calls or []):
                arguments = _arguments(call.function.arguments, f"{where}.tool_calls[{j}]")
                calls.append({"name": call.function.name, "arguments": arguments})
                ids.append(call.id)
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                msg["tool_calls"] = calls
        elif role == "tool":
            msg = {"role": "tool", "content": text}
            ids.append(m.tool_call_id)
        else:
            msg = {"role": role, "content": text}
        out.append(msg)
        call_ids.append(ids)
    _order_tool_results(out, call_ids)
    if not (use_tools and request.tools):
        return out
    system = system_prompt(toolbox(request.tools))
    if out and out[0]["role"] == "system":
        system = out.pop(0)["content"] + "\n" + system
    return [{"role": "system", "content": system}, *out]


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise APIError(400, f"{where}.function.arguments: not JSON ({exc.msg})",
                       param=f"{where}.function.arguments") from None  # fmt: skip
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}.function.arguments: must be a JSON object",
                       param=f"{where}.function.arguments")  # fmt: skip
    return arguments


def _order_tool_results(messages: list[dict[str, Any]], call_ids: list[list[str | None]]) -> None:
    """Put the tool messages after an assistant turn in the order of its calls, when their
    `tool_call_id`s name exactly those calls (the chat format pairs results by position)."""
    i = 0
    while i < len(messages):
        j = i + 1
        while j < len(messages) and messages[j]["role"] == "tool":
            j += 1
        if messages[i]["role"] == "assistant" and j > i + 1:
            wanted = call_ids[i]
            given = [call_ids[t][0] for t in range(i + 1, j)]
            distinct = None not in wanted and len(set(wanted)) == len(wanted)
            if distinct and sorted(map(str, wanted)) == sorted(map(str, given)):
                by_id = {call_ids[t][0]: messages[t] for t in range(i + 1, j)}
                messages[i + 1 : j] = [by_id[w] for w in wanted]
        i = j


def reply_parts(text: str, use_tools: bool) -> tuple[str, list[dict[str, Any]]]:
    """Content and OpenAI tool calls of a generated reply. With tools, well-formed
    `<tool_call>` blocks become calls; a reply with a malformed block stays plain text."""
    if use_tools:
        turn = parse_assistant(text)
        if turn.tool_calls and not turn.errors:
            calls = [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": c.name,
                        "arguments": json.dumps(c.arguments, ensure_ascii=False),
                    },
                }
                for c in turn.tool_calls
            ]
            return turn.content, calls
    return text.strip(), []


class ChatText:
    """The content deltas to stream while a reply is generated: stripped like the final
    content, and nothing from a `<tool_call>` on (the calls come whole at the end)."""

    def __init__(self, use_tools: bool) -> None:
        self.use_tools = use_tools
        self.raw = ""
        self.sent = ""

    def feed(self, piece: str) -> str:
        self.raw += piece
        text = self.raw
        if self.use_tools:
            at = text.find(TOOL_CALL)
            text = text[:at] if at != -1 else text[: len(text) - _held_suffix(text, [TOOL_CALL])]
        candidate = text.strip()
        if len(candidate) > len(self.sent) and candidate.startswith(self.sent):
            delta, self.sent = candidate[len(self.sent) :], candidate
            return delta
        return ""

    def finish(self, content: str) -> str:
        return content[len(self.sent) :] if content.startswith(self.sent) else ""


# --------------------------------------------------------------------------- the app


def _check_model(engine: Engine, model: str) -> None:
    if model != engine.name:
        raise APIError(404, f"The model `{model}` does not exist; this server has "
                       f"`{engine.name}`.", param="model", code="model_not_found")  # fmt: skip


def _sampling(request: _Sampling, max_tokens: int, logprobs: int | None) -> Params:
    if request.n not in (None, 1):
        raise APIError(400, f"n={request.n}: only n=1 is supported (one choice per request)",
                       param="n", code="unsupported_value")  # fmt: skip
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) not in (None, 0, 0.0):
            raise _unsupported(name, f"{name} other than 0")
    if request.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop sequences, got {len(stop)}",
                       param="stop")  # fmt: skip
    if request.top_k is not None and (request.top_k == 0 or request.top_k < -1):
        raise APIError(400, "top_k: must be -1 (no filter) or at least 1", param="top_k")
    temperature = 1.0 if request.temperature is None else request.temperature
    return Params(max_tokens=max_tokens, temperature=temperature, top_p=request.top_p,
                  top_k=request.top_k, seed=request.seed, stop=stop, logprobs=logprobs)  # fmt: skip


def _check_context(engine: Engine, n_prompt: int, max_tokens: int, where: str) -> None:
    if n_prompt + max_tokens > engine.context:
        raise APIError(
            400,
            f"This model's maximum context length is {engine.context} tokens. However, you "
            f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the {where}, {max_tokens} "
            f"in the completion). Please reduce the length of the {where} or completion.",
            param=where,
            code="context_length_exceeded",
        )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _event_stream(
    stream: _Stream,
    opening: AsyncIterator[str],
    closing: Callable[[Completion], Iterator[str]],
    usage_head: dict[str, Any] | None,
    prompt_tokens: int,
) -> StreamingResponse:
    """A server-sent-event response: `opening`'s events while the model generates, then
    `closing`'s for the finished completion, the usage chunk (with `usage_head`, when the
    client asked for usage) and `[DONE]`. A failure after the stream started is reported as
    an event; the generation is cancelled whenever the stream ends, the client leaving too."""

    async def events() -> AsyncIterator[str]:
        try:
            async for event in opening:
                yield event
            try:
                result = await stream.future
            except Exception as exc:  # the stream has started: report it as an event
                yield _sse(APIError(500, f"generation failed: {exc}", type="server_error").body())
                return
            for event in closing(result):
                yield event
            if usage_head is not None:
                usage = _usage(prompt_tokens, len(result.tokens))
                yield _sse({**usage_head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel.set()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Stream:
    """A generation on the worker whose text arrives on the event loop as it is made."""

    def __init__(self, engine: Engine, job: Callable[..., Completion]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.cancel = threading.Event()
        self.future = self.loop.run_in_executor(engine.executor, self._work, job)
        # A stream the client left ends in Cancelled, which nobody awaits: retrieve it here.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _put(self, item: str | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is going down
            self.cancel.set()

    def _work(self, job: Callable[..., Completion]) -> Completion:
        try:
            return job(emit=self._put, cancel=self.cancel)
        finally:
            self._put(None)

    async def pieces(self) -> AsyncIterator[str]:
        while (piece := await self.queue.get()) is not None:
            yield piece


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app serving `engine`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="stacklab serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}: {exc}".replace("\n", " ")
        return JSONResponse(APIError(500, message, type="server_error").body(), status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        _check_model(engine, model)
        return _model_card(engine)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatRequest) -> JSONResponse | StreamingResponse:
        return await _chat(engine, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> JSONResponse | StreamingResponse:
        return await _complete(engine, request)

    return app


def _model_card(engine: Engine) -> dict[str, Any]:
    return {"id": engine.name, "object": "model", "created": engine.created,
            "owned_by": "stacklab", "max_model_len": engine.context}  # fmt: skip


async def _chat(engine: Engine, request: ChatRequest) -> JSONResponse | StreamingResponse:
    _check_model(engine, request.model)
    choice = request.tool_choice
    if isinstance(choice, dict) or choice not in (None, "auto", "none"):
        raise _unsupported("tool_choice", f"tool_choice {choice!r} (only 'auto' and 'none')")
    if request.response_format and request.response_format.get("type") not in (None, "text"):
        raise _unsupported("response_format", f"response_format {request.response_format}")
    if request.stream and request.logprobs:
        raise _unsupported("logprobs", "logprobs with stream")
    use_tools = bool(request.tools) and choice != "none"
    messages = chat_messages(request, use_tools)
    try:
        prompt, _ = encode_chat(engine.tokenizer, messages, add_generation_prompt=True)
    except StacklabError as exc:  # e.g. a tool message that answers no call
        added = use_tools and request.messages[0].role not in ("system", "developer")
        shift = 1 if added else 0  # the system message the tools added

        def where(match: re.Match[str]) -> str:
            return f"messages[{max(int(match.group(1)) - shift, 0)}]"

        message = re.sub(r"chat message (\d+)", where, str(exc))
        raise APIError(400, message, param="messages") from None
    limit = request.max_completion_tokens or request.max_tokens
    if limit == 0:
        raise APIError(400, "max_tokens: must be at least 1", param="max_tokens")
    max_tokens = limit or max(engine.context - len(prompt), 0)
    _check_context(engine, len(prompt), max(max_tokens, 1), "messages")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = _sampling(request, max_tokens, logprobs)

    def job(emit: Callable[[str], None] | None = None, cancel: threading.Event | None = None):
        return engine.run(prompt, params, engine.chat_stops, emit, cancel)

    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": engine.name}  # fmt: skip
    if not request.stream:
        result = await asyncio.get_running_loop().run_in_executor(engine.executor, job)
        content, calls = reply_parts(result.text, use_tools)
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if calls:
            message["tool_calls"] = calls
        elif message["content"] is None:
            message["content"] = ""
        body_choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": _chat_logprobs(engine, result) if logprobs is not None else None,
            "finish_reason": "tool_calls" if calls else result.finish_reason,
        }
        body = {**head, "object": "chat.completion", "choices": [body_choice],
                "usage": _usage(len(prompt), len(result.tokens))}  # fmt: skip
        return JSONResponse(body)

    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    stream = _Stream(engine, job)
    text = ChatText(use_tools)

    async def opening() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in stream.pieces():
            if delta := text.feed(piece):
                yield chunk({"content": delta})

    def closing(result: Completion) -> Iterator[str]:
        content, calls = reply_parts(result.text, use_tools)
        if rest := text.finish(content):
            yield chunk({"content": rest})
        if calls:
            deltas = [{"index": i, **call} for i, call in enumerate(calls)]
            yield chunk({"tool_calls": deltas})
        yield chunk({}, "tool_calls" if calls else result.finish_reason)

    usage_head = head if include_usage else None
    return _event_stream(stream, opening(), closing, usage_head, len(prompt))


def _chat_logprobs(engine: Engine, result: Completion) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": engine.token_text(token), "logprob": logprob,
                "bytes": list(engine.token_bytes(token))}  # fmt: skip

    content = [
        {**entry(s.token, s.logprob or 0.0), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
        for s in result.scored
    ]
    return {"content": content, "refusal": None}


def _prompts(engine: Engine, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]  # one prompt: text, or token ids
    if not prompt:
        raise APIError(400, "prompt: must not be an empty list", param="prompt")
    vocab = engine.tokenizer.get_vocab_size(with_added_tokens=True)
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids = engine.tokenizer.encode(p, add_special_tokens=False).ids
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt[{i}]: token ids must be in [0, {vocab}), got "
                               f"{bad[0]}", param="prompt")  # fmt: skip
            ids = list(p)
        if not ids:  # an empty prompt starts a new document
            if engine.eot is None:
                raise APIError(400, f"prompt[{i}]: must not be empty", param="prompt")
            ids = [engine.eot]
        out.append(ids)
    return out


async def _complete(engine: Engine, request: CompletionRequest) -> JSONResponse | StreamingResponse:
    _check_model(engine, request.model)
    if request.best_of not in (None, 1):
        raise _unsupported("best_of", "best_of > 1")
    if request.suffix:
        raise _unsupported("suffix", "suffix (insertion)")
    if request.stream and request.logprobs is not None:
        raise _unsupported("logprobs", "logprobs with stream")
    if request.stream and request.echo:
        raise _unsupported("echo", "echo with stream")
    prompts = _prompts(engine, request.prompt)
    if len(prompts) > 1 and request.stream:
        raise _unsupported("prompt", "several prompts with stream")
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    if max_tokens == 0 and not request.echo:
        raise APIError(400, "max_tokens: must be at least 1 (0 only with echo)",
                       param="max_tokens")  # fmt: skip
    for ids in prompts:
        _check_context(engine, len(ids), max_tokens, "prompt")
    params = _sampling(request, max_tokens, request.logprobs)
    params.echo = request.echo
    texts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": engine.name}  # fmt: skip

    if not request.stream:

        def job() -> list[Completion]:
            return [engine.run(ids, params, engine.text_stops) for ids in prompts]

        results = await asyncio.get_running_loop().run_in_executor(engine.executor, job)
        choices = []
        for i, (ids, result) in enumerate(zip(prompts, results, strict=True)):
            echoed = ""
            if request.echo:
                p = texts[i]
                echoed = p if isinstance(p, str) else engine.tokenizer.decode(ids, False)
            logprobs = None
            if request.logprobs is not None:
                logprobs = _text_logprobs(engine, result, len(echoed))
            choices.append({"text": echoed + result.text, "index": i, "logprobs": logprobs,
                            "finish_reason": result.finish_reason})  # fmt: skip
        usage = _usage(sum(map(len, prompts)), sum(len(r.tokens) for r in results))
        return JSONResponse({**head, "choices": choices, "usage": usage})

    prompt = prompts[0]
    include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def job(emit: Callable[[str], None] | None = None, cancel: threading.Event | None = None):
        return engine.run(prompt, params, engine.text_stops, emit, cancel)

    def chunk(text: str, finish: str | None = None) -> str:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    stream = _Stream(engine, job)

    async def opening() -> AsyncIterator[str]:
        async for piece in stream.pieces():
            yield chunk(piece)

    def closing(result: Completion) -> Iterator[str]:
        yield chunk("", result.finish_reason)

    usage_head = head if include_usage else None
    return _event_stream(stream, opening(), closing, usage_head, len(prompt))


def _text_logprobs(engine: Engine, result: Completion, shift: int) -> dict[str, Any]:
    """OpenAI's completions logprobs: tokens, their log-probabilities, the top alternatives
    (the chosen token always among them) and where each token starts in the returned text."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    scored = [*result.prompt_scored, *result.scored]
    starts = [*result.prompt_offsets, *(shift + o for o in result.offsets)]
    for s, offset in zip(scored, starts, strict=True):
        tokens.append(engine.token_text(s.token))
        token_logprobs.append(s.logprob)
        if s.logprob is None:
            top_logprobs.append(None)
        else:
            top = {engine.token_text(t): lp for t, lp in s.top}
            top.setdefault(engine.token_text(s.token), s.logprob)
            top_logprobs.append(top)
        offsets.append(offset)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}  # fmt: skip


# --------------------------------------------------------------------------- entry point


def serve(
    run: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    stage: str | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Load RUN's model and serve it until interrupted."""
    import uvicorn

    engine = Engine(run, stage=stage, device=device)
    log(
        f"serving {engine.name} ({engine.model.num_params():,} parameters, context "
        f"{engine.context}) at http://{host}:{port}/v1"
    )
    uvicorn.run(create_app(engine), host=host, port=port, log_level="info")
