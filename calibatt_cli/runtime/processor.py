"""What a family's attention processor calls on a sparse run's fast path (see models/wan.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from calibatt_kernels import dispatch as ck_dispatch
from calibatt_kernels import ops as ck_ops

if TYPE_CHECKING:  # the controller builds these layers (SparseController.sparse_layer)
    from .controllers import SparseController


class SparseLayer:
    """What one processor needs to run its layer sparse without Python lookups: its stacked index tensors
    and the controller's bucket tensor. Calls the registered custom op, so torch.compile keeps it."""

    def __init__(self, controller: SparseController, layer: int):
        plan = controller.plan
        self.layer = layer
        self.block = plan.block_size
        self.controller = controller
        self.refresh()
        # The kernel configuration compile chose per bucket (launch parameters, so Python values: a compiled
        # caller specialises per bucket, and the index tensors stay data).
        nb = self.counts.shape[0]
        self.configs = [ck_ops.config_as_op_arg(plan.configs.get((b, layer))) for b in range(nb)]
        # precision fp8: the quantized kernel's op (INT8 Q.K^T, FP8 P.V), else the bf16 one
        fp8 = controller.precision == "fp8"
        self.op = ck_ops.block_sparse_attention_fp8_op if fp8 else ck_ops.block_sparse_attention_op

    def refresh(self) -> None:
        """Re-read the plan's stacked tensors (the guard replaces them when it widens a head)."""
        self.counts, self.offsets, self.indices, self.schedules = self.controller.plan.layer_tensors(self.layer)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.controller.bucket_t
        if not torch.compiler.is_compiling():  # (compiled, the calls keep the controller's (bucket, "*") scope)
            ck_dispatch.set_scope((self.controller.bucket, self.layer))
        return self.op(
            q,
            k,
            v,
            self.counts.index_select(0, b).squeeze(0),
            self.offsets.index_select(0, b).squeeze(0),
            self.indices.index_select(0, b).squeeze(0),
            self.schedules.index_select(0, b).squeeze(0),
            self.block,
            self.block,
            self.configs[self.controller.bucket],
        )
