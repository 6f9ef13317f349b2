"""A training run's record: `metrics.jsonl`, one JSON object per logged step.

Why it works this way:

* **The file is the record.** Every stage (pretraining, SFT, RL) logs through one `MetricsLog`,
  which writes a line per logged step and flushes it, so a run killed at any moment leaves
  every step it logged on disk; the trackers of `recipe.log` (tracking.py) get the same
  records, but a tracker that fails is warned about and switched off, never fatal.
* **A resumed run reads as one clean run.** On resume from step `resume_step`, records after
  it (logged by a killed run after its last checkpoint, or cut short mid-line) are dropped
  before the run appends again, so the file never holds a step twice.
* **Rank 0 writes.** Under torchrun the other ranks hold a disabled log, so the file has one
  line per step whatever the world size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stacklab.fileio import write_atomic
from stacklab.recipe import Recipe
from stacklab.tracking import NULL, Tracker, recipe_tracker
from stacklab.tracking import require as require_trackers

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """`metrics.jsonl` in `work_dir`, and the trackers of `recipe.log`, under `prefix` (the
    stage's name); a no-op where `enabled` is false (ranks other than 0)."""

    def __init__(
        self,
        work_dir: Path,
        resume_step: int,
        enabled: bool,
        prefix: str = "pretrain",
        recipe: Recipe | None = None,
    ) -> None:
        self.path = work_dir / METRICS_FILE
        self.enabled = enabled
        self.prefix = prefix
        self._file: Any = None
        self._tracker: Tracker = NULL
        if recipe is not None:  # on every rank: one stopping alone would leave others waiting
            require_trackers(recipe.log.trackers, "recipe key log.trackers")
        if not enabled:
            return
        kept = [r for r in read_log(self.path) if r["step"] <= resume_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")
        if recipe is not None:
            self._tracker = recipe_tracker(recipe, work_dir, prefix, resume_step)

    def write(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._tracker.log(record, int(record["step"]), self.prefix)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
        self._tracker.close()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, in order; a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
