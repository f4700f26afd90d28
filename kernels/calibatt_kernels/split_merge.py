"""The persistent Gluon kernel's last wave, split (bench/NOTES.md).

The persistent kernel runs one program per SM over the schedule's tiles. With T tiles of about equal length
(the uniform rows of random and local masks) on P SMs, the last wave holds only T mod P of them: Wan 1.3B's
3,072 tiles on 132 SMs make 23 full waves and one of 36 tiles, so 96 SMs idle for a whole tile's time (3 % of the call).
`split_last_wave` cuts each of those r tiles into s = P // r pieces of consecutive key blocks; a piece
runs like a tile but leaves its unnormalised output rows and their softmax statistics (running max m and
sum l, base 2) in a small fp32 workspace instead of the output. `_merge_splits` then combines the s pieces
of each split row, flash-decoding style:

    M = max_k m_k ;  O = sum_k 2^(m_k - M) O_k / sum_k 2^(m_k - M) l_k

and writes the row's output (rows >= N skipped). One extra launch, of r programs, over r s x 128 x D
floats: ~0.5 % of the call that it shortens by ~2.5 %.

Only near-uniform rows are split (the last wave's tiles at least 3/4 of the longest): with longest-first
rows of very different lengths, the last wave holds the shortest tiles and the imbalance is already small.
`merge_splits_ref` is the PyTorch reference of the merge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT_ROWS = 128  # a tile's query rows (the Gluon kernel's BLOCK)
# Split only when the whole tiles make at most this many waves: the last wave is then >= 3 % of the call.
# (Wan 14B's 23,640 tiles make 179 waves on 132 SMs: its split measured slower, the merge and the pieces'
# own prologues costing more than the < 0.6 % a full last wave can give.)
MAX_WAVES = 32


def split_last_wave(
    records: torch.Tensor, words: torch.Tensor, programs: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(records, split_rows, s): `records` (attn_gluon.tile_records, in launch order, one batch
    repeat) with its last T mod `programs` records each replaced by s pieces, and the flat row ids of those
    rows (None and s = 1 when nothing is split). A piece's record is (row, its block count, the offset of its
    first block id, that id | (slot + 1) << 16): slot, 0 .. r s - 1, is the piece's place in the workspace;
    whole tiles have 0 in the upper half. The pieces of one row are consecutive slots (row j: j s .. j s + s
    - 1), so the last wave (T - r + r s <= T - r + P records) gives each program at most one piece."""
    t = records.shape[0]
    r = t % programs if t > programs else 0
    s = programs // r if r else 0
    if s < 2:
        return records, None, 1
    if t // programs > MAX_WAVES:
        return records, None, 1
    tail = records[t - r :].to(torch.int64)
    cnt = tail[:, 1]
    shortest, longest = torch.stack([cnt.min(), records[:, 1].max().to(torch.int64)]).tolist()  # one sync
    s = min(s, shortest)  # every piece at least one block
    if s < 2 or shortest * 4 < longest * 3:
        return records, None, 1
    k = torch.arange(s, device=records.device)
    lo = cnt[:, None] * k // s
    hi = cnt[:, None] * (k + 1) // s
    e0 = tail[:, 2:3] + lo
    ids = words.view(torch.int16)
    first = ids[e0.clamp(max=ids.numel() - 1)].to(torch.int64) & 0xFFFF
    slot = torch.arange(r * s, device=records.device).view(r, s)
    pieces = torch.stack([tail[:, :1].expand(r, s), hi - lo, e0, first | ((slot + 1) << 16)], -1)
    out = torch.cat([records[: t - r], pieces.reshape(r * s, 4).to(torch.int32)]).contiguous()
    return out, tail[:, 0].to(torch.int32).contiguous(), s


