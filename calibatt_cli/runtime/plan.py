"""The sparse plan: which key blocks each (step bucket, layer) attends to, in the kernels' index form.

`plan_tensors` turns a bundle's masks into the flat tensors a cache's plan.safetensors stores, `plan_index`
turns those tensors back into BlockIndex objects, and `SparsePlan` holds them for a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import calibatt_kernels as ck
from calibatt_kernels import KernelConfig


@dataclass
class SparsePlan:
    """Runtime form of a mask bundle: per (bucket, layer) a BlockIndex on the model's device."""

    block_size: int
    step_buckets: list[int]  # step -> bucket; -1 marks a dense (warm-up) step
    index: dict[tuple[int, int], ck.BlockIndex]
    density: torch.Tensor  # float [buckets, layers, heads]: kept share of blocks
    configs: dict[tuple[int, int], KernelConfig] = field(default_factory=dict)  # chosen by compile; else default
    epsilon: float | None = None  # the bundle's (what the guard checks against); None: not in the cache
    # (bucket, layer) groups that compile measured faster dense than sparse on this device (tune.py): their
    # processors run dense attention, as the plan says, and they count as density 1
    dense: frozenset[tuple[int, int]] = frozenset()

    def to(self, device: torch.device) -> SparsePlan:
        """The plan on `device` (with the launch records its indices bring)."""
        index = {key: _index_to(ix, device) for key, ix in self.index.items()}
        return SparsePlan(
            self.block_size, self.step_buckets, index, self.density, self.configs, self.epsilon, self.dense
        )

    def heads(self, start: int, stop: int) -> SparsePlan:
        """The plan of heads [start, stop) alone (what a Ulysses rank runs), on the same device."""
        index = {}
        for key, ix in self.index.items():
            mask = ck.index_to_mask(ix, ix.counts.shape[-1])[:, start:stop]
            index[key] = ck.mask_to_index(mask.contiguous())
        density = self.density if self.density.shape[-1] == 1 else self.density[:, :, start:stop]  # per group or head
        return SparsePlan(self.block_size, self.step_buckets, index, density, self.configs, self.epsilon, self.dense)

    def set_index(self, bucket: int, layer: int, index: ck.BlockIndex) -> None:
        """Replace one (bucket, layer)'s index (the guard widens heads this way); processors holding the
        layer re-read it (SparseLayer.refresh)."""
        self.index[(bucket, layer)] = index

    def layer_state(self, layer: int) -> dict[int, ck.BlockIndex]:
        """One layer's index objects per bucket, for set_layer_state to put back."""
        return {b: self.index[(b, layer)] for b in range(1 + max(self.step_buckets))}

    def set_layer_state(self, layer: int, state: dict[int, ck.BlockIndex]) -> None:
        self.index.update({(b, layer): ix for b, ix in state.items()})

    def computed_density(self) -> torch.Tensor:
        """float [buckets, layers, heads or 1]: the share of blocks each group computes, 1 where it runs dense."""
        density = self.density.clone()
        for b, layer in self.dense:
            density[b, layer] = 1.0
        return density

    def mean_density(self) -> tuple[float, float]:
        """(over all steps with warm-up steps and dense groups counted dense, over the sparse steps only)."""
        per_bucket = self.computed_density().mean(dim=(1, 2))
        per_step = [1.0 if b < 0 else float(per_bucket[b]) for b in self.step_buckets]
        sparse = [d for d, b in zip(per_step, self.step_buckets, strict=True) if b >= 0]
        return sum(per_step) / len(per_step), (sum(sparse) / len(sparse) if sparse else 1.0)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _index_to(ix: ck.BlockIndex, device: torch.device) -> ck.BlockIndex:
    return ck.BlockIndex(
        ix.counts.to(device),
        ix.offsets.to(device),
        ix.indices.to(device),
        _to(ix.schedule, device),
        records=_to(ix.records, device),
        split_rows=_to(ix.split_rows, device),
    )


def group_configs(groups: list[dict]) -> dict[tuple[int, int], KernelConfig]:
    """The kernel config compile chose per (bucket, layer), from a manifest's groups (those without one run the
    default)."""
    return {(g["bucket"], g["layer"]): KernelConfig.from_manifest(g["config"]) for g in groups if g.get("config")}


def record_tensors(
    index: dict[tuple[int, int], ck.BlockIndex], configs: dict[tuple[int, int], KernelConfig], device: torch.device
) -> dict[str, torch.Tensor]:
    """The launch records (BlockIndex.records, split_rows: `dispatch.launch_records`) of each (bucket, layer)
    of `index`, made on `device` for its `configs`, as plan tensors on the CPU. compile stores them with the
    plan, so that generate brings them along instead of deriving them (small ops and a wait for the GPU per
    layer and bucket before the first step). Kernels that derive nothing from the index (every one on the CPU)
    give none."""
    out = {}
    for (b, layer), ix in index.items():
        records, split_rows = ck.dispatch.launch_records(_index_to(ix, device), configs.get((b, layer)))
        if records is not None:
            out[f"b{b}.l{layer}.records"] = records.cpu()
            if split_rows is not None:
                out[f"b{b}.l{layer}.split_rows"] = split_rows.cpu()
    return out


def plan_tensors(masks: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """bool [buckets, layers, heads, Mq, Mk] -> the plan's tensors and one record per (bucket, layer)."""
    tensors, groups = {}, []
    nb, nl = masks.shape[:2]
    for b in range(nb):
        for layer in range(nl):
            ix = ck.mask_to_index(masks[b, layer])
            key = f"b{b}.l{layer}"
            tensors[f"{key}.counts"] = ix.counts[0]
            tensors[f"{key}.offsets"] = ix.offsets[0]
            tensors[f"{key}.indices"] = ix.indices
            tensors[f"{key}.schedule"] = ix.schedule
            groups.append(
                {
                    "bucket": b,
                    "layer": layer,
                    "density": float(masks[b, layer].float().mean()),
                    "max_blocks_per_row": ix.max_blocks_per_row,
                }
            )
    return tensors, groups


def plan_index(tensors: dict[str, torch.Tensor], keys: list[tuple[int, int]]) -> dict[tuple[int, int], ck.BlockIndex]:
    """The plan's BlockIndex per (bucket, layer), with the launch records compile stored (`record_tensors`)."""
    return {
        (b, layer): ck.BlockIndex(
            tensors[f"b{b}.l{layer}.counts"].unsqueeze(0),
            tensors[f"b{b}.l{layer}.offsets"].unsqueeze(0),
            tensors[f"b{b}.l{layer}.indices"],
            tensors[f"b{b}.l{layer}.schedule"],
            records=tensors.get(f"b{b}.l{layer}.records"),
            split_rows=tensors.get(f"b{b}.l{layer}.split_rows"),
        )
        for b, layer in keys
    }
