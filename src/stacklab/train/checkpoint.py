"""Checkpoints a killed run can trust, and the final model other stages load.

Why it works this way:

* **The rename is the commit.** A checkpoint is written into a hidden temporary folder next to
  the others and renamed to `step_{N:06d}` only once every file in it is on disk, so a folder
  with that name is always complete; `latest_checkpoint` never sees a half-written one, and
  temporary folders left by a killed run are deleted by the next save.
* **Everything a bit-exact resume needs.** The weights (`model.safetensors`), the optimizer's
  own `state_dict` (`optimizer.pt`), and `state.json`: the step, the scheduler, the data
  loader's position, tokens seen, training seconds and the Python and NumPy random states.
  Torch's generator states are byte tensors, so they go into `rng.pt`.
* **Tied weights once.** With `tie_embeddings` the output head *is* the embedding matrix;
  safetensors refuses two names for one tensor, so `lm_head.weight` is left out on save and
  pointed back at `embed.weight` on load.
* **A final model anyone can rebuild.** `final/model.json` records the model's
  `TransformerConfig` and the vocabulary size next to `final/model.safetensors`, so
  evaluation, export and chat need no recipe to load it. The config is stored as the
  recipe's `model` section dumps it (the same keys, nested `moe`), and read back through
  that section's validation, so model.json files written before the model had its own
  config load unchanged, and older code reads the new ones.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from stacklab.errors import StacklabError
from stacklab.fileio import staging_dir
from stacklab.model.config import TransformerConfig
from stacklab.model.transformer import Transformer, build_model
from stacklab.recipe import ModelConfig

KEEP = 2  # checkpoints kept; older ones are deleted after each save
TIED = ("lm_head.weight", "embed.weight")  # (alias, stored name) when embeddings are tied
MODEL_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"step_(\d{6})")


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors and optimizer state, and the loop's `state.json`."""

    path: Path
    step: int
    model: dict[str, Tensor]  # full state dict, tied names restored
    optimizer: dict[str, Any]
    state: dict[str, Any]  # step, scheduler, loader, tokens, seconds, rng (python, numpy)
    torch_rng: dict[str, Any]  # "cpu": ByteTensor, "cuda": list of ByteTensors (may be empty)


# --------------------------------------------------------------------------- weights


def storable(state: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """A state dict safetensors can store: the tied alias dropped, tensors contiguous on CPU."""
    alias = TIED[0] if cfg.tie_embeddings else None
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k != alias}


def restore_tied(tensors: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """The full state dict again: the tied alias points at the stored embedding."""
    if cfg.tie_embeddings:
        alias, stored = TIED
        tensors = {**tensors, alias: tensors[stored]}
    return tensors


def write_model(
    path: str | Path, cfg: TransformerConfig, vocab_size: int, state: dict[str, Tensor]
) -> None:
    """Write `path/model.safetensors` and `path/model.json` (config + vocab) atomically."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    with staging_dir(path) as tmp:
        save_file(storable(state, cfg), tmp / MODEL_FILE)
        meta = {"model": cfg.to_dict(), "vocab_size": vocab_size}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_model(
    path: str | Path, cfg: TransformerConfig | None = None, vocab_size: int | None = None
) -> Transformer:
    """Rebuild a model saved by `write_model`, on CPU and in train mode as built.

    The config and vocabulary size come from `model.json` unless given.
    """
    path = Path(path)
    meta_file = path / "model.json"
    if not (path / MODEL_FILE).is_file() or not meta_file.is_file():
        raise StacklabError(f"no saved model in {path} (expected {MODEL_FILE} and model.json)")
    meta = json.loads(meta_file.read_text())
    # Validated as the recipe section it was dumped from: old and new model.json alike.
    cfg = cfg or ModelConfig.model_validate(meta["model"]).build()
    model = build_model(cfg, vocab_size or meta["vocab_size"])
    model.load_state_dict(restore_tied(load_file(path / MODEL_FILE), cfg))
    return model


def final_model_dir(
    inputs: dict[str, Path], order: tuple[str, ...] = ("rl", "sft", "pretrain")
) -> Path:
    """The newest trained model among a build's stage outputs: `<stage>/final` of the first
    stage in `order` that wrote one (a disabled SFT or RL stage writes none)."""
    for name in order:
        if name in inputs and (Path(inputs[name]) / "final" / MODEL_FILE).is_file():
            return Path(inputs[name]) / "final"
    raise StacklabError(f"no trained model in any of {', '.join(order)}")


MODEL_STAGES = ("rl", "sft", "pretrain")  # newest first


def run_model_dir(run: str | Path, stage: str | None = None) -> Path:
    """The final model of a run directory: `stage`'s, or the newest one trained."""
    run = Path(run)
    order = (stage,) if stage else MODEL_STAGES
    try:
        return final_model_dir({name: run / name for name in order}, order)
    except StacklabError:
        raise StacklabError(
            f"{run} has no trained model in {', '.join(f'{n}/final' for n in order)}: "
            "is it a run directory written by build?"
        ) from None


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    cfg: TransformerConfig,
    model_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = KEEP,
) -> Path:
    """Write `root/step_{step:06d}` atomically (with the RNG states); keep the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_dir(root, step)
    with staging_dir(final) as tmp:
        save_file(storable(model_state, cfg), tmp / MODEL_FILE)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(_torch_rng(), tmp / "rng.pt")
        record = {"step": step, **state, "rng": _host_rng()}
        (tmp / "state.json").write_text(json.dumps(record, indent=2) + "\n")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None (temporary folders are ignored)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, cfg: TransformerConfig) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (tensors on CPU)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    return Checkpoint(
        path=path,
        step=state["step"],
        model=restore_tied(load_file(path / MODEL_FILE), cfg),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        state=state,
        torch_rng=torch.load(path / "rng.pt", weights_only=True),
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators: a run starts from the same random
    states in every process, so the states its checkpoints save do not depend on the process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore_rng(ckpt: Checkpoint) -> None:
    """Put every random generator back where it was when the checkpoint was saved."""
    rng = ckpt.state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    _set_numpy(rng["numpy"])
    torch.set_rng_state(ckpt.torch_rng["cpu"])
    if ckpt.torch_rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt.torch_rng["cuda"])


# --------------------------------------------------------------------------- helpers


def _host_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "key": key.tolist(), "pos": pos, "gauss": [has_gauss, cached]},
    }


def _set_numpy(state: dict[str, Any]) -> None:
    key = np.array(state["key"], dtype=np.uint32)
    np.random.set_state((state["kind"], key, state["pos"], *state["gauss"]))


def _torch_rng() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}
