"""Quantized block-sparse attention (Triton `tl`): INT8 Q.K^T, FP8 P.V, the scheme of `quant.py`.

What it computes: what `attn_tl.py` computes (each query block attends to the key blocks its mask row lists,
softmax over those keys only, empty rows give zeros), on q, k, v quantized as `quant.py` describes; the
reference is `quant.block_sparse_attention_fp8_ref`, which emulates the kernel's casts element for element.

The launches:
- quantizing (`quantize_qkv`): K's mean and V's per-channel amax over the tokens of each head, then one
  program per (block, head) of each tensor writes its int8 / e4m3 codes and their scales (K smoothed first),
  padded with zeros to whole blocks, V transposed (the section "quantizing q, k, v" below). For Wan, q's codes
  come from the q/k norm + RoPE kernel instead (`qk_norm_rope_quant`), in the same pass.
- `_attn_fp8_fwd`: the attention on the codes, with the index form (`index.BlockIndex`) and the work order
  (LPT schedule, persistent or one program per tile) of the `tl` kernel. Per key tile: an int8 dot (exact,
  int32), the scores scaled by q_scale (per row) * k_scale (per tile) * softmax scale * log2(e) in one
  fused multiply, the online softmax in base 2 with P's largest element at 2^8, P cast to e4m3, its dot with
  V's e4m3 codes into a fresh fp32 accumulator, added to the running output; V's channel scales once at
  the end.

Speed: on an H100 the attention launch runs at 0.95-1.21x the bf16 Gluon kernel on computed blocks with its
default config (bench/results/fp8-nvidia-h100-80gb-hbm3-2026-12-06-*.json), not the 1.4x its halved MMA time
would allow. Each warpgroup's chain per tile is serial: the int8 wgmma, a wait, the softmax (16K exp2 on the
MUFU, 16K fp32 -> e4m3 casts), the fp8 wgmma, a wait; at 8 bits the MMAs take about as long as the exp2
alone. The default config gets some overlap from two 64-row programs per SM. FA3's ping-pong of two
warpgroups in Gluon (the bf16 kernel's structure, with this scheme's arithmetic) measured no faster: 0.89-1.03x
the bf16 kernel with P.V in a fresh accumulator per block (it spills at head dim 128), and accumulating P.V
across blocks in the 8-bit MMA, which does not spill (0.95-1.09x), loses too much precision: 9-16 % from the
reference on outlier inputs (bench/results/fp8-nvidia-h100-80gb-hbm3-2026-12-06-gluon.json; the kernel and
its log are in docs/kernel-history.md). Every fp8 variant runs at about the bf16 kernel's rate (594-666
TFLOP/s-equivalent there), which points at the softmax's exp2 and conversions, not the MMAs, as the common
limit. Triton's
`tl` pipeliner waits on a score dot right after issuing it even when its use is a loop iteration later, and
on the P.V dot too, whose fresh accumulator the next line adds (TTGIR for sm_90, triton 3.6 and 3.9). With
triton 3.6 for sm_90 (cross-compiled: the same SASS), `warp_specialize=True` on the key loop compiles to the
binary without it, and at 64-row tiles num_stages 4 to the binary of 3: K and V get two buffers either way.

Hopper's 8-bit tensor-core instructions (wgmma) take both operands with the reduction dim contiguous, hence
V's transposed codes. sm_89 (Ada) has 8-bit tensor cores too; the tensor descriptors (TMA) are sm_90 only.
Under the CPU interpreter the dots run in fp32 on the decoded codes (exact for the int8 products; the e4m3
values are decoded exactly).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import LOG2E, KernelConfig, check_attention_call, num_sms, triton_usable
from .attn_tl import _block_id, _tile_row, _tma_allocator
from .index import BlockIndex, index_on_device
from .quant import FP8_MAX, INT8_MAX, P_LOG2, TINY, Fp8QKV

_FP8_MAX = tl.constexpr(FP8_MAX)
_INT8_MAX = tl.constexpr(INT8_MAX)
_P_LOG2 = tl.constexpr(P_LOG2)
_TINY = tl.constexpr(TINY)
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + it - it rounds |x| < 2^22 to the nearest even integer


@triton.jit
def _int8_codes(x, inv):
    """x * inv rounded once to the nearest integer, ties to even (quant._int8): one fused multiply-add with
    1.5 * 2^23, whose sum's unit in the last place is 1, so the exact product is rounded, not its fp32
    rounding. Spelled as an FMA on purpose: the GPU compiler contracts x * inv + c into one anyway, the CPU
    interpreter does not, and both must round the same way. Then the int8 cast (exact: |codes| <= 127)."""
    return (tl.fma(x, inv, _RNE_MAGIC) - _RNE_MAGIC).to(tl.int8)


@triton.jit
def _div(x, y):
    """x / y rounded as IEEE division, as torch divides: Triton's fp32 `/` is an approximate division on the
    GPU, and a code one step off where x / y lands near a rounding boundary is a code the reference lacks.
    For the scales only (one per row or block): per element, IEEE division made quantizing 5x slower."""
    return tl.math.div_rn(x, y)


@triton.jit
def _inv(scale):
    """1 / scale, IEEE-rounded: the codes are x * (1 / scale), in the reference too."""
    return _div(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _e4m3_rne(x):
    """x (fp32) rounded to the nearest e4m3 value, ties to even, saturated at +-448: the GPU's
    cvt.rn.satfinite, in fp32 arithmetic for the CPU interpreter, whose fp8 cast truncates."""
    e = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # below 2^-6 the spacing stays 2^-9
    c = ((e + 20 + 127) << 23).to(tl.float32, bitcast=True) * 1.5  # 1.5 * 2^23 * (e4m3's spacing 2^(e-3))
    return tl.clamp((x + c) - c, -_FP8_MAX, _FP8_MAX)


def shape_why_not(head_dim: int, block_size: tuple[int, int]) -> str | None:
    """Why the kernel cannot take calls of this head dim and block size (None: it can): head dim 64 or 128,
    blocks of 16 to 128 tokens, powers of two."""
    if head_dim not in (64, 128):
        return f"head dim {head_dim} (the fp8 kernel takes 64 or 128)"
    if any(b not in (16, 32, 64, 128) for b in block_size):
        return f"block size {tuple(block_size)} (the fp8 kernel takes 16, 32, 64 or 128)"
    return None


def supports(q: torch.Tensor, block_size: tuple[int, int]) -> bool:
    """Whether the kernel can run a call: 8-bit tensor cores (sm_89+), or the CPU under TRITON_INTERPRET=1,
    and a shape `shape_why_not` lets through."""
    if not triton_usable(q.device) or shape_why_not(q.shape[-1], block_size) is not None:
        return False
    return not (q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9))


def default_config(device: torch.device, block_size: tuple[int, int]) -> KernelConfig:
    """One program per tile of 64 query rows (one warpgroup), 2 stages: two such programs share an SM, and one's
    MMAs overlap the other's softmax (the best of `candidate_configs` at every density and both Wan shapes on
    an H100: bench/results/fp8-nvidia-h100-80gb-hbm3-2026-12-06-m64.json). The CPU interpreter runs one
    program per mask block."""
    if torch.device(device).type != "cuda":
        return KernelConfig(kernel="tl_tile", num_warps=4, num_stages=1)
    return KernelConfig(kernel="tl_tile", block_m=64 if block_size[0] >= 128 else None, num_warps=4, num_stages=2)


def candidate_configs(capability: tuple[int, int], block_size: tuple[int, int]) -> list[KernelConfig]:
    """The configs worth measuring, the default first; the 128-row 8-warp configs came 10-20 % behind it on an
    H100 (bench/results/fp8-nvidia-h100-80gb-hbm3-2026-12-06-*.json)."""
    bm = 64 if block_size[0] >= 128 else None
    cands = [
        KernelConfig(kernel="tl_tile", block_m=bm, num_warps=4, num_stages=2),
        KernelConfig(kernel="tl_tile", block_m=bm, num_warps=4, num_stages=3),
        KernelConfig(num_warps=8 if block_size[0] >= 128 else 4, num_stages=3),
    ]
    if capability[0] < 9:  # no TMA before Hopper
        cands = [KernelConfig(**{**c.__dict__, "use_tma": False}) for c in cands]
    return cands


# `bench/bench_fp8.py --sweep`: every knob of the kernel worth a GPU measurement at 128 x 128 blocks. Some
# compile to another's binary (the note in the module docstring); the sweep times each binary once and says
# which names share it. Left out: 128 rows on 4 warps (spills: 1 KiB a thread, cross-compiled for sm_90).
SWEEP_CONFIGS = {
    "tile-m64-w4-s2": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=2),  # the default
    "tile-m64-w4-s3": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=3),
    "tile-m64-w4-s4": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=4),
    "tile-m64-w4-s2-ws": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=2, tl_warp_specialize=True),
    "tile-m64-w4-s3-ws": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=3, tl_warp_specialize=True),
    "tile-m64-w4-s2-ptr": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=2, use_tma=False),
    "tile-m64-w4-s3-ptr": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=3, use_tma=False),
    "tile-m64-w8-s2": KernelConfig(kernel="tl_tile", block_m=64, num_warps=8, num_stages=2),
    "tile-m128-w8-s2": KernelConfig(kernel="tl_tile", block_m=128, num_warps=8, num_stages=2),
    "tile-m128-w8-s3": KernelConfig(kernel="tl_tile", block_m=128, num_warps=8, num_stages=3),
    "tile-m128-w8-s2-ws": KernelConfig(
        kernel="tl_tile", block_m=128, num_warps=8, num_stages=2, tl_warp_specialize=True
    ),
    "persistent-m128-w8-s3": KernelConfig(block_m=128, num_warps=8, num_stages=3),
    "persistent-m64-w4-s2": KernelConfig(block_m=64, num_warps=4, num_stages=2),
}


# ---- quantizing q, k, v ----
#
# Five launches, each a pass over memory (what bench_fp8.py times one by one, with its bandwidth):
# - `_kv_stats`: per (token chunk, head), K's sum and V's amax per channel over the chunk, into [B * H, chunks,
#   D] partials. Element-wise accumulators over the chunk's tiles, reduced once at the end: a reduction per
#   tile would put a barrier between one tile's loads and the next.
# - `_kv_finalize`: per head, the partials: K's mean and V's scales. K is summed in float64, as the reference
#   sums it: exact for a model's bf16 keys (8-bit mantissas), so the order does not matter and the mean, and
#   every K code, is the reference's to the bit, on every run (a fused and an unfused call agree).
# - `_quantize_q`, `_quantize_k`, `_quantize_v`: one program per (block, head): its [block, D] tile's codes
#   and scales (K smoothed first), zeros past N, V transposed. `qk_norm_rope_quant` makes q's codes in the
#   norm's pass; then `_quantize_q` does not run.
# Sizes (N, Mq, Mk, the chunk count) vary with the video: not specialised on, one binary serves them all.
# Strides are specialised on divisibility by 16 (Triton's default), which every [B, H, N, D] layout of a head
# dim of 64 or 128 has, and the head dim's stride is 1 (the launcher copies a tensor whose is not): a row's
# channels load as 16-byte vectors, where an unknown stride would load them one element at a time.

STATS_CHUNK = 512  # tokens per `_kv_stats` program: 768 programs at Wan 1.3B 480p, 5,920 at 14B 720p
STATS_TILE = 32  # tokens per `_kv_stats` load (its float64 sums take 2 registers an element)
FINALIZE_TILE = 64  # chunks per `_kv_finalize` load


@triton.jit(do_not_specialize=["N"])
def _kv_stats(
    K,
    V,
    KPart,
    VPart,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_vz,
    stride_vh,
    stride_vn,
    H,
    N,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Program (chunk, b * H + h): K's sum and |V|'s max over the chunk's tokens, per channel, into
    KPart / VPart [B * H, chunks, D]."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b.to(tl.int64) * stride_kz + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vz + h.to(tl.int64) * stride_vh
    ksum = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float64)
    vmax = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    for t in tl.range(c * CHUNK, c * CHUNK + CHUNK, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        ok = (offs_t < N)[:, None]
        k = tl.load(k_base + offs_t[:, None] * stride_kn + offs_d[None, :], mask=ok, other=0.0)
        v = tl.load(v_base + offs_t[:, None] * stride_vn + offs_d[None, :], mask=ok, other=0.0)
        ksum += k.to(tl.float64)
        vmax = tl.maximum(vmax, tl.abs(v.to(tl.float32)))
    part = (bh * tl.num_programs(0) + c).to(tl.int64) * HEAD_DIM + offs_d
    tl.store(KPart + part, tl.sum(ksum, 0))
    tl.store(VPart + part, tl.max(vmax, 0))


@triton.jit(do_not_specialize=["N", "NC"])
def _kv_finalize(
    KPart,
    VPart,
    KMean,
    VScale,
    N,
    NC,
    SMOOTH_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Program b * H + h: K's mean (zeros without SMOOTH_K) and V's per-channel scales from the NC chunks'
    partials, summed in one fixed order."""
    bh = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    ksum = tl.zeros([BLOCK_C, HEAD_DIM], dtype=tl.float64)
    vmax = tl.zeros([BLOCK_C, HEAD_DIM], dtype=tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        rows = c0 + offs_c
        ptrs = (bh.to(tl.int64) * NC + rows)[:, None] * HEAD_DIM + offs_d[None, :]
        ok = (rows < NC)[:, None]
        ksum += tl.load(KPart + ptrs, mask=ok, other=0.0)
        vmax = tl.maximum(vmax, tl.load(VPart + ptrs, mask=ok, other=0.0))
    mean = (tl.sum(ksum, 0) / N.to(tl.float64)).to(tl.float32)  # float64 division is IEEE's on the GPU too
    if not SMOOTH_K:
        mean = tl.zeros([HEAD_DIM], dtype=tl.float32)
    tl.store(KMean + bh * HEAD_DIM + offs_d, mean)
    tl.store(VScale + bh * HEAD_DIM + offs_d, _div(tl.maximum(tl.max(vmax, 0), _TINY), _FP8_MAX))


@triton.jit
def _load_tile(X, stride_z, stride_h, stride_n, b, h, offs_t, N, HEAD_DIM: tl.constexpr):
    """Rows offs_t of head (b, h), fp32, zeros past N."""
    base = X + b.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h
    x = tl.load(
        base + offs_t[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :], mask=(offs_t < N)[:, None], other=0.0
    )
    return x.to(tl.float32)


@triton.jit(do_not_specialize=["N", "Mq"])
def _quantize_q(Q, Q8, QScale, stride_qz, stride_qh, stride_qn, H, N, Mq, BM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (block, b * H + h): query block `block`'s codes, one scale per token."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_t = blk * BM + tl.arange(0, BM)
    x = _load_tile(Q, stride_qz, stride_qh, stride_qn, bh // H, bh % H, offs_t, N, HEAD_DIM)
    scale = _div(tl.maximum(tl.max(tl.abs(x), 1), _TINY), _INT8_MAX)
    codes = _int8_codes(x, _inv(scale)[:, None])
    rows = bh.to(tl.int64) * (Mq * BM) + offs_t
    tl.store(Q8 + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], codes)
    tl.store(QScale + rows, scale)


@triton.jit(do_not_specialize=["N", "Mk"])
def _quantize_k(
    K,
    K8,
    KScale,
    KMean,
    stride_kz,
    stride_kh,
    stride_kn,
    H,
    N,
    Mk,
    BN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Program (block, b * H + h): key block `block` less K's mean, one scale for the block."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_t = blk * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, HEAD_DIM)
    x = _load_tile(K, stride_kz, stride_kh, stride_kn, bh // H, bh % H, offs_t, N, HEAD_DIM)
    x = tl.where((offs_t < N)[:, None], x - tl.load(KMean + bh * HEAD_DIM + offs_d)[None, :], 0.0)  # zeros past N
    scale = _div(tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), _TINY), _INT8_MAX)
    codes = _int8_codes(x, _inv(scale))
    rows = bh.to(tl.int64) * (Mk * BN) + offs_t
    tl.store(K8 + rows[:, None] * HEAD_DIM + offs_d[None, :], codes)
    tl.store(KScale + bh * Mk + blk, scale)


@triton.jit(do_not_specialize=["N", "Mk"])
def _quantize_v(
    V,
    V8T,
    VScale,
    stride_vz,
    stride_vh,
    stride_vn,
    H,
    N,
    Mk,
    BN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (block, b * H + h): value block `block`'s e4m3 codes under the per-channel scales, stored
    transposed ([D, Mk * BN] per head)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_t = blk * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, HEAD_DIM)
    x = _load_tile(V, stride_vz, stride_vh, stride_vn, bh // H, bh % H, offs_t, N, HEAD_DIM)
    inv = _inv(tl.load(VScale + bh * HEAD_DIM + offs_d))
    if UPCAST:
        codes = _e4m3_rne(x * inv[None, :]).to(tl.float8e4nv)  # exact values: the cast only packs
    else:
        codes = tl.clamp(x * inv[None, :], -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)
    cols = bh.to(tl.int64) * HEAD_DIM * (Mk * BN) + offs_t
    tl.store(V8T + cols[None, :] + offs_d[:, None] * (Mk * BN), tl.trans(codes))


def _unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _quantize_launches(
    q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: tuple[int, int],
    smooth_k: bool,
) -> tuple[Fp8QKV, dict]:
    """The buffers `quantize_qkv` fills and its launches, by name in the order they must first run ("stats",
    "finalize", "q" unless `q` is codes already, "k", "v"), each a function of no arguments: run once in
    order, they fill the buffers; then each can be run alone (bench_fp8.py times them so)."""
    B, H, N, D = k.shape
    bm, bn = block_size
    mq, mk = triton.cdiv(N, bm), triton.cdiv(N, bn)
    dev = k.device
    k, v = _unit_channel_stride(k), _unit_channel_stride(v)
    q_done = isinstance(q, tuple)
    if q_done:
        q8, q_scale = q
        if q8.shape != (B, H, mq * bm, D) or q_scale.shape != (B, H, mq * bm) or q8.dtype != torch.int8:
            raise ValueError(
                f"query codes {tuple(q8.shape)} {q8.dtype} / scales {tuple(q_scale.shape)} do not match "
                f"int8 {(B, H, mq * bm, D)} for k {tuple(k.shape)}, block {block_size}"
            )
    else:
        q = _unit_channel_stride(q)
        q8 = torch.empty(B, H, mq * bm, D, dtype=torch.int8, device=dev)
        q_scale = torch.empty(B, H, mq * bm, dtype=torch.float32, device=dev)
    qz = Fp8QKV(
        q8=q8,
        q_scale=q_scale,
        k8=torch.empty(B, H, mk * bn, D, dtype=torch.int8, device=dev),
        k_scale=torch.empty(B, H, mk, dtype=torch.float32, device=dev),
        k_mean=torch.empty(B, H, D, dtype=torch.float32, device=dev),
        v8t=torch.empty(B, H, D, mk * bn, dtype=torch.float8_e4m3fn, device=dev),
        v_scale=torch.empty(B, H, D, dtype=torch.float32, device=dev),
        n=N,
        block_size=(bm, bn),
    )
    if B * H * N == 0:
        qz.k_mean.zero_()
        qz.v_scale.fill_(TINY / FP8_MAX)
        return qz, {}
    chunks = triton.cdiv(N, STATS_CHUNK)
    k_part = torch.empty(B * H, chunks, D, dtype=torch.float64, device=dev)
    v_part = torch.empty(B * H, chunks, D, dtype=torch.float32, device=dev)
    warps = 8 if max(bm, bn) * D >= 128 * 128 else 4
    launches = {
        "stats": lambda: _kv_stats[(chunks, B * H)](
            k,
            v,
            k_part,
            v_part,
            *_zhn(k),
            *_zhn(v),
            H,
            N,
            CHUNK=STATS_CHUNK,
            BLOCK_T=STATS_TILE,
            HEAD_DIM=D,
            num_warps=8,
        ),
        "finalize": lambda: _kv_finalize[(B * H,)](
            k_part,
            v_part,
            qz.k_mean,
            qz.v_scale,
            N,
            chunks,
            SMOOTH_K=smooth_k,
            BLOCK_C=FINALIZE_TILE,
            HEAD_DIM=D,
        ),
    }
    if not q_done:
        launches["q"] = lambda: _quantize_q[(mq, B * H)](
            q, qz.q8, qz.q_scale, *_zhn(q), H, N, mq, BM=bm, HEAD_DIM=D, num_warps=warps
        )
    launches["k"] = lambda: _quantize_k[(mk, B * H)](
        k, qz.k8, qz.k_scale, qz.k_mean, *_zhn(k), H, N, mk, BN=bn, HEAD_DIM=D, num_warps=warps
    )
    launches["v"] = lambda: _quantize_v[(mk, B * H)](
        v, qz.v8t, qz.v_scale, *_zhn(v), H, N, mk, BN=bn, HEAD_DIM=D, UPCAST=not k.is_cuda, num_warps=warps
    )
    return qz, launches


def _zhn(x: torch.Tensor) -> tuple[int, int, int]:
    """The batch, head and token strides of a [B, H, N, D] tensor (its channel stride is 1)."""
    return x.stride(0), x.stride(1), x.stride(2)


def quantize_qkv(
    q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    smooth_k: bool = True,
) -> Fp8QKV:
    """q, k, v [B, H, N, D] (any strides; one whose head dim is not contiguous is copied first) -> the codes
    and scales the attention kernel reads, as `quant.quantize_qkv_ref` computes them. `q` may be the (codes,
    scales) that `qk_norm_rope_quant` made; then only k and v are read here."""
    qz, launches = _quantize_launches(q, k, v, tuple(block_size), smooth_k)
    for launch in launches.values():
        launch()
    return qz


@triton.jit(do_not_specialize=["N", "Nq", "stride_qb", "stride_qn", "stride_kb", "stride_kn", "stride_cn", "eps"])
def _norm_rope_quant(
    Xq,
    Xk,
    Wq,
    Wk,
    Q8,
    QScale,
    OutK,
    Cos,
    Sin,
    N,
    Nq,
    stride_qb,
    stride_qn,
    stride_kb,
    stride_kn,
    stride_cn,
    eps,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (token, q-or-k): norm_rope.py's row (RMS norm over all heads, rounded to the model's dtype,
    then the interleaved rotation), rounded to the model's dtype again as the unfused path stores it; k is
    stored so, q as INT8 codes with one scale per (token, head) into [B, HEADS, Nq, D]."""
    row = tl.program_id(0)
    b = row // N
    n = row % N
    C: tl.constexpr = HEADS * HEAD_DIM
    p = tl.arange(0, BLOCK_P)  # pair index: channels 2p and 2p + 1
    valid = p < C // 2
    pair = 2 * p[:, None] + tl.arange(0, 2)[None, :]
    pmask = valid[:, None]
    if tl.program_id(1) == 0:
        X = Xq + b.to(tl.int64) * stride_qb + n.to(tl.int64) * stride_qn
        W = Wq
    else:
        X = Xk + b.to(tl.int64) * stride_kb + n.to(tl.int64) * stride_kn
        W = Wk
    x = tl.load(X + pair, mask=pmask, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    w = tl.load(W + pair, mask=pmask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, 1), 0) / C + eps)
    y = (x * inv * w).to(dtype).to(tl.float32)
    y0, y1 = tl.split(y)
    d = (2 * p) % HEAD_DIM
    cos = tl.load(Cos + n.to(tl.int64) * stride_cn + d, mask=valid, other=0.0)
    sin = tl.load(Sin + n.to(tl.int64) * stride_cn + d + 1, mask=valid, other=0.0)
    out = tl.join(y0 * cos - y1 * sin, y0 * sin + y1 * cos).to(dtype)
    if tl.program_id(1) == 1:
        tl.store(OutK + row.to(tl.int64) * C + pair, out, mask=pmask)
    else:
        # heads as rows: [BLOCK_P, 2] pairs -> [2 * BLOCK_P / D, D], rows >= HEADS are padding
        R: tl.constexpr = 2 * BLOCK_P // HEAD_DIM
        xq = tl.reshape(out.to(tl.float32), [R, HEAD_DIM])
        h = tl.arange(0, R)
        scale = _div(tl.maximum(tl.max(tl.abs(xq), 1), _TINY), _INT8_MAX)
        codes = _int8_codes(xq, _inv(scale)[:, None])
        rows = (b * HEADS + h).to(tl.int64) * Nq + n  # [R]: row of (b, h, n) in [B, HEADS, Nq]
        ok = h < HEADS
        tl.store(Q8 + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], codes, mask=ok[:, None])
        tl.store(QScale + rows, scale, mask=ok)


def qk_norm_rope_quant(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float,
    block_size: tuple[int, int] = (128, 128),
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wan's q/k preparation (`norm_rope.qk_norm_rope_triton`) with q's INT8 quantization in the same pass:
    q, k [B, N, C] -> ((q codes [B, heads, Mq * BM, D], q scales [B, heads, Mq * BM]), k [B, N, heads, D] in
    q's dtype). The codes are what `quantize_qkv` makes of the unfused path's q; hand them to it as its `q`.
    K is not quantized here: its smoothing needs the mean over all tokens first."""
    from .norm_rope import rope_tables

    B, N, C = q.shape
    if k.shape != q.shape or C % heads or (C // heads) not in (64, 128):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must match, with {heads} heads of 64 or 128")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k need a unit channel stride")
    D = C // heads
    bm = block_size[0]
    nq = triton.cdiv(N, bm) * bm
    cos, sin = rope_tables(cos, sin, N, D)
    if sin.stride(0) != cos.stride(0):
        sin = sin.contiguous()
    q8 = torch.empty(B, heads, nq, D, dtype=torch.int8, device=q.device)
    q8[:, :, N:] = 0  # rows past N: zero codes, the smallest scale (as quant.quantize_qkv_ref pads)
    q_scale = torch.empty(B, heads, nq, dtype=torch.float32, device=q.device)
    q_scale[:, :, N:] = TINY / INT8_MAX
    out_k = torch.empty(B, N, heads, D, device=q.device, dtype=q.dtype)
    if B * N == 0:
        return (q8, q_scale), out_k
    block_p = triton.next_power_of_2(C // 2)
    wq, wk = (w.to(torch.float32).contiguous() for w in (weight_q, weight_k))
    _norm_rope_quant[(B * N, 2)](
        q,
        k,
        wq,
        wk,
        q8,
        q_scale,
        out_k,
        cos,
        sin,
        N,
        nq,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        eps,
        HEADS=heads,
        HEAD_DIM=D,
        BLOCK_P=block_p,
        num_warps=8 if block_p >= 2048 else 4,
    )
    return (q8, q_scale), out_k


# ---- attention ----


@triton.jit
def _fp8_scores(
    q, K8, kv_bh, blk, Mk, BN: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr
):
    """q @ k^T of key block `blk`: int32 on the GPU, fp32 under the interpreter."""
    if USE_TMA:
        k = K8.load([blk * BN, 0])
    else:
        k_rows = kv_bh.to(tl.int64) * (Mk * BN) + blk * BN + tl.arange(0, BN)
        k = tl.load(K8 + k_rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])
    if UPCAST:  # the interpreter: fp32 dots on the decoded codes (exact for the int8 products)
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    return tl.dot(q, tl.trans(k), out_dtype=tl.int32)


@triton.jit
def _fp8_softmax_pv(
    acc,
    l_i,
    m_i,
    qk,
    q_rs,
    V8T,
    KScale,
    kv_bh,
    blk,
    N,
    Mk,
    BN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The online-softmax update of key block `blk`'s scores qk (`_fp8_scores`), then its P @ V."""
    start_n = blk * BN
    if USE_TMA:
        vt = V8T.load([0, start_n])
    else:
        v_rows = kv_bh.to(tl.int64) * HEAD_DIM + tl.arange(0, HEAD_DIM)
        vt = tl.load(V8T + v_rows[:, None] * (Mk * BN) + start_n + tl.arange(0, BN)[None, :])
    if UPCAST:
        bias = 0.0
    else:
        # int32 -> fp32 on the ALU, not the quarter-rate conversion unit (16K conversions a tile cost about as
        # long as the tile's fp8 MMAs): |qk| <= 128 * 127^2 < 2^22, so the bits of qk + 0x4B400000 are the
        # float 1.5 * 2^23 + qk, exactly. The offset comes back out in the row's exponent bias.
        qk = (qk + 0x4B400000).to(tl.float32, bitcast=True)
        bias = _RNE_MAGIC
    rs = q_rs * tl.load(KScale + kv_bh * Mk + blk)  # all scales and log2(e) in one per-row factor (> 0)
    if MASK_KEYS:
        qk = tl.where((start_n + tl.arange(0, BN) < N)[None, :], qk, float("-inf"))
    m_ij = tl.maximum(m_i, (tl.max(qk, 1) - bias) * rs)
    alpha = tl.math.exp2(m_i - m_ij)
    # one FMA an element; P's largest element is 2^P_LOG2 (exact in e4m3)
    p = tl.math.exp2(qk * rs[:, None] - (m_ij - _P_LOG2 + bias * rs)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        pv = tl.dot(_e4m3_rne(p), tl.trans(vt.to(tl.float32)))
    else:
        pv = tl.dot(p.to(tl.float8e4nv), tl.trans(vt))  # a fresh fp32 accumulator: fp8 accumulation spans one block
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_ij


@triton.jit
def _fp8_tile(
    tile,
    ptrs,
    sizes,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_SCHEDULE: tl.constexpr,
    USE_TMA: tl.constexpr,
    OUT_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    ID_WORDS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """One program tile: BLOCK_M query rows of one mask row, over all key blocks the row lists. `ptrs` and
    `sizes`: `_attn_fp8_fwd`'s runtime arguments, as it packs them."""
    Q8, QScale, K8, KScale, V8T, VScale, Out, Counts, Offsets, Indices, Schedule = ptrs
    stride_oz, stride_oh, stride_om, stride_od, stride_cz, stride_ch, H, N, Mq, Mk, REPS, qk_scale = sizes
    b, h, bh, start_m, cnt, e0 = _tile_row(
        tile, Counts, Offsets, Schedule, stride_cz, stride_ch, H, Mq, REPS, BM, BLOCK_M, HAS_SCHEDULE
    )

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = bh.to(tl.int64) * (Mq * BM) + offs_m
    o_off = b.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh
    if USE_TMA:
        q = tl.make_tensor_descriptor(
            Q8 + bh.to(tl.int64) * (Mq * BM) * HEAD_DIM,
            shape=[Mq * BM, HEAD_DIM],
            strides=[HEAD_DIM, 1],
            block_shape=[BLOCK_M, HEAD_DIM],
        ).load([start_m, 0])
        k_src = tl.make_tensor_descriptor(
            K8 + bh.to(tl.int64) * (Mk * BN) * HEAD_DIM,
            shape=[Mk * BN, HEAD_DIM],
            strides=[HEAD_DIM, 1],
            block_shape=[BN, HEAD_DIM],
        )
        v_src = tl.make_tensor_descriptor(
            V8T + bh.to(tl.int64) * HEAD_DIM * (Mk * BN),
            shape=[HEAD_DIM, Mk * BN],
            strides=[Mk * BN, 1],
            block_shape=[HEAD_DIM, BN],
        )
    else:
        q = tl.load(Q8 + q_rows[:, None] * HEAD_DIM + offs_d[None, :])
        k_src = K8
        v_src = V8T
    q_rs = tl.load(QScale + q_rows) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # All listed blocks but the last are full; the last one may hold keys >= N.
    n_full = tl.maximum(cnt - 1, 0)
    for j in tl.range(0, n_full, warp_specialize=WARP_SPECIALIZE):
        blk = _block_id(Indices, e0 + j, ID_WORDS)
        qk = _fp8_scores(q, k_src, bh, blk, Mk, BN, HEAD_DIM, USE_TMA, UPCAST)
        acc, l_i, m_i = _fp8_softmax_pv(
            acc, l_i, m_i, qk, q_rs, v_src, KScale, bh, blk, N, Mk, BN, HEAD_DIM, False, USE_TMA, UPCAST
        )
    if cnt > 0:
        blk = _block_id(Indices, e0 + cnt - 1, ID_WORDS)
        qk = _fp8_scores(q, k_src, bh, blk, Mk, BN, HEAD_DIM, USE_TMA, UPCAST)
        acc, l_i, m_i = _fp8_softmax_pv(
            acc, l_i, m_i, qk, q_rs, v_src, KScale, bh, blk, N, Mk, BN, HEAD_DIM, True, USE_TMA, UPCAST
        )
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # an empty row: acc is 0, write 0
    v_scale = tl.load(VScale + bh * HEAD_DIM + offs_d)
    out = (acc * (1.0 / l_i)[:, None] * v_scale[None, :]).to(Out.dtype.element_ty)
    if OUT_TMA:
        tl.make_tensor_descriptor(
            Out + o_off, shape=[N, HEAD_DIM], strides=[stride_om, 1], block_shape=[BLOCK_M, HEAD_DIM]
        ).store([start_m, 0], out)
    else:
        tl.store(
            Out + o_off + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out, mask=(offs_m < N)[:, None]
        )


@triton.jit(
    do_not_specialize=["N", "Mq", "Mk", "num_tiles", "stride_cz", "stride_ch"],
    do_not_specialize_on_alignment=("Counts", "Offsets", "Indices", "Schedule"),
)
def _attn_fp8_fwd(
    Q8,
    QScale,
    K8,
    KScale,
    V8T,
    VScale,
    Out,
    Counts,
    Offsets,
    Indices,
    Schedule,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    stride_cz,
    stride_ch,
    H,
    N,
    Mq,
    Mk,
    num_tiles,
    REPS,
    qk_scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_SCHEDULE: tl.constexpr,
    PERSISTENT: tl.constexpr,
    USE_TMA: tl.constexpr,
    OUT_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    ID_WORDS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    ptrs = (Q8, QScale, K8, KScale, V8T, VScale, Out, Counts, Offsets, Indices, Schedule)
    sizes = (stride_oz, stride_oh, stride_om, stride_od, stride_cz, stride_ch, H, N, Mq, Mk, REPS, qk_scale)
    pid = tl.program_id(0)
    if PERSISTENT:
        for tile in range(pid, num_tiles, tl.num_programs(0)):
            _fp8_tile(
                tile,
                ptrs,
                sizes,
                BM,
                BN,
                BLOCK_M,
                HEAD_DIM,
                HAS_SCHEDULE,
                USE_TMA,
                OUT_TMA,
                UPCAST,
                ID_WORDS,
                WARP_SPECIALIZE,
            )
    else:  # straight-line: in a one-trip loop the compiler would keep the output's TMA buffer apart (+16 KiB)
        _fp8_tile(
            pid,
            ptrs,
            sizes,
            BM,
            BN,
            BLOCK_M,
            HEAD_DIM,
            HAS_SCHEDULE,
            USE_TMA,
            OUT_TMA,
            UPCAST,
            ID_WORDS,
            WARP_SPECIALIZE,
        )


def attention_fp8_quantized(
    qz: Fp8QKV,
    index: BlockIndex,
    out: torch.Tensor,
    *,
    scale: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """The attention launch alone, on codes from `quantize_qkv` (or a fused producer of the same form),
    written into `out` [B, H, N, D] (any strides; its dtype is the output's)."""
    B, H, N, D = out.shape
    BM, BN = qz.block_size
    Mq, Mk = triton.cdiv(N, BM), triton.cdiv(N, BN)
    Bi = index.counts.shape[0]
    cfg = config or default_config(out.device, qz.block_size)
    if cfg.backend != "tl":
        raise ValueError(f"{cfg.kernel} is not a tl kernel config")
    block_m = cfg.block_m or BM
    if BM % block_m or (cfg.block_n or BN) != BN:
        raise ValueError(f"the fp8 kernel takes whole key blocks and a query tile dividing {BM}, got {cfg}")
    on_gpu = out.is_cuda
    use_tma = cfg.use_tma
    if use_tma is None:
        use_tma = on_gpu and torch.cuda.get_device_capability(out.device)[0] >= 9
    use_tma = bool(use_tma) and on_gpu
    out_tma = use_tma and out.stride(-1) == 1 and (out.stride(-2) * out.element_size()) % 16 == 0
    out_tma = out_tma and out.data_ptr() % 16 == 0
    if use_tma:
        triton.set_allocator(_tma_allocator)
    counts, offsets, indices, id_words, schedule = index_on_device(index, out.device)
    reps = B // Bi
    num_tiles = Bi * H * Mq * reps * (BM // block_m)
    if num_tiles == 0:
        return out
    grid = (min(num_tiles, num_sms(out.device) if on_gpu else 3),) if cfg.persistent else (num_tiles,)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    _attn_fp8_fwd[grid](
        qz.q8,
        qz.q_scale,
        qz.k8,
        qz.k_scale,
        qz.v8t,
        qz.v_scale,
        out,
        counts,
        offsets,
        indices,
        schedule if schedule is not None else counts,
        *out.stride(),
        counts.stride(0),
        counts.stride(1),
        H,
        N,
        Mq,
        Mk,
        num_tiles,
        reps,
        scale * LOG2E,
        BM=BM,
        BN=BN,
        BLOCK_M=block_m,
        HEAD_DIM=D,
        HAS_SCHEDULE=schedule is not None,
        PERSISTENT=cfg.persistent,
        USE_TMA=use_tma,
        OUT_TMA=out_tma,
        UPCAST=not on_gpu,
        ID_WORDS=id_words,
        WARP_SPECIALIZE=cfg.tl_warp_specialize,  # the interpreter's range takes the flag and ignores it
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def block_sparse_attention_fp8_indexed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention with INT8 Q.K^T and FP8 P.V (`quant.py`'s scheme): q, k, v [B, H, N, D] (any
    strides), index rows [B or 1, H, Mq]. Returns [B, H, N, D] in q's dtype and memory layout (or writes
    `out`). Quantizes q, k, v (`quantize_qkv`), then runs the attention kernel."""
    block_size = tuple(block_size)
    out = check_attention_call(q, k, v, index, block_size, out)
    if not supports(q, block_size):
        raise ValueError(
            f"the fp8 kernel takes head dim 64/128, blocks of 16-128 and sm_89+ (or the interpreter); got "
            f"head dim {q.shape[-1]}, block {block_size} on {q.device}"
        )
    qz = quantize_qkv(q, k, v, block_size)
    return attention_fp8_quantized(qz, index, out, scale=scale, config=config)


def kernel_fns() -> list:
    """The JIT functions of this module (what a calibatt cache holds)."""
    return [_kv_stats, _kv_finalize, _quantize_q, _quantize_k, _quantize_v, _norm_rope_quant, _attn_fp8_fwd]
