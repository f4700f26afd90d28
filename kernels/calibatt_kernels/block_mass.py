"""Block mass of dense attention (Triton), for calibration.

What it computes: mass[b, h, i, j] = mean over the valid queries of query block i of
sum over the keys of key block j of softmax(q k^T * scale) -- the share of attention that block i puts
on block j. Each row of mass sums to 1. The reference is `reference.block_mass_ref`.

It never forms the N x N matrix. Pass 1 (`_row_lse`) runs the flash-style online softmax over all keys
and stores each query's log-sum-exp (base 2). Pass 2 (`_block_mass_fwd`) recomputes the scores of each
(query block, key block) tile, turns them into probabilities with exp2(s - lse), and reduces the tile to
one number: the sum over its valid queries and keys, divided by the number of valid queries. The same
`tl.dot` produces the scores in both passes, so rows sum to 1 up to fp32 rounding.

Cost: two QK^T products and two exponentials per score, no PV product: about one dense attention call
plus an exponential pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(
    X,
    off,
    start,
    N,
    stride_n,
    stride_d,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs = start + tl.arange(0, BLOCK)
    ptrs = X + off + offs[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :] * stride_d
    if MASKED:
        x = tl.load(ptrs, mask=(offs < N)[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:  # the interpreter's bf16/fp16 dot is wrong: compute in fp32 there
        x = x.to(tl.float32)
    return x


@triton.jit
def _program_block(
    Q,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kz,
    stride_kh,
    H,
    N,
    Mq,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """This program's query block: (block row, flat b*H+h, its query tile, the key offset of its (b, h))."""
    pid = tl.program_id(0)
    m_blk = pid % Mq
    bh = pid // Mq
    b = bh // H
    h = bh % H
    q_off = b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
    k_off = b.to(tl.int64) * stride_kz + h.to(tl.int64) * stride_kh
    q = _load_rows(Q, q_off, m_blk * BLOCK_M, N, stride_qm, stride_qd, BLOCK_M, HEAD_DIM, True, UPCAST)
    return m_blk, bh, q, k_off


@triton.jit(do_not_specialize=["N", "Mq"])
def _row_lse(
    Q,
    K,
    Lse,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kd,
    H,
    N,
    Mq,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Lse[bh, row] = log2(sum_keys exp2(s)) with s = q.k * scale * log2(e), for BLOCK_M rows."""
    m_blk, bh, q, k_off = _program_block(
        Q, stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, H, N, Mq, BLOCK_M, HEAD_DIM, UPCAST
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_full = N // BLOCK_N
    for j in range(0, n_full):
        k = _load_rows(K, k_off, j * BLOCK_N, N, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, False, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_ij) + tl.sum(tl.math.exp2(s - m_ij[:, None]), 1)
        m_i = m_ij
    if n_full * BLOCK_N < N:  # the partial last key block
        start_n = n_full * BLOCK_N
        k = _load_rows(K, k_off, start_n, N, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, True, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < N)[None, :], s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_ij) + tl.sum(tl.math.exp2(s - m_ij[:, None]), 1)
        m_i = m_ij
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(Lse + bh.to(tl.int64) * Mq * BLOCK_M + offs_m, m_i + tl.math.log2(l_i))


@triton.jit(do_not_specialize=["N", "Mq", "Mk"])
def _block_mass_fwd(
    Q,
    K,
    Lse,
    Mass,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kd,
    H,
    N,
    Mq,
    Mk,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Mass[bh, i, :] for one query block i: one number per key block."""
    m_blk, bh, q, k_off = _program_block(
        Q, stride_qz, stride_qh, stride_qm, stride_qd, stride_kz, stride_kh, H, N, Mq, BLOCK_M, HEAD_DIM, UPCAST
    )
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows >= N get lse = +inf, so their probabilities are exp2(-inf) = 0.
    lse = tl.load(Lse + bh.to(tl.int64) * Mq * BLOCK_M + offs_m)
    lse = tl.where(offs_m < N, lse, float("inf"))
    inv_rows = 1.0 / tl.minimum(N - m_blk * BLOCK_M, BLOCK_M).to(tl.float32)
    mass_row = Mass + tl.program_id(0).to(tl.int64) * Mk  # one row of Mk per program
    n_full = N // BLOCK_N
    for j in range(0, n_full):
        k = _load_rows(K, k_off, j * BLOCK_N, N, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, False, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        tl.store(mass_row + j, tl.sum(tl.sum(p, 1), 0) * inv_rows)
    if n_full * BLOCK_N < N:
        start_n = n_full * BLOCK_N
        k = _load_rows(K, k_off, start_n, N, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, True, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < N)[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        tl.store(mass_row + n_full, tl.sum(tl.sum(p, 1), 0) * inv_rows)


def block_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
) -> torch.Tensor:
    """q, k [B, H, N, D] (any strides) -> float32 [B, H, Mq, Mk] block mass; each row sums to 1."""
    B, H, N, D = q.shape
    if k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError(f"q and k must match, got {tuple(q.shape)} {q.dtype} and {tuple(k.shape)} {k.dtype}")
    if D not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {D}")
    BM, BN = block_size
    Mq, Mk = triton.cdiv(N, BM), triton.cdiv(N, BN)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    on_gpu = q.device.type == "cuda"
    lse = torch.empty(B * H, Mq * BM, dtype=torch.float32, device=q.device)
    mass = torch.empty(B, H, Mq, Mk, dtype=torch.float32, device=q.device)
    if mass.numel() == 0:
        return mass
    meta = dict(
        BLOCK_M=BM,
        BLOCK_N=BN,
        HEAD_DIM=D,
        UPCAST=not on_gpu,
        num_warps=8 if (on_gpu and BM >= 128) else 4,
        num_stages=3 if on_gpu else 1,
    )
    grid = (B * H * Mq,)
    _row_lse[grid](q, k, lse, *q.stride(), *k.stride(), H, N, Mq, scale * LOG2E, **meta)
    _block_mass_fwd[grid](q, k, lse, mass, *q.stride(), *k.stride(), H, N, Mq, Mk, scale * LOG2E, **meta)
    return mass
