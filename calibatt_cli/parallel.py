"""Multi-process layouts under torchrun: data parallel over prompts, CFG parallel, Ulysses sequence parallel.

One process per GPU (per CPU process under gloo in CI). The world is the mesh
`(dp, cfg, ring, ulysses) = (N / (cfg * K), cfg, 1, K)` in row-major rank order:
- `ulysses` (K ranks): diffusers' context parallelism splits Wan's tokens over them; inside attention each
  rank holds K-th of the heads over the whole sequence and runs our kernel on those heads' masks;
- `cfg` (1 or 2 ranks): the conditional and unconditional forwards of a step on two ranks;
- `dp`: what is left; each such group renders its share of the prompts.
`ring` stays 1: diffusers' ring attention all-gathers K/V without telling the attention op which shard it
holds, so a block mask cannot be applied to it.

Without torchrun (no WORLD_SIZE, or 1) everything is one process and nothing here is imported by the hot path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """This process's place in the world. The one-process layout is `Layout()`."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    dp: int = 1
    cfg: int = 1
    ulysses: int = 1
    mesh: Any = None  # torch DeviceMesh ("dp", "cfg", "ring", "ulysses") when world > 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.cfg * self.ulysses)

    @property
    def cfg_rank(self) -> int:
        return (self.rank // self.ulysses) % self.cfg

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def group_leader(self) -> bool:
        """Writes the outputs of its data-parallel group's prompts (the other ranks hold the same video)."""
        return self.cfg_rank == 0 and self.ulysses_rank == 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def heads(self, total: int) -> tuple[int, int]:
        """[start, stop) of the heads this process attends over under Ulysses (all of them without it)."""
        per = total // self.ulysses
        return self.ulysses_rank * per, (self.ulysses_rank + 1) * per

    def shard(self, n: int) -> list[int]:
        """The indices of n items (prompts) this process's data-parallel group renders: strided, so the
        groups' loads differ by at most one item."""
        return list(range(self.dp_rank, n, self.dp))

    def group(self, dim: str):
        return self.mesh[dim].get_group()

    def describe(self) -> str:
        parts = [f"{self.world} processes"]
        if self.dp > 1:
            parts.append(f"data parallel {self.dp}")
        if self.cfg > 1:
            parts.append("CFG parallel 2")
        if self.ulysses > 1:
            parts.append(f"Ulysses {self.ulysses}")
        return ", ".join(parts)


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def check_parallel_config(p) -> None:
    """What no world size can make work, refused before anything starts."""
    if p.ring != 1:
        raise ConfigError(
            "parallel.ring must be 1: ring attention is not supported (diffusers' ring all-gathers K/V "
            "without telling the attention op which shard it holds, so block masks cannot apply); "
            "use parallel.ulysses"
        )
    if p.ulysses_anything:
        raise ConfigError(
            "parallel.ulysses_anything is not supported (it pads heads, and the masks are per head); "
            "choose parallel.ulysses dividing the model's head count"
        )
    if p.ulysses < 1:
        raise ConfigError(f"parallel.ulysses must be >= 1, got {p.ulysses}")


def group_size(p) -> int:
    """Processes one video needs under this config: 2 with CFG parallel, times the Ulysses degree."""
    return (2 if p.cfg_parallel else 1) * p.ulysses


def setup(p, device: str) -> Layout:
    """Join the torchrun world (if launched by it) and build the mesh. `device` is the config's model.device;
    on CUDA each process takes the GPU of its LOCAL_RANK."""
    check_parallel_config(p)
    world = world_size()
    per_video = group_size(p)
    if world == 1:
        if per_video > 1:
            raise ConfigError(
                f"{_layout_words(p)} needs {per_video} processes; launch with "
                f"`torchrun --nproc-per-node {per_video} -m calibatt_cli ...`"
            )
        return Layout()
    if world % per_video:
        raise ConfigError(
            f"{world} processes do not fit {_layout_words(p)} ({per_video} processes per video); "
            f"launch a multiple of {per_video} processes"
        )
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                f"launch at most {torch.cuda.device_count()} processes per node"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    dp = world // per_video
    cfg = 2 if p.cfg_parallel else 1
    mesh = init_device_mesh(
        "cuda" if cuda else "cpu", (dp, cfg, 1, p.ulysses), mesh_dim_names=("dp", "cfg", "ring", "ulysses")
    )
    return Layout(world, rank, local_rank, dp, cfg, p.ulysses, mesh)


def teardown(layout: Layout) -> None:
    if layout.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def process_device(device: str, layout: Layout) -> str:
    """The config's device for this process: `cuda` means this process's GPU under torchrun."""
    if layout.distributed and device == "cuda":
        return f"cuda:{layout.local_rank}"
    return device


def _layout_words(p) -> str:
    parts = []
    if p.cfg_parallel:
        parts.append("CFG parallel")
    if p.ulysses > 1:
        parts.append(f"Ulysses {p.ulysses}")
    return " x ".join(parts) or "one process per video"


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_json(obj, layout: Layout) -> list:
    """Every process's JSON-able `obj`, in rank order. JSON over byte tensors rather than
    `all_gather_object`, which pickles."""
    if not layout.distributed:
        return [obj]
    import torch.distributed as dist

    dev = _comm_device()
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=dev)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(layout.world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in range(layout.world)]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[: int(s.item())].tolist()).decode()) for p, s in zip(parts, sizes, strict=True)]


def all_reduce_sum(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Sum of an integer tensor over all processes (exact: integer addition does not depend on order)."""
    if not layout.distributed:
        return t
    import torch.distributed as dist

    assert not t.is_floating_point(), "sum integers only: float sums depend on the reduction order"
    out = t.to(_comm_device())
    dist.all_reduce(out)
    return out.to(t.device)


def barrier(layout: Layout) -> None:
    if layout.distributed:
        import torch.distributed as dist

        dist.barrier()
