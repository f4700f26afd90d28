"""The live safety net of `generate` (generate.guard): a mask bundle is only as good as its calibration
prompts, so at the first sparse step of each step bucket the guard measures, for every (layer, head), the
share of the true softmax mass that the plan's kept blocks hold on this run's own q and k. A head that keeps
less than the threshold (`Guard.threshold`: 1 - factor * the bundle's epsilon, floored at `floor`) runs
dense for the rest of that bucket: the guard rebuilds that (bucket, layer)'s index with the head's rows full
and puts it where the kernels read it.

Sampling: a fixed number of query blocks (SAMPLE_BLOCKS) spread evenly over the sequence, the same for every
head, all of each block's queries. A fixed count keeps the check's cost flat as videos get longer (a share of
rows would grow with the sequence), and evenly spread rows see every region of a video whose attention is
local in space and time; the head's figure is the mean over those rows and over the batch, so one odd row
does not widen a head. Of a step's two guidance branches only the first call is measured.

The mass comes from PyTorch ops on the sampled queries (one GEMM and a softmax per head chunk): the Triton
block-mass kernel is not in a compiled cache, and launching it would compile at generate time (what
`--strict` forbids). A bundle whose masks hold is never touched: nothing is widened and the kernels run the
same index.

Compiled blocks (generate.compile) run the same check at the same call: the processors' attention op
(processor.layer_attention_op) is opaque to the compiler and calls the guard when it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import calibatt_kernels as ck

from .plan import SparsePlan

SAMPLE_BLOCKS = 8  # query blocks measured per head and call
# The lowest mean kept mass the guard accepts of a head, whatever the bundle's epsilon: ten times the loss the
# default epsilon (0.001) allows. With it, tiny's bundles at epsilon 0.2 and with permuted heads render a held-out
# prompt at >= 35 dB PSNR vs dense (tests/test_guard.py), where 1 - 2 x 0.2 = 0.6 would widen nothing.
FLOOR = 0.99


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


# Elements of one chunk of sampled scores (~256 MiB in bf16): long videos with many heads are scored a few
# heads at a time, so the check needs little memory beside the model's own.
CHUNK_ELEMENTS = 1 << 27


def sample_tokens(rows: torch.Tensor, block: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query tokens of the sampled rows of a sequence of n tokens: (token ids [T], each token's place in
    `rows` [T], tokens per row [S]), computed on the CPU (the last block may be partial)."""
    rows = rows.cpu()
    tokens = (rows[:, None] * block + torch.arange(block)).reshape(-1)
    row_of = torch.arange(rows.numel()).repeat_interleave(block)
    keep = tokens < n
    tokens, row_of = tokens[keep], row_of[keep]
    return tokens, row_of, torch.bincount(row_of, minlength=rows.numel()).clamp(min=1)


