"""Block-sparse attention forward for Hopper in Gluon: FA3's warp-specialized structure, so that the
softmax of one warpgroup overlaps the tensor-core work of the other and of its own P @ V -- the overlap
that Triton's `tl` compiler does not produce on sm_90. Two kernels share that structure (measured on an
H200 at Wan 1.3B's and 14B's shapes, densities 0.1-1: bench/results/kernel-nvidia-h200-2026-11-27-s10clock.json):
- `_gl_attn_persistent` (config kernel "gluon_persistent", the default): one program per SM walks its tiles
  of the schedule; Q is double-buffered and K and V have rings of their own (3 and 2 stages), so the loader
  fetches the next tile's Q and K/V while the consumers finish this one. When the tiles are of about equal
  length and make few waves, the last wave's tiles run as pieces on the idle SMs and `split_merge` merges
  them.
- `_gl_attn_tile` ("gluon_tile"): one program per 128-row query tile, a joint K/V ring of 3 stages.
  It is ahead of the persistent kernel on some rows, so `calibatt compile` measures both. It also has the
  profiling build (see "Profiling" below).

Same contract as `attn_tl._block_sparse_fwd` for the cases they take (`supports`; `dispatch` runs the
tl kernel otherwise): sm_90, bf16/fp16, head dim 64 or 128, kernel tile = mask block =
128 x 128, 16-byte aligned rows (TMA), heads that start on rows of the tensors' memory (`_row_view_ok`:
the contiguous layout, diffusers' and packed q/k/v views), no log-sum-exp output. The index is the same
compressed rows (counts, offsets, int16 block ids read as int32 words) and the same longest-first
schedule, read through one record per tile (`tile_records`). Q, K, V and the output are TMA descriptors
made on the host over [rows, stride_n] views (`_row_view`); each head's origin in them comes as int32
terms (`_row_terms`).

`gl.warp_specialize` into
- a loader warp: TMA loads of Q and of the row's listed K/V blocks into rings of buffers, each stage with
  a `ready` mbarrier (TMA bytes arrived) and an `empty` one (both consumers are done with it);
- two consumer warpgroups, 64 query rows each, running

      S = Q K0^T ;  P = softmax part of S
      for j = 1 .. n-1:
          issue S' = Q Kj^T (async) ; issue O += P V(j-1) (async)
          wait for S' only          -> its softmax overlaps P V(j-1) on the tensor cores
          wait for O ; free stage j-1 ; O *= alpha
      O += P V(n-1) ; O /= l ; store the 64 rows

  The rows go out by a TMA store staged in the warpgroup's half of Q's buffer, except a head's last rows
  (rows >= N masked, from registers: through the row view a TMA store would run into the next head).

No CTA-wide barrier is left in the loop, so the two warpgroups drift apart and one's softmax runs while the
other's GEMMs do (FA3's ping-pong, left to the warp schedulers: forcing the order with mbarriers measured
no faster; bench/NOTES.md). The tile mapping mirrors the tl kernel's (`_block_sparse_tile`); Gluon
functions cannot call `tl` ones.

There is no interpreter for Gluon: CI compiles both kernels for sm_90 on the CPU, and
tests/test_kernels_gpu.py checks them against the fp32 reference on a GPU.

Profiling: `_gl_attn_tile` has one flag, its `TRACE` constexpr (False in production, where the compiler
drops every traced statement, so the production binary has none of them). With TRACE=True (only
bench/trace_gluon.py sets it, through `block_sparse_attention_gluon(..., trace=...)`) each program stamps its
SM's clock at points of its prologue, loop and epilogue into `TRACE_SLOTS`. The build shares the production
kernel's code rather than living in a copy on the bench side, so a trace measures what ships.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from . import split_merge
from ._common import LOG2E, BackendUnavailable, KernelConfig, aot_signature, check_attention_call, num_sms
from .index import BlockIndex, index_on_device, index_words

# triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later
# releases call them async_load / async_store (and make the old names raise). Same arguments.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


BLOCK = 128  # the one tile shape this kernel takes: mask block = kernel tile = 128 x 128
CONSUMER_REGS = 232  # registers per thread of the second consumer warpgroup (the loader warp gets 24)
LOADER_REGS = 40  # the persistent kernel's loader also walks its tiles' records and works out their head origins
# TRACE's per-program record (bench/trace_gluon.py): the SM, its cycle counter at six points, the program's
# block count, the global ns timer at its start and at warpgroup 0's end (to convert cycles to time), and the
# cycle counter at three more points of the prologue
TRACE_SLOTS = (
    "smid",
    "start",
    "loader_issued",
    "first_kv_ready",
    "loop_done",
    "stored_wg0",
    "stored_wg1",
    "count",
    "start_ns",
    "stored_wg0_ns",
    "index_read",
    "descriptors_made",
    "loader_start",
)
DEFAULT_STAGES = 3  # with 2 the loader cannot run ahead of the consumers, and they wait on it


# The head origins' terms and the output's strides are only multiplied: specialising on their values (1, or
# divisible by 16) gains nothing and would make the contiguous and diffusers' layouts (q_head_row = N vs 0, say)
# separate compilations, which `generate --strict` after `compile` must not meet.
_ROW_TERMS = [f"{t}_{p}" for t in "qkvo" for p in ("batch_row", "head_row", "head_col")] + [
    "stride_oz",
    "stride_oh",
    "stride_om",
]


@gluon.jit
def _gl_block_id(Words, e):
    # int16 block ids, two to an int32 word (see attn_tl._block_id)
    w = gl.load(Words + (e >> 1))
    return (w >> ((e & 1) * 16)) & 0xFFFF


@gluon.jit
def _gl_record(Records, tile, REPS, Mq, H):
    """Work item `tile` (a schedule position times the batch repeats) from its record (`tile_records`):
    (b, h, query block, block count, offset of its block ids). The record's loads are independent: one
    round trip, where schedule -> count and offset -> block id were three."""
    rec = Records + (tile // REPS) * 4
    row = gl.load(rec)
    return row // (Mq * H) + tile % REPS, (row // Mq) % H, row % Mq, gl.load(rec + 1), gl.load(rec + 2)


@gluon.jit
def _gl_slot(Records, tile, REPS):
    """The workspace slot of a piece of a split tile (split_merge.split_last_wave), -1 for a whole tile."""
    return (gl.load(Records + (tile // REPS) * 4 + 3) >> 16) - 1


@gluon.jit
def _gl_store_partial(acc, m_i, l_i, WsO, WsML, slot, WG: gl.constexpr, o_layout: gl.constexpr, s_layout: gl.constexpr):
    """A piece's epilogue (split_merge): its 64 rows unnormalised, fp32, and their max and sum (base 2),
    for `split_merge._merge_splits`. Registers -> global memory: only the last wave's pieces come here."""
    HALF: gl.constexpr = acc.shape[0]
    HEAD_DIM: gl.constexpr = acc.shape[1]
    rows = slot * (2 * HALF) + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(WsO + gl.expand_dims(rows * HEAD_DIM, 1) + gl.expand_dims(cols, 0), acc)
    ml = WsML + slot * (4 * HALF) + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    gl.store(ml, m_i)
    gl.store(ml + 2 * HALF, l_i)


