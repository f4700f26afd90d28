"""The attention seam's model-independent half: what our processors do with q, k, v.

A model adapter installs one processor per self-attention layer (layer index baked in at install time)
and hands q, k, v to `AttentionController.attend` as [B, H, N, D] views. The controller knows the
current denoising step (the sampling loop's step callback advances it) and either
- runs dense attention (`dense`),
- runs dense attention and records block attention mass for calibration (`record`), or
- runs block-sparse attention from a compiled plan (`sparse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import calibatt_kernels as ck


@dataclass
class SparsePlan:
    """Runtime form of a mask bundle: per (bucket, layer) a BlockIndex on the model's device."""

    block_size: int
    step_buckets: list[int]  # step -> bucket; -1 marks a dense (warm-up) step
    index: dict[tuple[int, int], ck.BlockIndex]
    density: torch.Tensor  # float [buckets, layers, heads]: kept share of blocks

    def to(self, device: torch.device) -> SparsePlan:
        moved = {
            key: ck.BlockIndex(
                ix.counts.to(device),
                ix.indices.to(device),
                None if ix.schedule is None else ix.schedule.to(device),
            )
            for key, ix in self.index.items()
        }
        return SparsePlan(self.block_size, self.step_buckets, moved, self.density)

    def mean_density(self) -> tuple[float, float]:
        """(over all steps with warm-up steps counted dense, over the sparse steps only)."""
        per_bucket = self.density.mean(dim=(1, 2))
        per_step = [1.0 if b < 0 else float(per_bucket[b]) for b in self.step_buckets]
        sparse = [d for d, b in zip(per_step, self.step_buckets, strict=True) if b >= 0]
        return sum(per_step) / len(per_step), (sum(sparse) / len(sparse) if sparse else 1.0)


@dataclass
class MassRecorder:
    """Sums block-mass matrices per (bucket, layer) over prompts, CFG branches and steps."""

    step_buckets: list[int]
    block_size: int
    sums: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # float64 [H, Mq, Mk]
    counts: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, bucket: int, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        bs = (self.block_size, self.block_size)
        mass = ck.block_mass(q, k, block_size=bs).to(torch.float64).sum(0).cpu()  # over the batch
        key = (bucket, layer)
        if key in self.sums:
            self.sums[key] += mass
        else:
            self.sums[key] = mass
        self.counts[key] = self.counts.get(key, 0) + q.shape[0]

    def mean(self, bucket: int, layer: int) -> torch.Tensor:
        return self.sums[(bucket, layer)] / self.counts[(bucket, layer)]


class AttentionController:
    def __init__(self, mode: str, *, plan: SparsePlan | None = None, recorder: MassRecorder | None = None,
                 measure_mass: bool = False):
        if mode not in ("dense", "record", "sparse"):
            raise ValueError(f"unknown attention mode {mode!r}")
        if mode == "sparse" and plan is None:
            raise ValueError("sparse mode needs a plan")
        if mode == "record" and recorder is None:
            raise ValueError("record mode needs a recorder")
        self.mode = mode
        self.plan = plan
        self.recorder = recorder
        self.step = 0
        self.calls = 0
        self.step_hooks: list = []  # called after each denoising step (progress bars)
        # Live check of the masks (sparse mode): the share of the true softmax mass that the kept blocks
        # hold, measured on this run's own q and k. Costs one block_mass pass per sparse call.
        self.measure_mass = measure_mass
        self._kept_sum = 0.0
        self._kept_rows = 0

    # The pipeline's callback_on_step_end runs after step i, so the next forward belongs to step i + 1.
    def on_step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        self.step = i + 1
        for hook in self.step_hooks:
            hook()
        return {}

    def reset(self) -> None:
        self.step = 0

    def _bucket(self, buckets: list[int]) -> int:
        if self.step >= len(buckets):
            raise RuntimeError(f"denoising step {self.step} is beyond the {len(buckets)} steps the masks cover")
        return buckets[self.step]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, N, D] (any strides). Returns [B, H, N, D]."""
        self.calls += 1
        if self.mode == "sparse":
            bucket = self._bucket(self.plan.step_buckets)
            if bucket >= 0:
                bs = (self.plan.block_size, self.plan.block_size)
                index = self.plan.index[(bucket, layer)]
                if self.measure_mass:
                    self._measure(q, k, index, bs)
                return ck.block_sparse_attention_indexed(q, k, v, index, block_size=bs)
        elif self.mode == "record":
            bucket = self._bucket(self.recorder.step_buckets)
            if bucket >= 0:
                self.recorder.add(bucket, layer, q, k)
        return F.scaled_dot_product_attention(q, k, v)

    def _measure(self, q: torch.Tensor, k: torch.Tensor, index: ck.BlockIndex, bs: tuple[int, int]) -> None:
        mass = ck.block_mass(q, k, block_size=bs)  # [B, H, Mq, Mk]
        mask = ck.index_to_mask(index, mass.shape[-1]).to(mass.device)
        kept = (mass * mask).sum(-1)  # [B, H, Mq]
        self._kept_sum += float(kept.double().sum())
        self._kept_rows += kept.numel()

    def retained_mass(self) -> float | None:
        """Mean over the query-block rows of all sparse calls so far of the mass their kept blocks hold."""
        return self._kept_sum / self._kept_rows if self._kept_rows else None

    def reset_measure(self) -> None:
        self._kept_sum, self._kept_rows = 0.0, 0
