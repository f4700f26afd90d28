"""Block-sparse attention forward for Hopper in Gluon (v5): FA3's warp-specialized structure, so that the
softmax of one warpgroup overlaps the tensor-core work of the other and of its own P @ V -- the overlap
that Triton's `tl` compiler does not produce on sm_90 (bench/NOTES.md: 562-635 TFLOP/s on an H200 over
densities 0.1-1 at Wan 1.3B's shape, 577-634 at 14B's, against 430-489 for the tl kernel).

Same contract as `block_sparse._block_sparse_fwd` for the cases it takes (`supports`; the caller falls
back to the tl kernel otherwise): sm_90, bf16/fp16, head dim 64 or 128, kernel tile = mask block =
128 x 128, 16-byte aligned rows (TMA), heads that start on rows of the tensors' memory (`_row_view_ok`:
the contiguous layout, diffusers' and packed q/k/v views), no log-sum-exp output. The index is the same
compressed rows (counts, offsets, int16 block ids read as int32 words) and the same longest-first schedule.
Q, K and V arrive as TMA descriptors made on the host over [rows, stride_n] views (`_row_view`): making
them in each program cost 2.8 us of its ~5 us prologue (bench/trace_gluon.py, seventh session).

One program per 128-row query tile, `gl.warp_specialize` into
- a loader warp: TMA loads of Q and of the row's listed K/V blocks into a ring of STAGES buffers, each
  stage with a `ready` mbarrier (TMA bytes arrived) and an `empty` one (both consumers are done with it);
- two consumer warpgroups, 64 query rows each, running

      S = Q K0^T ;  P = softmax part of S
      for j = 1 .. n-1:
          issue S' = Q Kj^T (async) ; issue O += P V(j-1) (async)
          wait for S' only          -> its softmax overlaps P V(j-1) on the tensor cores
          wait for O ; free stage j-1 ; O *= alpha
      O += P V(n-1) ; O /= l ; store the 64 rows (rows >= N masked)

No CTA-wide barrier is left in the loop, so the two warpgroups drift apart and one's softmax runs while the
other's GEMMs do (FA3's ping-pong, left to the warp schedulers: forcing the order with mbarriers, and two
persistent variants, measured no faster; bench/NOTES.md, v6, v7 and v8).
`TRACE=True` builds a profiling variant that stamps each program's SM clock at points of its prologue,
loop and epilogue (`TRACE_SLOTS`; bench/trace_gluon.py reads them).
The tile mapping mirrors the tl kernel's (`_block_sparse_tile`); Gluon functions cannot call `tl` ones.

There is no interpreter for Gluon: CI compiles this kernel for sm_90 on the CPU, and
tests/test_kernels_gpu.py checks it against the fp32 reference on a GPU.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon ships with triton >= 3.5; older installs keep the `tl` kernel only
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later
    # releases call them async_load / async_store (and make the old names raise). Same arguments.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False


BLOCK = 128  # the one tile shape this kernel takes: mask block = kernel tile = 128 x 128
CONSUMER_REGS = 232  # registers per thread of the second consumer warpgroup (the loader warp gets 24)
# TRACE's per-program record (bench/trace_gluon.py): the SM, its cycle counter at six points, the program's
# block count, the global ns timer at its start and at warpgroup 0's end (to convert cycles to time), and the
# cycle counter at three more points of the prologue
TRACE_SLOTS = ("smid", "start", "loader_issued", "first_kv_ready", "loop_done", "stored_wg0", "stored_wg1", "count",
               "start_ns", "stored_wg0_ns", "index_read", "descriptors_made", "loader_start")
DEFAULT_STAGES = 3  # 2 stages measured 398-455 TFLOP/s: the loader cannot run ahead of the consumers


if HAVE_GLUON:

    @gluon.jit
    def _gl_block_id(Words, e):
        # int16 block ids, two to an int32 word (see block_sparse._block_id)
        w = gl.load(Words + (e >> 1))
        return (w >> ((e & 1) * 16)) & 0xFFFF

    @gluon.jit
    def _gl_origin(b, h, stride_z, stride_h, stride_n):
        """Where head (b, h) starts in a descriptor over [rows, stride_n] (see `_row_view`): (row, column)."""
        off = b.to(gl.int64) * stride_z + h.to(gl.int64) * stride_h
        return (off // stride_n).to(gl.int32), (off % stride_n).to(gl.int32)

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
    def _gl_stamp(Trace, slot, WARPS: gl.constexpr, WHAT: gl.constexpr, value):
        """Profiling (TRACE, bench/trace_gluon.py): Trace[slot] = the SM's cycle counter (WHAT 0; the global
        ns timer ticks too coarsely on some parts), the low word of %globaltimer in ns (1), the SM's id (2) or
        `value` (3), written by one thread of the calling partition. (Every argument is passed: triton 3.6
        does not take defaults for constexpr parameters of a called function.)"""
        offs = gl.arange(0, 32 * WARPS, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
        if WHAT == 3:
            t = offs * 0 + value
        elif WHAT == 2:
            t = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [offs], dtype=gl.int32, is_pure=False,
                                          pack=1)
        elif WHAT == 0:
            t = gl.inline_asm_elementwise("mov.u32 $0, %clock;", "=r,r", [offs], dtype=gl.int32, is_pure=False,
                                          pack=1)
        else:
            t = gl.inline_asm_elementwise("mov.u32 $0, %globaltimer_lo;", "=r,r", [offs], dtype=gl.int32,
                                          is_pure=False, pack=1)
        gl.store(Trace + slot + offs, t, mask=offs == 0)

    @gluon.jit
    def _ws_load(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, q_row, qc,
                 kr, kc, vr, vc, Trace, trace_at, TRACE: gl.constexpr):
        # (partition arguments are runtime values: the tile constants come from the buffers' shapes)
        STAGES: gl.constexpr = k_smem.shape[0]
        BN: gl.constexpr = k_smem.shape[1]
        if TRACE:
            _gl_stamp(Trace, trace_at + 12, 1, 0, 0)  # the loader warp starts
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row, qc], q_bar, q_smem)
        for j in range(cnt):
            stage = j % STAGES
            if j >= STAGES:  # wait until both consumers are done with the tile that last used this stage
                mbarrier.wait(empty.index(stage), ((j // STAGES) - 1) & 1)
            kn = _gl_block_id(Words, e0 + j) * BN
            bar = ready.index(stage)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [kr + kn, kc], bar, k_smem.index(stage))
            _tma_load(v_desc, [vr + kn, vc], bar, v_smem.index(stage))
            if TRACE:
                if j == 0:
                    _gl_stamp(Trace, trace_at + 2, 1, 0, 0)  # Q and the first K/V requested

    @gluon.jit
    def _ws_consumer(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0,
                     cnt, start_m, N, qk_scale, Trace, trace_at, TRACE: gl.constexpr, WG: gl.constexpr):
        dtype: gl.constexpr = q_smem.dtype
        HALF: gl.constexpr = q_smem.shape[0] // 2
        HEAD_DIM: gl.constexpr = q_smem.shape[1]
        STAGES: gl.constexpr = k_smem.shape[0]
        BN: gl.constexpr = k_smem.shape[1]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_half = q_smem.slice(WG * HALF, HALF)  # this warpgroup's 64 query rows
        m_i = gl.full([HALF], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([HALF, BN], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)
        if cnt > 0:
            kn = _gl_block_id(Words, e0) * BN
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
                s_tok = warpgroup_mma(q_half, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
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
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        l_o = gl.where(l_o == 0.0, 1.0, l_o)
        out = (acc / gl.expand_dims(l_o, 1)).to(dtype)
        if start_m + (WG + 1) * HALF <= N:
            # TMA store through this warpgroup's half of Q's buffer (only it reads those rows, and its last
            # wgmma has completed): registers -> global memory measured ~1.3 us slower per tile.
            q_half.store(out)
            fence_async_shared()
            _tma_store(o_desc, [o_row + start_m + WG * HALF, oc], q_half)
            tma.store_wait(0)
        else:
            # The head's last rows: a TMA store through the row view would run past N into the next head's
            # rows, so these go from registers with rows >= N masked.
            offs_m = start_m + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
            cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            ptrs = o_base + gl.expand_dims(offs_m.to(gl.int64) * stride_om, 1) + gl.expand_dims(cols, 0)
            gl.store(ptrs, out, mask=gl.expand_dims(offs_m < N, 1))
        if TRACE:
            _gl_stamp(Trace, trace_at + 5 + WG, 4, 0, 0)  # this warpgroup's rows are stored
            if WG == 0:
                _gl_stamp(Trace, trace_at + 9, 4, 1, 0)

    # The partitions: constexpr arguments reach a partition as runtime values on triton 3.6, so the warpgroup
    # number and TRACE are bound here, one wrapper per combination.
    @gluon.jit
    def _ws_loader(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, q_row, qc,
                   kr, kc, vr, vc, Trace, trace_at):
        _ws_load(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, q_row, qc,
                 kr, kc, vr, vc, Trace, trace_at, False)

    @gluon.jit
    def _ws_loader_traced(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt,
                          q_row, qc, kr, kc, vr, vc, Trace, trace_at):
        _ws_load(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, q_row, qc,
                 kr, kc, vr, vc, Trace, trace_at, True)

    @gluon.jit
    def _ws_consumer0(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0,
                      cnt, start_m, N, qk_scale, Trace, trace_at):
        _ws_consumer(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words,
                     e0, cnt, start_m, N, qk_scale, Trace, trace_at, False, 0)

    @gluon.jit
    def _ws_consumer1(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0,
                      cnt, start_m, N, qk_scale, Trace, trace_at):
        _ws_consumer(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words,
                     e0, cnt, start_m, N, qk_scale, Trace, trace_at, False, 1)

    @gluon.jit
    def _ws_consumer0_traced(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty,
                             Words, e0, cnt, start_m, N, qk_scale, Trace, trace_at):
        _ws_consumer(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words,
                     e0, cnt, start_m, N, qk_scale, Trace, trace_at, True, 0)

    @gluon.jit
    def _ws_consumer1_traced(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty,
                             Words, e0, cnt, start_m, N, qk_scale, Trace, trace_at):
        _ws_consumer(o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words,
                     e0, cnt, start_m, N, qk_scale, Trace, trace_at, True, 1)

    # (index pointers: no alignment specialisation, as for the tl kernel; see block_sparse.INDEX_POINTERS)
    @gluon.jit(do_not_specialize=["N", "Mq", "stride_cz", "stride_ch"],
               do_not_specialize_on_alignment=["Counts", "Offsets", "Words", "Schedule", "Trace"])
    def _gl_block_sparse_fwd(
        q_desc, k_desc, v_desc, o_desc, Out, Counts, Offsets, Words, Schedule, Trace,
        stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
        stride_vz, stride_vh, stride_vn, stride_oz, stride_oh, stride_om,
        stride_cz, stride_ch, H, N, Mq, REPS, qk_scale,
        HAS_SCHEDULE: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, TRACE: gl.constexpr,
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
        pos = tile // REPS
        rep = tile % REPS
        if HAS_SCHEDULE:
            row = gl.load(Schedule + pos)
        else:
            row = pos
        m_blk = row % Mq
        h = (row // Mq) % H
        bi = row // (Mq * H)
        b = bi + rep
        start_m = m_blk * BM
        row_off = bi * stride_cz + h * stride_ch + m_blk
        cnt = gl.load(Counts + row_off)
        e0 = gl.load(Offsets + row_off)
        if TRACE:
            _gl_stamp(Trace, trace_at + 7, 4, 3, cnt)
            _gl_stamp(Trace, trace_at + 10, 4, 0, 0)  # the index entries have arrived
        # q, k and v come as the host's descriptors over [rows, stride_n] views (`_row_view`): making four
        # descriptors here took 2.8 us of each program's ~5 us prologue (bench/trace_gluon.py, seventh session)
        qr, qc = _gl_origin(b, h, stride_qz, stride_qh, stride_qm)
        kr, kc = _gl_origin(b, h, stride_kz, stride_kh, stride_kn)
        vr, vc = _gl_origin(b, h, stride_vz, stride_vh, stride_vn)
        o_row, oc = _gl_origin(b, h, stride_oz, stride_oh, stride_om)
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
            _gl_stamp(Trace, trace_at + 11, 4, 0, 0)  # barriers set up (and, before v5 took host descriptors, 4 made)
        consumer_args = (o_base, stride_om, o_desc, o_row, oc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words,
                         e0, cnt, start_m, N, qk_scale, Trace, trace_at)
        loader_args = (k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt,
                       qr + start_m, qc, kr, kc, vr, vc, Trace, trace_at)
        if TRACE:
            gl.warp_specialize([(_ws_consumer0_traced, consumer_args), (_ws_consumer1_traced, consumer_args),
                                (_ws_loader_traced, loader_args)], [4, 1], [CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([(_ws_consumer0, consumer_args), (_ws_consumer1, consumer_args),
                                (_ws_loader, loader_args)], [4, 1], [CONSUMER_REGS, 24])
        mbarrier.invalidate(q_bar)
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(st))
            mbarrier.invalidate(empty.index(st))



def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: tuple[int, int], *,
             return_lse: bool = False) -> bool:
    """Whether the Gluon kernel takes this call (else the caller uses the `tl` kernel)."""
    if not HAVE_GLUON or return_lse or q.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if tuple(block_size) != (BLOCK, BLOCK) or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.shape[-1] not in (64, 128):
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or (t.stride(2) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
        if not _row_view_ok(t):  # host-side descriptors over a [rows, stride_n] view
            return False
    return True


def _row_view_ok(t: torch.Tensor) -> bool:
    """Whether `_row_view` can describe t: each head's rows start a row of the [rows, stride_n] view (or sit
    side by side within one, as diffusers' [B, N, H, D] heads do)."""
    B, H, N, D = t.shape
    w = t.stride(2)
    return w >= D and t.stride(0) % w == 0 and (t.stride(1) % w == 0 or (H - 1) * t.stride(1) + D <= w)


