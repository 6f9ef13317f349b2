"""`stacklab serve`: the OpenAI-compatible server, driven by the official `openai` client.

A real server (uvicorn in a background thread, on a free port) over a tiny run whose model
was overfit in a second on two tool-calling turns, so that a tool call round trip is the
model's own work. Skipped when fastapi, uvicorn or openai are missing, unless
STACKLAB_REQUIRE_SERVE=1 (CI with the extra), where that is a failure.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import skip_or_fail
from stacklab.cli import main
from stacklab.data.chat import encode_chat, render_chat
from stacklab.data.tokenizer import IM_END, load_tokenizer, save_tokenizer, train_tokenizer
from stacklab.model.generation import generate
from stacklab.model.transformer import build_model
from stacklab.recipe import ModelConfig, TokenizerConfig
from stacklab.train.checkpoint import load_model, write_model

try:
    import fastapi
    import httpx
    import openai
    import uvicorn
except ImportError as exc:  # the serve extra (and the openai client) are optional
    MISSING: str | None = exc.name
else:
    MISSING = None
    from stacklab import serve  # an import error in it is a failure, never a skip

CONTEXT = 256
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}
QUESTION = "What is the weather in Paris?"
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
RESULT = "sunny, 21 C"
ANSWER = "Answer: sunny, 21 C"


def needs_serve() -> None:
    if MISSING is not None:
        skip_or_fail(
            "STACKLAB_REQUIRE_SERVE",
            f"{MISSING} is not installed: pip install 'stacklab[serve]' openai",
        )


def training_conversations() -> list[list[dict[str, Any]]]:
    """The two turns the tiny model learns, with the system prompt the server writes."""
    request = serve.ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": QUESTION}],
         "tools": [WEATHER_TOOL]}
    )  # fmt: skip
    head = serve.chat_messages(request, use_tools=True)
    call = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    answer = [{"role": "tool", "content": RESULT}, {"role": "assistant", "content": ANSWER}]
    return [[*head, call], [*head, call, *answer]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose model answers QUESTION with a get_weather call, then RESULT with ANSWER."""
    needs_serve()
    run = tmp_path_factory.mktemp("tiny-run")
    conversations = training_conversations()
    texts = [render_chat(c) for c in conversations] * 5
    texts += [f"user asks {i} plus {i * 7} and the assistant answers {i * 8}\n" for i in range(200)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=400, min_frequency=1))
    save_tokenizer(tok, run / "tokenizer")
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, aspect=32, head_dim=16, max_seq_len=CONTEXT).build()
    model = build_model(cfg, 400)
    rows = [encode_chat(tok, c) for c in conversations]
    width = max(len(ids) for ids, _ in rows)
    inputs = torch.zeros(len(rows), width - 1, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), -100, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        inputs[r, : len(ids) - 1] = torch.tensor(ids[:-1])
        kept = [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
        targets[r, : len(ids) - 1] = torch.tensor(kept)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only wait on each other
    try:
        for _ in range(200):
            loss = model(inputs, targets).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 5e-3:  # every answer token is then the model's clear first choice
                break
    finally:
        torch.set_num_threads(threads)
    write_model(run / "sft" / "final", model.cfg, model.vocab_size, model.state_dict())
    return run


@pytest.fixture(scope="module")
def server(run: Path) -> Iterator[str]:
    """The server's base URL (http://127.0.0.1:PORT/v1), on a free port, for the module."""
    engine = serve.Engine(run)
    config = uvicorn.Config(serve.create_app(engine), log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(run: Path) -> str:
    return run.name


def ask(client: openai.OpenAI, model_id: str, **kw: Any) -> Any:
    messages = kw.pop("messages", [{"role": "user", "content": "hello"}])
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model_id, messages=messages, **kw)


# --------------------------------------------------------------------------- the API


def test_models_lists_the_run(client: openai.OpenAI, model_id: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model_id]
    assert client.models.retrieve(model_id).id == model_id


def test_chat_completion(client: openai.OpenAI, model_id: str) -> None:
    response = ask(client, model_id, max_completion_tokens=8)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert response.model == model_id and response.object == "chat.completion"


def test_streaming_reassembles_to_the_same_text(client: openai.OpenAI, model_id: str) -> None:
    for messages in ([{"role": "user", "content": "hello there"}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "the assistant answers"}]):  # fmt: skip
        whole = ask(client, model_id, messages=messages, max_tokens=24).choices[0]
        chunks = list(
            ask(client, model_id, messages=messages, max_tokens=24, stream=True,
                stream_options={"include_usage": True})
        )  # fmt: skip
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == whole.finish_reason and not any(finishes[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_completions_stream(client: openai.OpenAI, model_id: str) -> None:
    kw = {"model": model_id, "prompt": "user asks 5", "max_tokens": 10, "temperature": 0}
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_stream_ends_with_done(server: str, model_id: str) -> None:
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 4}  # fmt: skip
    with httpx.stream("POST", f"{server}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_tool_call_round_trip(client: openai.OpenAI, model_id: str) -> None:
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    first = ask(client, model_id, messages=messages, tools=[WEATHER_TOOL], max_tokens=40)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")

    # The client's own message object goes back, as OpenAI's examples do.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    second = ask(client, model_id, messages=messages, tools=[WEATHER_TOOL], max_tokens=40)
    assert second.choices[0].message.content == ANSWER
    assert second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls

    # Streamed, the call arrives whole in one delta.
    chunks = list(ask(client, model_id, messages=messages[:1], tools=[WEATHER_TOOL],
                      max_tokens=40, stream=True))  # fmt: skip
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather")]
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_are_rendered_and_history_is_mapped(run: Path) -> None:
    request = serve.ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather "},
                                             {"type": "text", "text": "here and there?"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "b", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "tool_call_id": "b", "content": "rain"},  # out of order
                {"role": "tool", "tool_call_id": "a", "content": "sun"},
            ],
            "tools": [WEATHER_TOOL],
        }
    )  # fmt: skip
    messages = serve.chat_messages(request, use_tools=True)
    assert messages[0]["content"] == (  # the system prompt of SFT's tool-use demonstrations
        'Be brief.\nCall a tool with <tool_call>{"name": ..., "arguments": {...}}</tool_call>. '
        "Tools:\nget_weather(city: string) - The current weather in a city.\n"
        "Finish with one line: Answer: <the answer>"
    )
    assert messages[1] == {"role": "user", "content": "Weather here and there?"}
    assert messages[2]["tool_calls"] == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Rome"}},
    ]
    assert [m["content"] for m in messages[3:]] == ["sun", "rain"]
    assert serve.chat_messages(request, use_tools=False)[0] == {
        "role": "system",
        "content": "Be brief.",
    }
    plain = serve.ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert serve.chat_messages(plain, use_tools=False) == [{"role": "user", "content": "hi"}]


