"""The attention seam's model-independent half: what our processors do with q, k, v.

A model adapter installs one processor per self-attention layer (layer index baked in at install time)
and hands q, k, v to its controller's `attend` (or `attend_joint`) as [B, H, N, D] views. The controller
knows the current denoising step (the sampling loop's step callback advances it) and
- runs dense attention (`DenseController`),
- runs dense attention and records block attention mass for calibration (`RecordController`), or
- runs block-sparse attention from a compiled plan (`SparseController`).
`AttentionController(mode, ...)` builds the one a mode string names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import calibatt_kernels as ck

from .guard import Guard
from .plan import SparsePlan
from .processor import SparseLayer, prepare_layer


@dataclass
class MassRecorder:
    """Sums block-mass matrices per (bucket, layer) over prompts, CFG branches and steps.

    The sums are fixed point (int64, see `fixed_mass`): integer addition does not depend on its order, so the
    same calls recorded by one process, by several (summed across them), or in shards give the same bits."""

    step_buckets: list[int]
    block_size: int
    sums: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # int64 [H, Mq, Mk], fixed point
    counts: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(
        self, bucket: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Record one call's block mass. With `v`, also return the call's dense attention output (on the CPU
        both come from one softmax: attention_with_block_mass)."""
        bs = (self.block_size, self.block_size)
        out = None
        if v is None:
            mass = ck.block_mass(q, k, block_size=bs)
        else:
            out, mass = ck.attention_with_block_mass(q, k, v, block_size=bs)
        mass = fixed_mass(mass.to(torch.float64).sum(0).cpu())  # over the batch
        key = (bucket, layer)
        if key in self.sums:
            self.sums[key] += mass
        else:
            self.sums[key] = mass
        self.counts[key] = self.counts.get(key, 0) + q.shape[0]
        return out

    def mean(self, bucket: int, layer: int) -> torch.Tensor:
        return mass_from_fixed(self.sums[(bucket, layer)]) / self.counts[(bucket, layer)]


# 2^-40 resolution (~1e-12) is far below any epsilon; a sum of up to 2^23 calls of mass <= 1 per entry fits int64.
MASS_SCALE = 2.0**40


def fixed_mass(mass: torch.Tensor) -> torch.Tensor:
    """float block mass -> int64 fixed point (see MassRecorder)."""
    return torch.round(mass.to(torch.float64) * MASS_SCALE).to(torch.int64)


def mass_from_fixed(total: torch.Tensor) -> torch.Tensor:
    return total.to(torch.float64) / MASS_SCALE


