"""The quantized attention scheme behind `precision: fp8`, in PyTorch: what `attn_fp8.py` computes, element
for element.

Naive FP8 attention (one scale per tensor, Q.K^T and P.V in e4m3) ruins video: DiT keys carry a few channels
with a large offset common to every token, and a per-tensor scale then spends the codes on that offset, not on
what tells the keys apart. The scheme follows SageAttention 2 (INT8 Q.K^T with K smoothing, FP8 P.V):

- K is smoothed: its mean over the tokens of a head is subtracted before quantizing. That is exact for the
  softmax: q.(k_j - m) = q.k_j - q.m shifts every score of a query row by one constant.
- Q.K^T runs in INT8 (int32 accumulation, exact): e4m3's 3 mantissa bits give each element ~2.4 % rms error,
  INT8 under a block's amax ~1 %, and the scores' error sets how far the softmax moves. Q gets one scale
  per token (largest |q| / 127): free in the kernel, where it folds into the row's softmax scale, and a
  per-token quantity that a per-token pass (the q/k norm + RoPE kernel) can produce. K gets one scale per
  (head, key block of BN tokens), after smoothing: one scalar per key tile, folded into the same multiply.
- P.V runs in FP8 e4m3 with V scaled per (head, channel) over all tokens (applied once to the output) and
  P = exp2(s - m + 8), whose largest element is 2^8 = 256, exact in e4m3: no overflow, and the 2^8 cancels in
  out = acc / l, since the row sum l is taken of the same P (fp32, before the cast). m is the online softmax's
  running row max after each key block, as the kernel keeps it, so the reference casts the P the kernel does.
- Two-level accumulation: each key block's P @ V goes into a fresh fp32 accumulator, then into the running
  output (acc * alpha + block), so the tensor cores' reduced-precision fp8 accumulation sums only one block.

Inputs as `reference.block_sparse_attention_ref`: q, k, v [B, H, N, D], a block mask [(B,) H, Mq, Mk] and
the block size. The quantized tensors are padded with zeros to whole blocks (Q to Mq * BM rows, K and V to
Mk * BN), and V is stored transposed ([B, H, D, Nk]): Hopper's 8-bit tensor-core instructions take the
reduction dim contiguous in both operands, which for P.V is the key dim of V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import LOG2E
from .reference import _batched_mask, num_blocks

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
INT8_MAX = 127.0  # symmetric INT8 codes: -127..127
P_LOG2 = 8.0  # P's largest element is 2^P_LOG2, exact in e4m3
TINY = 1e-30  # a floor under every amax: an all-zero row or block gets a finite scale (and zero codes)


@dataclass
class Fp8QKV:
    """q, k, v quantized for the kernel (codes int8 / e4m3, scales fp32; x ~ codes * scale)."""

    q8: torch.Tensor  # [B, H, Mq * BM, D] int8, zero past N
    q_scale: torch.Tensor  # [B, H, Mq * BM] fp32: one per token
    k8: torch.Tensor  # [B, H, Mk * BN, D] int8 of k - k_mean, zero past N
    k_scale: torch.Tensor  # [B, H, Mk] fp32: one per key block
    k_mean: torch.Tensor  # [B, H, D] fp32: the mean over the N tokens, subtracted before quantizing
    v8t: torch.Tensor  # [B, H, D, Mk * BN] e4m3, transposed, zero past N
    v_scale: torch.Tensor  # [B, H, D] fp32: one per channel
    n: int  # the number of tokens N
    block_size: tuple[int, int]


def _quotient(a: torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    """a / b (fp32) rounded as one IEEE fp32 division, as the kernels' `div_rn`, on every device: computed in
    float64 and rounded once more, which for a quotient of fp32 values gives the same fp32 result. Not
    `a / 127.0` in fp32: on CUDA PyTorch divides by a Python scalar as a * (1 / b), often a step off in the
    last bit, and such a scale moves the codes that sit on a rounding tie."""
    return (a.double() / (b.double() if isinstance(b, torch.Tensor) else b)).float()


def _int8(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """The INT8 codes of x (fp32) under the reciprocal scale inv (fp32, broadcast): x * inv rounded once to the
    nearest integer, ties to even, as the kernels' fused multiply-add does. The product of two fp32 values is
    exact in float64, so rounding it there is the one rounding. Rounding an fp32 product rounds twice: a
    product a hair off a half becomes the half, then goes to the even side, and with bf16 inputs, whose
    short mantissas put many products next to a half, a few codes in ten thousand would come out a step
    apart."""
    return torch.round(x.double() * inv.double()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def _cast(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3, round to nearest even (as the GPU's cvt.rn.satfinite does for values within +-448)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _recip(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale rounded to fp32, as the kernels compute it: their codes are x * (1 / scale)."""
    return _quotient(torch.ones_like(scale), scale)


