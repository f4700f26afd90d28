"""What a family's attention processor calls on a sparse run's fast path (see models/wan.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

import calibatt_kernels as ck
from calibatt_kernels import ops as ck_ops

if TYPE_CHECKING:  # the controller builds these layers (SparseController.sparse_layer)
    from .controllers import SparseController


class SparseLayer:
    """What one processor needs to run its layer as the plan says without Python lookups: its stacked index
    tensors, the controller's bucket tensor, and what each bucket's launch derives from its index, made
    here at load (so a call never waits for the GPU). Calls the registered custom op, so torch.compile
    keeps it."""

    def __init__(self, controller: SparseController, layer: int):
        plan = controller.plan
        self.layer = layer
        self.block = plan.block_size
        self.controller = controller
        nb = 1 + max(plan.step_buckets)
        # Per bucket as Python values (a compiled caller specialises per bucket; the index tensors stay
        # data): the kernel configuration compile chose, and whether compile measured dense attention faster.
        self.configs = [ck_ops.config_as_op_arg(plan.configs.get((b, layer))) for b in range(nb)]
        self.dense = [(b, layer) in plan.dense for b in range(nb)]
        # precision fp8: the quantized kernel's op (INT8 Q.K^T, FP8 P.V), else the bf16 one
        self.fp8 = controller.precision == "fp8"
        self.op = ck_ops.block_sparse_attention_fp8_op if self.fp8 else ck_ops.block_sparse_attention_op
        self.refresh()

    def refresh(self) -> None:
        """Re-read the plan's stacked tensors (the guard replaces them when it widens a head) and make what
        each bucket's launch derives from its index (BlockIndex.records), once per index."""
        plan = self.controller.plan
        self.counts, self.offsets, self.indices, self.schedules = plan.layer_tensors(self.layer)
        launch = [
            # (the fp8 kernel reads the index itself: nothing to derive)
            (None, None)
            if self.fp8
            else ck.dispatch.launch_records(plan.index[(b, self.layer)], plan.configs.get((b, self.layer)))
            for b in range(len(self.configs))
        ]
        # Lists, not stacks: the records' count varies with the masks (split last waves).
        self.records = [records for records, _ in launch]
        self.split_rows = [split_rows for _, split_rows in launch]
        # each bucket's block count, summed here once: the op's record of what ran counts it per call
        self.kept = [plan.index[(b, self.layer)].counts.sum(dtype=torch.int64) for b in range(len(self.configs))]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bucket = self.controller.bucket
        if self.dense[bucket]:
            return F.scaled_dot_product_attention(q, k, v)
        b = self.controller.bucket_t
        if not torch.compiler.is_compiling():  # (compiled, the calls keep the controller's (bucket, "*") scope)
            ck.dispatch.set_scope((self.controller.bucket, self.layer))
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
            self.configs[bucket],
            *(() if self.fp8 else (self.records[bucket], self.split_rows[bucket], self.kept[bucket])),
        )
