"""calibatt_kernels: block-sparse attention, calibration block mass, and Wan's fused q/k norm + RoPE and
FFN up-projection + GELU.

Installed under the import name `calibatt_kernels` (never `kernels`: PyPI has an unrelated package of
that name that diffusers probes for). `dispatch.py` is the entry: it picks the backend of each call
(`attn_gluon.py`, `attn_tl.py`, `cpu.py`, `reference.py`) and records what ran (`what_ran`). Each kernel
module holds its Triton kernel and launcher; the pure-PyTorch references live in `reference.py`.
"""

from __future__ import annotations

# `dispatch` imports the kernel modules before the public functions are bound here: importing a submodule
# binds its name on the package, so a later first import of `block_mass.py` or `linear_gelu.py` would
# replace the public functions `calibatt_kernels.block_mass` / `.linear_gelu` by their modules.
from . import dispatch
from ._common import KernelConfig, triton_usable
from .dispatch import (
    attention_with_block_mass,
    block_mass,
    block_sparse_attention,
    block_sparse_attention_indexed,
    linear_gelu,
    qk_norm_rope,
    reset_what_ran,
    what_ran,
)
from .index import BlockIndex, index_to_mask, lpt_schedule, mask_to_index
from .reference import (
    block_mass_ref,
    block_sparse_attention_ref,
    expand_block_mask,
    linear_gelu_ref,
    num_blocks,
    qk_norm_rope_ref,
    rope_interleaved_ref,
)

__all__ = [
    "BlockIndex",
    "KernelConfig",
    "attention_with_block_mass",
    "block_mass",
    "block_mass_ref",
    "block_sparse_attention",
    "block_sparse_attention_indexed",
    "block_sparse_attention_ref",
    "dispatch",
    "expand_block_mask",
    "index_to_mask",
    "linear_gelu",
    "linear_gelu_ref",
    "lpt_schedule",
    "mask_to_index",
    "num_blocks",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "reset_what_ran",
    "rope_interleaved_ref",
    "triton_usable",
    "what_ran",
]
