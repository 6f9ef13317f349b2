"""Learning-rate schedules: a pure factor of the step, applied to every group's peak lr.

Why it works this way:

* **A pure function of (step, total_steps, cfg).** `lr_factor` has no state, so a resumed
  run, a plot in a notebook and a test all compute the same numbers. `build_scheduler` wraps
  it in torch's `LambdaLR`, which multiplies each parameter group's own peak (`initial_lr`,
  recorded when the scheduler is built: AdamW's `lr` and Muon's `muon.lr` differ), and whose
  `state_dict` is just the step count.
* **Counting.** `step` is the 0-based index of the optimizer step about to be taken, and the
  factor is computed from t = step + 1 updates. Warmup is linear, t / warmup_steps, so step 0
  already gets a small positive lr (1 / warmup_steps) rather than a wasted step at zero, and
  the last warmup step is at the peak. The decay reaches exactly `min_lr_frac` at the last
  step (step = total_steps − 1) and stays there if training runs longer.
* **Shapes.** `cosine` decays over every step after warmup. `wsd` (warmup–stable–decay: Hu et
  al. 2024, "MiniCPM") holds the peak, then decays linearly over the last `decay_frac` of the
  steps; a run can be extended, or stopped early with its own short decay, from any
  checkpoint of the stable phase. `constant` stays at the peak after warmup.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from stacklab.recipe import OptimConfig


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The share of the peak learning rate to use at optimizer step `step` (0-based)."""
    t = step + 1
    warmup = min(1.0, t / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "constant":
        return warmup
    if cfg.schedule == "cosine":
        progress = (t - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        shape = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    else:  # wsd
        decay_steps = max(1, round(cfg.decay_frac * total_steps))
        progress = (t - (total_steps - decay_steps)) / decay_steps
        shape = 1 - min(1.0, max(0.0, progress))
    return warmup * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * shape)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig
) -> LambdaLR:
    """`LambdaLR` over `lr_factor`; call its `step()` after each optimizer step."""
    return LambdaLR(optimizer, functools.partial(lr_factor, total_steps=total_steps, cfg=cfg))
