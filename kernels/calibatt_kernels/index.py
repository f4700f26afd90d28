"""The runtime index form of block masks, prepared once by `calibatt compile`.

A mask row is turned into a count and a list of key-block indices, so a kernel loops over exactly the
blocks it needs, and one compiled binary serves every mask of a shape (the mask is data, not a constexpr).
The schedule orders rows longest-first (LPT) for a persistent grid that assigns them to programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_KEY_BLOCKS = 32767  # int16 block ids: 4.2 M tokens at block 128


@dataclass
class BlockIndex:
    """Compressed rows (CSR): row r = (b, h, i) lists `counts[r]` key blocks, ascending, at
    `indices[offsets[r]:offsets[r] + counts[r]]`. Not a padded [B, H, Mq, Kmax] table: that costs the
    widest row for every row, and one dense head makes Kmax = Mk (Wan 14B at 720p: 40 layers x 40 heads x
    591 x 591 int32 = 2.2 GB per step bucket, 9 GB for a 4-bucket bundle). Compressed int16 rows cost what
    the mask keeps: 0.22 GB per bucket at density 0.2."""

    counts: torch.Tensor  # int32 [B, H, Mq]: number of key blocks listed for each query-block row
    offsets: torch.Tensor  # int32 [B, H, Mq]: where each row's list starts in `indices`
    indices: torch.Tensor  # int16 [L], L >= sum(counts): the rows' lists back to back (then any padding)
    schedule: torch.Tensor | None = None  # int32 [B*H*Mq]: flat row ids, most blocks first
    # The Gluon kernel's launch records for one batch repeat, made ahead (`attn_gluon.launch_records`), and
    # the rows its last wave splits (None: none is split). A call that brings them derives nothing from the
    # index, so it never waits for the GPU: a sparse run makes them at load (runtime/processor.py, SparseLayer).
    records: torch.Tensor | None = field(default=None, repr=False, compare=False)
    split_rows: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # What a kernel derives from this index once and reuses while the index lives (the Gluon kernel's tile
    # records, per device): a plan's index serves every step, so it pays for them once.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def max_blocks_per_row(self) -> int:
        return int(self.counts.max()) if self.counts.numel() else 0


def mask_to_index(block_mask: torch.Tensor, with_schedule: bool = True) -> BlockIndex:
    """bool [H, Mq, Mk] or [B, H, Mq, Mk] -> BlockIndex (a 3-d mask gets B = 1)."""
    if block_mask.dim() == 3:
        block_mask = block_mask.unsqueeze(0)
    if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
        raise ValueError(
            f"block_mask must be bool [H, Mq, Mk] or [B, H, Mq, Mk], got {block_mask.dtype} {tuple(block_mask.shape)}"
        )
    if block_mask.shape[-1] > MAX_KEY_BLOCKS:
        raise ValueError(
            f"{block_mask.shape[-1]} key blocks exceed the index's int16 block ids "
            f"(at most {MAX_KEY_BLOCKS}); use a larger block size"
        )
    counts = block_mask.sum(-1).to(torch.int32).contiguous()
    flat = counts.reshape(-1).to(torch.int64)
    offsets = (torch.cumsum(flat, 0) - flat).to(torch.int32).view(counts.shape)
    # Boolean indexing walks the mask in row-major order: rows back to back, blocks ascending in a row.
    cols = torch.arange(block_mask.shape[-1], dtype=torch.int16, device=block_mask.device).expand(block_mask.shape)
    indices = cols[block_mask]
    pad = -indices.numel() % 8 or (8 if indices.numel() == 0 else 0)  # never empty (a kernel argument); 16 B
    if pad:
        indices = torch.cat([indices, indices.new_zeros(pad)])
    schedule = lpt_schedule(counts) if with_schedule else None
    return BlockIndex(counts, offsets.contiguous(), indices.contiguous(), schedule)


def index_words(indices: torch.Tensor) -> torch.Tensor:
    """The int16 block ids as the int32 words the kernel reads (two ids a word, little-endian): a view when
    the ids are 4-byte aligned and even in number (mask_to_index and plans make them so), else a padded copy.
    Ids of another dtype are narrowed first (a copy per call)."""
    if indices.dtype != torch.int16:
        indices = indices.to(torch.int16)
    if not indices.is_contiguous():
        indices = indices.contiguous()
    if indices.numel() % 2 or indices.numel() == 0 or indices.data_ptr() % 4:
        padded = indices.new_zeros(indices.numel() + 2 - indices.numel() % 2)
        padded[: indices.numel()] = indices
        indices = padded
    return indices.view(torch.int32)


def index_on_device(index: BlockIndex, device: torch.device):
    """The index as the kernels take it: (counts, offsets, ids, id_words, schedule or None). int16 ids
    (mask_to_index, plans) go as int32 words holding two each (id_words); int32 ids as they are (twice the
    memory; bench_kernel.py --index-ab times the two side by side)."""
    counts = index.counts.to(device=device, dtype=torch.int32).contiguous()
    offsets = index.offsets.to(device=device, dtype=torch.int32).contiguous()
    ids = index.indices.to(device=device)
    id_words = ids.dtype != torch.int32
    ids = index_words(ids) if id_words else ids.contiguous()
    schedule = index.schedule
    if schedule is not None:
        schedule = schedule.to(device=device, dtype=torch.int32)
    return counts, offsets, ids, id_words, schedule


def lpt_schedule(counts: torch.Tensor, levels: int = 0) -> torch.Tensor:
    """Flat row ids, longest-processing-time first.

    levels = 0: sorted by descending block count, ties by row id (exact LPT).
    levels = L > 0: sorted by descending count *level* (count quantised to L levels of the widest row), then
    by row id. Within a level rows keep their natural (batch, head, row) order, so the ~130 tiles running at
    once mostly share a head and its K/V stays in L2; exact LPT interleaves heads whenever counts vary
    (random or border-trimmed local masks) and every wave reads K/V from many heads. The tail stays balanced
    to within 1/L of the widest row."""
    flat = counts.reshape(-1).to(torch.int64)
    if levels > 0 and flat.numel():
        top = int(flat.max())
        if top > 0:
            flat = (flat * levels + top - 1) // top  # ceil(count / top * levels): 0 only for empty rows
    # Sort key: -key, then row id; a stable sort on -key keeps row-id order among ties.
    return torch.argsort(-flat, stable=True).to(torch.int32)


def index_to_mask(index: BlockIndex, num_key_blocks: int) -> torch.Tensor:
    """Inverse of mask_to_index (used by tests and by the CPU path)."""
    counts = index.counts.reshape(-1).to(torch.int64)
    dev = counts.device
    total = int(counts.sum())
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts)
    # position of each listed block: its row's offset + its rank within the row
    rank = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    pos = torch.repeat_interleave(index.offsets.reshape(-1).to(device=dev, dtype=torch.int64), counts) + rank
    cols = index.indices.to(dev).long()[pos]
    mask = torch.zeros(counts.numel(), num_key_blocks, dtype=torch.bool, device=dev)
    mask[rows, cols] = True
    return mask.view(*index.counts.shape, num_key_blocks)