@gluon.jit
def _gl_softmax(s, m_i, l_i, kn, N, qk_scale, s_layout: gl.constexpr, BN: gl.constexpr, MASK: gl.constexpr):
    """Online-softmax update for scores s of the key tile at kn: (p, alpha, m_new, l_new), base 2."""
    if MASK:  # the last listed block may hold keys >= N (TMA filled them with zeros)
        offs_n = kn + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(offs_n < N, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _gl_store_rows(acc, l_i, q_half, o_desc, o_row, oc, o_base, stride_om, start, N, o_layout: gl.constexpr):
    """A consumer's epilogue: its 64 rows O / l, from `start` of the head at (o_row, oc) of the output's row
    view. By TMA store, staged in the warpgroup's half of Q's buffer (only it reads those rows, and its
    last wgmma has completed; registers -> global memory was slower per tile), except the
    head's last rows: a TMA store through the row view would run past N into the next head's rows, so
    these go from registers with rows >= N masked (o_base: the head's first output element)."""
    HALF: gl.constexpr = q_half.shape[0]
    HEAD_DIM: gl.constexpr = q_half.shape[1]
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    l_o = gl.where(l_o == 0.0, 1.0, l_o)
    out = (acc / gl.expand_dims(l_o, 1)).to(q_half.dtype)
    if start + HALF <= N:
        q_half.store(out)
        fence_async_shared()
        _tma_store(o_desc, [o_row + start, oc], q_half)
        tma.store_wait(0)
    else:
        offs_m = start + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptrs = o_base + gl.expand_dims(offs_m.to(gl.int64) * stride_om, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, out, mask=gl.expand_dims(offs_m < N, 1))


@gluon.jit
def _gl_stamp(Trace, slot, WARPS: gl.constexpr, WHAT: gl.constexpr, value):
    """Profiling (TRACE, bench/trace_gluon.py): Trace[slot] = the SM's cycle counter (WHAT 0; the global
    ns timer ticks too coarsely on some parts), the low word of %globaltimer in ns (1), the SM's id (2) or
    `value` (3), written by one thread of the calling partition. (Every argument is passed: triton 3.6
    does not take defaults for constexpr parameters of a called function.)"""
    offs = gl.arange(0, 32 * WARPS, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
    if WHAT == 3:
        t = offs * 0 + value
    elif WHAT == 2:
        t = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [offs], dtype=gl.int32, is_pure=False, pack=1)
    elif WHAT == 0:
        t = gl.inline_asm_elementwise("mov.u32 $0, %clock;", "=r,r", [offs], dtype=gl.int32, is_pure=False, pack=1)
    else:
        t = gl.inline_asm_elementwise(
            "mov.u32 $0, %globaltimer_lo;", "=r,r", [offs], dtype=gl.int32, is_pure=False, pack=1
        )
    gl.store(Trace + slot + offs, t, mask=offs == 0)


@gluon.jit
def _tile_load(
    k_desc,
    v_desc,
    q_desc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    q_row,
    qc,
    kr,
    kc,
    vr,
    vc,
    Trace,
    trace_at,
    TRACE: gl.constexpr,
):
    # (partition arguments are runtime values: the tile constants come from the buffers' shapes)
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    if TRACE:
        _gl_stamp(Trace, trace_at + 12, 1, 0, 0)  # the loader warp starts
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, qc], q_bar, q_smem)
    if cnt > 0:  # the first block's id came with the tile's record: no dependent load before its TMA
        bar = ready.index(0)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [kr + first * BN, kc], bar, k_smem.index(0))
        _tma_load(v_desc, [vr + first * BN, vc], bar, v_smem.index(0))
        if TRACE:
            _gl_stamp(Trace, trace_at + 2, 1, 0, 0)  # Q and the first K/V requested
    for j in range(1, cnt):
        stage = j % STAGES
        if j >= STAGES:  # wait until both consumers are done with the tile that last used this stage
            mbarrier.wait(empty.index(stage), ((j // STAGES) - 1) & 1)
        kn = _gl_block_id(Words, e0 + j) * BN
        bar = ready.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [kr + kn, kc], bar, k_smem.index(stage))
        _tma_load(v_desc, [vr + kn, vc], bar, v_smem.index(stage))


@gluon.jit
def _tile_consume(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    qk_scale,
    Trace,
    trace_at,
    TRACE: gl.constexpr,
    WG: gl.constexpr,
):
    dtype: gl.constexpr = q_smem.dtype
    HALF: gl.constexpr = q_smem.shape[0] // 2
    HEAD_DIM: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_half = q_smem.slice(WG * HALF, HALF)  # this warpgroup's 64 query rows
    m_i = gl.full([HALF], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([HALF, BN], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    if cnt > 0:
        kn = first * BN
        mbarrier.wait(ready.index(0), 0)
        if TRACE:
            if WG == 0:
                _gl_stamp(Trace, trace_at + 3, 4, 0, 0)  # Q and the first K/V have arrived
        qk = warpgroup_mma(q_half, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        p, alpha, m_i, l_i = _gl_softmax(qk, m_i, l_i, kn, N, qk_scale, s_layout, BN, True)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, cnt):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            kn = _gl_block_id(Words, e0 + j) * BN
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_half, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            if j == cnt - 1:
                p, alpha, m_i, l_i = _gl_softmax(qk, m_i, l_i, kn, N, qk_scale, s_layout, BN, True)
            else:
                p, alpha, m_i, l_i = _gl_softmax(qk, m_i, l_i, kn, N, qk_scale, s_layout, BN, False)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
            mbarrier.arrive(empty.index(prev), count=1)  # K and V of tile j-1: this warpgroup is done
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        if TRACE:
            if WG == 0:
                _gl_stamp(Trace, trace_at + 4, 4, 0, 0)  # the loop is done: the last P V and the epilogue remain
        acc = warpgroup_mma(p_op, v_smem.index((cnt - 1) % STAGES), acc)
    _gl_store_rows(acc, l_i, q_half, o_desc, o_row, oc, o_base, stride_om, start_m + WG * HALF, N, o_layout)
    if TRACE:
        _gl_stamp(Trace, trace_at + 5 + WG, 4, 0, 0)  # this warpgroup's rows are stored
        if WG == 0:
            _gl_stamp(Trace, trace_at + 9, 4, 1, 0)


# The partitions: constexpr arguments reach a partition as runtime values on triton 3.6, so the warpgroup
# number and TRACE are bound here, one wrapper per combination.
@gluon.jit
def _tile_loader(
    k_desc,
    v_desc,
    q_desc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    q_row,
    qc,
    kr,
    kc,
    vr,
    vc,
    Trace,
    trace_at,
):
    _tile_load(
        k_desc,
        v_desc,
        q_desc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        q_row,
        qc,
        kr,
        kc,
        vr,
        vc,
        Trace,
        trace_at,
        False,
    )


@gluon.jit
def _tile_loader_traced(
    k_desc,
    v_desc,
    q_desc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    q_row,
    qc,
    kr,
    kc,
    vr,
    vc,
    Trace,
    trace_at,
):
    _tile_load(
        k_desc,
        v_desc,
        q_desc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        q_row,
        qc,
        kr,
        kc,
        vr,
        vc,
        Trace,
        trace_at,
        True,
    )


@gluon.jit
def _tile_consumer0(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    qk_scale,
    Trace,
    trace_at,
):
    _tile_consume(
        o_base,
        stride_om,
        o_desc,
        o_row,
        oc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        qk_scale,
        Trace,
        trace_at,
        False,
        0,
    )


@gluon.jit
def _tile_consumer1(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    qk_scale,
    Trace,
    trace_at,
):
    _tile_consume(
        o_base,
        stride_om,
        o_desc,
        o_row,
        oc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        qk_scale,
        Trace,
        trace_at,
        False,
        1,
    )


@gluon.jit
def _tile_consumer0_traced(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    qk_scale,
    Trace,
    trace_at,
):
    _tile_consume(
        o_base,
        stride_om,
        o_desc,
        o_row,
        oc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        qk_scale,
        Trace,
        trace_at,
        True,
        0,
    )


@gluon.jit
def _tile_consumer1_traced(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    qk_scale,
    Trace,
    trace_at,
):
    _tile_consume(
        o_base,
        stride_om,
        o_desc,
        o_row,
        oc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        qk_scale,
        Trace,
        trace_at,
        True,
        1,
    )


# (index pointers: no alignment specialisation, as for the tl kernel; see attn_tl.INDEX_POINTERS)
@gluon.jit(do_not_specialize=["N", "Mq", *_ROW_TERMS], do_not_specialize_on_alignment=["Records", "Words", "Trace"])
def _gl_attn_tile(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    Out,
    Records,
    Words,
    Trace,
    q_batch_row,
    q_head_row,
    q_head_col,
    k_batch_row,
    k_head_row,
    k_head_col,
    v_batch_row,
    v_head_row,
    v_head_col,
    o_batch_row,
    o_head_row,
    o_head_col,
    stride_oz,
    stride_oh,
    stride_om,
    H,
    N,
    Mq,
    REPS,
    qk_scale,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    TRACE: gl.constexpr,
    num_warps: gl.constexpr,
):
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    dtype: gl.constexpr = q_desc.dtype
    BM: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    tile = gl.program_id(0)
    trace_at = tile * 13  # TRACE: 13 int32 per program, TRACE_SLOTS
    if TRACE:
        _gl_stamp(Trace, trace_at, 4, 2, 0)
        _gl_stamp(Trace, trace_at + 1, 4, 0, 0)  # the program starts
        _gl_stamp(Trace, trace_at + 8, 4, 1, 0)
    b, h, m_blk, cnt, e0 = _gl_record(Records, tile, REPS, Mq, H)
    first = gl.load(Records + (tile // REPS) * 4 + 3) & 0xFFFF  # the first block id: its K/V goes out at once
    start_m = m_blk * BM
    if TRACE:
        _gl_stamp(Trace, trace_at + 7, 4, 3, cnt)
        _gl_stamp(Trace, trace_at + 10, 4, 0, 0)  # the index entries have arrived
    # Where head (b, h) starts in each host-side row view (`_row_view`, `_row_terms`): int32 multiply-adds
    # of terms the host divided out (64-bit divisions here lengthened every program's prologue).
    qr = b * q_batch_row + h * q_head_row
    kr = b * k_batch_row + h * k_head_row
    vr = b * v_batch_row + h * v_head_row
    o_row = b * o_batch_row + h * o_head_row
    o_base = Out + b.to(gl.int64) * stride_oz + h.to(gl.int64) * stride_oh
    q_smem = gl.allocate_shared_memory(dtype, [BM, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=2)  # one arrival per consumer warpgroup
    if TRACE:
        _gl_stamp(Trace, trace_at + 11, 4, 0, 0)  # barriers set up
    consumer_args = (
        o_base,
        stride_om,
        o_desc,
        o_row,
        h * o_head_col,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        qk_scale,
        Trace,
        trace_at,
    )
    loader_args = (
        k_desc,
        v_desc,
        q_desc,
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        qr + start_m,
        h * q_head_col,
        kr,
        h * k_head_col,
        vr,
        h * v_head_col,
        Trace,
        trace_at,
    )
    if TRACE:
        gl.warp_specialize(
            [
                (_tile_consumer0_traced, consumer_args),
                (_tile_consumer1_traced, consumer_args),
                (_tile_loader_traced, loader_args),
            ],
            [4, 1],
            [CONSUMER_REGS, 24],
        )
    else:
        gl.warp_specialize(
            [(_tile_consumer0, consumer_args), (_tile_consumer1, consumer_args), (_tile_loader, loader_args)],
            [4, 1],
            [CONSUMER_REGS, 24],
        )
    mbarrier.invalidate(q_bar)
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(st))
        mbarrier.invalidate(empty.index(st))


# ---- the persistent kernel: Q double-buffered, K and V in separate rings ----
# The per-tile kernel's trace puts ~2 block-times per tile outside the key loop (first K/V's latency, the
# last P V, the output store, the next program's launch), none of it overlapped: one program fills an SM's
# shared memory. Here one program per SM walks its tiles while the loader already fetches the next tile's
# Q and K/V. Q needs two buffers for that (with one, its reload lands on the tile boundary); they fit
# beside K and V rings of 3 + 2 stages (224 KiB) because a K stage is freed right after its Q K^T and a V
# stage after its P V, so the shallower V ring still runs a block ahead (a joint ring of 2 does not).


@gluon.jit
def _persistent_loader(
    q_desc,
    k_desc,
    v_desc,
    q_smem,
    k_smem,
    v_smem,
    q_ready,
    q_empty,
    k_ready,
    k_empty,
    v_ready,
    v_empty,
    Words,
    Records,
    H,
    Mq,
    REPS,
    q_batch_row,
    q_head_row,
    q_head_col,
    k_batch_row,
    k_head_row,
    k_head_col,
    v_batch_row,
    v_head_row,
    v_head_col,
    first,
    num_tiles,
    step,
):
    KS: gl.constexpr = k_smem.shape[0]
    VS: gl.constexpr = v_smem.shape[0]
    BM: gl.constexpr = q_smem.shape[1]
    BN: gl.constexpr = k_smem.shape[1]
    it = 0
    t = 0
    for tile in range(first, num_tiles, step):
        # (the record is read here, not carried from the previous iteration: triton 3.6 drops a value
        # carried across this loop and used only as the inner loop's bound, and the kernel hangs)
        b, h, m_blk, cnt, e0 = _gl_record(Records, tile, REPS, Mq, H)
        qb = t % 2
        if t >= 2:  # both consumers are done with the Q of two tiles ago
            mbarrier.wait(q_empty.index(qb), ((t // 2) - 1) & 1)
        mbarrier.expect(q_ready.index(qb), q_desc.block_type.nbytes)
        _tma_load(
            q_desc,
            [b * q_batch_row + h * q_head_row + m_blk * BM, h * q_head_col],
            q_ready.index(qb),
            q_smem.index(qb),
        )
        kr = b * k_batch_row + h * k_head_row
        vr = b * v_batch_row + h * v_head_row
        for j in range(cnt):
            kn = _gl_block_id(Words, e0 + j) * BN
            ks = it % KS
            if it >= KS:
                mbarrier.wait(k_empty.index(ks), ((it // KS) - 1) & 1)
            mbarrier.expect(k_ready.index(ks), k_desc.block_type.nbytes)
            _tma_load(k_desc, [kr + kn, h * k_head_col], k_ready.index(ks), k_smem.index(ks))
            vs = it % VS
            if it >= VS:
                mbarrier.wait(v_empty.index(vs), ((it // VS) - 1) & 1)
            mbarrier.expect(v_ready.index(vs), v_desc.block_type.nbytes)
            _tma_load(v_desc, [vr + kn, h * v_head_col], v_ready.index(vs), v_smem.index(vs))
            it += 1
        t += 1


@gluon.jit
def _persistent_consume(
    Out,
    q_smem,
    k_smem,
    v_smem,
    q_ready,
    q_empty,
    k_ready,
    k_empty,
    v_ready,
    v_empty,
    Words,
    Records,
    o_desc,
    o_batch_row,
    o_head_row,
    o_head_col,
    H,
    Mq,
    REPS,
    stride_oz,
    stride_oh,
    stride_om,
    N,
    qk_scale,
    first,
    num_tiles,
    step,
    WsO,
    WsML,
    WG: gl.constexpr,
):
    dtype: gl.constexpr = q_smem.dtype
    HALF: gl.constexpr = q_smem.shape[1] // 2
    HEAD_DIM: gl.constexpr = q_smem.shape[2]
    KS: gl.constexpr = k_smem.shape[0]
    VS: gl.constexpr = v_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_zero = gl.zeros([HALF, BN], gl.float32, layout=s_layout)
    it = 0
    t = 0
    b, h, m_blk, cnt, e0 = _gl_record(Records, first, REPS, Mq, H)
    slot = _gl_slot(Records, first, REPS)
    for tile in range(first, num_tiles, step):
        # the next tile's record now, so that its latency hides behind this tile
        nb, nh, nm, ncnt, ne0 = _gl_record(Records, gl.minimum(tile + step, num_tiles - 1), REPS, Mq, H)
        nslot = _gl_slot(Records, gl.minimum(tile + step, num_tiles - 1), REPS)
        # only the row's last block can hold keys >= N (ids ascend): its id, read now, is used at the end
        kn_last = _gl_block_id(Words, gl.where(cnt > 0, e0 + cnt - 1, 0)) * BN
        qb = t % 2
        q_half = q_smem.index(qb).slice(WG * HALF, HALF)  # this warpgroup's 64 query rows
        m_i = gl.full([HALF], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
        mbarrier.wait(q_ready.index(qb), (t // 2) & 1)
        if cnt > 0:
            ks = it % KS
            mbarrier.wait(k_ready.index(ks), (it // KS) & 1)
            qk = warpgroup_mma(q_half, k_smem.index(ks).permute((1, 0)), s_zero, use_acc=False)
            mbarrier.arrive(k_empty.index(ks), count=1)
            if cnt == 1:
                p, alpha, m_i, l_i = _gl_softmax(qk, m_i, l_i, kn_last, N, qk_scale, s_layout, BN, True)
            else:
                p, alpha, m_i, l_i = _gl_softmax(qk, m_i, l_i, kn_last, N, qk_scale, s_layout, BN, False)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, cnt):
                itj = it + j
                ks = itj % KS
                vs = (itj - 1) % VS
                mbarrier.wait(k_ready.index(ks), (itj // KS) & 1)
                mbarrier.wait(v_ready.index(vs), ((itj - 1) // VS) & 1)
                s_tok = warpgroup_mma(q_half, k_smem.index(ks).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                o_tok = warpgroup_mma(p_op, v_smem.index(vs), acc, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
                mbarrier.arrive(k_empty.index(ks), count=1)  # K of block j: this warpgroup is done
                if j == cnt - 1:
                    p, alpha, m_i, l_i = _gl_softmax(qk, m_i, l_i, kn_last, N, qk_scale, s_layout, BN, True)
                else:
                    p, alpha, m_i, l_i = _gl_softmax(qk, m_i, l_i, kn_last, N, qk_scale, s_layout, BN, False)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
                mbarrier.arrive(v_empty.index(vs), count=1)  # V of block j-1
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            vs = (it + cnt - 1) % VS
            mbarrier.wait(v_ready.index(vs), ((it + cnt - 1) // VS) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(vs), acc)
            mbarrier.arrive(v_empty.index(vs), count=1)
            it += cnt
        if slot >= 0:  # a piece of a split tile: split_merge._merge_splits finishes its rows
            _gl_store_partial(acc, m_i, l_i, WsO, WsML, slot, WG, o_layout, s_layout)
        else:
            # (staged in the tile's own Q buffer, which goes back to the loader only after the store: two
            # tiles before it is needed again)
            _gl_store_rows(
                acc,
                l_i,
                q_half,
                o_desc,
                b * o_batch_row + h * o_head_row,
                h * o_head_col,
                Out + b.to(gl.int64) * stride_oz + h.to(gl.int64) * stride_oh,
                stride_om,
                m_blk * (2 * HALF) + WG * HALF,
                N,
                o_layout,
            )
        mbarrier.arrive(q_empty.index(qb), count=1)
        b, h, m_blk, cnt, e0, slot = nb, nh, nm, ncnt, ne0, nslot
        t += 1


@gluon.jit
def _persistent_consumer0(
    Out,
    q_smem,
    k_smem,
    v_smem,
    q_ready,
    q_empty,
    k_ready,
    k_empty,
    v_ready,
    v_empty,
    Words,
    Records,
    o_desc,
    o_batch_row,
    o_head_row,
    o_head_col,
    H,
    Mq,
    REPS,
    stride_oz,
    stride_oh,
    stride_om,
    N,
    qk_scale,
    first,
    num_tiles,
    step,
    WsO,
    WsML,
):
    _persistent_consume(
        Out,
        q_smem,
        k_smem,
        v_smem,
        q_ready,
        q_empty,
        k_ready,
        k_empty,
        v_ready,
        v_empty,
        Words,
        Records,
        o_desc,
        o_batch_row,
        o_head_row,
        o_head_col,
        H,
        Mq,
        REPS,
        stride_oz,
        stride_oh,
        stride_om,
        N,
        qk_scale,
        first,
        num_tiles,
        step,
        WsO,
        WsML,
        0,
    )


@gluon.jit
def _persistent_consumer1(
    Out,
    q_smem,
    k_smem,
    v_smem,
    q_ready,
    q_empty,
    k_ready,
    k_empty,
    v_ready,
    v_empty,
    Words,
    Records,
    o_desc,
    o_batch_row,
    o_head_row,
    o_head_col,
    H,
    Mq,
    REPS,
    stride_oz,
    stride_oh,
    stride_om,
    N,
    qk_scale,
    first,
    num_tiles,
    step,
    WsO,
    WsML,
):
    _persistent_consume(
        Out,
        q_smem,
        k_smem,
        v_smem,
        q_ready,
        q_empty,
        k_ready,
        k_empty,
        v_ready,
        v_empty,
        Words,
        Records,
        o_desc,
        o_batch_row,
        o_head_row,
        o_head_col,
        H,
        Mq,
        REPS,
        stride_oz,
        stride_oh,
        stride_om,
        N,
        qk_scale,
        first,
        num_tiles,
        step,
        WsO,
        WsML,
        1,
    )


@gluon.jit(
    do_not_specialize=["N", "Mq", "num_tiles", *_ROW_TERMS],
    do_not_specialize_on_alignment=["Records", "Words", "WsO", "WsML"],
)
def _gl_attn_persistent(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    Out,
    Records,
    Words,
    WsO,
    WsML,
    q_batch_row,
    q_head_row,
    q_head_col,
    k_batch_row,
    k_head_row,
    k_head_col,
    v_batch_row,
    v_head_row,
    v_head_col,
    o_batch_row,
    o_head_row,
    o_head_col,
    stride_oz,
    stride_oh,
    stride_om,
    H,
    N,
    Mq,
    REPS,
    num_tiles,
    qk_scale,
    K_STAGES: gl.constexpr,
    V_STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    LOADER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    dtype: gl.constexpr = q_desc.dtype
    BM: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    first = gl.program_id(0)
    step = gl.num_programs(0)
    q_smem = gl.allocate_shared_memory(dtype, [2, BM, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BN, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, BN, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival per consumer warpgroup
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    consumer_args = (
        Out,
        q_smem,
        k_smem,
        v_smem,
        q_ready,
        q_empty,
        k_ready,
        k_empty,
        v_ready,
        v_empty,
        Words,
        Records,
        o_desc,
        o_batch_row,
        o_head_row,
        o_head_col,
        H,
        Mq,
        REPS,
        stride_oz,
        stride_oh,
        stride_om,
        N,
        qk_scale,
        first,
        num_tiles,
        step,
        WsO,
        WsML,
    )
    loader_args = (
        q_desc,
        k_desc,
        v_desc,
        q_smem,
        k_smem,
        v_smem,
        q_ready,
        q_empty,
        k_ready,
        k_empty,
        v_ready,
        v_empty,
        Words,
        Records,
        H,
        Mq,
        REPS,
        q_batch_row,
        q_head_row,
        q_head_col,
        k_batch_row,
        k_head_row,
        k_head_col,
        v_batch_row,
        v_head_row,
        v_head_col,
        first,
        num_tiles,
        step,
    )
    gl.warp_specialize(
        [
            (_persistent_consumer0, consumer_args),
            (_persistent_consumer1, consumer_args),
            (_persistent_loader, loader_args),
        ],
        [4, 1],
        [CONSUMER_REGS, LOADER_REGS],
    )
    for i in gl.static_range(2):
        mbarrier.invalidate(q_ready.index(i))
        mbarrier.invalidate(q_empty.index(i))
    for i in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(k_empty.index(i))
    for i in gl.static_range(V_STAGES):
        mbarrier.invalidate(v_ready.index(i))
        mbarrier.invalidate(v_empty.index(i))


def supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: tuple[int, int], *, return_lse: bool = False
) -> bool:
    """Whether the Gluon kernels take this call (else `dispatch` runs the `tl` kernel)."""
    return why_not(q, k, v, block_size, return_lse=return_lse) is None


def why_not(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: tuple[int, int], *, return_lse: bool = False
) -> str | None:
    """Why the Gluon kernels cannot take this call (what a fallback's record and warning say); None: they can."""
    if q.device.type != "cuda":
        return f"Gluon runs on CUDA GPUs, not {q.device.type}"
    if return_lse:
        return "the call needs the row log-sum-exp, which the Gluon kernels do not return"
    cap = torch.cuda.get_device_capability(q.device)
    if cap[0] != 9:
        return f"the Gluon kernels are sm_90 code; this GPU is sm_{cap[0]}{cap[1]}"
    if tuple(block_size) != (BLOCK, BLOCK):
        return f"block {tuple(block_size)} (the Gluon kernels take {BLOCK} x {BLOCK})"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (the Gluon kernels take bf16 or fp16)"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]} (the Gluon kernels take 64 or 128)"
    for name, t in zip("qkv", (q, k, v), strict=True):
        if t.stride(-1) != 1 or (t.stride(2) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name} is not TMA-aligned (unit last stride, 16-byte rows and base)"
        if not _row_view_ok(t):  # host-side descriptors over a [rows, stride_n] view
            return f"{name}'s heads do not start on rows of its memory (strides {tuple(t.stride())})"
    return None


def _row_view_ok(t: torch.Tensor) -> bool:
    """Whether `_row_view` can describe t: each head's rows start a row of the [rows, stride_n] view (or sit
    side by side within one, as diffusers' [B, N, H, D] heads do)."""
    B, H, N, D = t.shape
    w = t.stride(2)
    return w >= D and t.stride(0) % w == 0 and (t.stride(1) % w == 0 or (H - 1) * t.stride(1) + D <= w)


def _row_view(t: torch.Tensor, rows_per_tile: int):
    """A host-side TMA descriptor over t's memory as a 2-d [rows, t.stride(2)] array (t: [B, H, N, D]
    with unit last stride). Head (b, h) then starts at row b zr + h hr, column h hc (`_row_terms`): for the
    contiguous layout ([B, H, N, D]) row (b H + h) N, column 0; for diffusers' ([B, N, H, D] viewed) row b N,
    column h D. A tile that runs past N reads the next head's or batch's rows (or TMA's zero fill past the
    end): the kernel masks keys >= N out of the softmax and stores no output row >= N through it. The layout
    must pass `_row_view_ok` (`supports` checks it)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, N, D = t.shape
    w = t.stride(2)
    rows = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) // w + 1
    # (the 128-row tile's shared layout also for the output's 64-row halves: they are stored from halves of
    # Q's buffer)
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK, D], gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(base=t, shape=[rows, w], strides=[w, 1], block_shape=[rows_per_tile, D], layout=layout)


def _row_terms(t: torch.Tensor) -> tuple[int, int, int]:
    """(zr, hr, hc): head (b, h) of t starts at row b zr + h hr, column h hc of `_row_view(t)`. `_row_view_ok`
    guarantees that a batch starts a row (stride_b % stride_n == 0) and that a head either starts a row or
    sits within one beside the others ((H - 1) stride_h + D <= stride_n), so no carry crosses a row."""
    w = t.stride(2)
    hr, hc = divmod(t.stride(1), w) if t.stride(1) % w == 0 else (0, t.stride(1))
    return t.stride(0) // w, hr, hc


def tile_records(
    counts: torch.Tensor, offsets: torch.Tensor, words: torch.Tensor, schedule: torch.Tensor | None
) -> torch.Tensor:
    """int32 [rows, 4], one record per program in launch order: (flat row id, block count, list offset,
    first block id; 0 for an empty row). A program reads its record in one round trip and requests its first
    K/V at once; through the schedule, then the counts and offsets, then the ids, it takes three
    (bench/NOTES.md). Made on the device in a few small ops; `cached_records` keeps it with the index it came
    from, so a plan pays for it once."""
    rows = schedule.to(torch.int64) if schedule is not None else torch.arange(counts.numel(), device=counts.device)
    cnt = counts.reshape(-1)[rows]
    e0 = offsets.reshape(-1)[rows]
    ids = words.view(torch.int16)
    first = torch.where(cnt > 0, ids[e0.to(torch.int64).clamp(max=ids.numel() - 1)].to(torch.int32) & 0xFFFF, 0)
    return torch.stack([rows.to(torch.int32), cnt, e0, first.to(torch.int32)], 1).contiguous()


def persistent_records(
    counts: torch.Tensor,
    offsets: torch.Tensor,
    words: torch.Tensor,
    schedule: torch.Tensor | None,
    reps: int,
    device: torch.device,
) -> tuple[torch.Tensor, tuple[torch.Tensor, int] | None]:
    """The persistent kernel's records: `tile_records` with the last wave split over the idle SMs
    (`split_merge`), and the split rows and pieces per row (None when nothing is split: an index broadcast
    over `reps` > 1 batches is not, nor are rows of very different lengths)."""
    records = tile_records(counts, offsets, words, schedule)
    if reps != 1 or torch.device(device).type != "cuda":
        return records, None
    records, split_rows, s = split_merge.split_last_wave(records, words, num_sms(device))
    return records, (split_rows, s) if split_rows is not None else None


def block_sparse_attention_gluon(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    words: torch.Tensor,
    schedule: torch.Tensor | None,
    *,
    scale: float,
    stages: int = DEFAULT_STAGES,
    persistent: bool = True,
    records: torch.Tensor | None = None,
    splits: tuple[torch.Tensor, int] | None = None,
    trace: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Gluon kernels' launcher. `GluonBackend.launch` validates the call, allocates `out` and prepares the
    index (`index.index_on_device`): q, k, v, out [B, H, N, D] with unit last strides; int32 counts and offsets
    [Bi, H, Mq] (contiguous); the int16 block ids as int32 words; layouts `supports` accepts. `records`:
    `tile_records` of this index, if the caller keeps them (else made here); for the persistent kernel, with
    its last wave split (`persistent_records`, which also gives `splits`: the split rows and pieces per row,
    None when nothing is split). `trace` (profiling, bench/trace_gluon.py; the per-tile kernel only): int32
    [programs, len(TRACE_SLOTS)], filled with each program's SM, time stamps and block count."""
    B, H, N, D = q.shape
    Mq = triton.cdiv(N, BLOCK)
    reps = B // counts.shape[0]
    num_tiles = counts.shape[0] * H * Mq * reps
    if num_tiles == 0:
        return out
    if not _row_view_ok(out):  # a caller's own output buffer of another layout: compute into q's, then copy
        tmp = torch.empty_like(q)
        block_sparse_attention_gluon(
            q,
            k,
            v,
            tmp,
            counts,
            offsets,
            words,
            schedule,
            scale=scale,
            stages=stages,
            persistent=persistent,
            records=records,
            splits=splits,
            trace=trace,
        )
        return out.copy_(tmp)
    if records is None:
        if persistent:
            records, splits = persistent_records(counts, offsets, words, schedule, reps, q.device)
        else:
            records = tile_records(counts, offsets, words, schedule)
    # (`supports` checked that q, k and v allow row views)
    descs = [_row_view(t, BLOCK) for t in (q, k, v)] + [_row_view(out, BLOCK // 2)]
    terms = [x for t in (q, k, v, out) for x in _row_terms(t)]
    if persistent:
        if trace is not None:
            raise ValueError("the TRACE build is the per-tile kernel's: pass persistent=False")
        num_tiles = records.shape[0] * reps  # (pieces of split tiles included)
        grid = min(num_tiles, num_sms(q.device))
        # The workspaces are fp32 pointers in every launch, split or not (unread when nothing is split): one
        # binary serves both, so a cache that holds it serves masks whatever their last wave does.
        ws_o = ws_ml = _no_workspace(q.device)
        if splits is not None:
            n_pieces = splits[0].numel() * splits[1]
            ws_o = torch.empty(n_pieces * BLOCK, D, device=q.device, dtype=torch.float32)
            ws_ml = torch.empty(n_pieces, 2, BLOCK, device=q.device, dtype=torch.float32)
        _gl_attn_persistent[(grid,)](
            *descs,
            out,
            records,
            words,
            ws_o,
            ws_ml,
            *terms,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            H,
            N,
            Mq,
            reps,
            num_tiles,
            scale * LOG2E,
            K_STAGES=stages,
            V_STAGES=stages - 1,
            CONSUMER_REGS=CONSUMER_REGS,
            LOADER_REGS=LOADER_REGS,
            num_warps=4,
        )
        if splits is not None:
            split_merge.merge_splits(ws_o, ws_ml, splits[0], splits[1], out, H, Mq)
        return out
    _gl_attn_tile[(num_tiles,)](
        *descs,
        out,
        records,
        words,
        trace if trace is not None else records,
        *terms,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        H,
        N,
        Mq,
        reps,
        scale * LOG2E,
        STAGES=stages,
        CONSUMER_REGS=CONSUMER_REGS,
        TRACE=trace is not None,
        num_warps=4,
    )
    return out


@functools.cache
def _no_workspace(device: torch.device) -> torch.Tensor:
    """The persistent kernel's workspace arguments when no row is split."""
    return torch.empty(1, device=device, dtype=torch.float32)


def kernel_fn(persistent: bool = True):
    """The Gluon JIT function (for the ahead-of-time tools): the persistent one or the per-tile one."""
    return _gl_attn_persistent if persistent else _gl_attn_tile


def aot_source_args(dtype: torch.dtype, head_dim: int, stages: int = DEFAULT_STAGES, persistent: bool = True):
    """(signature, constexprs, attrs, options) of `kernel_fn(persistent)` for `triton.compile(GluonASTSource(...))`
    without a GPU."""
    import inspect

    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Gluon kernel takes bf16/fp16, not {dtype}")
    names = list(inspect.signature(kernel_fn(persistent).fn).parameters)
    if persistent:
        consts = dict(
            K_STAGES=stages, V_STAGES=stages - 1, CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4
        )
    else:
        consts = dict(STAGES=stages, CONSUMER_REGS=CONSUMER_REGS, TRACE=False, num_warps=4)
    sig, attrs = aot_signature(names, consts, dtype, i32_pointers=("Records", "Words", "Trace"))
    # q, k, v and out as host-side descriptors over [rows, stride_n] (see _row_view)
    elem, gdt = ("bf16", gl.bfloat16) if dtype == torch.bfloat16 else ("fp16", gl.float16)
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK, head_dim], gdt)
    for n in ("q_desc", "k_desc", "v_desc"):
        sig[n] = f"tensordesc<{elem}[{BLOCK}, {head_dim}],{layout!r}>"
    sig["o_desc"] = f"tensordesc<{elem}[{BLOCK // 2}, {head_dim}],{layout!r}>"
    return sig, consts, attrs, {"num_warps": 4}


# The two Gluon configs `calibatt compile` measures (and the default on sm_90: the persistent one). The kernels
# run 4 warps per partition whatever num_warps says; the field stays 4 so that the manifest records it as such.
GLUON_PERSISTENT = KernelConfig(kernel="gluon_persistent", num_stages=DEFAULT_STAGES, num_warps=4)
GLUON_TILE = KernelConfig(kernel="gluon_tile", num_stages=DEFAULT_STAGES, num_warps=4)


def takes_shape(capability: tuple[int, int], block_size: tuple[int, int], head_dim: int) -> bool:
    """Whether the Gluon kernels can serve a model of this GPU, block size and head dim at all (`supports`
    also checks a call's dtype and layout)."""
    return capability[0] == 9 and tuple(block_size) == (BLOCK, BLOCK) and head_dim in (64, 128)


def candidate_configs(
    capability: tuple[int, int],
    block_size: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype | None = None,
    *,
    return_lse: bool = False,
) -> list[KernelConfig]:
    """The Gluon configs worth measuring: both kernels where they can take the model's calls. `dtype`: the
    model's, when known (bf16 and fp16 only); `return_lse`: the calls need the row log-sum-exp (joint
    attention), which the Gluon kernels do not return."""
    if (
        takes_shape(capability, block_size, head_dim)
        and dtype in (None, torch.bfloat16, torch.float16)
        and not return_lse
    ):
        return [GLUON_PERSISTENT, GLUON_TILE]
    return []


def cached_records(index: BlockIndex, device: torch.device, persistent: bool, reps: int = 1):
    """The Gluon kernel's records for this index (one per tile; the persistent kernel's with its last wave
    split, `split_merge`) and the splits. Records the index brings (`launch_records`, made at load) serve a
    call of one batch repeat on their device; else they are made once per index, device, kernel and batch
    repeats and kept in `index.derived` (calibatt's prewarm makes them before the first step)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must find the same records
        device = torch.device("cuda", torch.cuda.current_device())
    brought = index.records
    if brought is not None and brought.device == device and reps == 1 and (persistent or index.split_rows is None):
        return brought, _splits(brought, index.split_rows, index.counts.numel())
    key = ("gluon_tile_records", str(device), persistent, reps)
    if key not in index.derived:
        index.derived[key] = derive_records(index, device, persistent, reps)
    return index.derived[key]


def compile_failure(e: BaseException) -> bool:
    """Whether `e` comes from making the kernel's binary, not from running it: triton's compile errors (its
    front end's CompilationError, ptxas, a binary that needs more shared memory than the GPU has), or any
    error raised inside triton's compiler package (an MLIR pass fails with a plain RuntimeError,
    "PassManager::run failed")."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    if isinstance(e, (CompilationError, PTXASError, OutOfResources)):
        return True
    compiler_dir = os.path.dirname(triton.compiler.__file__) + os.sep
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(compiler_dir):
            return True
        tb = tb.tb_next
    return False


def derive_records(index: BlockIndex, device: torch.device, persistent: bool, reps: int = 1):
    """(records, splits) of `cached_records`, made from the index: a few small ops on the device and, for the
    persistent kernel on a GPU, one wait for it (`split_merge.split_last_wave` decides on the host)."""
    counts, offsets, ids, id_words, schedule = index_on_device(index, device)
    words = ids if id_words else index_words(ids)
    if persistent:
        return persistent_records(counts, offsets, words, schedule, reps, device)
    return tile_records(counts, offsets, words, schedule), None


def _splits(records: torch.Tensor, split_rows: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, int] | None:
    """The (split rows, pieces per row) of records made for `rows` tiles, from the shapes alone: the r split
    rows' tiles became r s pieces, so the records number rows - r + r s."""
    if split_rows is None:
        return None
    r = split_rows.numel()
    return split_rows, (records.shape[0] - rows + r) // r


def launch_records(
    index: BlockIndex, device: torch.device, persistent: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(records, split_rows) for a call of one batch repeat on `device`, made now (and kept with the index) so
    that the calls bring them along (BlockIndex.records): what a plan's processors do at load."""
    records, splits = cached_records(index, device, persistent)
    return records, None if splits is None else splits[0]


class GluonBackend:
    """The Gluon kernels as a `dispatch` backend."""

    name = "gluon"
    is_fallback = False

    def supports(self, q, k, v, block_size, *, return_lse=False) -> bool:
        return supports(q, k, v, block_size, return_lse=return_lse)

    def default_config(self, device: torch.device, block_size: tuple[int, int]) -> KernelConfig:
        return GLUON_PERSISTENT

    def candidates(self, capability, block_size, head_dim, dtype=None, *, return_lse=False) -> list[KernelConfig]:
        return candidate_configs(capability, block_size, head_dim, dtype, return_lse=return_lse)

    def launch(self, q, k, v, index, *, block_size, scale, out, config, return_lse):
        """Raises `BackendUnavailable` when the installed triton fails to compile the kernel (a Gluon API the
        kernel does not know, an MLIR pass, ptxas) or the binary does not fit the GPU: that happens before
        anything runs on the GPU (`compile_failure`). Out of memory and CUDA errors of the launch propagate:
        they say nothing about the backend."""
        out = check_attention_call(q, k, v, index, block_size, out)
        counts, offsets, ids, id_words, schedule = index_on_device(index, q.device)
        words = ids if id_words else index_words(ids)  # the Gluon kernel reads int16 ids only
        records, splits = cached_records(index, q.device, config.persistent, q.shape[0] // counts.shape[0])
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        try:
            return block_sparse_attention_gluon(
                q,
                k,
                v,
                out,
                counts,
                offsets,
                words,
                schedule,
                scale=scale,
                stages=config.num_stages,
                persistent=config.persistent,
                records=records,
                splits=splits,
            )
        except Exception as e:
            if not compile_failure(e):
                raise
            raise BackendUnavailable(
                f"the Gluon kernel failed to compile or fit with triton {triton.__version__} "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ) from e

    def kernel_fns(self) -> list:
        return [kernel_fn(persistent=True), kernel_fn(persistent=False)]

    def aot_source(self, config, dtype, block_size, head_dim, capability, return_lse=False):
        from triton.experimental.gluon._runtime import GluonASTSource

        sig, consts, attrs, opts = aot_source_args(dtype, head_dim, config.num_stages, config.persistent)
        return GluonASTSource(kernel_fn(config.persistent), sig, consts, attrs), opts

    def prewarm(self, configs, index, *, device, dtype, head_dim, return_lse=False) -> None:
        """The persistent kernel's records of each plan index (its last wave split, made once per index) and
        the merge kernel of split rows: else the first step pays for them."""
        device = torch.device(device)
        persistent = [key for key, c in configs.items() if c is not None and c.kernel == "gluon_persistent"]
        if not persistent or return_lse or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
            return
        if not takes_shape(torch.cuda.get_device_capability(device), (BLOCK, BLOCK), head_dim):
            return
        for key in persistent:
            if key in index:
                cached_records(index[key], device, True)
        split_merge.warm(device, dtype, head_dim)


BACKEND = GluonBackend()
