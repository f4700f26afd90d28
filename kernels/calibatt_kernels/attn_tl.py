"""Block-sparse flash-attention forward (Triton).

What it computes: for every (batch b, head h, query block i) the query rows of block i attend to the keys
of exactly the key blocks that the mask row (b, h, i) lists, with a softmax over those keys only:

    out[b, h, rows(i)] = softmax(q[rows(i)] @ k[cols]^T * scale) @ v[cols],   cols = keys of listed blocks

A row that lists no block gives zeros. The reference is `reference.block_sparse_attention_ref`.

The mask arrives as data (`index.BlockIndex`: per-row block counts, and ascending block lists stored as
compressed rows), so one binary serves every mask and every sequence length of a (tile shape, head dim,
dtype) class. The block
size the caller passes is the mask granularity; the kernel tile may split it (BLOCK_M | BM, BLOCK_N | BN).
The softmax runs in base 2 with scale * log2(e) folded into one multiply. Keys >= N are masked in the
last listed block only (blocks are listed in ascending order, so only that one can be partial).

Memory access: on Hopper each program builds 2-D TMA descriptors over its (b, h) slice ([N, D] with the
tensor's row stride), so any strides with a contiguous head dim work without a copy, reads past N are
zero-filled and writes past N are dropped. Elsewhere (the CPU interpreter, Ampere, odd strides) it uses
plain pointer loads with masks.

Work order: programs take (mask row, sub-tile) pairs in the order of `index.schedule` (rows with the most
blocks first, LPT), either one program per tile or a persistent grid of one program per SM that strides
through the same order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import LOG2E, KernelConfig, aot_signature, check_attention_call, num_sms, triton_usable
from .index import BlockIndex, index_on_device


def default_config(device: torch.device, block_size: tuple[int, int]) -> KernelConfig:
    """The tl kernel's best config on an H200 (bench/NOTES.md: persistent LPT grid, 3 stages, TMA); the CPU
    interpreter runs one program per tile."""
    if device.type != "cuda":
        return KernelConfig(kernel="tl_tile", num_warps=4, num_stages=1)
    return KernelConfig(num_warps=8 if block_size[0] >= 128 else 4)


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, v, qk_scale):
    """The online-softmax update of a full tile's scores qk, then acc += p @ v."""
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_ij)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _attn_step(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    k_ptrs,
    v_ptrs,
    start_n,
    N,
    qk_scale,
    stride_kn,
    stride_vn,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key tile [start_n, start_n + BLOCK_N) of the online softmax."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:
        k = K.load([start_n, 0])
        v = V.load([start_n, 0])
    else:
        if MASK_KEYS:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=(offs_n < N)[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=(offs_n < N)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
    if UPCAST:  # the interpreter's bf16/fp16 dot is wrong: compute in fp32 there
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k))
    if MASK_KEYS:
        qk = tl.where((offs_n < N)[None, :], qk, float("-inf"))
    return _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)


@triton.jit
def _load_tile(T, t_ptrs, start_n, stride_tn, USE_TMA: tl.constexpr, UPCAST: tl.constexpr):
    """One full key (or value) tile starting at start_n."""
    if USE_TMA:
        t = T.load([start_n, 0])
    else:
        t = tl.load(t_ptrs + start_n * stride_tn)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _block_id(Indices, e, ID_WORDS: tl.constexpr):
    """Block id number e of the index. ID_WORDS: int16 ids read as the int32 words that hold two each
    (little-endian); else int32 ids. Why not an int16 load: with one, triton's software pipeliner gives the
    K/V loads an extra stage (+64 KiB shared memory at 128x128x128: the 3-stage configs no longer fit)."""
    if ID_WORDS:
        w = tl.load(Indices + (e >> 1))
        return (w >> ((e & 1) * 16)) & 0xFFFF
    else:
        return tl.load(Indices + e)