def _row_view(t: torch.Tensor, rows_per_tile: int):
    """A host-side TMA descriptor over t's memory as a 2-d [rows, t.stride(2)] array (t: [B, H, N, D]
    with unit last stride). Head (b, h) then starts at row, column divmod(b * stride_b + h * stride_h,
    stride_n) (`_gl_origin`), for the contiguous layout ([B, H, N, D]: row (b H + h) N, column 0) and for
    diffusers' ([B, N, H, D] viewed: row b N, column h D) alike. A tile that runs past N reads the next
    head's or batch's rows (or TMA's zero fill past the end): the kernel masks keys >= N out of the softmax
    and stores no output row >= N. The layout must pass `_row_view_ok` (`supports` checks it)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, N, D = t.shape
    w = t.stride(2)
    rows = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) // w + 1
    # (the 128-row tile's shared layout also for the output's 64-row halves: they are stored from halves of
    # Q's buffer)
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK, D], gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(base=t, shape=[rows, w], strides=[w, 1], block_shape=[rows_per_tile, D], layout=layout)


def block_sparse_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                 counts: torch.Tensor, offsets: torch.Tensor, words: torch.Tensor,
                                 schedule: torch.Tensor | None, *, scale: float, stages: int = DEFAULT_STAGES,
                                 trace: torch.Tensor | None = None) -> torch.Tensor:
    """Called by `block_sparse.block_sparse_attention_triton`, which validates the call, allocates `out` and
    prepares the index (`_device_index`): q, k, v, out [B, H, N, D] with unit last strides; int32 counts and
    offsets [Bi, H, Mq]; the int16 block ids as int32 words; layouts `supports` accepts. `trace` (profiling,
    bench/trace_gluon.py): int32 [programs, 13], filled with each program's SM, time stamps and block count
    (`TRACE_SLOTS`)."""
    from calibatt_kernels.block_sparse import LOG2E

    B, H, N, D = q.shape
    Mq = triton.cdiv(N, BLOCK)
    reps = B // counts.shape[0]
    num_tiles = counts.shape[0] * H * Mq * reps
    if num_tiles == 0:
        return out
    if not _row_view_ok(out):  # a caller's own output buffer of another layout: compute into q's, then copy
        tmp = torch.empty_like(q)
        block_sparse_attention_gluon(q, k, v, tmp, counts, offsets, words, schedule, scale=scale, stages=stages,
                                     trace=trace)
        return out.copy_(tmp)
    # (`supports` checked that q, k and v allow row views)
    descs = [_row_view(t, BLOCK) for t in (q, k, v)] + [_row_view(out, BLOCK // 2)]
    _gl_block_sparse_fwd[(num_tiles,)](
        *descs, out, counts, offsets, words, schedule if schedule is not None else counts,
        trace if trace is not None else counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        counts.stride(0), counts.stride(1), H, N, Mq, reps, scale * LOG2E,
        HAS_SCHEDULE=schedule is not None, STAGES=stages, CONSUMER_REGS=CONSUMER_REGS, TRACE=trace is not None,
        num_warps=4,
    )
    return out


def kernel_fn():
    """The Gluon JIT function (for the ahead-of-time tools)."""
    return _gl_block_sparse_fwd


def aot_source_args(dtype: torch.dtype, head_dim: int, stages: int = DEFAULT_STAGES):
    """(signature, constexprs, attrs, options) for `triton.compile(GluonASTSource(...))` without a GPU."""
    import inspect

    from calibatt_kernels.block_sparse import aot_signature

    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Gluon kernel takes bf16/fp16, not {dtype}")
    names = list(inspect.signature(_gl_block_sparse_fwd.fn).parameters)
    consts = dict(HAS_SCHEDULE=True, STAGES=stages, CONSUMER_REGS=CONSUMER_REGS, TRACE=False, num_warps=4)
    sig, attrs = aot_signature(names, consts, dtype, i32_pointers=("Counts", "Offsets", "Words", "Schedule", "Trace"))
    # q, k, v as host-side descriptors over [rows, stride_n] (see _row_view)
    elem, gdt = ("bf16", gl.bfloat16) if dtype == torch.bfloat16 else ("fp16", gl.float16)
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK, head_dim], gdt)
    for n in ("q_desc", "k_desc", "v_desc"):
        sig[n] = f"tensordesc<{elem}[{BLOCK}, {head_dim}],{layout!r}>"
    sig["o_desc"] = f"tensordesc<{elem}[{BLOCK // 2}, {head_dim}],{layout!r}>"
    return sig, consts, attrs, {"num_warps": 4}
