"""Data-parallel training under torchrun, without DistributedDataParallel's wrapper.

Every rank trains on its own slice of each global batch and the gradients are averaged across
ranks once per update, in a pre-hook of the optimizer's step. Everything a method does before
`optimizer.step()` is therefore rank-local by construction: SAM's ascent pass (m-sharpness with
m = the local batch, as Foret et al. describe), micro-batch penalties on the rank's own
micro-batches, GVR's two views. A method that needs the global gradient before transforming it
(normalized GD, grafting) calls `sync_grads` itself; the hook then does not average again.

Why no DDP wrapper: methods call `model.forward_features`, `model.fc` and run several passes per
step; DDP only reduces gradients of passes that go through its own forward, and its reducer is
not built for double backward (pytorch#63812). An explicit all-reduce of one flat buffer per
update is the same communication volume without those traps; what it gives up is DDP's overlap of
communication with the backward pass (negligible on one node, measurable on many).

BatchNorm keeps per-rank batch statistics (DDP's default); running statistics are averaged across
ranks before every evaluation and checkpoint, so all ranks hold identical models.

What the loop adds: each rank augments its slice with the random draws of the whole global batch
(data.Draws), so the ranks together see what one process would; each rank draws dropout masks and
per-row choices from its own random stream, and the choices ranks share from one generator
(training.seed_epoch, Method.shared_rng); the metrics of logged steps are
averaged over the ranks (`rank_mean`), and methods measure the norm of their update gradient
after its all-reduce (Method.update_norm), so a log holds the global batch's values; checkpoints
carry every rank's method state (`gather_to_main`), and each rank resumes with its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce_(tensors: list[torch.Tensor], world: World, op: str = "sum") -> None:
    """In-place sum, mean or max across ranks, through one flat buffer (one collective per call;
    the tensors share a dtype)."""
    if not world.active or not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=REDUCE_OPS[op])
    if op == "mean":
        flat /= world.size
    torch._foreach_copy_(tensors, torch._utils._unflatten_dense_tensors(flat, tensors))


def gather_ranks(local: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's `local` (same shape on all), concatenated along dim 0 in rank order: the order
    of the global batch, whose r-th slice rank r holds. One all-reduce of a zero-padded buffer."""
    if not world.active:
        return local
    full = local.new_zeros(world.size, *local.shape)
    full[world.rank] = local
    all_reduce_([full], world, "sum")
    return full.flatten(0, 1)


def average_(tensors: list[torch.Tensor], world: World) -> None:
    """In-place mean across ranks."""
    all_reduce_(tensors, world, "mean")


class GradSync:
    """Averages .grad across ranks once per update: in a pre-hook of the optimizer's step, or
    earlier when a method calls `now()` (it then is not averaged twice)."""

    def __init__(self, optimizer: torch.optim.Optimizer, world: World):
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.world, self.done = world, False
        if world.active:
            optimizer.register_step_pre_hook(self.pre_step)

    def now(self) -> None:
        if self.world.active and not self.done:
            average_([p.grad for p in self.params if p.grad is not None], self.world)
            self.done = True

    def pre_step(self, optimizer, args, kwargs) -> None:
        self.now()
        self.done = False


def rank_mean(values: dict, world: World, device: torch.device) -> dict:
    """Each value (0-dim tensor or number) averaged over the ranks, as 0-dim tensors on the device:
    one all-reduce, no host sync. For logged step metrics, so a log holds the global batch's values."""
    if not world.active or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device) for k in keys])
    average_([stacked], world)
    return dict(zip(keys, stacked.unbind()))


def gather_to_main(state, world: World) -> list | None:
    """Every rank's `state` (nested dicts, lists and tensors) on rank 0, in rank order, its tensors
    moved to the CPU; None on the other ranks and in a single process. For per-rank method state
    in the checkpoint."""
    if not world.active:
        return None
    on_cpu = torch.utils._pytree.tree_map(lambda v: v.cpu() if torch.is_tensor(v) else v, state)
    gathered = [None] * world.size if world.main else None
    dist.gather_object(on_cpu, gathered, dst=0)
    return gathered


def average_buffers(model: torch.nn.Module, world: World) -> None:
    """Make BN running statistics identical on every rank (their mean)."""
    average_([b for b in model.buffers() if b.is_floating_point()], world)


def reduce_means(values: dict[str, float], world: World) -> dict[str, float]:
    if not world.active or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist())}
