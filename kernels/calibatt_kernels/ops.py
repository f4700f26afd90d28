"""calibatt's kernels as registered PyTorch custom ops.

torch.compile (fullgraph, e.g. diffusers' compile_repeated_blocks) keeps an opaque custom op in the graph
instead of breaking it, and the fake implementation tells it the output's shape and layout. The op
runs what `dispatch` chooses, like `block_sparse_attention_indexed` (and is recorded in `what_ran`).
"""

from __future__ import annotations

import torch

from ._common import KERNELS, KernelConfig
from .index import BlockIndex


def config_as_op_arg(config: KernelConfig | None) -> list[int]:
    """A KernelConfig as the int list the op's schema can carry ([] for the default config)."""
    if config is None:
        return []
    tma = -1 if config.use_tma is None else int(config.use_tma)
    return [
        KERNELS.index(config.kernel),
        config.block_m or 0,
        config.block_n or 0,
        config.num_warps,
        config.num_stages,
        tma,
        int(config.tl_warp_specialize),
        int(config.tl_pipeline_qk),
    ]


def config_from_op_arg(values: list[int]) -> KernelConfig | None:
    """Inverse of `config_as_op_arg`."""
    if not values:
        return None
    kernel, bm, bn, warps, stages, tma, ws, pipe = values
    return KernelConfig(
        kernel=KERNELS[kernel],
        block_m=bm or None,
        block_n=bn or None,
        num_warps=warps,
        num_stages=stages,
        use_tma=None if tma < 0 else bool(tma),
        tl_warp_specialize=bool(ws),
        tl_pipeline_qk=bool(pipe),
    )


@torch.library.custom_op("calibatt::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    schedule: torch.Tensor,
    block_m: int,
    block_n: int,
    config: list[int],
) -> torch.Tensor:
    from .dispatch import block_sparse_attention_indexed

    return block_sparse_attention_indexed(
        q,
        k,
        v,
        BlockIndex(counts, offsets, indices, schedule),
        block_size=(block_m, block_n),
        config=config_from_op_arg(config),
    )


@block_sparse_attention_op.register_fake
def _(q, k, v, counts, offsets, indices, schedule, block_m, block_n, config):
    # The launcher allocates its output in q's stride order, as empty_like does for a dense q.
    return torch.empty_like(q)


@torch.library.custom_op("calibatt::block_sparse_attention_fp8", mutates_args=())
def block_sparse_attention_fp8_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    schedule: torch.Tensor,
    block_m: int,
    block_n: int,
    config: list[int],
) -> torch.Tensor:
    """`calibatt::block_sparse_attention` in fp8 (precision: fp8): dispatch.block_sparse_attention_fp8_indexed,
    which records what ran and a fallback to bf16 where fp8 cannot run."""
    from .dispatch import block_sparse_attention_fp8_indexed

    return block_sparse_attention_fp8_indexed(
        q,
        k,
        v,
        BlockIndex(counts, offsets, indices, schedule),
        block_size=(block_m, block_n),
        config=config_from_op_arg(config),
    )


@block_sparse_attention_fp8_op.register_fake
def _(q, k, v, counts, offsets, indices, schedule, block_m, block_n, config):
    return torch.empty_like(q)  # in q's dtype and stride order, as the launcher's output


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