def quantize_qkv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: tuple[int, int] = (128, 128), smooth_k: bool = True
) -> Fp8QKV:
    """q, k, v [B, H, N, D] -> the kernel's quantized form. `smooth_k=False` skips the K smoothing (for tests
    that show what it buys)."""
    B, H, N, D = q.shape
    bm, bn = block_size
    mq, mk = num_blocks(N, bm), num_blocks(N, bn)
    qf, kf, vf = q.float(), k.float(), v.float()

    qp = torch.nn.functional.pad(qf, (0, 0, 0, mq * bm - N))  # zero rows past N (scale TINY / 127, codes 0)
    q_scale = _quotient(qp.abs().amax(-1).clamp_min(TINY), INT8_MAX)  # [B, H, Mq * BM]
    q8 = _int8(qp, _recip(q_scale)[..., None])

    # summed in float64: exact for bf16 keys whatever the order, so the kernel's chunked sum is the same bits
    k_mean = _quotient(k.double().sum(2), N) if smooth_k else torch.zeros(B, H, D, device=q.device)
    ks = torch.nn.functional.pad(kf - k_mean[:, :, None], (0, 0, 0, mk * bn - N))  # zero keys past N
    k_scale = _quotient(ks.reshape(B, H, mk, bn * D).abs().amax(-1).clamp_min(TINY), INT8_MAX)  # [B, H, Mk]
    k8 = _int8(ks, _recip(k_scale).repeat_interleave(bn, -1)[..., None])

    v_scale = _quotient(vf.abs().amax(2).clamp_min(TINY), FP8_MAX)  # [B, H, D]
    v8 = _cast(torch.nn.functional.pad(vf * _recip(v_scale)[:, :, None], (0, 0, 0, mk * bn - N)))

    return Fp8QKV(q8, q_scale, k8, k_scale, k_mean, v8.transpose(-1, -2).contiguous(), v_scale, N, (bm, bn))


def block_sparse_attention_fp8_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    *,
    smooth_k: bool = True,
    quantized: Fp8QKV | None = None,
    rows_per_chunk: int = 8,
) -> torch.Tensor:
    """Block-sparse attention as the FP8 kernel computes it: quantize (or take `quantized`), then for each
    query-block row the listed key blocks in ascending order with the online softmax, in fp32 on the
    dequantized codes. Rows with no block give 0. Returns q's dtype and layout."""
    B, H, N, D = q.shape
    bm, bn = block_size
    mq, mk = num_blocks(N, bm), num_blocks(N, bn)
    mask = _batched_mask(block_mask.to(torch.bool), B)
    if mask.shape[1:] != (H, mq, mk):
        raise ValueError(f"block_mask shape {tuple(block_mask.shape)} does not match (H, Mq, Mk) = {(H, mq, mk)}")
    qz = quantized if quantized is not None else quantize_qkv_ref(q, k, v, block_size, smooth_k)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dev = q.device

    q8 = qz.q8.float().reshape(B, H, mq, bm, D)
    row_scale = (qz.q_scale * (scale * LOG2E)).view(B, H, mq, bm)  # the kernel folds these into one multiply
    k8 = qz.k8.float().reshape(B, H, mk, bn, D)
    v8 = qz.v8t.float().transpose(-1, -2).reshape(B, H, mk, bn, D)
    key_valid = (torch.arange(mk * bn, device=dev) < N).view(mk, bn)

    counts = mask.sum(-1)  # [B, H, Mq]
    kmax = max(int(counts.max().item()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :kmax]  # listed blocks, ascending
    bidx = torch.arange(B, device=dev)[:, None, None]
    hidx = torch.arange(H, device=dev)[None, :, None]
    out = torch.zeros(B, H, mq, bm, D, dtype=torch.float32, device=dev)
    for r0 in range(0, mq, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, mq)
        R = r1 - r0
        m_i = torch.full((B, H, R, bm), float("-inf"), device=dev)
        l_i = torch.zeros(B, H, R, bm, device=dev)
        acc = torch.zeros(B, H, R, bm, D, device=dev)
        for j in range(kmax):
            ok = (counts[:, :, r0:r1] > j)[..., None]  # [B, H, R, 1]: the row lists a j-th block
            blk = order[:, :, r0:r1, j]  # [B, H, R]
            s = torch.einsum("bhrmd,bhrnd->bhrmn", q8[:, :, r0:r1], k8[bidx, hidx, blk])
            s = s * (row_scale[:, :, r0:r1] * qz.k_scale[bidx, hidx, blk][..., None])[..., None]
            s = s.masked_fill(~key_valid[blk][:, :, :, None, :], float("-inf"))
            m_new = torch.maximum(m_i, s.amax(-1))
            alpha = torch.exp2(m_i - m_new)
            p = torch.exp2(s - (m_new - P_LOG2)[..., None])
            pv = torch.einsum("bhrmn,bhrnd->bhrmd", _cast(p).float(), v8[bidx, hidx, blk])
            m_i = torch.where(ok, m_new, m_i)
            l_i = torch.where(ok, l_i * alpha + p.sum(-1), l_i)
            acc = torch.where(ok[..., None], acc * alpha[..., None] + pv, acc)
        l_i = torch.where(l_i == 0, 1.0, l_i)
        out[:, :, r0:r1] = acc / l_i[..., None] * qz.v_scale[:, :, None, None, :]
    return torch.empty_like(q).copy_(out.view(B, H, mq * bm, D)[:, :, :N])


def naive_fp8_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
) -> torch.Tensor:
    """What a plain FP8 cast gives: q, k, v each with one scale per tensor, P cast to e4m3 after the softmax
    (scaled by 448), no smoothing. The baseline the scheme is measured against."""
    from .reference import expand_block_mask

    def per_tensor(x):
        s = x.float().abs().amax().clamp_min(TINY) / FP8_MAX
        return _cast(x.float() / s).float() * s

    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    tok = expand_block_mask(_batched_mask(block_mask.to(torch.bool), B), N, N, block_size)
    s = (per_tensor(q) @ per_tensor(k).transpose(-1, -2) * scale).masked_fill(~tok, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (_cast(p * FP8_MAX).float() / FP8_MAX) @ per_tensor(v)
