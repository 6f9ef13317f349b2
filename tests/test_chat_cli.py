"""`stacklab chat`: the terminal loop, its tool round-trips and its exits."""

import io
from pathlib import Path

import pytest
from rich.console import Console

from stacklab import chat as chat_module
from stacklab.cli import main
from stacklab.data.tokenizer import save_tokenizer, train_tokenizer
from stacklab.model.generation import Generation
from stacklab.model.transformer import build_model
from stacklab.recipe import ModelConfig, TokenizerConfig
from stacklab.train.checkpoint import save_model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    texts = [f"user asks {i} plus {i * 7} and the assistant answers {i * 8}\n" for i in range(300)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=400, min_frequency=1))
    save_tokenizer(tok, run / "tokenizer")
    model = build_model(ModelConfig(depth=1, aspect=16, head_dim=16, max_seq_len=4096), 400)
    save_model(model, run / "pretrain" / "final")
    return run


def scripted(replies: list[str]):
    def read(prompt: str) -> str:
        if not replies:
            raise EOFError
        return replies.pop(0)

    return read


def test_random_model_chats_and_quits(run: Path) -> None:
    out = io.StringIO()
    messages = chat_module.chat(
        run, read=scripted(["hello", "/quit", "never read"]), max_new_tokens=4,
        console=Console(file=out),
    )  # fmt: skip
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert "model>" in out.getvalue()


def test_tool_calls_are_answered_until_a_plain_reply(run: Path, monkeypatch) -> None:
    turns = iter(
        [
            '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234*5678"}}\n'
            "</tool_call>",
            "<tool_call>\n{bad json}\n</tool_call>",
            "It is 7006652.",
        ]
    )

    def fake_generate(model, prompts, max_new_tokens, **kw):
        tok = chat_module.load_tokenizer(run / "tokenizer")
        return [Generation(tok.encode(next(turns)).ids, None, None)]

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    out = io.StringIO()
    messages = chat_module.chat(
        run, read=scripted(["what is 1234*5678?"]), console=Console(file=out)
    )
    roles = [m["role"] for m in messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "7006652"
    assert messages[5]["content"].startswith("error: ")
    assert messages[6]["content"] == "It is 7006652."
    assert "7006652" in out.getvalue()


def test_chat_on_a_non_run_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["chat", str(tmp_path)]) == 2
    assert "is it a run directory" in capsys.readouterr().out


def test_a_chat_too_long_for_the_model_starts_over(run: Path) -> None:
    out = io.StringIO()
    messages = chat_module.chat(
        run, read=scripted(["hello"]), max_new_tokens=5000, console=Console(file=out)
    )
    assert [m["role"] for m in messages] == ["system"]
    assert "no longer fits" in out.getvalue()
