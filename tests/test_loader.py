"""The loader: deterministic shuffles, whole epochs, exact resume, disjoint data-parallel ranks."""

import itertools
import json

import numpy as np
import pytest
import torch

from stacklab.data.loader import ShardLoader, iter_eval_batches
from stacklab.data.shards import write_index, write_split
from stacklab.errors import DataError

SEQ_LEN = 8
ROWS = 50


@pytest.fixture
def shard_dir(tmp_path):
    # One document 1..400, so stream[k] = k + 1 and row i starts with token i * SEQ_LEN + 1.
    entry = write_split(tmp_path, "train", [list(range(1, 401))], SEQ_LEN, 16, 1000)
    assert entry["rows"] == ROWS
    write_index(tmp_path, {"train": entry}, meta={})
    return tmp_path


def row_ids(inputs: torch.Tensor) -> list[int]:
    return ((inputs[:, 0] - 1) // SEQ_LEN).tolist()


def take(loader: ShardLoader, n: int) -> list[list[int]]:
    return [row_ids(loader.next_batch()[0]) for _ in range(n)]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_batches_are_shifted_int64_rows(shard_dir):
    inputs, targets = ShardLoader(shard_dir, "train", batch_size=4, seed=0).next_batch()
    assert inputs.shape == targets.shape == (4, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets[:, -1], inputs[:, 0] + SEQ_LEN)


def test_same_seed_same_batches_other_seed_differs(shard_dir):
    a = take(ShardLoader(shard_dir, "train", 4, seed=1), 5)
    assert a == take(ShardLoader(shard_dir, "train", 4, seed=1), 5)
    assert a != take(ShardLoader(shard_dir, "train", 4, seed=2), 5)


def test_an_epoch_visits_each_row_once(shard_dir):
    loader = ShardLoader(shard_dir, "train", batch_size=5, seed=0)
    assert loader.steps_per_epoch == 10
    first = take(loader, 10)
    assert sorted(flat(first)) == list(range(ROWS))
    second = take(loader, 10)
    assert sorted(flat(second)) == list(range(ROWS))
    assert first != second  # a fresh shuffle each epoch


def test_epoch_remainder_is_skipped(shard_dir):
    loader = ShardLoader(shard_dir, "train", batch_size=4, seed=0)
    assert loader.steps_per_epoch == 12  # 48 of 50 rows
    seen = flat(take(loader, 12))
    assert len(set(seen)) == 48
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0


@pytest.mark.parametrize("saved_after", [3, 10, 12, 25])  # mid-epoch, near/at/past a boundary
def test_resume_yields_the_same_next_batches(shard_dir, saved_after):
    original = ShardLoader(shard_dir, "train", batch_size=4, seed=7)
    take(original, saved_after)
    state = json.loads(json.dumps(original.state_dict()))
    expected = take(original, 6)
    restored = ShardLoader(shard_dir, "train", batch_size=4, seed=7)
    restored.load_state_dict(state)
    assert take(restored, 6) == expected


def test_ranks_are_disjoint_and_union_is_the_global_batch(shard_dir):
    single = ShardLoader(shard_dir, "train", batch_size=6, seed=3)
    ranks = [ShardLoader(shard_dir, "train", 3, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 8
    for _ in range(12):  # across an epoch boundary
        whole_inputs, whole_targets = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert not set(row_ids(parts[0][0])) & set(row_ids(parts[1][0]))
        assert torch.equal(torch.cat([p[0] for p in parts]), whole_inputs)
        assert torch.equal(torch.cat([p[1] for p in parts]), whole_targets)


def test_iteration_matches_next_batch(shard_dir):
    a = ShardLoader(shard_dir, "train", 4, seed=0)
    b = ShardLoader(shard_dir, "train", 4, seed=0)
    for inputs, _ in itertools.islice(a, 3):
        assert torch.equal(inputs, b.next_batch()[0])


def test_bad_state_is_refused(shard_dir, tmp_path_factory):
    state = ShardLoader(shard_dir, "train", 4, seed=0).state_dict()
    with pytest.raises(DataError, match="seed 0 != 1"):
        ShardLoader(shard_dir, "train", 4, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="world_size"):
        ShardLoader(shard_dir, "train", 2, seed=0, world_size=2).load_state_dict(state)
    other = tmp_path_factory.mktemp("other")
    write_index(other, {"train": write_split(other, "train", [[5] * 400], 8, 16, 1000)}, {})
    with pytest.raises(DataError, match="dataset"):
        ShardLoader(other, "train", 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="out of range"):
        ShardLoader(shard_dir, "train", 4, seed=0).load_state_dict({**state, "step": 12})


def test_too_few_rows_for_a_global_batch(shard_dir):
    with pytest.raises(DataError, match="50 rows, fewer than one global batch of 52"):
        ShardLoader(shard_dir, "train", batch_size=26, seed=0, world_size=2)


def test_eval_batches_cover_every_row_in_order(shard_dir):
    batches = list(iter_eval_batches(shard_dir, "train", batch_size=16))
    assert [len(inputs) for inputs, _ in batches] == [16, 16, 16, 2]
    assert flat([row_ids(inputs) for inputs, _ in batches]) == list(range(ROWS))
    assert all(np.array_equal(i[:, 1:], t[:, :-1]) for i, t in batches)
