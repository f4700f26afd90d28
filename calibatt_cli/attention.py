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
from calibatt_kernels import ops as ck_ops
from calibatt_kernels.block_sparse import KernelConfig


@dataclass
class SparsePlan:
    """Runtime form of a mask bundle: per (bucket, layer) a BlockIndex on the model's device."""

    block_size: int
    step_buckets: list[int]  # step -> bucket; -1 marks a dense (warm-up) step
    index: dict[tuple[int, int], ck.BlockIndex]
    density: torch.Tensor  # float [buckets, layers, heads]: kept share of blocks
    configs: dict[tuple[int, int], KernelConfig] = field(default_factory=dict)  # chosen by compile; else default
    _stacks: dict[int, tuple] = field(default_factory=dict, repr=False)  # per layer, see layer_tensors

    def to(self, device: torch.device) -> SparsePlan:
        """The plan on `device`. Each layer's buckets are stacked once (what processors hold, see
        layer_tensors) and the per-(bucket, layer) entries become views into the stacks: the index form is
        on the device once, not twice."""
        plan = SparsePlan(self.block_size, self.step_buckets, {}, self.density, self.configs)
        nb = 1 + max(self.step_buckets)
        for layer in sorted({key[1] for key in self.index}):
            stack = tuple(t.to(device) for t in self._stack(layer))
            plan._stacks[layer] = stack
            for b in range(nb):
                plan.index[(b, layer)] = ck.BlockIndex(*(t[b] for t in stack))
        return plan

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer's index form stacked over buckets: counts and offsets [nb, B, H, Mq], indices [nb, L]
        (L: the layer's longest bucket, rounded up to 16 bytes so every bucket's view is as aligned as a
        fresh tensor and the kernel specialises alike), schedules [nb, R]. A processor holds these and picks
        the bucket with a tensor index: no Python lookup that torch.compile would have to guard on."""
        if layer not in self._stacks:
            self._stacks[layer] = self._stack(layer)
        return self._stacks[layer]

    def _stack(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        nb = 1 + max(self.step_buckets)
        ixs = [self.index[(b, layer)] for b in range(nb)]
        width = -(-max(ix.indices.shape[0] for ix in ixs) // 8) * 8  # int16: 8 ids = 16 bytes
        pad = [torch.nn.functional.pad(ix.indices, (0, width - ix.indices.shape[0])) for ix in ixs]
        return (torch.stack([ix.counts for ix in ixs]), torch.stack([ix.offsets for ix in ixs]), torch.stack(pad),
                torch.stack([ix.schedule for ix in ixs]))

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

    def add(self, bucket: int, layer: int, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor | None = None) -> torch.Tensor | None:
        """Record one call's block mass. With `v`, also return the call's dense attention output (on the CPU
        both come from one softmax: attention_with_block_mass)."""
        bs = (self.block_size, self.block_size)
        out = None
        if v is None:
            mass = ck.block_mass(q, k, block_size=bs)
        else:
            out, mass = ck.attention_with_block_mass(q, k, v, block_size=bs)
        mass = mass.to(torch.float64).sum(0).cpu()  # over the batch
        key = (bucket, layer)
        if key in self.sums:
            self.sums[key] += mass
        else:
            self.sums[key] = mass
        self.counts[key] = self.counts.get(key, 0) + q.shape[0]
        return out

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
        self.step_hooks: list = []  # called after each denoising step (progress bars)
        # The current bucket as data (for processors running compiled) and whether this step is dense.
        self.bucket_t = torch.zeros(1, dtype=torch.long)
        self.bucket = 0
        self.dense_now = True
        # Live check of the masks (sparse mode): the share of the true softmax mass that the kept blocks
        # hold, measured on this run's own q and k. Costs one block_mass pass per sparse call.
        self.measure_mass = measure_mass
        self._kept_sum = 0.0
        self._kept_rows = 0

    # The pipeline's callback_on_step_end runs after step i, so the next forward belongs to step i + 1.
    def on_step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        self._set_step(i + 1)
        for hook in self.step_hooks:
            hook()
        return {}

    def reset(self) -> None:
        self._set_step(0)

    def _set_step(self, step: int) -> None:
        self.step = step
        if self.plan is not None and step < len(self.plan.step_buckets):
            bucket = self.plan.step_buckets[step]
            self.dense_now = bucket < 0
            self.bucket = max(bucket, 0)
            self.bucket_t.fill_(self.bucket)

    def to(self, device: torch.device) -> AttentionController:
        self.bucket_t = self.bucket_t.to(device)
        return self

    def fast_sparse(self) -> bool:
        """True when a processor may call the sparse op directly with its own tensors (see SparseLayer)."""
        return self.mode == "sparse" and not self.dense_now and not self.measure_mass

    def fast_dense(self) -> bool:
        """True on a sparse run's dense (warm-up) steps: a processor may run plain SDPA directly.
        The fast paths touch no counters or Python lookups, so compiled blocks do not recompile per call."""
        return self.mode == "sparse" and self.dense_now and not self.measure_mass

    def _bucket(self, buckets: list[int]) -> int:
        if self.step >= len(buckets):
            raise RuntimeError(f"denoising step {self.step} is beyond the {len(buckets)} steps the masks cover")
        return buckets[self.step]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, N, D] (any strides). Returns [B, H, N, D]."""
        if self.mode == "sparse":
            bucket = self._bucket(self.plan.step_buckets)
            if bucket >= 0:
                bs = (self.plan.block_size, self.plan.block_size)
                index = self.plan.index[(bucket, layer)]
                if self.measure_mass:
                    self._measure(q, k, index, bs)
                return ck.block_sparse_attention_indexed(q, k, v, index, block_size=bs,
                                                         config=self.plan.configs.get((bucket, layer)))
        elif self.mode == "record":
            bucket = self._bucket(self.recorder.step_buckets)
            if bucket >= 0:
                return self.recorder.add(bucket, layer, q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    def attend_joint(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_txt: torch.Tensor,
        k_txt: torch.Tensor,
        v_txt: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention (Mochi): visual q, k, v [B, H, N, D] and text q, k, v [B, H, T, D] attend over all
        N + T keys, as SDPA over the concatenated sequence would. Returns (visual out, text out).

        Masks cover only visual x visual blocks; rows and columns that touch text stay dense:
        - text queries: dense over every key;
        - visual queries (sparse mode): the exact softmax over {listed visual key blocks} u {all text keys},
          from two partial attentions merged with their row log-sum-exp.
        Calibration (record mode) measures the mass of visual queries over visual keys, normalised over the
        visual keys alone. Text keys are always kept, so what a mask must preserve is the visual part of each
        row; normalised this way the rows sum to 1 and the epsilon rule means the same as for Wan. It is also
        conservative: a row gives share p of its joint mass to visual keys, so dropping eps of the visual
        mass drops p * eps <= eps of the joint mass. (Normalised over all keys, a row that looks mostly at
        text would sum to p < 1 and could never reach 1 - eps: it would keep every block.)
        """
        bucket = -1
        if self.mode == "sparse":
            bucket = self._bucket(self.plan.step_buckets)
        elif self.mode == "record":
            bucket = self._bucket(self.recorder.step_buckets)
            if bucket >= 0:
                self.recorder.add(bucket, layer, q, k)
        n = q.shape[2]
        if self.mode != "sparse" or bucket < 0:
            out = F.scaled_dot_product_attention(torch.cat([q, q_txt], 2), torch.cat([k, k_txt], 2),
                                                 torch.cat([v, v_txt], 2))
            return out[:, :, :n], out[:, :, n:]

        out_txt = F.scaled_dot_product_attention(q_txt, torch.cat([k, k_txt], 2), torch.cat([v, v_txt], 2))
        bs = (self.plan.block_size, self.plan.block_size)
        index = self.plan.index[(bucket, layer)]
        if self.measure_mass:
            self._measure(q, k, index, bs)
        out_vis, lse_vis = ck.block_sparse_attention_indexed(
            q, k, v, index, block_size=bs, config=self.plan.configs.get((bucket, layer)), return_lse=True)
        if k_txt.shape[2] == 0:
            return out_vis, out_txt
        out_t, lse_t = _attention_with_lse(q, k_txt, v_txt)
        lse = torch.logaddexp(lse_vis, lse_t)  # text keys make every row non-empty: lse is finite
        w_vis = torch.exp(lse_vis - lse).unsqueeze(-1)
        w_txt = torch.exp(lse_t - lse).unsqueeze(-1)
        out_vis = (out_vis.float() * w_vis + out_t * w_txt).to(q.dtype)
        return out_vis, out_txt

    def _measure(self, q: torch.Tensor, k: torch.Tensor, index: ck.BlockIndex, bs: tuple[int, int]) -> None:
        mass = ck.block_mass(q, k, block_size=bs)  # [B, H, Mq, Mk]
        mask = ck.index_to_mask(index, mass.shape[-1]).to(mass.device)
        kept = (mass * mask).sum(-1)  # [B, H, Mq]
        self._kept_sum += float(kept.double().sum())
        self._kept_rows += kept.numel()

    def retained_mass(self) -> float | None:
        """Mean over the query-block rows of all sparse calls so far of the mass their kept blocks hold."""
        return self._kept_sum / self._kept_rows if self._kept_rows else None


class SparseLayer:
    """What one processor needs to run its layer sparse without Python lookups: its stacked index tensors
    and the controller's bucket tensor. Calls the registered custom op, so torch.compile keeps it."""

    def __init__(self, controller: AttentionController, layer: int):
        plan = controller.plan
        self.counts, self.offsets, self.indices, self.schedules = plan.layer_tensors(layer)
        self.block = plan.block_size
        self.controller = controller
        # The kernel configuration compile chose per bucket (launch parameters, so Python values: a compiled
        # caller specialises per bucket, and the index tensors stay data).
        nb = self.counts.shape[0]
        self.configs = [ck_ops.config_to_ints(plan.configs.get((b, layer))) for b in range(nb)]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.controller.bucket_t
        return ck_ops.block_sparse_attention_op(
            q, k, v, self.counts.index_select(0, b).squeeze(0), self.offsets.index_select(0, b).squeeze(0),
            self.indices.index_select(0, b).squeeze(0), self.schedules.index_select(0, b).squeeze(0),
            self.block, self.block,
            self.configs[self.controller.bucket],
        )


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        rows_per_chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q [B, H, N, D] over a few keys [B, H, T, D] (text), in fp32, with the row
    log-sum-exp: (out float32 [B, H, N, D], lse float32 [B, H, N]). Chunked over rows so the N x T scores
    stay small for long videos."""
    scale = q.shape[-1] ** -0.5
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for r0 in range(0, q.shape[2], rows_per_chunk):
        s = torch.einsum("bhnd,bhtd->bhnt", q[:, :, r0:r0 + rows_per_chunk].float(), kf) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("bhnt,bhtd->bhnd", torch.exp(s - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)
