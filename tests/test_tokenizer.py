"""The tokenizer: byte-exact round trips, one token per digit, fixed special ids, HF parity."""

import json
import random

import pytest

from stacklab.data.tokenizer import (
    EOT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    TOOL_CALL,
    bytes_per_token,
    hf_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from stacklab.errors import DataError
from stacklab.recipe import TokenizerConfig

VOCAB = 400

TRICKY = [
    "",
    " leading space, trailing space ",
    "  two  spaces\t\ttabs\n\n\nnewlines\r\nCRLF\rlone CR",
    "def f(x):\n\tif x:\n\t\treturn '\\n'  # comment\n    \n",
    "naïve café — “curly quotes” ‘single’ … ß ﬁ",
    "e\u0301 (decomposed) vs \u00e9 (precomposed): no normalization",
    "日本語のテキスト 中文 한국어 العربية עברית",
    "emoji 🙂 family 👩‍👩‍👧‍👦 flag 🏳️‍🌈 🇫🇷",
    "\x00\x01\x7f controls \u200b zero width \ufeff bom \U0010ffff",
    "x2024y 3.14159 -42 1e10 0xFF",
    "<|endoftext <|pad|> near-miss specials <tool_call",
]


PROSE = (
    "the quick brown fox jumps over a lazy dog while every model reads its token stream "
    "from shards written by the loader and trained with gradient descent on small batches "
    "of packed rows until validation loss stops improving across several random seeds"
)


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = PROSE.split()
    texts = []
    for i in range(200):
        texts.append(" ".join(rng.choice(words) for _ in range(12)) + f" {i}.\n")
        texts.append(f"def f_{i}(x):\n\treturn x * {i} + len('héllo wörld')\n")
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), TokenizerConfig(vocab_size=VOCAB, min_frequency=2))


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, folder)
    return folder


def test_vocab_size_includes_specials(tok):
    assert tok.get_vocab_size() == VOCAB


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_byte_exact(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trip_with_special_tokens(tok):
    text = f'{IM_START}user\n 12 + 3?{IM_END}\n{TOOL_CALL}{{"a": 1}}</tool_call>{EOT}'
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    ("text", "digits"),
    [("12345", list("12345")), ("x2024y", list("2024")), (" 007\n99", list("00799"))],
)
def test_every_digit_is_its_own_token(tok, text, digits):
    pieces = tok.encode(text).tokens
    assert [p for p in pieces if any(c.isdigit() for c in p)] == digits


def test_special_tokens_have_fixed_ids_and_are_never_split(tok):
    assert SPECIAL_TOKENS[:4] == (EOT, PAD, IM_START, IM_END)
    assert len(SPECIAL_TOKENS) == 8
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i
        assert tok.encode(special).ids == [i]
        ids = tok.encode(f"ab{special}cd {special}").ids
        assert ids.count(i) == 2


def test_save_is_loadable_from_folder_or_file(tok, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for path in (saved, saved / "tokenizer.json"):
        assert load_tokenizer(path).encode(TRICKY[3]).ids == tok.encode(TRICKY[3]).ids


def test_save_to_json_path_writes_config_beside_it(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path / "out" / "tokenizer.json")
    assert path == tmp_path / "out" / "tokenizer.json"
    assert json.loads((path.parent / "tokenizer_config.json").read_text())["eos_token"] == EOT


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_hf_tokenizers_give_the_same_ids(tok, saved):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(saved / "tokenizer.json"))
    ours = hf_tokenizer(saved)
    auto = transformers.AutoTokenizer.from_pretrained(str(saved))
    for hf in (ours, auto):
        assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token) == (0, 1, None)
    for text in [*TRICKY, f"{IM_START}assistant\n4{IM_END}{EOT}"]:
        expected = tok.encode(text).ids
        for hf in (fast, ours, auto):
            assert hf(text)["input_ids"] == expected
        assert ours.decode(expected) == text
        assert auto.decode(expected) == text


def test_bytes_per_token(tok):
    assert bytes_per_token(tok, ["0123456789"]) == 1.0
    assert bytes_per_token(tok, _corpus()[:20]) > 1.5
    with pytest.raises(DataError):
        bytes_per_token(tok, [""])


def test_minus_before_digit_is_its_own_token() -> None:
    # Trained on text full of "=-", the prompt "7-80=" must stay a token prefix of the answer.
    texts = [f"{a}-{a + b}=-{b}\nx = -{a}\n" for a in range(60) for b in range(1, 30)]
    trained = train_tokenizer(texts, TokenizerConfig(vocab_size=VOCAB, min_frequency=2))
    for text, prompt in (("7-80=-73", "7-80="), ("x=-5", "x="), ("a = -12", "a =")):
        ids = trained.encode(text).ids
        assert ids[: len(trained.encode(prompt).ids)] == trained.encode(prompt).ids, text
        assert trained.decode(ids) == text
