"""Mask selection and bit packing.

select_blocks keeps, for every query-block row of a block-mass matrix, the fewest key blocks whose mass
reaches 1 - epsilon of the row's total. Taking the largest blocks first is optimal for the count (any
k blocks hold at most the k largest), and among the minimal sets it keeps the one with the most mass.
"""

from __future__ import annotations

import numpy as np
import torch


def select_blocks(mass: torch.Tensor, epsilon: float) -> torch.Tensor:
    """mass float [..., Mq, Mk] (rows need not be normalised) -> bool mask of the same shape."""
    mass = mass.to(torch.float64)
    total = mass.sum(-1, keepdim=True)
    # Stable sort on descending mass: equal masses keep ascending block order, so results are repeatable.
    order = torch.argsort(-mass, dim=-1, stable=True)
    sorted_mass = torch.gather(mass, -1, order)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass held by the blocks ranked above each block
    keep_sorted = before < (1.0 - epsilon) * total  # a block is needed while the threshold is not reached
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def retained_mass(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each row's mass that the mask keeps, averaged over rows: [...] from [..., Mq, Mk]."""
    mass = mass.to(torch.float64)
    return ((mass * mask).sum(-1) / mass.sum(-1).clamp_min(1e-30)).mean(-1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., Mk] -> uint8 [..., ceil(Mk / 8)] (little bit order along the last axis)."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=num_key_blocks, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def local_block_mask(heads: int, grid: tuple[int, int, int], density: float, block: int) -> torch.Tensor:
    """A synthetic mask with the structure calibration finds in video DiTs (benchmarks): each query block
    keeps the round(density * M) key blocks whose token centroids are nearest on the (frame, row, col)
    grid (Chebyshev distance on normalised coordinates; token order frame, row, col). bool [heads, M, M]."""
    f, r, c = grid
    n = f * r * c
    tok = torch.arange(n)
    coords = torch.stack([tok // (r * c), (tok // c) % r, tok % c], -1).float() / torch.tensor([f, r, c]).float()
    mb = -(-n // block)
    pad = torch.nn.functional.pad(coords, (0, 0, 0, mb * block - n), value=float("nan"))
    cent = pad.view(mb, block, 3).nanmean(1)
    dist = (cent[:, None, :] - cent[None, :, :]).abs().amax(-1)
    idx = torch.argsort(dist, dim=-1, stable=True)[:, : max(1, round(density * mb))]
    mask = torch.zeros(mb, mb, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.expand(heads, mb, mb).contiguous()
