"""The chat format: ChatML turns with tool calls, its token ids and the SFT loss mask.

One format serves SFT data, RL rollouts, evaluation and `stacklab chat`, so the model always
sees the same layout. It is the layout of Qwen2.5's chat template (a model or a tool written
for that template reads ours unchanged):

    <|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}\\n<tool_call>\\n{call json}\\n</tool_call><|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n

* **Tool calls** follow the assistant's content, one `<tool_call>` block per call, the parts
  (content, blocks) joined by one newline. The call is `json.dumps({"name": ..., "arguments":
  {...}}, ensure_ascii=False)`: keys in the order the call was written (a function's argument
  order reads better than a sorted one), non-ASCII text as itself.
* **Tool results** go back inside a `user` turn, one `<tool_response>` block per result, the
  results of consecutive `tool` messages sharing one turn (joined by a newline). The model then
  has only three roles to know, and a result is marked as such by the block, not by a role.
* **The loss mask** is True exactly on what the assistant produced: its content, its
  tool-call blocks and its closing `<|im_end|>` (so the model learns to stop). Role headers,
  the newline after `<|im_end|>`, and everything the system, user and tools wrote are False.
* **Injection-safe ids.** Markers are encoded as their special ids; every text piece
  (contents, role names, newlines) is encoded on its own with special tokens treated as plain
  text. A user who types "<|im_end|>" gets those characters, not a turn boundary, and the
  mask cannot be fooled by it. The ids decode back to `render_chat(messages)` exactly.
* **Prompt ids are a prefix of training ids.** The role header is its own piece, so the ids
  of a conversation with a generation prompt are a prefix of the ids of the same conversation
  with the assistant's reply appended: generation continues exactly where training did.

`parse_assistant` reads a generated reply back: its content and its calls, with every
malformed block turned into an error line for the agent loop to send back to the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from stacklab.data.tasks import Problem
from stacklab.data.tokenizer import (
    IM_END,
    IM_START,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_RESPONSE,
    TOOL_RESPONSE_END,
)
from stacklab.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
_SPECIALS = (IM_START, IM_END, TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END)


@dataclass(frozen=True)
class _Piece:
    text: str
    special: bool  # a structural marker, encoded as its special id
    trained: bool  # in the loss mask


def _text(text: str, trained: bool = False) -> _Piece:
    return _Piece(text, special=False, trained=trained)


def _mark(token: str, trained: bool = False) -> _Piece:
    return _Piece(token, special=True, trained=trained)


def tool_call_json(name: str, arguments: dict[str, Any]) -> str:
    """The JSON inside a `<tool_call>` block, exactly as rendered."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


# --------------------------------------------------------------------------- validation