def test_completions_with_logprobs(client: openai.OpenAI, model_id: str) -> None:
    response = client.completions.create(
        model=model_id, prompt="user asks 3 plus", max_tokens=6, logprobs=2, temperature=0
    )
    choice = response.choices[0]
    lp = choice.logprobs
    n = response.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n >= 1
    assert all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and top[token] == value
        assert value == pytest.approx(max(top.values()))  # greedy picks the likeliest


def test_completion_logprobs_are_the_models(run: Path, client: openai.OpenAI, model_id: str):
    prompt = "user asks 4 plus 28 and"
    response = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=0, echo=True, logprobs=0
    )
    choice = response.choices[0]
    assert choice.text == prompt
    assert choice.logprobs.token_logprobs[0] is None
    tok = load_tokenizer(run / "tokenizer")
    ids = tok.encode(prompt).ids
    model = load_model(run / "sft" / "final").eval()
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert "".join(choice.logprobs.tokens) == prompt

    # Echo with new tokens (lm-eval's loglikelihood request): the prompt's, then the new ones.
    kw = {"model": model_id, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    plain = client.completions.create(**kw).choices[0]
    both = client.completions.create(**kw, echo=True, logprobs=1).choices[0]
    assert both.text == prompt + plain.text
    assert len(both.logprobs.tokens) == len(ids) + 2
    assert both.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    assert both.logprobs.text_offset[len(ids)] == len(prompt)


def test_greedy_decoding_matches_generate(run: Path) -> None:
    engine = serve.Engine(run)
    tok = engine.tokenizer
    im_end = tok.token_to_id(IM_END)
    for text in ("hello", QUESTION, "user asks 9"):
        ids = tok.encode(text).ids
        want = generate(engine.model, [ids], 30, stop_ids=(im_end,))[0]
        got = engine.run(ids, serve.Params(max_tokens=30, temperature=0), frozenset([im_end]))
        assert got.tokens == want.tokens
        assert got.finish_reason == ("stop" if want.stopped else "length")
        assert got.text == tok.decode(want.tokens, skip_special_tokens=False)
    engine.executor.shutdown()


def test_a_cancelled_generation_stops(run: Path) -> None:
    engine = serve.Engine(run)
    cancel = threading.Event()
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        cancel.set()  # the client leaves after the first piece

    ids = engine.tokenizer.encode("hello").ids
    with pytest.raises(serve.Cancelled):
        engine.run(ids, serve.Params(max_tokens=100, temperature=0), frozenset(), emit, cancel)
    assert len(pieces) == 1
    engine.executor.shutdown()


def test_seed_stop_and_sampling_options(client: openai.OpenAI, model_id: str) -> None:
    kw = {"temperature": 1.5, "top_p": 0.9, "seed": 7, "max_tokens": 16}
    a, b = ask(client, model_id, **kw), ask(client, model_id, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    full = client.completions.create(model=model_id, prompt="user asks", max_tokens=16,
                                     temperature=0).choices[0].text  # fmt: skip
    cut = full[len(full) // 2 : len(full) // 2 + 2]
    stopped = client.completions.create(model=model_id, prompt="user asks", max_tokens=16,
                                        temperature=0, stop=[cut]).choices[0]  # fmt: skip
    assert stopped.text == full[: full.index(cut)]
    assert stopped.finish_reason == "stop"


# --------------------------------------------------------------------------- bad requests


def test_bad_requests_are_answered_and_the_server_lives(
    client: openai.OpenAI, model_id: str, server: str
) -> None:
    def still_works() -> None:
        assert ask(client, model_id, max_tokens=2).choices[0].message.role == "assistant"

    with pytest.raises(openai.NotFoundError) as info:
        ask(client, "no-such-model")
    assert info.value.code == "model_not_found" and "no-such-model" in info.value.message
    still_works()

    with pytest.raises(openai.BadRequestError) as info:
        ask(client, model_id, n=2)
    assert info.value.param == "n" and "n=1" in info.value.message
    still_works()

    long = " ".join(["weather"] * (CONTEXT + 10))
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, model_id, messages=[{"role": "user", "content": long}])
    assert info.value.code == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in info.value.message
    still_works()

    with pytest.raises(openai.BadRequestError) as info:  # the prompt fits, the answer not
        client.completions.create(model=model_id, prompt="hello", max_tokens=CONTEXT)
    assert info.value.code == "context_length_exceeded"
    assert f"{CONTEXT} in the completion" in info.value.message
    still_works()

    with pytest.raises(openai.BadRequestError) as info:
        ask(client, model_id, temperature=5)
    assert info.value.param == "temperature" and "\n" not in info.value.message
    still_works()

    with pytest.raises(openai.BadRequestError) as info:  # a tool result answering no call
        ask(client, model_id, messages=[{"role": "tool", "tool_call_id": "x", "content": "r"}])
    assert "messages[0]: a tool message must answer a tool call" in info.value.message
    still_works()

    cases = [
        (b'{"model": "x", "messages": [', "not valid JSON"),
        (json.dumps({"model": model_id, "messages": [{"role": "robot", "content": "x"}]}),
         "messages[0].role: Input should be"),
        (json.dumps({"model": model_id, "messages": [], "max_tokens": 2}), "messages: List"),
        (json.dumps({"model": model_id, "messages": [{"role": "user", "content": "x"}],
                     "stop": 3}), "stop: does not match any accepted form"),
        (json.dumps({"model": model_id, "messages": [{"role": "user", "content": "x"}],
                     "frobnicate": 1}), "unrecognized request argument supplied: frobnicate"),
    ]  # fmt: skip
    for body, message in cases:
        r = httpx.post(f"{server}/chat/completions", content=body, timeout=60,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert message in error["message"] and "\n" not in error["message"], error
        still_works()

    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": CONTEXT // 2, "temperature": 1}  # fmt: skip
    with httpx.stream("POST", f"{server}/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # then leave mid-stream
    still_works()

    r = httpx.get(f"{server}/nowhere", timeout=60)
    assert r.status_code == 404 and "message" in r.json()["error"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt="x", max_tokens=0)
    assert info.value.param == "max_tokens"
    still_works()


def test_concurrent_requests_all_complete(client: openai.OpenAI, model_id: str) -> None:
    def one(i: int) -> str:
        if i % 2:
            chunks = ask(client, model_id, max_tokens=20, stream=True, seed=i, temperature=1)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        response = ask(client, model_id, max_tokens=20, seed=i, temperature=1)
        return response.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        assert client.models.list().data  # the event loop answers while the worker works
        results = [f.result(timeout=120) for f in futures]
    assert all(isinstance(r, str) for r in results)


# --------------------------------------------------------------------------- CLI


def test_cli_serve_without_the_extra_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert main(["serve", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "stacklab serve needs the serve extra: pip install 'stacklab[serve]'" in out


def test_cli_serve_starts_uvicorn(run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", str(run), "--port", "8123", "--host", "0.0.0.0"]) == 0
    assert isinstance(seen["app"], fastapi.FastAPI)
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 8123)
    assert f"serving {run.name}" in capsys.readouterr().out
    assert main(["serve", str(tmp_path)]) == 2  # not a run: one line, no traceback
    assert "is it a run directory" in capsys.readouterr().out