class Controller:
    """Follows the denoising steps and attends densely; the three controllers differ only in what they do
    on a step that has a bucket (a sparse or recorded step)."""

    mode = "dense"
    plan: SparsePlan | None = None
    recorder: MassRecorder | None = None
    measure_mass = False

    def __init__(self):
        self.step = 0
        self.step_hooks: list = []  # called after each denoising step (progress bars)
        # The current bucket and whether this step is dense (what SparseLayer.run reads at each call).
        self.bucket = 0
        self.dense_now = True

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

    def fast(self) -> bool:
        """True when a processor may hand every call to its SparseLayer through `layer_attention_op`, which
        reads the step when it runs: a compiled block holds no Python value that changes during a run."""
        return False

    def _bucket(self, buckets: list[int]) -> int:
        if self.step >= len(buckets):
            raise RuntimeError(f"denoising step {self.step} is beyond the {len(buckets)} steps the masks cover")
        return buckets[self.step]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, N, D] (any strides). Returns [B, H, N, D]."""
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
        return _dense_joint(q, k, v, q_txt, k_txt, v_txt)

    def retained_mass(self) -> float | None:
        return None


class DenseController(Controller):
    """Dense attention on every step (the baseline, and a step counter for the stock pipeline)."""


class RecordController(Controller):
    """Dense attention; on the calibrated steps, also the block mass of every call into the recorder."""

    mode = "record"

    def __init__(self, recorder: MassRecorder):
        super().__init__()
        self.recorder = recorder

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bucket = self._bucket(self.recorder.step_buckets)
        if bucket >= 0:
            return self.recorder.add(bucket, layer, q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    def attend_joint(self, layer, q, k, v, q_txt, k_txt, v_txt):
        bucket = self._bucket(self.recorder.step_buckets)
        if bucket >= 0:
            self.recorder.add(bucket, layer, q, k)
        return _dense_joint(q, k, v, q_txt, k_txt, v_txt)


class SparseController(Controller):
    """Block-sparse attention from a compiled plan on its sparse steps (dense for the groups where compile
    measured dense faster, SparsePlan.dense), dense on its warm-up steps."""

    mode = "sparse"

    def __init__(
        self, plan: SparsePlan, measure_mass: bool = False, guard: Guard | None = None, precision: str = "bf16"
    ):
        super().__init__()
        self.plan = plan
        # "fp8": the sparse calls run the quantized kernel (dispatch.block_sparse_attention_fp8_indexed); the
        # processors' layers call the same function (SparseLayer.run)
        self.precision = precision
        self.sparse_attention = (
            ck.dispatch.block_sparse_attention_fp8_indexed
            if precision == "fp8"
            else ck.dispatch.block_sparse_attention_indexed
        )
        self.guard = guard  # checks the masks at each bucket's first sparse step, widens heads that lose mass
        # Live check of the masks: the share of the true softmax mass that the kept blocks hold, measured
        # on this run's own q and k. Costs one block_mass pass per sparse call.
        self.measure_mass = measure_mass
        self._kept_sum = 0.0
        self._kept_rows = 0
        # The same per (bucket, layer, head): float64 sums and int64 row counts [buckets, layers, heads].
        self._kept_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._set_step(0)  # sparse from the first call: processors read dense_now on their fast paths

    def _set_step(self, step: int) -> None:
        self.step = step
        if step < len(self.plan.step_buckets):
            bucket = self.plan.step_buckets[step]
            self.dense_now = bucket < 0
            self.bucket = max(bucket, 0)
            # what ran is recorded per (bucket, layer): each sparse call names its own
            ck.dispatch.set_scope(None)

    def sparse_layer(self, layer: int) -> SparseLayer:
        """What a processor of `layer` holds to take the fast path (fast)."""
        return SparseLayer(self, layer)

    def reset(self) -> None:
        super().reset()
        if self.guard is not None:  # each video starts from the plan as compiled
            for layer in self.guard.reset():
                self._refresh(layer)

    def guard_due(self) -> bool:
        """True on a step whose calls the guard measures (callers call guard_check, then attend as usual)."""
        return self.guard is not None and not self.dense_now and self.guard.due(self.step)

    def guard_check(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        bucket = self._bucket(self.plan.step_buckets)
        if (bucket, layer) in self.plan.dense:  # runs dense: no mask to check
            return
        if self.guard.due(self.step) and self.guard.check(bucket, layer, q, k):
            self._refresh(layer)

    def _refresh(self, layer: int) -> None:
        """The plan's index of `layer` was replaced (the guard widened or put it back): what its launches
        derive from it is made now, at the check, not in a later call."""
        prepare_layer(self.plan, layer, self.precision)

    def fast(self) -> bool:
        return not self.measure_mass

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bucket = self._bucket(self.plan.step_buckets)
        if bucket < 0:
            return F.scaled_dot_product_attention(q, k, v)
        bs = (self.plan.block_size, self.plan.block_size)
        index = self.plan.index[(bucket, layer)]
        if self.measure_mass:
            self._measure(q, k, index, bs, bucket, layer)
        ck.dispatch.set_scope((bucket, layer))
        if (bucket, layer) in self.plan.dense:
            return F.scaled_dot_product_attention(q, k, v)
        return self.sparse_attention(q, k, v, index, block_size=bs, config=self.plan.configs.get((bucket, layer)))

    def attend_joint(self, layer, q, k, v, q_txt, k_txt, v_txt):
        bucket = self._bucket(self.plan.step_buckets)
        if bucket < 0:
            return _dense_joint(q, k, v, q_txt, k_txt, v_txt)
        out_txt = F.scaled_dot_product_attention(q_txt, torch.cat([k, k_txt], 2), torch.cat([v, v_txt], 2))
        if self.guard_due():
            self.guard_check(layer, q, k)
        bs = (self.plan.block_size, self.plan.block_size)
        index = self.plan.index[(bucket, layer)]
        if self.measure_mass:
            self._measure(q, k, index, bs, bucket, layer)
        ck.dispatch.set_scope((bucket, layer))
        if (bucket, layer) in self.plan.dense:
            return _dense_joint(q, k, v, q_txt, k_txt, v_txt)
        out_vis, lse_vis = self.sparse_attention(  # (fp8 returns no lse: it falls back to bf16, recorded)
            q, k, v, index, block_size=bs, config=self.plan.configs.get((bucket, layer)), return_lse=True
        )
        if k_txt.shape[2] == 0:
            return out_vis, out_txt
        out_t, lse_t = _attention_with_lse(q, k_txt, v_txt)
        lse = torch.logaddexp(lse_vis, lse_t)  # text keys make every row non-empty: lse is finite
        w_vis = torch.exp(lse_vis - lse).unsqueeze(-1)
        w_txt = torch.exp(lse_t - lse).unsqueeze(-1)
        out_vis = (out_vis.float() * w_vis + out_t * w_txt).to(q.dtype)
        return out_vis, out_txt

    def _measure(
        self, q: torch.Tensor, k: torch.Tensor, index: ck.BlockIndex, bs: tuple[int, int], bucket: int, layer: int
    ) -> None:
        mass = ck.block_mass(q, k, block_size=bs)  # [B, H, Mq, Mk]
        mask = ck.index_to_mask(index, mass.shape[-1]).to(mass.device)
        if (bucket, layer) in self.plan.dense:  # runs dense: every block is kept
            mask = torch.ones_like(mask)
        kept = (mass * mask).sum(-1)  # [B, H, Mq]
        self._kept_sum += float(kept.double().sum())
        self._kept_rows += kept.numel()
        if self._kept_table is None:
            shape = (1 + max(self.plan.step_buckets), 1 + max(key[1] for key in self.plan.index), kept.shape[1])
            self._kept_table = (torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.int64))
        sums, rows = self._kept_table
        sums[bucket, layer] += kept.double().sum((0, 2)).cpu()
        rows[bucket, layer] += kept.shape[0] * kept.shape[2]

    def retained_mass(self) -> float | None:
        """Mean over the query-block rows of all sparse calls so far of the mass their kept blocks hold."""
        return self._kept_sum / self._kept_rows if self._kept_rows else None

    def mass_totals(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(kept-mass sums float64, row counts int64), each [buckets, layers, heads], over the sparse calls so
        far (copies); None before the first measured call. Two snapshots' difference is what happened between."""
        return None if self._kept_table is None else (self._kept_table[0].clone(), self._kept_table[1].clone())


