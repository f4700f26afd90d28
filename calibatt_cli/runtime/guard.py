"""The live safety net of `generate` (generate.guard): a mask bundle is only as good as its calibration
prompts, so at the first sparse step of each step bucket the guard measures, for every (layer, head), the
share of the true softmax mass that the plan's kept blocks hold on this run's own q and k. A head that keeps
less than `1 - factor * epsilon` (epsilon: the bundle's) runs dense for the rest of that bucket: the guard
rebuilds that (bucket, layer)'s index with the head's rows full and puts it where the kernels read it.

Sampling: a fixed number of query blocks (SAMPLE_BLOCKS) spread evenly over the sequence, the same for every
head. A fixed count keeps the check's cost flat as videos get longer (a share of rows would grow with the
sequence), and evenly spread rows see every region of a video whose attention is local in space and time;
the head's figure is the mean over those rows and over the batch, so one odd row does not widen a head.

The mass comes from the PyTorch block-mass reference on the sampled queries: the Triton block-mass kernel is
not in a compiled cache, and launching it would compile at generate time (what `--strict` forbids).
A bundle whose masks hold is never touched: nothing is widened and the kernels run the same index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import calibatt_kernels as ck

from .plan import SparsePlan

SAMPLE_BLOCKS = 8  # query blocks measured per head and call


@dataclass
class Widening:
    video: int
    bucket: int
    layer: int
    head: int
    mass: float  # the head's measured retained mass

    def as_dict(self) -> dict:
        return {
            "video": self.video,
            "bucket": self.bucket,
            "layer": self.layer,
            "head": self.head,
            "mass": round(self.mass, 6),
        }


def sample_rows(mq: int, n: int = SAMPLE_BLOCKS) -> torch.Tensor:
    """n query-block ids spread evenly over [0, mq), first and last included (all of them if mq <= n)."""
    return torch.linspace(0, mq - 1, min(n, mq)).round().long().unique()


def sampled_mass(
    q: torch.Tensor, k: torch.Tensor, index: ck.BlockIndex, block: int, rows: torch.Tensor
) -> torch.Tensor:
    """float64 [H]: the mean over the sampled query-block rows (and the batch) of the mass the index keeps.
    q, k: [B, H, N, D]. Only the sampled rows' queries are scored: S x N probabilities per head, not N x N."""
    n, nk = q.shape[2], k.shape[2]
    mk = -(-nk // block)
    rows = rows.to(q.device)
    tokens = (rows[:, None] * block + torch.arange(block, device=q.device)).reshape(-1)
    row_of = torch.arange(rows.numel(), device=q.device).repeat_interleave(block)
    keep = tokens < n  # only the sequence's last block can be partial
    tokens, row_of = tokens[keep], row_of[keep]
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(q.index_select(2, tokens).float() @ (k.float() * scale).transpose(-1, -2), dim=-1)
    p = torch.nn.functional.pad(p, (0, mk * block - nk))  # missing keys hold no weight
    per_key_block = p.view(*p.shape[:3], mk, block).sum(-1)  # [B, H, T, Mk]: each sampled query's mass
    mass = torch.zeros(*p.shape[:2], rows.numel(), mk, device=q.device).index_add_(2, row_of, per_key_block)
    mass /= torch.bincount(row_of, minlength=rows.numel()).clamp(min=1).to(mass.dtype)[:, None]  # [B, H, S, Mk]
    mask = ck.index_to_mask(index, mk)[:, :, rows.to(index.counts.device)].to(mass.device)  # [1, H, S, Mk]
    return (mass * mask).sum(-1).double().mean(dim=(0, 2))


@dataclass
class Guard:
    """Checks and widens a plan in place while a SparseController samples; `reset` (each video) puts the
    plan back as compiled."""

    plan: SparsePlan
    factor: float = 2.0
    samples: int = SAMPLE_BLOCKS
    widened: list[Widening] = field(default_factory=list)
    mass: list[dict[tuple[int, int], torch.Tensor]] = field(default_factory=list)  # per video: [H] per key
    seconds: float = 0.0  # spent measuring and widening, all videos
    checks: int = 0  # calls measured
    _first: set[int] = field(default_factory=set)  # the first step of each bucket
    _saved: dict[int, tuple] = field(default_factory=dict)  # layer -> its state before this video widened it
    _dense: dict[tuple[int, int], set[int]] = field(default_factory=dict)  # heads widened this video

    def __post_init__(self):
        if self.plan.epsilon is None:
            raise ValueError("the guard needs the bundle's epsilon in the plan")
        buckets = self.plan.step_buckets
        self._first = {buckets.index(b) for b in set(buckets) if b >= 0}

    @property
    def threshold(self) -> float:
        return 1.0 - self.factor * self.plan.epsilon

    def due(self, step: int) -> bool:
        """True on the first sparse step of a bucket: the step whose calls are measured."""
        return step in self._first

    def reset(self) -> list[int]:
        """A new video: undo the last video's widenings. Returns the layers whose tensors changed."""
        for layer, state in self._saved.items():
            self.plan.set_layer_state(layer, state)
        layers = list(self._saved)
        self._saved.clear()
        self._dense.clear()
        self.mass.append({})
        return layers

    def check(self, bucket: int, layer: int, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Measure one call (q, k [B, H, N, D]) and widen the heads below the threshold. Both guidance
        branches are measured; a head's figure is its lowest. Returns True if the plan's layer changed."""
        t0 = time.perf_counter()
        if not self.mass:
            self.mass.append({})
        block = self.plan.block_size
        index = self.plan.index[(bucket, layer)]
        rows = sample_rows(index.counts.shape[-1], self.samples)
        kept = sampled_mass(q, k, index, block, rows).cpu()
        key = (bucket, layer)
        seen = self.mass[-1].get(key)
        self.mass[-1][key] = kept if seen is None else torch.minimum(seen, kept)
        dense = self._dense.setdefault(key, set())
        low = [h for h in range(kept.shape[0]) if kept[h] < self.threshold and h not in dense]
        if low:
            self._widen(bucket, layer, low, kept)
        self.checks += 1
        self.seconds += time.perf_counter() - t0
        return bool(low)

    def _widen(self, bucket: int, layer: int, heads: list[int], kept: torch.Tensor) -> None:
        if layer not in self._saved:
            self._saved[layer] = self.plan.layer_state(layer)
        index = self.plan.index[(bucket, layer)]
        mask = ck.index_to_mask(index, index.counts.shape[-1])  # self-attention: as many key blocks as query blocks
        mask[:, heads] = True  # these heads' rows list every key block: dense
        self.plan.set_index(bucket, layer, ck.mask_to_index(mask))
        self._dense[(bucket, layer)].update(heads)
        video = len(self.mass) - 1
        self.widened.extend(Widening(video, bucket, layer, h, float(kept[h])) for h in heads)

    def report(self) -> dict:
        """What `--json` shows: the rule, what was widened, and the measured mass per video as
        [bucket][layer][head] (null where a bucket was not reached)."""
        nb = 1 + max(self.plan.step_buckets)
        layers = 1 + max(key[1] for key in self.plan.index)
        mass = [
            [
                [
                    None if (b, layer) not in m else [round(float(x), 6) for x in m[(b, layer)]]
                    for layer in range(layers)
                ]
                for b in range(nb)
            ]
            for m in self.mass
        ]
        lowest = [float(t.min()) for m in self.mass for t in m.values()]
        return {
            "enabled": True,
            "factor": self.factor,
            "epsilon": self.plan.epsilon,
            "threshold": round(self.threshold, 6),
            "sample_blocks": self.samples,
            "checks": self.checks,
            "seconds": round(self.seconds, 4),
            "min_mass": round(min(lowest), 6) if lowest else None,
            "widened": [w.as_dict() for w in self.widened],
            "mass": mass,
        }
