"""torchrun support: `torchrun --nproc_per_node N script.py ...` runs N copies of a script, one per GPU (or CPU
process with gloo). Every rank draws the same global batch of N * batch_size prompts and per-sample seeds from the
shared seed and keeps its own slice, so N ranks of batch B see exactly what one process of batch N * B sees; LoRA
gradients are averaged across ranks before each optimizer step, so the ranks' weights stay identical. Without
torchrun (no WORLD_SIZE in the environment) rank is 0, world_size 1 and every function here is a no-op."""

import datetime
import os

import torch
import torch.distributed as dist


def setup(use_cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; joins the process group when there are several."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available() and use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():  # a rank that stops answering fails the others after the timeout
        timeout = datetime.timedelta(seconds=float(os.environ.get("DIST_TIMEOUT_S", 1800)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return rank, world_size, device


def sample_generators(batch_size: int, rng: torch.Generator) -> list[torch.Generator]:
    """One CPU generator per sample of this rank's slice of the global batch, seeded from the shared `rng`: all of a
    sample's noise (x_T, the sampler's eta noise, re-noising) comes from it, so it does not depend on the rank."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    seeds = torch.randint(2**62, (world_size * batch_size,), generator=rng)[rank * batch_size : (rank + 1) * batch_size]
    return [torch.Generator().manual_seed(seed) for seed in seeds.tolist()]


def shard(items: list, batch_size: int) -> list:
    """This rank's slice of a global batch of world_size * batch_size items."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return items[rank * batch_size : (rank + 1) * batch_size]


def shuffle(n: int, rng: torch.Generator) -> torch.Tensor:
    """A random order of this rank's n samples: their order within one permutation of all world_size * n samples
    (rank r holds samples r * n ... (r + 1) * n - 1), so `rng` makes the same draws on every rank and in one process."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    order = torch.randperm(world_size * n, generator=rng)
    return order[(order >= rank * n) & (order < (rank + 1) * n)] - rank * n


def average_gradients(params: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one all-reduce of the flattened LoRA grads)."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:  # a parameter this rank's loss did not reach still takes part in the mean
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def gather(x: torch.Tensor | list) -> torch.Tensor | list:
    """The ranks' tensors (same shape on every rank) or lists, concatenated in rank order, on every rank."""
    if not dist.is_initialized():
        return x
    parts = [None] * dist.get_world_size()
    if isinstance(x, list):
        dist.all_gather_object(parts, x)
        return [item for part in parts for item in part]
    parts = [torch.empty_like(x) for _ in parts]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast(obj):
    """Rank 0's `obj` (any picklable object) on every rank."""
    if not dist.is_initialized():
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
