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
