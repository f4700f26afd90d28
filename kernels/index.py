"""The runtime index form of block masks, prepared once by `calibatt compile`.

A mask row is turned into a count and a list of key-block indices, so a kernel loops over exactly the
blocks it needs, and one compiled binary serves every mask of a shape (the mask is data, not a constexpr).
The schedule orders rows longest-first (LPT) for a persistent grid that assigns them to programs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockIndex:
    counts: torch.Tensor  # int32 [B, H, Mq]: number of key blocks listed for each query-block row
    indices: torch.Tensor  # int32 [B, H, Mq, Kmax]: listed key blocks ascending, then padding (0)
    schedule: torch.Tensor | None = None  # int32 [B*H*Mq]: flat row ids, most blocks first

    @property
    def num_key_blocks(self) -> int:
        return int(self.indices.shape[-1])


def mask_to_index(block_mask: torch.Tensor, with_schedule: bool = True) -> BlockIndex:
    """bool [H, Mq, Mk] or [B, H, Mq, Mk] -> BlockIndex (a 3-d mask gets B = 1)."""
    if block_mask.dim() == 3:
        block_mask = block_mask.unsqueeze(0)
    if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be bool [H, Mq, Mk] or [B, H, Mq, Mk], got {block_mask.dtype} "
                         f"{tuple(block_mask.shape)}")
    counts = block_mask.sum(-1).to(torch.int32)
    kmax = max(int(counts.max().item()) if counts.numel() else 0, 1)
    # A stable sort of "not listed" puts listed blocks first, in ascending block order.
    order = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True)[..., :kmax].to(torch.int32)
    slot = torch.arange(kmax, device=block_mask.device)
    indices = torch.where(slot < counts.unsqueeze(-1), order, torch.zeros_like(order)).contiguous()
    schedule = lpt_schedule(counts) if with_schedule else None
    return BlockIndex(counts.contiguous(), indices, schedule)


def lpt_schedule(counts: torch.Tensor) -> torch.Tensor:
    """Flat row ids sorted by descending block count (ties by row id): longest-processing-time first."""
    flat = counts.reshape(-1).to(torch.int64)
    # Sort key: -count, then row id; a stable sort on -count keeps row-id order among ties.
    return torch.argsort(-flat, stable=True).to(torch.int32)


def index_to_mask(index: BlockIndex, num_key_blocks: int) -> torch.Tensor:
    """Inverse of mask_to_index (used by tests and by the CPU path)."""
    counts, indices = index.counts, index.indices.long()
    slot = torch.arange(indices.shape[-1], device=indices.device)
    valid = slot < counts.unsqueeze(-1).long()
    hits = torch.zeros(*counts.shape, num_key_blocks, dtype=torch.int32, device=counts.device)
    # scatter_add, not scatter: padding slots point at block 0 too, and must not clear a listed block 0.
    hits.scatter_add_(-1, torch.where(valid, indices, 0), valid.to(torch.int32))
    return hits > 0
