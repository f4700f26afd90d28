"""Quantized block-sparse attention for Hopper in Gluon: `attn_fp8.py`'s scheme (INT8 Q.K^T, FP8 P.V) in
`attn_gluon.py`'s warp-specialized structure.

Why a second fp8 kernel: at 8 bits a tile's two MMAs take about as long as its softmax (16K exp2 on the
MUFU, 16K fp32 -> e4m3 casts), so the speed-up over bf16 needs one tile's MMAs to overlap another's softmax.
Triton's `tl` pipeliner on sm_90 waits on each dot right after issuing it (attn_fp8.py's docstring), which
caps the `tl` kernel near the bf16 Gluon kernel's rate. Here, as in `_gl_attn_tile`: a loader warp streams
Q, K and V by TMA into rings of shared-memory stages; two consumer warpgroups of 64 query rows each run

    S = Q8 K8_0^T (int32) ;  P = softmax part of S
    for j = 1 .. n-1:
        issue S' = Q8 K8_j^T (async) ; issue O += P8 V8_(j-1) (async)
        wait for S' only          -> its softmax overlaps P V on the tensor cores
        wait for O ; free stage j-1 ; O *= alpha_j
    O += P8 V8_(n-1) ; O = O / l * v_scale ; store the 64 rows

with no CTA-wide barrier in the loop, so the warpgroups drift apart and one's softmax runs while the other's
MMAs do.

The arithmetic is the `tl` kernel's (`attn_fp8._fp8_softmax_pv`), so both compare with the same reference
(`quant.block_sparse_attention_fp8_ref`): int32 scores exact; their fp32 value through the 1.5 * 2^23 bit
trick (the ALU, not the quarter-rate conversion unit); one per-row factor q_scale * k_scale * softmax scale *
log2(e); P's largest element at 2^P_LOG2, cast to e4m3; V's channel scales once at the end. One difference,
P.V's accumulation (`PV_FRESH`): by default the 8-bit MMA adds into the running output, as above, where the
`tl` kernel and the reference give each key block a fresh fp32 accumulator and add it to the output in fp32
(Hopper's 8-bit MMA accumulates with fewer than fp32's bits, so the running output picks up that rounding
once per block). PV_FRESH=True keeps the reference's order, (O + PV) * alpha, at the cost of 64 more
registers a thread: at head dim 128 that spills.

The codes come from `attn_fp8.quantize_qkv` (or the fused q/k norm + RoPE producer): contiguous [B, H, rows,
D] int8 q and k, [B, H, D, keys] e4m3 V transposed (Hopper's 8-bit wgmma takes both operands with the
reduction dim contiguous, so V's tile [D, BN] is permuted to [BN, D] with BN contiguous, as K's is). The index
comes as `attn_gluon.tile_records`. Takes: sm_90, block 128 x 128, head dim 64 or 128, an output of bf16/fp16
in a layout `attn_gluon._row_view_ok` accepts (others go through a temporary).

There is no interpreter for Gluon: CI compiles the kernel for sm_90 on the CPU (tests/test_fp8_gluon.py), and
tests/test_fp8_gluon_gpu.py checks it against the reference on a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from ._common import LOG2E, KernelConfig
from .attn_gluon import (
    BLOCK,
    CONSUMER_REGS,
    _gl_block_id,
    _gl_record,
    _gl_store_rows,
    _row_terms,
    _row_view,
    _row_view_ok,
    _tma_load,
    cached_records,
)
from .index import BlockIndex
from .quant import P_LOG2, Fp8QKV

DEFAULT_STAGES = 3  # K and V stages of the joint ring (16 KiB each at head dim 128)
# P.V into the running output (False) or a fresh accumulator per key block (True; see the module docstring)
PV_FRESH = False
_RNE_MAGIC = gl.constexpr(12582912.0)  # 1.5 * 2^23 (see attn_fp8._fp8_softmax_pv)
_MAGIC_BITS = gl.constexpr(0x4B400000)  # its bits: an int32 |x| < 2^22 added to them: the bits of 1.5 * 2^23 + x
_P_LOG2 = gl.constexpr(P_LOG2)

GLUON_FP8_TILE = KernelConfig(kernel="gluon_tile", num_stages=DEFAULT_STAGES, num_warps=4)


@gluon.jit
def _fp8_softmax(qk, m_i, l_i, rs, kn, N, s_layout: gl.constexpr, BN: gl.constexpr, MASK: gl.constexpr):
    """Online-softmax update for the int32 scores qk of the key tile at kn (rs: the row's factor), base 2:
    (p, alpha, m_new, l_new), p's largest element 2^P_LOG2 (see attn_fp8._fp8_softmax_pv)."""
    s = (qk + _MAGIC_BITS).to(gl.float32, bitcast=True)  # 1.5 * 2^23 + qk, exactly
    if MASK:  # the last listed block may hold keys >= N (zero codes past N, other heads' rows, or TMA's fill)
        offs_n = kn + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(offs_n < N, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, (gl.max(s, axis=1) - _RNE_MAGIC) * rs)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * gl.expand_dims(rs, 1) - gl.expand_dims(m_new - _P_LOG2 + _RNE_MAGIC * rs, 1))
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _fp8_load(
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, first, q_row, k_row, v_row
):
    """The loader warp: Q's 128 rows, then each listed key block's K codes and V's transposed codes."""
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, 0], q_bar, q_smem)
    if cnt > 0:  # the first block's id came with the tile's record: no dependent load before its TMA
        bar = ready.index(0)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [k_row + first * BN, 0], bar, k_smem.index(0))
        _tma_load(v_desc, [v_row, first * BN], bar, v_smem.index(0))
    for j in range(1, cnt):
        stage = j % STAGES
        if j >= STAGES:  # wait until both consumers are done with the tile that last used this stage
            mbarrier.wait(empty.index(stage), ((j // STAGES) - 1) & 1)
        kn = _gl_block_id(Words, e0 + j) * BN
        bar = ready.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [k_row + kn, 0], bar, k_smem.index(stage))
        _tma_load(v_desc, [v_row, kn], bar, v_smem.index(stage))


@gluon.jit
def _fp8_consume(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    QScale,
    KScale,
    VScale,
    q_srow,
    k_srow,
    v_srow,
    qk_scale,
    WG: gl.constexpr,
    PV_FRESH: gl.constexpr,
):
    HALF: gl.constexpr = q_smem.shape[0] // 2
    HEAD_DIM: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    # 8-bit wgmma: instruction k of 32; P as the register operand, four 8-bit values to a 32-bit register
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    q_half = q_smem.slice(WG * HALF, HALF)  # this warpgroup's 64 query rows
    rows = start_m + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    q_rs = gl.load(QScale + q_srow + rows) * qk_scale  # rows past N hold the pad scale: finite
    m_i = gl.full([HALF], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([HALF, BN], gl.int32, layout=s_layout)
    o_zero = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    mbarrier.wait(q_bar, 0)
    if cnt > 0:
        ks = gl.load(KScale + k_srow + first)
        mbarrier.wait(ready.index(0), 0)
        qk = warpgroup_mma(q_half, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        p, alpha, m_i, l_i = _fp8_softmax(qk, m_i, l_i, q_rs * ks, first * BN, N, s_layout, BN, True)
        p_op = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
        for j in range(1, cnt):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            blk = _gl_block_id(Words, e0 + j)
            ks = gl.load(KScale + k_srow + blk)
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_half, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if PV_FRESH:
                o_tok = warpgroup_mma(p_op, v_smem.index(prev).permute((1, 0)), o_zero, use_acc=False, is_async=True)
            else:
                o_tok = warpgroup_mma(p_op, v_smem.index(prev).permute((1, 0)), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            if j == cnt - 1:
                p, alpha, m_i, l_i = _fp8_softmax(qk, m_i, l_i, q_rs * ks, blk * BN, N, s_layout, BN, True)
            else:
                p, alpha, m_i, l_i = _fp8_softmax(qk, m_i, l_i, q_rs * ks, blk * BN, N, s_layout, BN, False)
            alpha_o = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            if PV_FRESH:
                pv = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,))
                acc = (acc + pv) * alpha_o
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok,)) * alpha_o
            mbarrier.arrive(empty.index(prev), count=1)  # K and V of tile j-1: this warpgroup is done
            p_op = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
        if PV_FRESH:
            acc = acc + warpgroup_mma(p_op, v_smem.index((cnt - 1) % STAGES).permute((1, 0)), o_zero, use_acc=False)
        else:
            acc = warpgroup_mma(p_op, v_smem.index((cnt - 1) % STAGES).permute((1, 0)), acc)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    acc = acc * gl.expand_dims(gl.load(VScale + v_srow + cols), 0)
    o_half = o_smem.slice(WG * HALF, HALF)
    _gl_store_rows(acc, l_i, o_half, o_desc, o_row, oc, o_base, stride_om, start_m + WG * HALF, N, o_layout)


# The partitions: constexpr arguments reach a partition as runtime values on triton 3.6, so the warpgroup
# number and PV_FRESH are bound here, one wrapper per combination.
@gluon.jit
def _fp8_consumer0(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    QScale,
    KScale,
    VScale,
    q_srow,
    k_srow,
    v_srow,
    qk_scale,
):
    _fp8_consume(
        o_base,
        stride_om,
        o_desc,
        o_row,
        oc,
        q_smem,
        k_smem,
        v_smem,
        o_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        QScale,
        KScale,
        VScale,
        q_srow,
        k_srow,
        v_srow,
        qk_scale,
        0,
        True,
    )


@gluon.jit
def _fp8_consumer1(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    QScale,
    KScale,
    VScale,
    q_srow,
    k_srow,
    v_srow,
    qk_scale,
):
    _fp8_consume(
        o_base,
        stride_om,
        o_desc,
        o_row,
        oc,
        q_smem,
        k_smem,
        v_smem,
        o_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        QScale,
        KScale,
        VScale,
        q_srow,
        k_srow,
        v_srow,
        qk_scale,
        1,
        True,
    )


@gluon.jit
def _fp8_consumer0_acc(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    QScale,
    KScale,
    VScale,
    q_srow,
    k_srow,
    v_srow,
    qk_scale,
):
    _fp8_consume(
        o_base,
        stride_om,
        o_desc,
        o_row,
        oc,
        q_smem,
        k_smem,
        v_smem,
        o_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        QScale,
        KScale,
        VScale,
        q_srow,
        k_srow,
        v_srow,
        qk_scale,
        0,
        False,
    )


@gluon.jit
def _fp8_consumer1_acc(
    o_base,
    stride_om,
    o_desc,
    o_row,
    oc,
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    q_bar,
    ready,
    empty,
    Words,
    e0,
    cnt,
    first,
    start_m,
    N,
    QScale,
    KScale,
    VScale,
    q_srow,
    k_srow,
    v_srow,
    qk_scale,
):
    _fp8_consume(
        o_base,
        stride_om,
        o_desc,
        o_row,
        oc,
        q_smem,
        k_smem,
        v_smem,
        o_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        QScale,
        KScale,
        VScale,
        q_srow,
        k_srow,
        v_srow,
        qk_scale,
        1,
        False,
    )


_OUT_TERMS = ["o_batch_row", "o_head_row", "o_head_col", "stride_oz", "stride_oh", "stride_om"]


@gluon.jit(
    do_not_specialize=["N", "Mq", "Mk", *_OUT_TERMS],
    do_not_specialize_on_alignment=["Records", "Words", "QScale", "KScale", "VScale"],
)
def _gl_attn_fp8_tile(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    Out,
    Records,
    Words,
    QScale,
    KScale,
    VScale,
    o_batch_row,
    o_head_row,
    o_head_col,
    stride_oz,
    stride_oh,
    stride_om,
    H,
    N,
    Mq,
    Mk,
    REPS,
    qk_scale,
    STAGES: gl.constexpr,
    PV_FRESH: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    BM: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    tile = gl.program_id(0)
    b, h, m_blk, cnt, e0 = _gl_record(Records, tile, REPS, Mq, H)
    first = gl.load(Records + (tile // REPS) * 4 + 3) & 0xFFFF  # the first block id: its K/V goes out at once
    start_m = m_blk * BM
    bh = b * H + h
    # The codes' rows: q [B H Mq BM, D], k [B H Mk BN, D], V transposed [B H D, Mk BN]; the scales per q row,
    # per key block, per V channel.
    q_srow = bh * (Mq * BM)
    k_srow = bh * Mk
    v_srow = bh * HEAD_DIM
    o_row = b * o_batch_row + h * o_head_row
    o_base = Out + b.to(gl.int64) * stride_oz + h.to(gl.int64) * stride_oh
    q_smem = gl.allocate_shared_memory(gl.int8, [BM, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BN, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, HEAD_DIM, BN], v_desc.layout)
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [BM, HEAD_DIM], o_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=2)  # one arrival per consumer warpgroup
    consumer_args = (
        o_base,
        stride_om,
        o_desc,
        o_row,
        h * o_head_col,
        q_smem,
        k_smem,
        v_smem,
        o_smem,
        q_bar,
        ready,
        empty,
        Words,
        e0,
        cnt,
        first,
        start_m,
        N,
        QScale,
        KScale,
        VScale,
        q_srow,
        k_srow,
        v_srow,
        qk_scale,
    )
    loader_args = (
        q_desc,
        k_desc,
        v_desc,
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
        q_srow + start_m,
        bh * (Mk * BN),
        v_srow,
    )
    if PV_FRESH:
        gl.warp_specialize(
            [(_fp8_consumer0, consumer_args), (_fp8_consumer1, consumer_args), (_fp8_load, loader_args)],
            [4, 1],
            [CONSUMER_REGS, 24],
        )
    else:
        gl.warp_specialize(
            [(_fp8_consumer0_acc, consumer_args), (_fp8_consumer1_acc, consumer_args), (_fp8_load, loader_args)],
            [4, 1],
            [CONSUMER_REGS, 24],
        )
    mbarrier.invalidate(q_bar)
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(st))
        mbarrier.invalidate(empty.index(st))


def why_not(out: torch.Tensor, block_size: tuple[int, int]) -> str | None:
    """Why this kernel cannot take a call writing `out` [B, H, N, D] (None: it can)."""
    if out.device.type != "cuda":
        return f"Gluon runs on CUDA GPUs, not {out.device.type}"
    cap = torch.cuda.get_device_capability(out.device)
    if cap[0] != 9:
        return f"the Gluon fp8 kernel is sm_90 code; this GPU is sm_{cap[0]}{cap[1]}"
    if tuple(block_size) != (BLOCK, BLOCK):
        return f"block {tuple(block_size)} (the Gluon fp8 kernel takes {BLOCK} x {BLOCK})"
    if out.shape[-1] not in (64, 128):
        return f"head dim {out.shape[-1]} (the Gluon fp8 kernel takes 64 or 128)"
    if out.dtype not in (torch.bfloat16, torch.float16):
        return f"output dtype {out.dtype} (the Gluon fp8 kernel writes bf16 or fp16)"
    return None


def _descriptors(qz: Fp8QKV, out: torch.Tensor):
    """Host-side TMA descriptors over the codes as 2-d arrays of rows (q, k: [B H rows, D]; V transposed:
    [B H D, keys]) and the output's row view (`attn_gluon._row_view`)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    D = out.shape[-1]
    bm, bn = qz.block_size

    def desc(t, block):
        t2 = t.reshape(-1, t.shape[-1])
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.int8 if t.dtype == torch.int8 else gl.float8e4nv)
        return TensorDescriptor(
            base=t2, shape=list(t2.shape), strides=[t2.shape[1], 1], block_shape=block, layout=layout
        )

    return desc(qz.q8, [bm, D]), desc(qz.k8, [bn, D]), desc(qz.v8t, [D, bn]), _row_view(out, BLOCK // 2)


def attention_fp8_gluon(
    qz: Fp8QKV,
    index: BlockIndex,
    out: torch.Tensor,
    *,
    scale: float | None = None,
    stages: int = DEFAULT_STAGES,
    pv_fresh: bool = PV_FRESH,
) -> torch.Tensor:
    """The attention launch on codes from `attn_fp8.quantize_qkv`, written into `out` [B, H, N, D]. The call
    must pass `why_not`; an output in a layout the row view cannot describe is computed into a temporary and
    copied."""
    why = why_not(out, qz.block_size)
    if why is not None:
        raise ValueError(why)
    if not _row_view_ok(out) or out.stride(-1) != 1 or (out.stride(2) * out.element_size()) % 16:
        tmp = torch.empty(out.shape, device=out.device, dtype=out.dtype)
        attention_fp8_gluon(qz, index, tmp, scale=scale, stages=stages, pv_fresh=pv_fresh)
        return out.copy_(tmp)
    B, H, N, D = out.shape
    Mq, Mk = triton.cdiv(N, BLOCK), triton.cdiv(N, BLOCK)
    reps = B // index.counts.shape[0]
    num_tiles = index.counts.shape[0] * H * Mq * reps
    if num_tiles == 0:
        return out
    from .index import index_on_device, index_words

    counts, offsets, ids, id_words, schedule = index_on_device(index, out.device)
    words = ids if id_words else index_words(ids)
    records, _ = cached_records(index, out.device, False, reps)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _gl_attn_fp8_tile[(num_tiles,)](
        *_descriptors(qz, out),
        out,
        records,
        words,
        qz.q_scale,
        qz.k_scale,
        qz.v_scale,
        *_row_terms(out),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        H,
        N,
        Mq,
        Mk,
        reps,
        scale * LOG2E,
        STAGES=stages,
        PV_FRESH=pv_fresh,
        CONSUMER_REGS=CONSUMER_REGS,
        num_warps=4,
    )
    return out


def aot_source_args(out_dtype: torch.dtype, head_dim: int, stages: int = DEFAULT_STAGES, pv_fresh: bool = PV_FRESH):
    """(signature, constexprs, attrs, options) of `_gl_attn_fp8_tile` for `triton.compile(GluonASTSource(...))`
    without a GPU."""
    import inspect

    if out_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Gluon fp8 kernel writes bf16/fp16, not {out_dtype}")
    names = list(inspect.signature(_gl_attn_fp8_tile.fn).parameters)
    consts = dict(STAGES=stages, PV_FRESH=pv_fresh, CONSUMER_REGS=CONSUMER_REGS, num_warps=4)
    elem, gdt = ("bf16", gl.bfloat16) if out_dtype == torch.bfloat16 else ("fp16", gl.float16)
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("Records", "Words"):
            sig[n] = "*i32"
        elif n in ("QScale", "KScale", "VScale"):
            sig[n] = "*fp32"
        elif n == "Out":
            sig[n] = f"*{elem}"
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i32"
    for n, dt, block in (
        ("q_desc", ("i8", gl.int8), [BLOCK, head_dim]),
        ("k_desc", ("i8", gl.int8), [BLOCK, head_dim]),
        ("v_desc", ("fp8e4nv", gl.float8e4nv), [head_dim, BLOCK]),
    ):
        layout = gl.NVMMASharedLayout.get_default_for(block, dt[1])
        sig[n] = f"tensordesc<{dt[0]}[{block[0]}, {block[1]}],{layout!r}>"
    o_layout = gl.NVMMASharedLayout.get_default_for([BLOCK, head_dim], gdt)
    sig["o_desc"] = f"tensordesc<{elem}[{BLOCK // 2}, {head_dim}],{o_layout!r}>"
    attrs = {(names.index("Out"),): [["tt.divisibility", 16]]}
    return sig, consts, attrs, {"num_warps": 4}


def kernel_fns() -> list:
    return [_gl_attn_fp8_tile]
