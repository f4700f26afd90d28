"""calibatt_kernels: block-sparse attention, calibration block mass, and Wan's fused q/k norm + RoPE and
FFN up-projection + GELU.

Installed under the import name `calibatt_kernels` (never `kernels`: PyPI has an unrelated package of
that name that diffusers probes for). Each kernel module holds its Triton kernel and launcher; the
pure-PyTorch references live in `reference.py` and are the CPU path.
"""

from __future__ import annotations

import logging
import os

import torch

# The kernel modules are imported here, before `def block_mass` below: importing a submodule binds its name
# on the package, so a lazy `from .block_mass import ...` inside `block_mass()` would replace the public
# function `calibatt_kernels.block_mass` by the module on first use.
from . import block_mass as _mass_kernels
from . import block_sparse as _sparse_kernels
from . import cpu as _cpu_kernels
from . import norm_rope as _qk_kernels
from .index import BlockIndex, index_to_mask, lpt_schedule, mask_to_index
from .linear_gelu import linear_gelu
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
    "attention_with_block_mass",
    "block_mass",
    "block_mass_ref",
    "block_sparse_attention",
    "block_sparse_attention_indexed",
    "block_sparse_attention_ref",
    "expand_block_mask",
    "index_to_mask",
    "linear_gelu",
    "linear_gelu_ref",
    "lpt_schedule",
    "mask_to_index",
    "num_blocks",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "rope_interleaved_ref",
    "triton_usable",
]

log = logging.getLogger("calibatt.kernels")
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of this device (a Hopper/Ampere GPU, or the CPU
    under TRITON_INTERPRET=1). Otherwise callers fall back to the references (and say so once)."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return False


def block_sparse_attention_indexed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    config: _sparse_kernels.KernelConfig | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention from the precomputed index form (see `index.py`). `config`: the kernel
    configuration `calibatt compile` chose (None: `block_sparse.default_config`); the reference ignores it.
    `return_lse`: also return each row's log-sum-exp, float32 [B, H, N] (-inf for rows with no block)."""
    if triton_usable(q.device) and q.shape[-1] in (64, 128):
        return _sparse_kernels.block_sparse_attention_triton(q, k, v, index, block_size=block_size, scale=scale,
                                                             config=config, return_lse=return_lse)
    if q.device.type == "cpu" and not return_lse:
        # exact like the reference, about twice as fast (SDPA's fused CPU kernel per query block)
        _warn_once("calibatt_kernels: Triton unavailable for cpu; using the PyTorch path (kernels/cpu.py)")
        return _cpu_kernels.block_sparse_attention_rows(q, k, v, index, block_size=block_size, scale=scale)
    _warn_once(f"calibatt_kernels: Triton unavailable for {q.device.type}; using the PyTorch reference")
    mask = index_to_mask(index, num_blocks(k.shape[2], block_size[1]))
    return block_sparse_attention_ref(q, k, v, mask, block_size, scale, return_lse=return_lse)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention; q, k, v [B, H, N, D] (any strides), block_mask bool [(B,) H, Mq, Mk]."""
    return block_sparse_attention_indexed(
        q, k, v, mask_to_index(block_mask, with_schedule=True), block_size=block_size, scale=scale
    )


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
) -> torch.Tensor:
    """float32 [B, H, Mq, Mk]: mean over each query block's queries of the softmax mass per key block."""
    if triton_usable(q.device) and q.shape[-1] in (64, 128):
        return _mass_kernels.block_mass_triton(q, k, block_size=block_size, scale=scale)
    _warn_once(f"calibatt_kernels: Triton unavailable for {q.device.type}; using the PyTorch reference")
    return block_mass_ref(q, k, block_size, scale)


def attention_with_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense attention output like q's layout, block_mass) of one call: what calibration records. On the
    GPU, SDPA and the block_mass kernel; where Triton cannot run, one pass of the reference gives both from
    the same probabilities (one softmax instead of SDPA plus block_mass_ref's own: ~25 % less calibration
    time on the CPU)."""
    if triton_usable(q.device) and q.shape[-1] in (64, 128):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out, _mass_kernels.block_mass_triton(q, k, block_size=block_size)
    _warn_once(f"calibatt_kernels: Triton unavailable for {q.device.type}; using the PyTorch reference")
    mass, out = block_mass_ref(q, k, block_size, v=v)
    return out, mass


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's q/k preparation: RMS norm of q and k [B, N, C] over their C channels, then the interleaved
    rotary embedding (cos, sin: [1, N, 1, D] or [N, D]). Returns contiguous [B, N, heads, D] tensors."""
    if triton_usable(q.device):
        return _qk_kernels.qk_norm_rope_triton(q, k, weight_q, weight_k, cos, sin, heads=heads, eps=eps)
    _warn_once(f"calibatt_kernels: Triton unavailable for {q.device.type}; using the PyTorch reference")
    return qk_norm_rope_ref(q, k, weight_q, weight_k, cos, sin, heads=heads, eps=eps)
