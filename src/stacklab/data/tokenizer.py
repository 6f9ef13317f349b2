"""The tokenizer: byte-level BPE trained with Hugging Face `tokenizers`.

Why these choices:

* **Byte-level, full 256-byte alphabet, no normalizer.** Every string, whatever its script,
  emoji or control characters, encodes and decodes back to exactly the same bytes. A code
  model that silently turns tabs into spaces or recomposes accents cannot be evaluated
  honestly, so nothing is normalized, no prefix space is added and nothing is trimmed.
* **Digits one per token.** BPE otherwise learns arbitrary digit chunks ("20", "245") from
  whatever numbers were frequent, which makes arithmetic needlessly hard to learn; splitting
  digits individually (as Llama and DeepSeek do) gives every number a regular spelling. A
  minus sign before a digit is split off too, so a negative number is "-" then its digits and
  never merges with the punctuation before it (a prompt "7-80=" must be a token prefix of
  "7-80=-73", or the model is asked to continue from a boundary it never saw).
* **Fixed special-token ids.** Document boundaries, padding, ChatML turns and tool calls have
  the same ids (0..7) in every tokenizer we train, so packing, SFT masks and agent parsing can
  name them as constants, and they are never split or merged with neighbouring text.

A saved tokenizer folder holds `tokenizer.json` plus a `tokenizer_config.json`, so it loads
both here (`load_tokenizer`) and in `transformers` (`AutoTokenizer.from_pretrained(folder)`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from stacklab.errors import DataError
from stacklab.fileio import write_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    # Annotations only: the model package imports this module's token ids and must not
    # import the recipe (tests/test_transformer.py checks).
    from stacklab.recipe import TokenizerConfig

EOT = "<|endoftext|>"  # document boundary; also the end-of-sequence token
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # ChatML: opens a turn ("<|im_start|>assistant\n...")
IM_END = "<|im_end|>"  # ChatML: closes a turn
TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"

# The order is the id: SPECIAL_TOKENS[i] has id i in every stacklab tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    EOT,
    PAD,
    IM_START,
    IM_END,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_RESPONSE,
    TOOL_RESPONSE_END,
)
EOT_ID = SPECIAL_TOKENS.index(EOT)
PAD_ID = SPECIAL_TOKENS.index(PAD)

TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"

# What `transformers` needs beyond tokenizer.json: which tokens are EOS and padding, no BOS
# (documents are separated by EOT, not opened by a BOS), and no "clean-up" of spaces before
# punctuation on decode, which would break the byte-exact round trip.
_HF_SETTINGS: dict[str, Any] = {
    "eos_token": EOT,
    "pad_token": PAD,
    "bos_token": None,
    "clean_up_tokenization_spaces": False,
}


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE tokenizer of `cfg.vocab_size` ids (special tokens included).

    Trains on all of `texts`: drawing a `cfg.train_chars` sample from the mixture is the
    caller's job. The vocabulary comes out smaller when the texts have too few distinct pairs.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # A minus sign before a digit is its own token, so "=-73" never merges into
            # "=-": a prompt ending in "=" is then a token prefix of every answer.
            pre_tokenizers.Split(Regex(r"-(?=[0-9])"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write the tokenizer to `path` (a folder, or a `.json` file in it); return the file.

    `tokenizer_config.json` goes next to it so that `transformers` can load the folder; keep
    the default name `tokenizer.json` for that. Each file is written to a temporary name and
    then renamed, so a crash never leaves a half-written tokenizer behind.
    """
    path = Path(path)
    if path.suffix != ".json":
        path = path / TOKENIZER_FILE
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, tok.to_str())
    hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", **_HF_SETTINGS}
    write_atomic(folder / HF_CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a folder written by `save_tokenizer`, or from its tokenizer.json."""
    file = _tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{file}: not a readable tokenizer ({exc})") from None


def hf_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The same tokenizer as a `transformers` fast tokenizer (EOS = EOT, PAD = pad, no BOS)."""
    file = _tokenizer_file(path)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise DataError(
            "hf_tokenizer needs the `transformers` package: pip install 'stacklab[hf]'"
        ) from None
    return PreTrainedTokenizerFast(tokenizer_file=str(file), **_HF_SETTINGS)


def _tokenizer_file(path: str | Path) -> Path:
    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise DataError(f"tokenizer file not found: {file}")
    return file


def bytes_per_token(tok: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts`: the tokenizer's compression (higher is better)."""
    texts = list(texts)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    n_tokens = sum(len(enc.ids) for enc in tok.encode_batch(texts, add_special_tokens=False))
    if n_tokens == 0:
        raise DataError("bytes_per_token: the sample texts are empty")
    return n_bytes / n_tokens