def merge_splits_ref(
    ws_o: torch.Tensor,
    ws_ml: torch.Tensor,
    split_rows: torch.Tensor,
    s: int,
    out: torch.Tensor,
    heads: int,
    row_blocks: int,
) -> torch.Tensor:
    """PyTorch reference of `_merge_splits`: ws_o fp32 [r s SPLIT_ROWS, D] (unnormalised output rows of each
    piece), ws_ml fp32 [r s, 2, SPLIT_ROWS] (their max m and sum l, base 2); split row j's pieces are slots
    j s .. j s + s - 1; row id -> (b, h, query block) as in the kernels' records. Writes out [B, H, N, D]."""
    r = split_rows.numel()
    N = out.shape[2]
    o = ws_o.view(r, s, SPLIT_ROWS, -1)
    m, lsum = ws_ml.view(r, s, 2, SPLIT_ROWS).unbind(2)
    top = m.max(1, keepdim=True).values
    w = torch.where(top == float("-inf"), 0.0, torch.exp2(m - top))  # [r, s, rows]
    den = (w * lsum).sum(1)
    num = (w[..., None] * o).sum(1)
    res = torch.where(den[..., None] == 0, 0.0, num / den[..., None].clamp_min(1e-30))
    for j, row in enumerate(split_rows.tolist()):
        b, h, blk = row // (row_blocks * heads), (row // row_blocks) % heads, row % row_blocks
        n = min(SPLIT_ROWS, N - blk * SPLIT_ROWS)
        out[b, h, blk * SPLIT_ROWS : blk * SPLIT_ROWS + n] = res[j, :n].to(out.dtype)
    return out


@triton.jit(
    do_not_specialize=["S", "N", "H", "Mq", "stride_oz", "stride_oh", "stride_om"],
    do_not_specialize_on_alignment=["SplitRows"],
)
def _merge_splits(
    WsO, WsML, SplitRows, Out, S, N, H, Mq, stride_oz, stride_oh, stride_om, BM: tl.constexpr, HEAD_DIM: tl.constexpr
):
    j = tl.program_id(0)
    row = tl.load(SplitRows + j)
    b = row // (Mq * H)
    h = (row // Mq) % H
    blk = row % Mq
    rows = tl.arange(0, BM)
    cols = tl.arange(0, HEAD_DIM)
    top = tl.full([BM], float("-inf"), tl.float32)
    for k in range(S):
        top = tl.maximum(top, tl.load(WsML + (j * S + k) * 2 * BM + rows))
    top_ok = tl.where(top == float("-inf"), 0.0, top)  # (a row with no valid key in any piece: weights 0)
    acc = tl.zeros([BM, HEAD_DIM], tl.float32)
    den = tl.zeros([BM], tl.float32)
    for k in range(S):
        base = (j * S + k) * 2 * BM
        w = tl.where(top == float("-inf"), 0.0, tl.exp2(tl.load(WsML + base + rows) - top_ok))
        den += w * tl.load(WsML + base + BM + rows)
        o = tl.load(WsO + ((j * S + k) * BM + rows)[:, None] * HEAD_DIM + cols[None, :])
        acc += w[:, None] * o
    res = tl.where(den[:, None] == 0.0, 0.0, acc / tl.where(den == 0.0, 1.0, den)[:, None])
    offs_m = blk * BM + rows
    ptrs = (
        Out
        + b.to(tl.int64) * stride_oz
        + h.to(tl.int64) * stride_oh
        + offs_m.to(tl.int64)[:, None] * stride_om
        + cols[None, :]
    )
    tl.store(ptrs, res.to(Out.dtype.element_ty), mask=(offs_m < N)[:, None])


def merge_splits(
    ws_o: torch.Tensor,
    ws_ml: torch.Tensor,
    split_rows: torch.Tensor,
    s: int,
    out: torch.Tensor,
    heads: int,
    row_blocks: int,
) -> torch.Tensor:
    """`_merge_splits` over `split_rows` (arguments as `merge_splits_ref`; out's last stride 1)."""
    assert out.stride(-1) == 1 and ws_o.is_contiguous() and ws_ml.is_contiguous()
    D = out.shape[-1]
    _merge_splits[(split_rows.numel(),)](
        ws_o,
        ws_ml,
        split_rows,
        out,
        s,
        out.shape[2],
        heads,
        row_blocks,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BM=SPLIT_ROWS,
        HEAD_DIM=D,
        num_warps=8,
    )
    return out


def kernel_fn():
    return _merge_splits


def warm(device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Launch `_merge_splits` once on zeros (calibatt's prewarm), so that its binary is loaded from the cache
    before the first denoising step; it has one specialisation per dtype and head dim."""
    ws_o = torch.zeros(2 * SPLIT_ROWS, head_dim, device=device)
    ws_ml = torch.zeros(2, 2, SPLIT_ROWS, device=device)
    out = torch.empty(1, 1, SPLIT_ROWS, head_dim, device=device, dtype=dtype)
    merge_splits(ws_o, ws_ml, torch.zeros(1, device=device, dtype=torch.int32), 2, out, 1, 1)
