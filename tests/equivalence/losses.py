"""Every number tiny pretraining, SFT and RL runs log, captured exactly, to prove that a change
to the training code changed none of them.

A refactoring of a training loop should move code, not results. This script runs, for fixed
seeds and on one thread, a few seconds of each stage through its public entry point (dense
and MoE pretraining with AdamW and Muon, grad accumulation, SFT and RL from those models,
MoE with the aux-free bias and with the balance loss), and records every logged record but
its timings, the stage's summary metrics and the final weights, floats as `float.hex`:

    python -m tests.equivalence.losses capture OUT.json   # before the change (old code)
    python -m tests.equivalence.losses compare OUT.json   # after it: bit for bit, or exit 1

`compare` prints the first difference. A summary metric listed in `DELIBERATE` may differ
(a documented change of what it means); it is printed, not failed. Bit-exactness holds on one
machine and one torch build; `tests/test_equivalence_losses.py` runs the same comparison
with a tolerance for other machines.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Summary metrics whose meaning changed on purpose, so their golden value no longer holds.
# None now. The golden file was captured again on 2026-12-06 (SFT's head only at trained
# positions, RL scoring episodes in length buckets: every logged value within 2e-6 relative
# of the old file, except `logprob_drift`, itself float noise of ~1e-7; docs/LOG.md), which
# also took in the 5-log `sft/final_loss` that was listed here.
DELIBERATE: set[str] = set()
TIMING = ("seconds", "tokens_per_s", "mfu", "peak_flops")  # differ between any two runs

TASK = {"kind": "arithmetic", "ops": ["+"], "min_digits": 1, "max_digits": 1, "eval_fraction": 0.2}
MODEL = {"depth": 2, "aspect": 32, "head_dim": 16, "max_seq_len": 64}
MOE = {"enabled": True, "num_experts": 4, "top_k": 2}
AUX_FREE = {**MOE, "balance": "aux_free", "bias_update_rate": 0.01}
AUX_LOSS = {**MOE, "balance": "aux_loss"}
PRETRAIN = {"steps": 8, "batch_size": 4, "ckpt_every": 4, "log_every": 1}

# name → recipe sections of each pretraining run
PRETRAIN_RUNS: dict[str, dict[str, Any]] = {
    "dense": {},
    "moe_aux_free_accum": {"model": {"moe": AUX_FREE}, "pretrain": {"grad_accum": 2}},
    "muon": {"optim": {"name": "muon"}},
    "muon_moe_aux_loss": {"optim": {"name": "muon"}, "model": {"moe": AUX_LOSS}},
}
SFT = {
    "enabled": True,
    "steps": 7,
    "batch_size": 2,
    "seq_len": 32,
    "task_examples": 12,
    "agent_envs": [],
    "warmup_steps": 2,
    "ckpt_every": 3,
    "log_every": 1,
}
RL = {
    "enabled": True,
    "steps": 3,
    "prompts_per_step": 2,
    "group_size": 4,
    "max_turns": 1,
    "max_new_tokens": 6,
    "token_budget": 40,
    "overlong_buffer": 4,
    "kl_coef": 0.01,
    "minibatch_size": 4,
    "lr": 1e-3,
    "ckpt_every": 2,
}
# name → (the pretraining run it starts from, SFT fields, RL fields)
POSTTRAIN_RUNS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "dense": ("dense", {}, {}),
    "moe_aux_free": ("moe_aux_free_accum", {}, {"epochs": 2}),
    "moe_aux_loss": ("muon_moe_aux_loss", {"lr": 1e-2}, {"epochs": 2, "minibatch_size": 2}),
}


# --------------------------------------------------------------------------- the runs


def _recipe(sections: dict[str, Any]) -> Any:
    from stacklab.recipe import Recipe

    raw: dict[str, Any] = {"seed": 3, "model": MODEL, "optim": {"warmup_steps": 2}}
    raw["pretrain"] = PRETRAIN
    raw["data"] = {"tasks": [TASK]}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return Recipe.model_validate(raw)


def _tokenizer() -> Any:
    from stacklab.data.chat import render_chat
    from stacklab.data.tokenizer import train_tokenizer
    from stacklab.recipe import ArithmeticTask, TokenizerConfig
    from stacklab.train.sft_data import task_conversations

    texts = [render_chat(c) for c in task_conversations([ArithmeticTask(**TASK)], 60, seed=0)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=2))


def _shards(folder: Path, vocab: int, seq_len: int = 32) -> Path:
    from stacklab.data.shards import write_index, write_split

    rng = np.random.default_rng(0)
    docs = [rng.integers(8, vocab, size=rng.integers(20, 80)).tolist() for _ in range(200)]
    info = write_split(folder, "train", docs, seq_len, rows_per_shard=100, vocab_size=vocab)
    write_index(folder, {"train": info}, meta={})
    return folder


def _log(work: Path) -> list[dict[str, Any]]:
    lines = (work / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.endswith(TIMING)} for x in lines]


def _weights(work: Path) -> dict[str, Any]:
    """Per tensor of the final model: a digest of its bytes and its norm."""
    from safetensors.torch import load_file

    out = {}
    for name, t in sorted(load_file(work / "final" / "model.safetensors").items()):
        digest = hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
        out[name] = {"sha": digest, "norm": float(t.double().norm())}
    return out


def _result(work: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    summary = {k: v for k, v in sorted(metrics.items()) if not k.endswith(TIMING)}
    return {"log": _log(work), "summary": summary, "weights": _weights(work)}


def run_all(root: Path) -> dict[str, Any]:
    """Every run in `root`; their logs, summaries and final weights (floats as floats)."""
    from stacklab.rl.trainer import train_rl
    from stacklab.train.pretrain import pretrain
    from stacklab.train.sft import sft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as the stages train on CPU
    try:
        tok = _tokenizer()
        shards = _shards(root / "shards", tok.get_vocab_size())
        out: dict[str, Any] = {}
        for name, sections in PRETRAIN_RUNS.items():
            work = root / "pretrain" / name
            out[f"pretrain/{name}"] = _result(work, pretrain(_recipe(sections), shards, work))
        for name, (base, sft_fields, rl_fields) in POSTTRAIN_RUNS.items():
            sections = PRETRAIN_RUNS[base]
            base_dir = root / "pretrain" / base / "final"
            work = root / "sft" / name
            recipe = _recipe({**sections, "sft": {**SFT, **sft_fields}})
            out[f"sft/{name}"] = _result(work, sft(recipe, tok, base_dir, work))
            sft_dir, work = work / "final", root / "rl" / name
            recipe = _recipe({**sections, "rl": {**RL, **rl_fields}})
            out[f"rl/{name}"] = _result(work, train_rl(recipe, tok, sft_dir, work))
        return out
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(threads)


def capture() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_all(Path(tmp))


# --------------------------------------------------------------------------- comparing


def encode(value: Any) -> Any:
    """Floats as exact hex strings ("0x1.8p+1"), everything else as it is."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, str) and ("0x" in value or value in ("nan", "inf", "-inf")):
        return float.fromhex(value)
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def differences(golden: Any, now: Any, rtol: float = 0.0, where: str = "") -> list[str]:
    """Where `now` differs from `golden`, in order: floats beyond `rtol` (0: bit for bit),
    anything else by ==. With `rtol` > 0, weight digests are skipped (their norms compare)."""
    if isinstance(golden, dict) and isinstance(now, dict):
        if list(golden) != list(now):
            return [f"{where}: keys {list(golden)} != {list(now)}"]
        found = []
        for key in golden:
            if rtol and key == "sha":
                continue
            if key in DELIBERATE and where.endswith("/summary"):
                continue
            found += differences(golden[key], now[key], rtol, f"{where}/{key}")
        return found
    if isinstance(golden, list) and isinstance(now, list):
        if len(golden) != len(now):
            return [f"{where}: {len(golden)} entries != {len(now)}"]
        pairs = enumerate(zip(golden, now, strict=True))
        return [d for i, (a, b) in pairs for d in differences(a, b, rtol, f"{where}[{i}]")]
    if isinstance(golden, float) and isinstance(now, float):
        same = golden.hex() == now.hex() or (math.isnan(golden) and math.isnan(now))
        if not same and rtol:
            same = math.isclose(golden, now, rel_tol=rtol, abs_tol=1e-12)
        return [] if same else [f"{where}: golden {golden!r} ({golden.hex()}), now {now!r}"]
    return [] if golden == now else [f"{where}: golden {golden!r}, now {now!r}"]


def deliberate(golden: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The `DELIBERATE` summary metrics that changed, golden and now."""
    return [
        f"{run}/summary/{key}: golden {golden[run]['summary'][key]!r}, "
        f"now {now[run]['summary'][key]!r}"
        for run in golden
        for key in DELIBERATE
        if key in golden[run]["summary"]
        and golden[run]["summary"][key] != now.get(run, {}).get("summary", {}).get(key)
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("capture", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    import stacklab

    print(f"stacklab from {Path(stacklab.__file__).parent}", file=sys.stderr)
    path = Path(argv[1])
    now = capture()
    if argv[0] == "capture":
        path.write_text(json.dumps(encode(now), indent=1) + "\n")
        print(f"wrote {path}: {len(now)} runs, {sum(len(r['log']) for r in now.values())} records")
        return 0
    golden = decode(json.loads(path.read_text()))
    found = differences(golden, now)
    for line in deliberate(golden, now):
        print(f"deliberate change: {line}")
    if found:
        print(f"DIFFERENT: {len(found)} values differ; the first: {found[0]}")
        return 1
    records = sum(len(r["log"]) for r in now.values())
    print(f"identical: {len(now)} runs, {records} records, final weights: bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