@triton.jit
def _tile_row(
    tile,
    Counts,
    Offsets,
    Schedule,
    stride_cz,
    stride_ch,
    H,
    Mq,
    REPS,
    BM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_SCHEDULE: tl.constexpr,
):
    """Program tile -> (batch b, head h, b * H + h, its first query row start_m, the mask row's block count,
    where its ids start in Indices, counted in int16 ids). Tiles follow the rows' LPT order (Schedule), and a
    row's batch copies and BLOCK_M sub-tiles stay adjacent."""
    M_SUB: tl.constexpr = BM // BLOCK_M  # program tiles per mask row
    per_row = REPS * M_SUB
    pos = tile // per_row
    rep = (tile % per_row) // M_SUB
    sub = tile % M_SUB
    if HAS_SCHEDULE:
        row = tl.load(Schedule + pos)
    else:
        row = pos
    m_blk = row % Mq
    h = (row // Mq) % H
    bi = row // (Mq * H)
    b = bi + rep  # index batch of 1 broadcasts (bi = 0); of B keeps rep = 0
    bh = b * H + h
    start_m = m_blk * BM + sub * BLOCK_M
    row_off = bi * stride_cz + h * stride_ch + m_blk  # Counts and Offsets share one contiguous layout
    cnt = tl.load(Counts + row_off)
    e0 = tl.load(Offsets + row_off)
    return b, h, bh, start_m, cnt, e0


@triton.jit
def _block_sparse_tile(
    tile,
    Q,
    K,
    V,
    Out,
    Counts,
    Offsets,
    Indices,
    Schedule,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    stride_cz,
    stride_ch,
    H,
    N,
    Mq,
    REPS,
    qk_scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_SCHEDULE: tl.constexpr,
    USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    Lse,
    stride_lz,
    stride_lh,
    RETURN_LSE: tl.constexpr,
    PIPELINE_QK: tl.constexpr,
    ID_WORDS: tl.constexpr,
):
    """One program tile: BLOCK_M query rows of one mask row, over all key blocks the row lists."""
    N_SUB: tl.constexpr = BN // BLOCK_N  # key tiles per mask block
    b, h, _, start_m, cnt, e0 = _tile_row(
        tile, Counts, Offsets, Schedule, stride_cz, stride_ch, H, Mq, REPS, BM, BLOCK_M, HAS_SCHEDULE
    )

    q_off = b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
    k_off = b.to(tl.int64) * stride_kz + h.to(tl.int64) * stride_kh
    v_off = b.to(tl.int64) * stride_vz + h.to(tl.int64) * stride_vh
    o_off = b.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    if USE_TMA:
        desc_q = tl.make_tensor_descriptor(
            Q + q_off, shape=[N, HEAD_DIM], strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        desc_k = tl.make_tensor_descriptor(
            K + k_off, shape=[N, HEAD_DIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        desc_v = tl.make_tensor_descriptor(
            V + v_off, shape=[N, HEAD_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM]
        )
        desc_o = tl.make_tensor_descriptor(
            Out + o_off, shape=[N, HEAD_DIM], strides=[stride_om, 1], block_shape=[BLOCK_M, HEAD_DIM]
        )
        q = desc_q.load([start_m, 0])
        k_ptrs = K
        v_ptrs = V
    else:
        desc_k = K
        desc_v = V
        q = tl.load(
            Q + q_off + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=(offs_m < N)[:, None], other=0.0
        )
        k_ptrs = K + k_off + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = V + v_off + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # All listed blocks but the last are full; the last one may hold keys >= N.
    n_full = tl.maximum(cnt - 1, 0) * N_SUB
    if PIPELINE_QK:
        if n_full > 0:
            # qk of tile j+1 is issued before the softmax and PV of tile j (which it does not depend on)
            prev_n = _block_id(Indices, e0, ID_WORDS) * BN
            qk = tl.dot(q, tl.trans(_load_tile(desc_k, k_ptrs, prev_n, stride_kn, USE_TMA, UPCAST)))
            for j in tl.range(1, n_full):
                start_n = _block_id(Indices, e0 + j // N_SUB, ID_WORDS) * BN + (j % N_SUB) * BLOCK_N
                qk_next = tl.dot(q, tl.trans(_load_tile(desc_k, k_ptrs, start_n, stride_kn, USE_TMA, UPCAST)))
                v = _load_tile(desc_v, v_ptrs, prev_n, stride_vn, USE_TMA, UPCAST)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
                qk = qk_next
                prev_n = start_n
            v = _load_tile(desc_v, v_ptrs, prev_n, stride_vn, USE_TMA, UPCAST)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
    else:
        for j in tl.range(0, n_full, warp_specialize=WARP_SPECIALIZE):
            start_n = _block_id(Indices, e0 + j // N_SUB, ID_WORDS) * BN + (j % N_SUB) * BLOCK_N
            acc, l_i, m_i = _attn_step(
                acc,
                l_i,
                m_i,
                q,
                desc_k,
                desc_v,
                k_ptrs,
                v_ptrs,
                start_n,
                N,
                qk_scale,
                stride_kn,
                stride_vn,
                BLOCK_N,
                False,
                USE_TMA,
                UPCAST,
            )
    if cnt > 0:
        last = _block_id(Indices, e0 + cnt - 1, ID_WORDS) * BN
        for s in tl.static_range(N_SUB):
            acc, l_i, m_i = _attn_step(
                acc,
                l_i,
                m_i,
                q,
                desc_k,
                desc_v,
                k_ptrs,
                v_ptrs,
                last + s * BLOCK_N,
                N,
                qk_scale,
                stride_kn,
                stride_vn,
                BLOCK_N,
                True,
                USE_TMA,
                UPCAST,
            )
    if RETURN_LSE:  # the row's natural-log sum-exp of scaled scores (-inf if empty), to merge partial attentions
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # m_i, l_i are in base 2
        tl.store(Lse + b.to(tl.int64) * stride_lz + h.to(tl.int64) * stride_lh + offs_m, lse, mask=offs_m < N)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # an empty row: acc is 0, write 0
    out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    if USE_TMA:
        desc_o.store([start_m, 0], out)
    else:
        tl.store(
            Out + o_off + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out, mask=(offs_m < N)[:, None]
        )


# The index pointers are read one scalar at a time, so their alignment buys nothing; specialising on it would
# compile a second binary whenever a plan hands the kernel a per-bucket view that is not 16-byte aligned
# (a [buckets, B, H, Mq] stack's second bucket starts 4 * B * H * Mq bytes in), which `generate --strict`
# reports as a compilation at the first step of that bucket.
INDEX_POINTERS = ("Counts", "Offsets", "Indices", "Schedule")


@triton.jit(
    do_not_specialize=["N", "Mq", "num_tiles", "stride_cz", "stride_ch", "stride_lz", "stride_lh"],
    do_not_specialize_on_alignment=INDEX_POINTERS,
)
def _block_sparse_fwd(
    Q,
    K,
    V,
    Out,
    Counts,
    Offsets,
    Indices,
    Schedule,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    stride_cz,
    stride_ch,
    H,
    N,
    Mq,
    num_tiles,
    REPS,
    qk_scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_SCHEDULE: tl.constexpr,
    PERSISTENT: tl.constexpr,
    USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    Lse,
    stride_lz,
    stride_lh,
    RETURN_LSE: tl.constexpr,  # optional row LSE out, float32 [B, H, N]
    PIPELINE_QK: tl.constexpr,  # see KernelConfig.tl_pipeline_qk
    ID_WORDS: tl.constexpr,  # int16 block ids read as int32 words (_block_id); False: int32 ids
):
    pid = tl.program_id(0)
    if PERSISTENT:
        for tile in range(pid, num_tiles, tl.num_programs(0)):
            _block_sparse_tile(
                tile,
                Q,
                K,
                V,
                Out,
                Counts,
                Offsets,
                Indices,
                Schedule,
                stride_qz,
                stride_qh,
                stride_qm,
                stride_qd,
                stride_kz,
                stride_kh,
                stride_kn,
                stride_kd,
                stride_vz,
                stride_vh,
                stride_vn,
                stride_vd,
                stride_oz,
                stride_oh,
                stride_om,
                stride_od,
                stride_cz,
                stride_ch,
                H,
                N,
                Mq,
                REPS,
                qk_scale,
                BM,
                BN,
                BLOCK_M,
                BLOCK_N,
                HEAD_DIM,
                HAS_SCHEDULE,
                USE_TMA,
                UPCAST,
                WARP_SPECIALIZE,
                Lse,
                stride_lz,
                stride_lh,
                RETURN_LSE,
                PIPELINE_QK,
                ID_WORDS,
            )
    else:
        _block_sparse_tile(
            pid,
            Q,
            K,
            V,
            Out,
            Counts,
            Offsets,
            Indices,
            Schedule,
            stride_qz,
            stride_qh,
            stride_qm,
            stride_qd,
            stride_kz,
            stride_kh,
            stride_kn,
            stride_kd,
            stride_vz,
            stride_vh,
            stride_vn,
            stride_vd,
            stride_oz,
            stride_oh,
            stride_om,
            stride_od,
            stride_cz,
            stride_ch,
            H,
            N,
            Mq,
            REPS,
            qk_scale,
            BM,
            BN,
            BLOCK_M,
            BLOCK_N,
            HEAD_DIM,
            HAS_SCHEDULE,
            USE_TMA,
            UPCAST,
            WARP_SPECIALIZE,
            Lse,
            stride_lz,
            stride_lh,
            RETURN_LSE,
            PIPELINE_QK,
            ID_WORDS,
        )


def _tma_ok(*ts: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 and (t.stride(-2) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in ts)


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def supports(q: torch.Tensor, block_size: tuple[int, int], *, return_lse: bool = False) -> bool:
    """Whether the tl kernel can take a call on q's device: a Hopper/Ampere GPU, or the CPU under
    TRITON_INTERPRET=1; head dim 64 or 128."""
    return triton_usable(q.device) and q.shape[-1] in (64, 128)


def block_sparse_attention_tl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, N, D] (any strides), index over [Bi, H, Mq] rows with Bi in {1, B}.

    Returns [B, H, N, D] in q's dtype and memory layout (or writes `out`, which must have q's shape).
    With `return_lse`, returns (out, lse): lse float32 [B, H, N] = log sum_j exp(scale * q.k_j) over each row's
    listed keys, -inf for a row with no block (joint attention merges partial attentions with it)."""
    out = check_attention_call(q, k, v, index, block_size, out)
    B, H, N, D = q.shape
    BM, BN = block_size
    Mq = triton.cdiv(N, BM)
    Bi = index.counts.shape[0]

    cfg = config or default_config(q.device, block_size)
    if cfg.backend != "tl":
        raise ValueError(f"{cfg.kernel} is not a tl kernel config (calibatt_kernels.dispatch chooses the backend)")
    block_m = cfg.block_m or BM
    block_n = cfg.block_n or BN
    if BM % block_m or BN % block_n:
        raise ValueError(f"kernel tile ({block_m}, {block_n}) must divide the mask block {block_size}")
    on_gpu = q.device.type == "cuda"
    use_tma = cfg.use_tma
    if use_tma is None:
        use_tma = on_gpu and torch.cuda.get_device_capability(q.device)[0] >= 9
    use_tma = bool(use_tma) and _tma_ok(q, k, v, out)
    if use_tma:
        triton.set_allocator(_tma_allocator)

    counts, offsets, indices, id_words, schedule = index_on_device(index, q.device)
    reps = B // Bi
    num_tiles = Bi * H * Mq * reps * (BM // block_m)
    if cfg.persistent:  # (the interpreter gets 3 programs, to exercise the striding)
        grid = (min(num_tiles, num_sms(q.device) if on_gpu else 3),)
    else:
        grid = (num_tiles,)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    lse = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None
    if num_tiles == 0:
        return (out, lse) if return_lse else out

    _block_sparse_fwd[grid](
        q,
        k,
        v,
        out,
        counts,
        offsets,
        indices,
        schedule if schedule is not None else counts,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        counts.stride(0),
        counts.stride(1),
        H,
        N,
        Mq,
        num_tiles,
        reps,
        scale * LOG2E,
        Lse=lse if return_lse else out,
        stride_lz=lse.stride(0) if return_lse else 0,
        stride_lh=lse.stride(1) if return_lse else 0,
        **_constexprs(
            cfg,
            block_size,
            D,
            use_tma=use_tma,
            on_gpu=on_gpu,
            has_schedule=schedule is not None,
            return_lse=return_lse,
            id_words=id_words,
        ),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return (out, lse) if return_lse else out


def _constexprs(
    cfg: KernelConfig,
    block_size: tuple[int, int],
    head_dim: int,
    *,
    use_tma: bool,
    on_gpu: bool,
    has_schedule: bool,
    return_lse: bool = False,
    id_words: bool = True,
) -> dict:
    """The kernel's constexprs for a config: shared by the launcher and the ahead-of-time compiler."""
    BM, BN = block_size
    return dict(
        BM=BM,
        BN=BN,
        BLOCK_M=cfg.block_m or BM,
        BLOCK_N=cfg.block_n or BN,
        HEAD_DIM=head_dim,
        HAS_SCHEDULE=has_schedule,
        PERSISTENT=cfg.persistent,
        USE_TMA=use_tma,
        UPCAST=not on_gpu,
        WARP_SPECIALIZE=bool(cfg.tl_warp_specialize and on_gpu),
        RETURN_LSE=return_lse,
        PIPELINE_QK=bool(cfg.tl_pipeline_qk),
        ID_WORDS=id_words,
    )


# Ahead of time: the configs `calibatt compile` measures per mask group, and the kernel's signature for
# `triton.compile(ASTSource(...), target=GPUTarget(...))` without a GPU.


def candidate_configs(capability: tuple[int, int], block_size: tuple[int, int]) -> list[KernelConfig]:
    """The tl configs worth measuring on a GPU of this compute capability (bench/NOTES.md's sweep, trimmed to
    those that won or came within a few per cent somewhere). The default config comes first."""
    BM, BN = block_size
    warps = 8 if BM >= 128 else 4
    cands = [
        KernelConfig(num_warps=warps, num_stages=3),
        KernelConfig(kernel="tl_tile", num_warps=warps, num_stages=3),
        KernelConfig(num_warps=warps, num_stages=2),
    ]
    # tl_pipeline_qk is not a candidate: in compile's tuning on an H200 it won none of 150 mask groups
    # (bench/NOTES.md), so measuring and compiling it would only slow `calibatt compile` down.
    if BN >= 128:
        cands.append(KernelConfig(block_n=BN // 2, num_warps=warps, num_stages=3))
    if BM >= 128:
        cands.append(KernelConfig(kernel="tl_tile", block_m=BM // 2, num_warps=4, num_stages=3))
    if capability[0] < 9:  # no TMA before Hopper; Ampere-class shared memory favours 2 stages
        cands = [KernelConfig(**{**c.__dict__, "use_tma": False}) for c in cands]
    return cands


def resolved_use_tma(cfg: KernelConfig, capability: tuple[int, int]) -> bool:
    """Whether the launcher takes the TMA path for this config on this GPU (for tensors whose strides allow
    it: a contiguous head dim and 16-byte aligned rows, as every model layout we serve has)."""
    return capability[0] >= 9 if cfg.use_tma is None else bool(cfg.use_tma) and capability[0] >= 9


def aot_source_args(
    cfg: KernelConfig,
    dtype: torch.dtype,
    block_size: tuple[int, int],
    head_dim: int,
    capability: tuple[int, int],
    return_lse: bool = False,
) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of `_block_sparse_fwd` for `triton.compile(ASTSource(...))`.
    The binary's hash differs from the JIT's, so this checks that a config compiles; it does not fill the
    JIT cache."""
    consts = _constexprs(
        cfg,
        block_size,
        head_dim,
        use_tma=resolved_use_tma(cfg, capability),
        on_gpu=True,
        has_schedule=True,
        return_lse=return_lse,
    )
    # Indices: mask_to_index's int16 block ids, two to an int32 word (index_words)
    sig, attrs = aot_signature(_block_sparse_fwd.arg_names, consts, dtype, i32_pointers=INDEX_POINTERS)
    return sig, consts, attrs, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def kernel_fn():
    """The JIT function the launcher runs (for the ahead-of-time tools)."""
    return _block_sparse_fwd


class TlBackend:
    """The `tl` kernel as a `dispatch` backend: every GPU from Ampere on, and the CPU interpreter."""

    name = "tl"
    is_fallback = False

    def supports(self, q, k, v, block_size, *, return_lse=False) -> bool:
        return supports(q, block_size, return_lse=return_lse)

    def default_config(self, device: torch.device, block_size: tuple[int, int]) -> KernelConfig:
        return default_config(device, block_size)

    def candidates(self, capability, block_size, head_dim, dtype=None, *, return_lse=False) -> list[KernelConfig]:
        return candidate_configs(capability, block_size)

    def launch(self, q, k, v, index, *, block_size, scale, out, config, return_lse):
        return block_sparse_attention_tl(
            q, k, v, index, block_size=block_size, scale=scale, out=out, config=config, return_lse=return_lse
        )

    def kernel_fns(self) -> list:
        return [_block_sparse_fwd]

    def aot_source(self, config, dtype, block_size, head_dim, capability, return_lse=False):
        from triton.compiler import ASTSource

        sig, consts, attrs, opts = aot_source_args(config, dtype, block_size, head_dim, capability, return_lse)
        return ASTSource(_block_sparse_fwd, sig, consts, attrs), opts

    def prewarm(self, configs, index, *, device, dtype, head_dim, return_lse=False) -> None:
        pass  # nothing beyond the launch binaries


BACKEND = TlBackend()
