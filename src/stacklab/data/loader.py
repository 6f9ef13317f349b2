"""The training-data loader: random batches of packed rows that are deterministic, resumable
and split across data-parallel ranks.

Why it works this way:

* **A pure function of (seed, epoch, step).** Each epoch shuffles all rows with a generator
  seeded by `[seed, epoch]`, and step `k` takes the `k`-th block of that permutation. No hidden
  iterator state, worker processes or prefetch queues: the loader's whole state is two
  integers, so a run restored from a checkpoint sees exactly the batches the original would
  have seen, and two runs with the same seed see the same data.
* **One global batch, sliced by rank.** Each step consumes `batch_size * world_size` rows; rank
  `r` takes the `r`-th contiguous slice. Ranks never see the same row, and together they see
  exactly what one process with the whole global batch would see, so changing the number of
  machines does not change the data order.
* **Whole batches only.** The rows left over at the end of an epoch that do not fill a global
  batch are skipped (they come back in a later epoch's shuffle), so every step has the same
  shape.

`iter_eval_batches` is the validation counterpart: every row once, in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stacklab.data.shards import ShardSet, open_split
from stacklab.errors import DataError

STATE_FORMAT = 1
Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each int64 [batch, seq_len]


class ShardLoader:
    """Shuffled batches of `batch_size` rows for rank `rank` of `world_size`."""

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, "
                f"rank {rank}, world_size {world_size}"
            )
        self.shards: ShardSet = open_split(shard_dir, split, verify=verify)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        if self.shards.num_rows < self.global_batch:
            raise DataError(
                f"{shard_dir}: split '{split}' has {self.shards.num_rows} rows, fewer than one "
                f"global batch of {self.global_batch} (batch_size {batch_size} x world_size "
                f"{world_size})"
            )
        self.epoch = 0
        self.step = 0  # steps already taken in the current epoch
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.shards.num_rows // self.global_batch

    def next_batch(self) -> Batch:
        """This rank's next `(inputs, targets)`, each int64 `[batch_size, seq_len]`."""
        start = self.step * self.global_batch + self.rank * self.batch_size
        rows = self.shards.rows(self._permutation()[start : start + self.batch_size])
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        batch = torch.from_numpy(rows.astype(np.int64))  # [batch_size, row_len]
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self) -> Iterator[Batch]:
        """Batches without end; the training loop decides how many steps to take."""
        while True:
            yield self.next_batch()

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(self.shards.num_rows)
            self._perm_epoch = self.epoch
        return self._perm

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is, as plain JSON-able data (the same on every rank)."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch is the one the saving loader would have given."""
        mismatched = [
            f"{key} {state.get(key)!r} != {value!r}"
            for key, value in {"format": STATE_FORMAT, **self._identity()}.items()
            if state.get(key) != value
        ]
        if mismatched:
            raise DataError(
                "loader state was saved for a different setup: " + "; ".join(mismatched)
            )
        epoch, step = state.get("epoch"), state.get("step")
        if not (isinstance(epoch, int) and isinstance(step, int)) or not (
            epoch >= 0 and 0 <= step < self.steps_per_epoch
        ):
            raise DataError(
                f"loader state out of range: epoch {epoch!r}, step {step!r} "
                f"(steps per epoch: {self.steps_per_epoch})"
            )
        self.epoch, self.step = epoch, step

    def _identity(self) -> dict[str, Any]:
        # Everything that must match for (epoch, step) to mean the same batches.
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "split": self.shards.split,
            "dataset": self.shards.fingerprint,
            "num_rows": self.shards.num_rows,
        }


def iter_eval_batches(
    shard_dir: str | Path, split: str, batch_size: int, verify: bool = True
) -> Iterator[Batch]:
    """Every row of `split` once, in order, as `(inputs, targets)`; the last batch may be short."""
    shards = open_split(shard_dir, split, verify=verify)
    for start in range(0, shards.num_rows, batch_size):
        rows = shards.rows(np.arange(start, min(start + batch_size, shards.num_rows)))
        batch = torch.from_numpy(rows.astype(np.int64))  # [n, row_len]
        yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
