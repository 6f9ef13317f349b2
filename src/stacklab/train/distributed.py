"""Data-parallel training under `torchrun`: the few places where more than one process shows.

Why it looks like this:

* **One process per device, started by torchrun.** `init_distributed` reads torchrun's
  `RANK`, `WORLD_SIZE` and `LOCAL_RANK`, joins the process group (gloo on CPU, NCCL on GPU)
  and picks the device. Without torchrun it is a world of one and nothing here does anything,
  so the training loop has no separate single-process path. SFT and RL train in one process
  (`single_process`) on the device the same rule picks.
* **DDP by default, FSDP2 on request.** DDP keeps a full replica per rank and averages the
  gradients; `fully_shard` (FSDP2) shards each block's parameters, gradients and optimizer
  state, for models that do not fit one device. FSDP over gloo on CPU is not a setup anyone
  should train with, so it is refused rather than emulated.
* **Data is split by the loader**, not here: rank r reads the r-th slice of each global batch.
* **Rank 0 writes.** Checkpoints and metrics are written by rank 0 while the others wait at a
  barrier; under FSDP gathering the full state is a collective every rank joins.
* **MoE load counts are summed across ranks** before the aux-loss-free bias update, so every
  rank moves its bias the same way and the replicas stay identical. (DDP must not broadcast
  buffers, or rank 0's counts would overwrite the others' at each forward.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from stacklab.errors import StacklabError
from stacklab.model.transformer import Transformer
from stacklab.recipe import Recipe


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def local_device() -> torch.device:
    """The one device rule of every stage and of evaluation: this process's GPU (torchrun's
    LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed() -> World:
    """The world torchrun set up (or a world of one), with the process group joined once."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return World(rank, world_size, int(os.environ.get("LOCAL_RANK", "0")), device)


def single_process(stage: str) -> World:
    """The world of a stage that trains in one process (SFT, RL): the device
    `init_distributed` picks; refused under torchrun with more than one process."""
    world = init_distributed()
    if world.distributed:
        raise StacklabError(
            f"{stage} trains in one process; run it without torchrun (only pretraining is "
            "data-parallel)"
        )
    return world


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_parallel(recipe: Recipe, world: World) -> None:
    """Refuse settings that cannot work in this world, before any work is done."""
    if not world.distributed or recipe.pretrain.parallel != "fsdp":
        return
    if world.device.type != "cuda":
        raise StacklabError("pretrain.parallel=fsdp needs GPUs; on CPU use pretrain.parallel=ddp")
    if recipe.optim.name == "muon":
        raise StacklabError(
            "optim.name=muon with pretrain.parallel=fsdp is not supported: Muon orthogonalises "
            "whole matrices and FSDP shards them; use pretrain.parallel=ddp"
        )


def wrap_model(model: Transformer, world: World, parallel: str) -> nn.Module:
    """DDP or FSDP2 around `model` in a distributed world; `model` itself otherwise.

    `fully_shard` changes `model` in place (its parameters become sharded DTensors), so build
    the optimizer on `model` after this call.
    """
    if not world.distributed:
        return model
    if parallel == "fsdp":
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for all but the last micro-batch of a step."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def all_reduce(tensor: Tensor, world: World, op: str = "avg") -> Tensor:
    """`tensor` reduced over ranks in place (`avg`, `sum` or `min`); unchanged in a world of one.

    gloo has no AVG, so the average is a sum divided by the world size.
    """
    if world.distributed:
        reduce_op = {"avg": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=reduce_op[op])
        if op == "avg":
            tensor /= world.world_size
    return tensor


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def sum_expert_counts(model: Transformer, world: World) -> None:
    """Sum every MoE layer's token-per-expert counts over ranks (one collective for all)."""
    layers = model.moe_layers()
    if not world.distributed or not layers:
        return
    counts = torch.stack([m.expert_counts for m in layers])  # [moe_layers, E]
    all_reduce(counts, world, "sum")
    for layer, summed in zip(layers, counts, strict=True):
        layer.expert_counts.copy_(summed)


# --------------------------------------------------------------------------- state dicts
# Under FSDP the parameters are shards; these gather (and scatter) the full state so that a
# checkpoint is the same file whatever the parallelism. Call them on every rank.


def model_state(model: Transformer) -> dict[str, Tensor]:
    """The full model state dict (on CPU under FSDP, where only rank 0's copy is complete)."""
    if isinstance(model, FSDPModule):
        sd = _state_dict_api()
        return sd.get_model_state_dict(model, options=sd.StateDictOptions(**_GATHER))
    return model.state_dict()


def load_model_state(model: Transformer, state: dict[str, Tensor]) -> None:
    if isinstance(model, FSDPModule):
        sd = _state_dict_api()
        sd.set_model_state_dict(model, state, options=sd.StateDictOptions(**_SCATTER))
    else:
        model.load_state_dict(state)


def optimizer_state(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if isinstance(model, FSDPModule):
        sd = _state_dict_api()
        return sd.get_optimizer_state_dict(model, optimizer, options=sd.StateDictOptions(**_GATHER))
    return optimizer.state_dict()


def load_optimizer_state(
    model: Transformer, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    if isinstance(model, FSDPModule):
        sd = _state_dict_api()
        sd.set_optimizer_state_dict(
            model, optimizer, state, options=sd.StateDictOptions(**_SCATTER)
        )
    else:
        optimizer.load_state_dict(state)


_GATHER = {"full_state_dict": True, "cpu_offload": True}
_SCATTER = {"full_state_dict": True}  # every rank read the same files: each has the full state


def _state_dict_api() -> Any:
    # Imported only when sharding: the module takes over 2 s to import.
    import torch.distributed.checkpoint.state_dict as api

    return api
