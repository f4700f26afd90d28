"""Kernel tuning and the cost model: on the GPU, time every candidate kernel config on each (bucket, layer)
mask and keep the fastest (inside the cache's Triton folder, aot.kernel_cache, so the winners' binaries land
there); on the CPU, time the row-wise CPU path. Either way each group's sparse time is set against one dense
SDPA call at the model's shape, and the group runs whichever is faster (`choose`): sparse attention pays
only where it skips enough blocks to beat the dense kernel it replaces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import calibatt_kernels as ck
from calibatt_kernels import KernelConfig, attn_fp8

from ..errors import CacheError
from . import aot


def _time_ms(fn, reps: int) -> float:
    """Mean milliseconds of fn() on the current CUDA stream (one untimed call first)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def choose(sparse_ms: float, dense_ms: float) -> str:
    """What a group runs: "dense" where one dense SDPA call measured faster than the sparse path, else "sparse"."""
    return "dense" if dense_ms < sparse_ms else "sparse"


@dataclass
class TuneResult:
    configs: dict[tuple[int, int], KernelConfig]
    groups: dict[tuple[int, int], dict]  # per group: config, ms, dense_ms, speedup
    info: dict  # dense time, candidates, rejected candidates, seconds, compilations


def tune_kernels(
    index: dict[tuple[int, int], ck.BlockIndex],
    *,
    heads: int,
    tokens: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int,
    device: str | torch.device = "cuda",
    batches: tuple[int, ...] = (1,),
    reps: int = 3,
    return_lse: bool = False,
    fp8: bool = False,
) -> TuneResult:
    """Measure every candidate config on every (bucket, layer) mask with random q, k, v [B, H, N, D] laid
    out as the models hand them over ([B, N, H, D] storage), keep the fastest per group, and launch each
    winner once per batch size in `batches` (a batch of 1 and of B specialise differently). `return_lse`:
    the model's calls ask for the row log-sum-exp (joint attention), a kernel variant of its own.

    `fp8`: measure the fp8 kernel's configs (precision: fp8) instead of the bf16 backends'.

    Call it inside `aot.kernel_cache(...)`: every binary it compiles lands in that folder."""
    from calibatt_kernels import dispatch

    t0 = time.perf_counter()
    dev = torch.device(device)
    cap = torch.cuda.get_device_capability(dev)
    bs = (block_size, block_size)
    gen = torch.Generator(device=dev).manual_seed(0)

    def qkv(b: int):
        x = torch.randn(3, b, tokens, heads, head_dim, device=dev, dtype=dtype, generator=gen)
        return [t.transpose(1, 2) for t in x]

    q, k, v = qkv(batches[0])
    out = torch.empty_like(q)
    dense_ms = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    # a binary held in memory would never reach the folder
    for fn in dispatch.attention_kernel_fns() + (attn_fp8.kernel_fns() if fp8 else []):
        aot.forget_compiled(fn)
    index = {
        key: ck.BlockIndex(ix.counts.to(dev), ix.offsets.to(dev), ix.indices.to(dev), ix.schedule.to(dev))
        for key, ix in index.items()
    }
    first = next(iter(index.values()))

    attention = dispatch.block_sparse_attention_fp8_indexed if fp8 else dispatch.block_sparse_attention_indexed
    if fp8:
        candidates = dispatch.fp8_candidate_configs(cap, bs)
    else:
        candidates = dispatch.candidate_configs(cap, bs, head_dim, dtype, return_lse=return_lse)

    def run(ix, c, qq=q, kk=k, vv=v, oo=out):
        return attention(qq, kk, vv, ix, block_size=bs, out=oo, config=c, return_lse=return_lse)

    # strict_fallbacks: a config whose kernel cannot run here is rejected, never timed as another kernel
    with aot.CompileCounter() as counter, dispatch.strict_fallbacks():
        usable, rejected = [], {}
        for c in candidates:
            try:  # compiles; a config that does not fit this GPU fails here (out of shared memory, ...)
                run(first, c)
                torch.cuda.synchronize(dev)
                usable.append(c)
            except Exception as e:
                rejected[aot.config_label(c.to_manifest(), bs)] = (
                    f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                )
        if not usable:
            raise CacheError(f"no kernel config runs on this GPU ({rejected}); report this with the GPU's name")
        configs, groups = {}, {}
        for key, ix in index.items():
            times = [(_time_ms(lambda ix=ix, c=c: run(ix, c), reps), i) for i, c in enumerate(usable)]
            ms, best = min(times)
            configs[key] = usable[best]
            groups[key] = {
                "config": usable[best].to_manifest(),
                "ms": round(ms, 4),
                "dense_ms": round(dense_ms, 4),
                "speedup": round(dense_ms / ms, 3) if ms > 0 else None,
                "candidates_ms": [round(t, 4) for t, _ in times],
                "attention": choose(ms, dense_ms),
            }
        winners = set(configs.values())
        for b in batches[1:]:
            qb, kb, vb = qkv(b)
            ob = torch.empty_like(qb)
            for c in winners:
                run(first, c, qb, kb, vb, ob)
        # the persistent Gluon kernel's merge of split last-wave rows: into the cache whether or not these
        # masks split (prewarm launches it; generate's masks may split where these did not)
        dispatch.prewarm_backends(
            dict(enumerate(winners)), {}, device=dev, dtype=dtype, head_dim=head_dim, return_lse=return_lse
        )
        torch.cuda.synchronize(dev)
    info = {
        "dense_ms": round(dense_ms, 4),
        "candidates": [c.to_manifest() for c in usable],
        "rejected": rejected,
        "winners": [c.to_manifest() for c in winners],
        "batches": list(batches),
        "tune_seconds": round(time.perf_counter() - t0, 2),
        "compilations": counter.count,
    }
    return TuneResult(configs, groups, info)


def cpu_costs(
    index: dict[tuple[int, int], ck.BlockIndex],
    *,
    heads: int,
    tokens: int,
    head_dim: int,
    block_size: int,
    reps: int = 2,
) -> dict[tuple[int, int], dict]:
    """The cost model on the CPU: per (bucket, layer), the row-wise CPU path on that group's mask (the call
    generate makes) against one dense SDPA call, on random float32 q, k, v [1, H, N, D] laid out as the
    models hand them over. Best of `reps` timings each (one when the first is already over 1.5 x dense: the
    choice is clear); dense is timed between the groups, so a busy machine slows both alike.
    Returns per group: ms, dense_ms, speedup (dense over sparse), attention (`choose`)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, tokens, heads, head_dim, generator=gen)
    q, k, v = (t.transpose(1, 2) for t in x)
    bs = (block_size, block_size)

    def ms(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    dense()  # first calls allocate
    dense_times = [ms(dense)]
    sparse_times = {}
    for key, ix in index.items():
        times = []
        for _ in range(reps):
            times.append(ms(lambda ix=ix: ck.block_sparse_attention_indexed(q, k, v, ix, block_size=bs)))
            dense_times.append(ms(dense))
            if times[0] > 1.5 * min(dense_times):
                break
        sparse_times[key] = min(times)
    dense_ms = min(dense_times)
    return {
        key: {
            "ms": round(t, 4),
            "dense_ms": round(dense_ms, 4),
            "speedup": round(dense_ms / t, 3) if t > 0 else None,
            "attention": choose(t, dense_ms),
        }
        for key, t in sparse_times.items()
    }
