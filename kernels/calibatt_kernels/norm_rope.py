"""Wan's q/k preparation in one pass: RMS norm over all heads, then interleaved rotary embedding.

What it computes, for q and for k (x: [B, N, C], C = heads * D, the projections' output):

    y = rms_norm(x, weight, eps)                      # over all C channels, in fp32, rounded to x's dtype
    out[b, n, h, 2i]     = y[2i] * cos[n, 2i] - y[2i+1] * sin[n, 2i+1]     (i: pair index within a head)
    out[b, n, h, 2i + 1] = y[2i] * sin[n, 2i+1] + y[2i+1] * cos[n, 2i]

exactly what diffusers' WanAttnProcessor does with `attn.norm_q`/`norm_k` and its `apply_rotary_emb` (cos,
sin: the [1, N, 1, D] tables of WanRotaryPosEmbed). The reference is `reference.qk_norm_rope_ref`.

Why a kernel: compiled with the rest of the block (compile_repeated_blocks), inductor turns these two norms
and rotations into one reduction kernel that moves the 400 MB of a Wan 1.3B 480p layer call's q and k
several times over, far below the memory bandwidth. This one reads each row once (a row of 1,536 or 5,120
channels fits in registers), and writes it once.

One program per (token, q-or-k): the row's channels as (even, odd) pairs, the sum of squares over the row,
then each pair rotated with its head position's cos/sin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_row(
    X,
    W,
    Out,
    Cos,
    Sin,
    b,
    n,
    stride_xb,
    stride_xn,
    stride_ob,
    stride_on,
    stride_cn,
    stride_sn,
    eps,
    C: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p = tl.arange(0, BLOCK_P)  # pair index: channels 2p and 2p + 1
    valid = p < C // 2
    pair = 2 * p[:, None] + tl.arange(0, 2)[None, :]  # [BLOCK_P, 2] channel of each (pair, member)
    pmask = valid[:, None]
    x = tl.load(X + b.to(tl.int64) * stride_xb + n.to(tl.int64) * stride_xn + pair, mask=pmask, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(W + pair, mask=pmask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, 1), 0) / C + eps)
    # the stock path rounds the norm's output to the activations' dtype before rotating it: so do we
    y = (x * inv * w).to(Out.dtype.element_ty).to(tl.float32)
    y0, y1 = tl.split(y)
    d = (2 * p) % HEAD_DIM  # even channel within the head
    cos = tl.load(Cos + n.to(tl.int64) * stride_cn + d, mask=valid, other=0.0)
    sin = tl.load(Sin + n.to(tl.int64) * stride_sn + d + 1, mask=valid, other=0.0)
    out = tl.join(y0 * cos - y1 * sin, y0 * sin + y1 * cos)
    tl.store(
        Out + b.to(tl.int64) * stride_ob + n.to(tl.int64) * stride_on + pair, out.to(Out.dtype.element_ty), mask=pmask
    )


@triton.jit(
    do_not_specialize=[
        "N",
        "stride_qb",
        "stride_qn",
        "stride_kb",
        "stride_kn",
        "stride_ob",
        "stride_on",
        "stride_cn",
        "stride_sn",
        "eps",
    ]
)
def _qk_norm_rope_fwd(
    Xq,
    Xk,
    Wq,
    Wk,
    OutQ,
    OutK,
    Cos,
    Sin,
    N,
    stride_qb,
    stride_qn,
    stride_kb,
    stride_kn,
    stride_ob,
    stride_on,
    stride_cn,
    stride_sn,
    eps,
    C: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // N
    n = row % N
    if tl.program_id(1) == 0:
        _norm_rope_row(
            Xq,
            Wq,
            OutQ,
            Cos,
            Sin,
            b,
            n,
            stride_qb,
            stride_qn,
            stride_ob,
            stride_on,
            stride_cn,
            stride_sn,
            eps,
            C,
            HEAD_DIM,
            BLOCK_P,
        )
    else:
        _norm_rope_row(
            Xk,
            Wk,
            OutK,
            Cos,
            Sin,
            b,
            n,
            stride_kb,
            stride_kn,
            stride_ob,
            stride_on,
            stride_cn,
            stride_sn,
            eps,
            C,
            HEAD_DIM,
            BLOCK_P,
        )


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' [1, N, 1, D] (or [N, D]) cos/sin tables as fp32 [N, D] rows: one kernel binary whatever
    the model keeps its tables in (WanRotaryPosEmbed's buffers are float64, or the model's dtype once cast)."""

    def rows(t):
        t = t.reshape(tokens, head_dim)
        return t if t.dtype == torch.float32 and t.stride(1) == 1 else t.to(torch.float32).contiguous()

    return rows(cos), rows(sin)


def qk_norm_rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, N, C] with unit channel stride; weights [C]; cos, sin: see `rope_tables`.
    Returns (q, k) normed and rotated, each a new contiguous [B, N, heads, C // heads] tensor (or writes
    `out`, two such tensors)."""
    B, N, C = q.shape
    if k.shape != q.shape or C % heads or (C // heads) % 2:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must match, with {heads} heads of an even head dim"
        )
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k need a unit channel stride")
    D = C // heads
    cos, sin = rope_tables(cos, sin, N, D)
    if out is None:
        out_q = torch.empty(B, N, heads, D, device=q.device, dtype=q.dtype)
        out_k = torch.empty_like(out_q)
    else:
        out_q, out_k = out
        for o in out:
            if o.shape != (B, N, heads, D) or o.dtype != q.dtype or not o.is_contiguous():
                raise ValueError(f"out must be two contiguous {(B, N, heads, D)} {q.dtype}, got {tuple(o.shape)}")
    if B * N == 0:
        return out_q, out_k
    block_p = triton.next_power_of_2(C // 2)
    # fp32 weights and tables whatever the model holds: one binary per (dtype, heads, head dim), so the one
    # `calibatt compile` caches is the one generate runs
    wq, wk = (w.to(torch.float32).contiguous() for w in (weight_q, weight_k))
    _qk_norm_rope_fwd[(B * N, 2)](
        q,
        k,
        wq,
        wk,
        out_q,
        out_k,
        cos,
        sin,
        N,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        out_q.stride(0),
        out_q.stride(1),
        cos.stride(0),
        sin.stride(0),
        eps,
        C=C,
        HEAD_DIM=D,
        BLOCK_P=block_p,
        num_warps=8 if block_p >= 2048 else 4,
    )
    return out_q, out_k


def kernel_fn():
    """The JIT function (for the ahead-of-time tools)."""
    return _qk_norm_rope_fwd


def aot_source_args(dtype: torch.dtype, heads: int, head_dim: int):
    """(signature, constexprs, attrs, options) of `_qk_norm_rope_fwd` for `triton.compile(ASTSource(...))`."""
    elem = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    C = heads * head_dim
    block_p = triton.next_power_of_2(C // 2)
    consts = dict(C=C, HEAD_DIM=head_dim, BLOCK_P=block_p)
    sig = {}
    for name in _qk_norm_rope_fwd.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("Xq", "Xk", "OutQ", "OutK"):
            sig[name] = f"*{elem[dtype]}"
        elif name in ("Wq", "Wk", "Cos", "Sin"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
    attrs = {
        (_qk_norm_rope_fwd.arg_names.index(n),): [["tt.divisibility", 16]]
        for n in ("Xq", "Xk", "Wq", "Wk", "OutQ", "OutK", "Cos", "Sin")
    }
    return sig, consts, attrs, {"num_warps": 8 if block_p >= 2048 else 4}
