"""Attention inputs with the outliers DiT activations have, for the FP8 attention tests (CPU and GPU)."""

from __future__ import annotations

import torch

# Keys: a few channels with an offset common to every token of tens of times the tokens' spread, as
# SageAttention reports for video DiTs' keys (what K smoothing removes); queries: heavy tails over tokens (a
# log-normal factor per token) and over channels (Student-t); values: per-channel offsets.
K_OFFSETS = {3: 60.0, 17: -50.0, 40: 40.0}  # channel: offset, in units of the keys' spread


def outlier_qkv(
    B: int,
    H: int,
    N: int,
    D: int,
    *,
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, N, D] in `dtype` (views of [B, N, H, D] buffers with `transposed`, diffusers' layout)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q = randn(B, N, H, D) * torch.exp(0.5 * randn(B, N, H, 1))
    chi2 = (randn(3, B, N, H, D) ** 2).mean(0)  # Student-t with 3 degrees of freedom: normal / sqrt(chi2 / 3)
    q = q + 0.5 * randn(B, N, H, D) / chi2.sqrt()
    offsets = torch.zeros(D, device=device)
    for c, o in K_OFFSETS.items():
        offsets[c % D] = o
    k = randn(B, N, H, D) + offsets
    v = randn(B, N, H, D) + 0.5 * randn(D)
    out = [x.to(dtype) for x in (q, k, v)]
    return tuple(x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous() for x in out)


def random_qkv(B, H, N, D, *, seed, device="cpu", dtype=torch.bfloat16, transposed=False):
    """Standard-normal q, k, v [B, H, N, D] (views of [B, N, H, D] buffers with `transposed`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [torch.randn(B, N, H, D, generator=gen, device=device).to(dtype) for _ in range(3)]
    return tuple(x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous() for x in out)


def int8_tie_q(B, H, N, D, *, seed, device="cpu", dtype=torch.bfloat16):
    """q [B, H, N, D] whose INT8 codes sit on rounding ties: in each token, |q| peaks at a (a bf16 value whose
    x * fp32(1 / fp32(a / 127)) at x = a / 2 rounds to 64 as an fp32 product but is just under 63.5 exactly), and
    half its elements are +-a / 2, the rest normal within +-a / 2. Rounding the fp32 product (twice) and rounding
    the exact product (once) give those elements codes a step apart."""
    mant = torch.arange(128, 256, dtype=torch.float64) / 128
    inv = (1.0 / (mant / 127.0).float().double()).float().double()  # fp32 scale, then fp32 reciprocal
    half = (mant / 2).float()
    peaks = mant[torch.round(half * inv.float()) != torch.round(half.double() * inv)].to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape, f64 = (B, H, N, D), dict(device=device, dtype=torch.float64)
    a = peaks[torch.randint(len(peaks), (B, H, N, 1), generator=gen, device=device)]
    a = a * 2.0 ** torch.randint(-3, 4, (B, H, N, 1), generator=gen, device=device)
    q = (torch.randn(shape, generator=gen, **f64) * a / 3).clamp(-a / 2, a / 2)
    sign = torch.where(torch.rand(shape, generator=gen, device=device) < 0.5, -1.0, 1.0)
    q = torch.where(torch.rand(shape, generator=gen, device=device) < 0.5, sign * a / 2, q)
    q[..., :1] = a  # the peak
    return q.to(dtype)