def mass_table(sums: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean kept mass per entry from mass_totals()' sums and row counts; NaN where no row was measured."""
    return torch.where(rows > 0, sums / rows.clamp(min=1), torch.full_like(sums, float("nan")))


def AttentionController(
    mode: str, *, plan: SparsePlan | None = None, recorder: MassRecorder | None = None, measure_mass: bool = False
) -> Controller:
    """The controller of a mode: 'dense', 'record' (needs `recorder`) or 'sparse' (needs `plan`)."""
    if mode not in ("dense", "record", "sparse"):
        raise ValueError(f"unknown attention mode {mode!r}")
    if mode == "sparse" and plan is None:
        raise ValueError("sparse mode needs a plan")
    if mode == "record" and recorder is None:
        raise ValueError("record mode needs a recorder")
    if mode == "sparse":
        return SparseController(plan, measure_mass=measure_mass)
    if mode == "record":
        return RecordController(recorder)
    return DenseController()


def _dense_joint(q, k, v, q_txt, k_txt, v_txt) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention as one SDPA over the concatenated visual + text sequence."""
    n = q.shape[2]
    out = F.scaled_dot_product_attention(torch.cat([q, q_txt], 2), torch.cat([k, k_txt], 2), torch.cat([v, v_txt], 2))
    return out[:, :, :n], out[:, :, n:]


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows_per_chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q [B, H, N, D] over a few keys [B, H, T, D] (text), in fp32, with the row
    log-sum-exp: (out float32 [B, H, N, D], lse float32 [B, H, N]). Chunked over rows so the N x T scores
    stay small for long videos."""
    scale = q.shape[-1] ** -0.5
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for r0 in range(0, q.shape[2], rows_per_chunk):
        s = torch.einsum("bhnd,bhtd->bhnt", q[:, :, r0 : r0 + rows_per_chunk].float(), kf) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("bhnt,bhtd->bhnd", torch.exp(s - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)