def sampled_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    index: ck.BlockIndex | None,
    block: int,
    rows: torch.Tensor,
    mask: torch.Tensor | None = None,
    sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """float32 [H] on q's device: the mean over the sampled query-block rows (and the batch) of the mass the
    index keeps. q, k: [B, H, N, D]. Only the sampled rows' queries are scored: S x N probabilities per head,
    not N x N. A caller that checks often passes what depends on the rows alone, on q's device: `mask` (bool
    [1 or B, H, S, Mk], the index's rows) and `sample` (sample_tokens), so that a call does not wait for the
    device before its end.

    Scores and probabilities stay in q's dtype (bf16 on a GPU; the GEMM accumulates in fp32, softmax computes in
    fp32 and rounds its output), at half the memory traffic of fp32 scores. Rounding moves each probability by
    up to 2^-9 of itself, which is as much as a correct bundle drops when one key dominates a row; so the
    figure is 1 - dropped / total, both sums in fp32 over the same rounded probabilities: the dropped share is
    then off by at most ~2^-8 of itself, whatever the kept mass is."""
    b, h, n, d = q.shape
    nk = k.shape[2]
    mk, full = -(-nk // block), nk // block
    if mask is None:
        mask = ck.index_to_mask(index, mk)[:, :, rows.to(index.counts.device)].to(q.device)
    if sample is None:
        sample = tuple(t.to(q.device) for t in sample_tokens(rows, block, n))
    tokens, row_of, per_row_count = sample
    qs = q.index_select(2, tokens) * d**-0.5  # [B, H, T, D]
    kept = torch.empty(b, h, tokens.numel(), dtype=torch.float32, device=q.device)
    step = max(1, CHUNK_ELEMENTS // max(1, b * tokens.numel() * nk))
    for h0 in range(0, h, step):
        hs = slice(h0, min(h, h0 + step))
        p = torch.softmax(qs[:, hs] @ k[:, hs].transpose(-1, -2), dim=-1)  # [B, h, T, Nk]
        blocks = p[..., : full * block].unflatten(-1, (full, block)).sum(-1, dtype=torch.float32)
        if full < mk:  # a partial last key block
            blocks = torch.cat([blocks, p[..., full * block :].sum(-1, keepdim=True, dtype=torch.float32)], -1)
        dropped = blocks.masked_fill(mask[:, hs].index_select(2, row_of), 0.0).sum(-1)
        kept[:, hs] = 1.0 - dropped / blocks.sum(-1)  # each sampled query's kept mass
    per_row = torch.zeros(b, h, per_row_count.numel(), dtype=torch.float32, device=q.device)
    per_row.index_add_(2, row_of, kept)
    return (per_row / per_row_count).mean(dim=(0, 2))


@dataclass
class Guard:
    """Checks and widens a plan in place while a SparseController samples; `reset` (each video) puts the
    plan back as compiled."""

    plan: SparsePlan
    factor: float = 2.0
    floor: float = FLOOR
    samples: int = SAMPLE_BLOCKS
    widened: list[Widening] = field(default_factory=list)
    mass: list[dict[tuple[int, int], torch.Tensor]] = field(default_factory=list)  # per video: [H] per key
    seconds: float = 0.0  # spent measuring and widening, all videos
    checks: int = 0  # calls measured
    _first: set[int] = field(default_factory=set)  # the first step of each bucket
    _rows: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (bucket, layer) -> Guard._sampled
    _saved: dict[int, tuple] = field(default_factory=dict)  # layer -> its state before this video widened it
    _dense: dict[tuple[int, int], set[int]] = field(default_factory=dict)  # heads widened this video

    def __post_init__(self):
        if self.plan.epsilon is None:
            raise ValueError("the guard needs the bundle's epsilon in the plan")
        buckets = self.plan.step_buckets
        self._first = {buckets.index(b) for b in set(buckets) if b >= 0}

    @property
    def threshold(self) -> float:
        """A head keeping less than this is widened: the bundle's own promise with slack (1 - factor *
        epsilon), but never below `floor`. The floor is what catches a bundle calibrated too loosely: its
        masks hold their promise (each row keeps 1 - epsilon) and the promise is too weak for the video."""
        return max(1.0 - self.factor * self.plan.epsilon, self.floor)

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
        """Measure one call (q, k [B, H, N, D]) and widen the heads below the threshold. The first call of a
        (bucket, layer) in a video is measured; the step's second guidance branch is not (the masks were
        calibrated on both, and measuring one halves the cost). Returns True if the plan's layer changed."""
        if not self.mass:
            self.mass.append({})
        key = (bucket, layer)
        if key in self.mass[-1]:
            return False
        t0 = time.perf_counter()
        kept = sampled_mass(q, k, None, self.plan.block_size, *self._sampled(key, q)).cpu()
        self.mass[-1][key] = kept
        dense = self._dense.setdefault(key, set())
        low = [h for h in range(kept.shape[0]) if kept[h] < self.threshold and h not in dense]
        if low:
            self._widen(bucket, layer, low, kept)
        self.checks += 1
        self.seconds += time.perf_counter() - t0
        return bool(low)

    def _sampled(self, key: tuple[int, int], q: torch.Tensor) -> tuple:
        """(rows, mask, sample) of a (bucket, layer) for sampled_mass, on q's device, made once: the compiled
        plan's mask on the sampled rows [1, H, S, Mk] and their query tokens (widening only ever changes a
        (bucket, layer) already measured in the video, and reset puts it back)."""
        if key not in self._rows:
            index = self.plan.index[key]
            mq = index.counts.shape[-1]  # self-attention: as many key blocks as query blocks
            rows = sample_rows(mq, self.samples)
            mask = ck.index_to_mask(index, mq)[:, :, rows.to(index.counts.device)].to(q.device)
            sample = tuple(t.to(q.device) for t in sample_tokens(rows, self.plan.block_size, q.shape[2]))
            self._rows[key] = (rows, mask, sample)
        return self._rows[key]

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
            "floor": self.floor,
            "threshold": round(self.threshold, 6),
            "sample_blocks": self.samples,
            "checks": self.checks,
            "seconds": round(self.seconds, 4),
            "min_mass": round(min(lowest), 6) if lowest else None,
            "widened": [w.as_dict() for w in self.widened],
            "mass": mass,
        }
