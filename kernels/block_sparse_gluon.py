"""Block-sparse attention forward for Hopper in Gluon (v5): FA3's warp-specialized structure, so that the
softmax of one warpgroup overlaps the tensor-core work of the other and of its own P @ V -- the overlap
that Triton's `tl` compiler does not produce on sm_90 (bench/NOTES.md: 531-641 TFLOP/s on an H200 over
densities 0.1-1, against 430-489 for the tl kernel).

Same contract as `block_sparse._block_sparse_fwd` for the cases it takes (`supports`; the caller falls
back to the tl kernel otherwise): sm_90, bf16/fp16, head dim 64 or 128, kernel tile = mask block =
128 x 128, 16-byte aligned rows (TMA), no log-sum-exp output. The index is the same compressed rows
(counts, offsets, int16 block ids read as int32 words) and the same longest-first schedule.

One program per 128-row query tile, `gl.warp_specialize` into
- a loader warp: TMA loads of Q and of the row's listed K/V blocks into a ring of STAGES buffers, each
  stage with a `ready` mbarrier (TMA bytes arrived) and an `empty` one (both consumers are done with it);
- two consumer warpgroups, 64 query rows each, running

      S = Q K0^T ;  P = softmax part of S
      for j = 1 .. n-1:
          issue S' = Q Kj^T (async) ; issue O += P V(j-1) (async)
          wait for S' only          -> its softmax overlaps P V(j-1) on the tensor cores
          wait for O ; free stage j-1 ; O *= alpha
      O += P V(n-1) ; O /= l ; TMA store of the 64 rows

No CTA-wide barrier is left in the loop, so the two warpgroups drift apart and one's softmax runs while the
other's GEMMs do (FA3's ping-pong, left to the warp schedulers: forcing the order with mbarriers, and a
persistent variant, measured no faster; bench/NOTES.md, v6 and v7).
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
DEFAULT_STAGES = 3  # 2 stages measured 398-455 TFLOP/s: the loader cannot run ahead of the consumers


if HAVE_GLUON:

    @gluon.jit
    def _gl_block_id(Words, e):
        # int16 block ids, two to an int32 word (see block_sparse._block_id)
        w = gl.load(Words + (e >> 1))
        return (w >> ((e & 1) * 16)) & 0xFFFF

    @gluon.jit
    def _gl_issue_kv(k_desc, v_desc, k_smem, v_smem, bars, stage, kn, pred):
        bar = bars.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
        _tma_load(k_desc, [kn, 0], bar, k_smem.index(stage), pred=pred)
        _tma_load(v_desc, [kn, 0], bar, v_smem.index(stage), pred=pred)

    @gluon.jit
    def _gl_head_desc(T, b, h, stride_z, stride_h, stride_n, N, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                      layout: gl.constexpr):
        """A TMA descriptor over the [N, HEAD_DIM] rows of batch b, head h, in tiles of ROWS rows."""
        return tma.make_tensor_descriptor(T + b.to(gl.int64) * stride_z + h.to(gl.int64) * stride_h,
                                          shape=[N, HEAD_DIM], strides=[stride_n, 1],
                                          block_shape=[ROWS, HEAD_DIM], layout=layout)

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
    def _ws_loader(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, start_m):
        # (partition arguments are runtime values: the tile constants come from the buffers' shapes)
        STAGES: gl.constexpr = k_smem.shape[0]
        BN: gl.constexpr = k_smem.shape[1]
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [start_m, 0], q_bar, q_smem)
        for j in range(cnt):
            stage = j % STAGES
            if j >= STAGES:  # wait until both consumers are done with the tile that last used this stage
                mbarrier.wait(empty.index(stage), ((j // STAGES) - 1) & 1)
            kn = _gl_block_id(Words, e0 + j) * BN
            _gl_issue_kv(k_desc, v_desc, k_smem, v_smem, ready, stage, kn, True)

    @gluon.jit
    def _ws_consumer(o_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, start_m, N, qk_scale,
                     WG: gl.constexpr):
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
            acc = warpgroup_mma(p_op, v_smem.index((cnt - 1) % STAGES), acc)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        l_o = gl.where(l_o == 0.0, 1.0, l_o)
        out = (acc / gl.expand_dims(l_o, 1)).to(dtype)
        q_half.store(out)  # only this warpgroup reads these Q rows, and its last wgmma has completed
        fence_async_shared()
        _tma_store(o_desc, [start_m + WG * HALF, 0], q_half)
        tma.store_wait(0)

    @gluon.jit
    def _ws_consumer1(o_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, start_m, N, qk_scale):
        _ws_consumer(o_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, start_m, N, qk_scale, 1)

    @gluon.jit
    def _ws_consumer0(o_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, start_m, N, qk_scale):
        _ws_consumer(o_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, start_m, N, qk_scale, 0)

    # (index pointers: no alignment specialisation, as for the tl kernel; see block_sparse.INDEX_POINTERS)
    @gluon.jit(do_not_specialize=["N", "Mq", "stride_cz", "stride_ch"],
               do_not_specialize_on_alignment=["Counts", "Offsets", "Words", "Schedule"])
    def _gl_block_sparse_fwd(
        Q, K, V, Out, Counts, Offsets, Words, Schedule,
        stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
        stride_vz, stride_vh, stride_vn, stride_oz, stride_oh, stride_om,
        stride_cz, stride_ch, H, N, Mq, REPS, qk_scale,
        BM: gl.constexpr, BN: gl.constexpr, HEAD_DIM: gl.constexpr, HAS_SCHEDULE: gl.constexpr,
        STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
        dtype: gl.constexpr = Q.dtype.element_ty
        HALF: gl.constexpr = BM // 2
        tile = gl.program_id(0)
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
        smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, HEAD_DIM], dtype)
        q_desc = _gl_head_desc(Q, b, h, stride_qz, stride_qh, stride_qm, N, BM, HEAD_DIM, smem_layout)
        k_desc = _gl_head_desc(K, b, h, stride_kz, stride_kh, stride_kn, N, BN, HEAD_DIM, smem_layout)
        v_desc = _gl_head_desc(V, b, h, stride_vz, stride_vh, stride_vn, N, BN, HEAD_DIM, smem_layout)
        o_desc = _gl_head_desc(Out, b, h, stride_oz, stride_oh, stride_om, N, HALF, HEAD_DIM, smem_layout)
        q_smem = gl.allocate_shared_memory(dtype, [BM, HEAD_DIM], smem_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], smem_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], smem_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=2)  # one arrival per consumer warpgroup
        consumer_args = (o_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt, start_m, N, qk_scale)
        gl.warp_specialize([
            (_ws_consumer0, consumer_args),
            (_ws_consumer1, consumer_args),
            (_ws_loader, (k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, Words, e0, cnt,
                          start_m)),
        ], [4, 1], [CONSUMER_REGS, 24])
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
    return True


def block_sparse_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                 counts: torch.Tensor, offsets: torch.Tensor, words: torch.Tensor,
                                 schedule: torch.Tensor | None, *, scale: float, stages: int = DEFAULT_STAGES
                                 ) -> torch.Tensor:
    """Called by `block_sparse.block_sparse_attention_triton`, which validates the call, allocates `out` and
    prepares the index (`_device_index`): q, k, v, out [B, H, N, D] with unit last strides; int32 counts and
    offsets [Bi, H, Mq]; the int16 block ids as int32 words."""
    from .block_sparse import LOG2E, _tma_allocator

    B, H, N, D = q.shape
    Mq = triton.cdiv(N, BLOCK)
    reps = B // counts.shape[0]
    grid = (counts.shape[0] * H * Mq * reps,)
    if grid[0] == 0:
        return out
    triton.set_allocator(_tma_allocator)  # scratch for the device-side TMA descriptors
    _gl_block_sparse_fwd[grid](
        q, k, v, out, counts, offsets, words, schedule if schedule is not None else counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        counts.stride(0), counts.stride(1), H, N, Mq, reps, scale * LOG2E,
        BM=BLOCK, BN=BLOCK, HEAD_DIM=D, HAS_SCHEDULE=schedule is not None, STAGES=stages,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
    )
    return out


def kernel_fn():
    """The Gluon JIT function (for the ahead-of-time tools)."""
    return _gl_block_sparse_fwd


def aot_source_args(dtype: torch.dtype, head_dim: int, stages: int = DEFAULT_STAGES):
    """(signature, constexprs, attrs, options) for `triton.compile(GluonASTSource(...))` without a GPU."""
    import inspect

    from .block_sparse import aot_signature

    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Gluon kernel takes bf16/fp16, not {dtype}")
    names = list(inspect.signature(_gl_block_sparse_fwd.fn).parameters)
    consts = dict(BM=BLOCK, BN=BLOCK, HEAD_DIM=head_dim, HAS_SCHEDULE=True, STAGES=stages,
                  CONSUMER_REGS=CONSUMER_REGS, num_warps=4)
    sig, attrs = aot_signature(names, consts, dtype, i32_pointers=("Counts", "Offsets", "Words", "Schedule"))
    return sig, consts, attrs, {"num_warps": 4}
