"""calibatt's non-attention kernels as registered PyTorch custom ops (the attention's are per layer:
calibatt_cli/runtime/processor.py).

torch.compile (fullgraph, e.g. diffusers' compile_repeated_blocks) keeps an opaque custom op in the graph
instead of breaking it, and the fake implementation tells it the output's shape and layout. Each op runs what
`dispatch` chooses (and is recorded in `what_ran`).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("calibatt::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .dispatch import qk_norm_rope

    return qk_norm_rope(q, k, weight_q, weight_k, cos, sin, heads=heads, eps=eps)


@qk_norm_rope_op.register_fake
def _(q, k, weight_q, weight_k, cos, sin, heads, eps):
    b, n, c = q.shape
    return q.new_empty(b, n, heads, c // heads), q.new_empty(b, n, heads, c // heads)


@torch.library.custom_op("calibatt::linear_gelu", mutates_args=())
def linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # An op, not a plain call, so that compiled blocks keep the single cuBLASLt call whatever a torch
    # version's inductor does with aten._addmm_activation: torch._decomp carries a decomposition of it
    # into a GEMM and a pointwise GELU (the very split this avoids), which inductor does not use today.
    from .dispatch import linear_gelu

    return linear_gelu(x, weight, bias)


@linear_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
