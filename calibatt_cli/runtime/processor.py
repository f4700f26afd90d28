"""What a family's attention processor calls on a sparse run's fast path (see models/wan.py).

A processor hands q, k, v to `layer_attention_op` with its layer's handle. The op is opaque to torch.compile,
so a compiled block holds one call of it and nothing of the plan: which step, bucket and index run, whether
the step is a dense warm-up, the kernel configuration, the guard's check and its widening are all read when
the op runs, in Python, from the `SparseLayer` the handle names. One graph then serves every step of a run
(dense warm-up and each bucket), a widened head takes effect at the very call the guard measured (as in
eager), and the compiled graph is the same with and without the guard.

With precision fp8, Wan's processor hands over the q/k projections instead (`layer_attention_qk_op`): the op
runs the q/k norm + RoPE itself, so that on the calls that run the fp8 kernel q is quantized in that pass,
and the calls that need the normed q (dense, the guard's check) get it. Deciding before the norm, in the
processor, would put the step into the compiled graph.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

import calibatt_kernels as ck

if TYPE_CHECKING:  # the controller builds these layers (SparseController.sparse_layer)
    from .controllers import SparseController

# handle's data_ptr -> the SparseLayer it names. A handle is a one-byte tensor each SparseLayer owns: while the
# layer lives, no other live tensor starts at its address. (An int key would be a constant in the graph, and
# the FX-graph cache key of a compiled block would change from one process to the next.)
_LAYERS: weakref.WeakValueDictionary[int, SparseLayer] = weakref.WeakValueDictionary()


class SparseLayer:
    """One self-attention layer's share of a sparse run. It reads the step, the plan (index, kernel config,
    planned-dense groups) and the guard from its controller when a call runs; what a launch derives from an
    index (the Gluon kernel's tile records and last-wave splits, the block count that the record of what ran
    adds per call) it makes here, at load and when the guard replaces an index, so that a call never waits
    for the GPU."""

    def __init__(self, controller: SparseController, layer: int):
        self.layer = layer
        self.controller = controller
        self.handle = torch.zeros(1, dtype=torch.uint8)
        _LAYERS[self.handle.data_ptr()] = self
        self.refresh()

    def refresh(self) -> None:
        """Make what the launches derive from the plan's index of this layer (after a caller replaced one)."""
        prepare_layer(self.controller.plan, self.layer, self.controller.precision)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer's attention (q, k, v [B, H, N, D]) through the registered op: a compiled caller keeps one
        opaque call, which runs `run` when it executes."""
        return layer_attention_op(q, k, v, self.handle)

    def attend_qk(self, q, k, v, weight_q, weight_k, cos, sin, eps: float) -> torch.Tensor:
        """Wan's q/k norm + RoPE and the layer's attention in one registered op (`layer_attention_qk_op`), for
        fp8: q, k [B, N, C] projections, v [B, N, H, D] -> [B, H, N, D] as `__call__` returns. Inside one op,
        whether q is quantized in the norm's pass is decided per call, where the step is known (`run_qk`)."""
        return layer_attention_qk_op(q, k, v, weight_q, weight_k, cos, sin, eps, self.handle)

    def run_qk(self, q, k, v, weight_q, weight_k, cos, sin, eps: float) -> torch.Tensor:
        """`attend_qk` on this call's step. A call that runs fp8 block-sparse attention gets q's codes from the
        norm + RoPE kernel (dispatch.qk_norm_rope_attention_fp8: the codes, so the output, of the unfused
        path). The others need the normed q itself: dense steps and groups (SDPA on it), and the guard's
        check step (block mass of q and k); they run the norm + RoPE kernel, then `run`."""
        c = self.controller
        key = (c.bucket, self.layer)
        if c.dense_now or key in c.plan.dense or c.guard_due():
            qn, kn = ck.dispatch.qk_norm_rope(q, k, weight_q, weight_k, cos, sin, heads=v.shape[2], eps=eps)
            return self.run(qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2))
        ck.dispatch.set_scope(key)
        bs = (c.plan.block_size, c.plan.block_size)
        return ck.dispatch.qk_norm_rope_attention_fp8(
            q,
            k,
            v,
            weight_q,
            weight_k,
            cos,
            sin,
            c.plan.index[key],
            eps=eps,
            block_size=bs,
            config=c.plan.configs.get(key),
        )

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer's attention on this call's step, as the plan (and the guard) say."""
        c = self.controller
        if c.dense_now:  # a warm-up step
            return _like(F.scaled_dot_product_attention(q, k, v), q)
        key = (c.bucket, self.layer)
        ck.dispatch.set_scope(key)
        if key in c.plan.dense:  # compile measured dense attention faster here: it runs dense, as planned
            return _like(F.scaled_dot_product_attention(q, k, v), q)
        if c.guard_due():
            c.guard_check(self.layer, q, k)  # may widen: the plan's index is then new, and refreshed
        bs = (c.plan.block_size, c.plan.block_size)
        return c.sparse_attention(q, k, v, c.plan.index[key], block_size=bs, config=c.plan.configs.get(key))


def prepare_layer(plan, layer: int, precision: str) -> None:
    """Make what each bucket's launches derive from `plan`'s index of `layer`, once per index object (it is kept
    with the index: BlockIndex.records, split_rows, derived)."""
    for b in range(1 + max(plan.step_buckets)):
        index = plan.index[(b, layer)]
        if "kept_blocks" not in index.derived:
            if precision != "fp8":  # (the fp8 kernel reads the index itself: nothing to derive)
                index.records, index.split_rows = ck.dispatch.launch_records(index, plan.configs.get((b, layer)))
            index.derived["kept_blocks"] = index.counts.sum(dtype=torch.int64)


def _like(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`out` in the layout the op declares (torch.empty_like(q)'s strides), which compiled code relies on. The
    kernels allocate so; SDPA's output usually matches and is copied when it does not."""
    if out.stride() == torch.empty_like(q, device="meta").stride():
        return out
    return torch.empty_like(q).copy_(out)


@torch.library.custom_op("calibatt::layer_attention", mutates_args=())
def layer_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    """One sparse run's self-attention of the layer `handle` names (SparseLayer.run): q, k, v [B, H, N, D]."""
    layer = _LAYERS.get(handle.data_ptr())
    if layer is None:
        raise RuntimeError("calibatt::layer_attention called for a layer whose sparse run has ended")
    return layer.run(q, k, v)


@layer_attention_op.register_fake
def _(q, k, v, handle):
    return torch.empty_like(q)


@torch.library.custom_op("calibatt::layer_attention_qk", mutates_args=())
def layer_attention_qk_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    handle: torch.Tensor,
) -> torch.Tensor:
    """`layer_attention_op` with Wan's q/k RMS norm + RoPE inside (SparseLayer.run_qk): q, k [B, N, C]
    projections, norm weights [C], RoPE tables, v [B, N, H, D]; returns [B, H, N, D] laid out as [B, N, H, D]."""
    layer = _LAYERS.get(handle.data_ptr())
    if layer is None:
        raise RuntimeError("calibatt::layer_attention_qk called for a layer whose sparse run has ended")
    return layer.run_qk(q, k, v, weight_q, weight_k, cos, sin, eps)


@layer_attention_qk_op.register_fake
def _(q, k, v, weight_q, weight_k, cos, sin, eps, handle):
    B, N, H, D = v.shape
    return q.new_empty_strided((B, H, N, D), (N * H * D, D, H * D, 1))
