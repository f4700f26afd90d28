"""The up-projection of a tanh-GELU feed-forward (Wan's FFN) as one GEMM with the GELU in its epilogue.

What it computes: gelu(x @ weight.T + bias, approximate="tanh"), exactly diffusers' `GELU(approximate="tanh")`
module (`reference.linear_gelu_ref`).

Why: compiled with the rest of the block (compile_repeated_blocks), the FFN's first GEMM writes its
[tokens, ffn_dim] output, and an inductor pointwise kernel reads it back to add the bias and apply the GELU,
then writes it again. On Wan 2.1 1.3B at 480p that tensor is 587 MB per call (32,760 x 8,960 bf16); without
this fusion the compiled step is 475.2 ms instead of 458.9 ms on an H200
(bench/results/e2e-nvidia-h200-2026-11-27-fused-ffn.json). cuBLASLt can apply bias + tanh-GELU to the
accumulator before it stores it (its GELU_BIAS epilogue), which torch exposes as
`torch._addmm_activation(..., use_gelu=True)`: the output is written once and never re-read, and the GELU is
computed from the fp32 accumulator instead of the rounded bf16 product.

Not a Triton kernel: cuBLAS's GEMM already runs at ~720 TFLOP/s here, and an epilogue is all that is missing.
On the CPU `_addmm_activation` applies the exact (erf) GELU, not the tanh one, so the CPU path is the
reference.
"""

from __future__ import annotations

import torch

from .reference import linear_gelu_ref

_LT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether cuBLASLt's bias + GELU epilogue applies: a CUDA GEMM with a bias, one dtype throughout."""
    return (
        x.is_cuda
        and bias is not None
        and x.dtype in _LT_DTYPES
        and weight.dtype == x.dtype
        and bias.dtype == x.dtype
        and x.shape[-1] == weight.shape[1]
        and x.numel() > 0
    )


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh") for x [..., K], weight [M, K], bias [M]. `out`: a
    contiguous [..., M] tensor of x's dtype to write (a test poisons it to see that every element is written)."""
    shape = (*x.shape[:-1], weight.shape[0])
    if out is not None and (tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous {shape} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if not fusable(x, weight, bias):
        res = linear_gelu_ref(x, weight, bias)
        return res if out is None else out.copy_(res)
    x2 = x.reshape(-1, x.shape[-1])
    o2 = None if out is None else out.view(-1, weight.shape[0])
    res = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True, out=o2)
    return res.view(shape)
