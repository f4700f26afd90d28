"""calibatt's block-sparse attention as a registered PyTorch custom op.

torch.compile (fullgraph, e.g. diffusers' compile_repeated_blocks) keeps an opaque custom op in the graph
instead of breaking it, and the fake implementation tells it the output's shape and layout. The op
runs the Triton kernel where Triton can run and the reference elsewhere, like
`block_sparse_attention_indexed`.
"""

from __future__ import annotations

import torch

from .index import BlockIndex


@torch.library.custom_op("calibatt::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    schedule: torch.Tensor,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    from . import block_sparse_attention_indexed

    return block_sparse_attention_indexed(q, k, v, BlockIndex(counts, indices, schedule), block_size=(block_m, block_n))


@block_sparse_attention_op.register_fake
def _(q, k, v, counts, indices, schedule, block_m, block_n):
    # The launcher allocates its output in q's stride order, as empty_like does for a dense q.
    return torch.empty_like(q)