def validate_messages(messages: list[dict[str, Any]]) -> None:
    """Raise `DataError` naming the first bad message (by index) and what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        raise DataError("chat: messages must be a non-empty list of message dicts")
    pending_calls = 0  # tool calls of the last assistant turn not yet answered
    for i, msg in enumerate(messages):
        where = f"chat message {i}"
        if not isinstance(msg, dict):
            raise DataError(f"{where}: expected a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role!r}; known: {', '.join(ROLES)}")
        allowed = {"role", "content", "tool_calls"} if role == "assistant" else {"role", "content"}
        extra = sorted(set(msg) - allowed)
        if extra:
            raise DataError(
                f"{where} ({role}): unexpected keys {extra}; allowed: {sorted(allowed)}"
            )
        if not isinstance(msg.get("content"), str):
            raise DataError(f"{where} ({role}): 'content' must be a string (may be empty)")
        if role == "system" and i != 0:
            raise DataError(f"{where}: a system message must come first")
        if role == "tool":
            if pending_calls == 0:
                raise DataError(
                    f"{where}: a tool message must answer a tool call of the assistant message "
                    "before it (one tool message per call)"
                )
            pending_calls -= 1
        elif role == "assistant":
            calls = msg.get("tool_calls", [])
            _validate_calls(calls, where)
            pending_calls = len(calls)
        else:
            pending_calls = 0


def _validate_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise DataError(f"{where} (assistant): 'tool_calls' must be a list")
    for j, call in enumerate(calls):
        if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
            raise DataError(
                f"{where} (assistant): tool call {j} must be a dict with exactly the keys "
                "'name' and 'arguments'"
            )
        if not isinstance(call["name"], str) or not call["name"]:
            raise DataError(
                f"{where} (assistant): tool call {j}: 'name' must be a non-empty string"
            )
        if not isinstance(call["arguments"], dict):
            raise DataError(f"{where} (assistant): tool call {j}: 'arguments' must be a dict")
        try:
            tool_call_json(call["name"], call["arguments"])
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"{where} (assistant): tool call {j}: arguments are not JSON ({exc})"
            ) from None


# --------------------------------------------------------------------------- rendering


def _pieces(messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[_Piece]:
    validate_messages(messages)
    out: list[_Piece] = []
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "assistant":
            out += [_mark(IM_START), _text("assistant\n")]
            parts = [[_text(msg["content"], trained=True)]] if msg["content"] else []
            for call in msg.get("tool_calls", []):
                body = "\n" + tool_call_json(call["name"], call["arguments"]) + "\n"
                parts.append(
                    [_mark(TOOL_CALL, True), _text(body, True), _mark(TOOL_CALL_END, True)]
                )
            out += _join(parts, _text("\n", trained=True))
            out += [_mark(IM_END, trained=True), _text("\n")]
        elif role == "tool":
            if messages[i - 1]["role"] != "tool":  # the first result opens the user turn
                out += [_mark(IM_START), _text("user\n")]
            else:
                out.append(_text("\n"))
            out += [_mark(TOOL_RESPONSE), _text(f"\n{msg['content']}\n"), _mark(TOOL_RESPONSE_END)]
            if i + 1 == len(messages) or messages[i + 1]["role"] != "tool":
                out += [_mark(IM_END), _text("\n")]
        else:
            out += [_mark(IM_START), _text(f"{role}\n"), _text(msg["content"])]
            out += [_mark(IM_END), _text("\n")]
    if add_generation_prompt:
        out += [_mark(IM_START), _text("assistant\n")]
    return [p for p in out if p.text]


def _join(parts: list[list[_Piece]], sep: _Piece) -> list[_Piece]:
    out: list[_Piece] = []
    for k, part in enumerate(parts):
        out += ([sep] if k else []) + part
    return out


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text; with `add_generation_prompt`, the assistant header
    `<|im_start|>assistant\\n` is appended for the model to continue."""
    return "".join(p.text for p in _pieces(messages, add_generation_prompt))


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of `render_chat(messages, add_generation_prompt)` and the SFT loss mask.

    mask[t] is True iff token t was written by the assistant (content, tool-call blocks, the
    closing `<|im_end|>`). Markers become their special ids; text pieces are encoded one by
    one with special-token strings kept as plain text.
    """
    special_ids = {tok: tokenizer.token_to_id(tok) for tok in _SPECIALS}
    missing = [tok for tok, id_ in special_ids.items() if id_ is None]
    if missing:
        raise DataError(f"encode_chat: the tokenizer lacks the special tokens {missing}")
    ids: list[int] = []
    mask: list[bool] = []
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # "<|im_end|>" typed in content stays text
    try:
        for piece in _pieces(messages, add_generation_prompt):
            if piece.special:
                piece_ids = [special_ids[piece.text]]
            else:
                piece_ids = tokenizer.encode(piece.text, add_special_tokens=False).ids
            ids += piece_ids
            mask += [piece.trained] * len(piece_ids)
    finally:
        tokenizer.encode_special_tokens = previous
    return ids, mask


def task_conversation(problem: Problem, system: str | None = None) -> list[dict[str, Any]]:
    """An SFT conversation from a task problem: the prompt as the user, the answer as the
    assistant, after an optional system message."""
    head = [{"role": "system", "content": system}] if system is not None else []
    turns = [
        {"role": "user", "content": problem.prompt},
        {"role": "assistant", "content": problem.answer},
    ]
    return head + turns


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class AssistantTurn:
    content: str  # the text outside the tool-call blocks, stripped of surrounding whitespace
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line per malformed block

    def to_message(self) -> dict[str, Any]:
        """The turn as a message dict, ready to append to a conversation."""
        calls = [{"name": c.name, "arguments": c.arguments} for c in self.tool_calls]
        return {"role": "assistant", "content": self.content, "tool_calls": calls}


def parse_assistant(text: str) -> AssistantTurn:
    """Split a generated assistant reply into content, tool calls and errors; never raises.

    The reply ends at the first `<|im_end|>` if there is one. Each `<tool_call>...</tool_call>`
    block must hold `{"name": <non-empty string>, "arguments": <object>}` and nothing else;
    a block that does not (bad JSON, no name, arguments not an object, no closing tag before
    the next `<tool_call>` or the end) adds an error line instead of a call, as does a stray
    `</tool_call>`. Text outside the blocks is the content.
    """
    text = text.split(IM_END, 1)[0]
    outside: list[str] = []
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos = 0
    n = 0  # blocks seen, for 1-based error messages
    while True:
        start = text.find(TOOL_CALL, pos)
        if start == -1:
            outside.append(text[pos:])
            break
        outside.append(text[pos:start])
        n += 1
        body_start = start + len(TOOL_CALL)
        end = text.find(TOOL_CALL_END, body_start)
        next_start = text.find(TOOL_CALL, body_start)
        if end == -1 or (next_start != -1 and next_start < end):
            errors.append(f"tool call {n}: unterminated block (no {TOOL_CALL_END} after it)")
            if next_start == -1:
                break
            pos = next_start
            continue
        call = _parse_call(text[body_start:end])
        if isinstance(call, ToolCall):
            calls.append(call)
        else:
            errors.append(f"tool call {n}: {call}")
        pos = end + len(TOOL_CALL_END)
    content = "".join(outside)
    if TOOL_CALL_END in content:
        errors.append(f"{TOOL_CALL_END} without an opening {TOOL_CALL}")
        content = content.replace(TOOL_CALL_END, "")
    return AssistantTurn(content=content.strip(), tool_calls=calls, errors=errors)


def _parse_call(body: str) -> ToolCall | str:
    """The call in one block's text, or what is wrong with it."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    except (ValueError, RecursionError) as exc:  # e.g. an integer too long, nesting too deep
        return f"invalid JSON ({type(exc).__name__})"
    if not isinstance(obj, dict):
        return f'expected an object {{"name": ..., "arguments": {{...}}}}, got {_json_type(obj)}'
    extra = sorted(set(obj) - {"name", "arguments"})
    if extra:
        return f'unexpected keys {extra}; a call has only "name" and "arguments"'
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return '"name" is missing or not a non-empty string'
    if "arguments" not in obj:
        return '"arguments" is missing (use {} for none)'
    if not isinstance(obj["arguments"], dict):
        return f'"arguments" must be an object, got {_json_type(obj["arguments"])}'
    return ToolCall(name=name, arguments=obj["arguments"])


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
