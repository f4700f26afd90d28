"""A/B of Gluon kernel versions in one process, interleaved on the same masks, best of three medians:
`python bench/ab_gluon.py prev [--patterns]` times bench/ab_prev.py (a copy of an earlier attn_gluon.py with
absolute imports; not kept in git) against the current module's persistent kernel ("persistent" with its last
wave split where the rows allow, "persistent-whole" without) and its per-tile kernel ("tile").
Writes $OUT/ab-gluon.json when $OUT is set (earlier runs are in bench/results/ab-gluon-*)."""

import importlib
import inspect
import json
import os
import statistics
import sys

import torch
import triton
from bench_kernel import BLOCK, SHAPES, D, local_mask, random_mask  # noqa: E402
from gpu_clock import ClockLog  # noqa: E402
from trace_gluon import pattern_mask, shuffled  # noqa: E402
from triton.testing import do_bench

import calibatt_kernels as ck  # noqa: E402
from calibatt_kernels import attn_gluon as g  # noqa: E402
from calibatt_kernels.index import index_on_device  # noqa: E402

# --patterns: masks whose rows all list the same number of blocks (trace_gluon.py's random / shared / prefix /
# pool<k>, and random rows read in shuffled order), to read the per-tile cost apart from K/V locality
PATTERNS = "--patterns" in sys.argv
mods = {n: importlib.import_module(f"ab_{n}") for n in sys.argv[1:] if not n.startswith("--")}
mods["persistent"] = g  # with its last wave split (split_merge) where the rows allow
mods["persistent-whole"] = g  # the same kernel, every tile whole
mods["tile"] = g


def launch(m, q, k, v, out, c, o, w, sch, kw):
    return m.block_sparse_attention_gluon(q, k, v, out, c, o, w, sch, **kw)


print("card", torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
rows = []
clock = ClockLog()  # each version's median SM clock while timed ("mhz_<name>": the card is power-capped)
for shape in ("wan1.3b", "wan14b"):
    B, H, grid = SHAPES[shape]
    N = grid[0] * grid[1] * grid[2]
    mb = triton.cdiv(N, BLOCK)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gen = torch.Generator().manual_seed(0)
    cases = (("random", 1.0), ("random", 0.25), ("random", 0.1), ("local", 0.25), ("local", 0.1))
    if PATTERNS:
        cases = [(p, c) for c in (26, 59) for p in ("random", "shuffled", "pool2", "pool4", "shared", "prefix")]
    for kind, dens in cases:
        if PATTERNS:
            mask = pattern_mask("random" if kind == "shuffled" else kind, H, mb, dens, gen)
        else:
            mask = random_mask(H, mb, mb, dens, gen) if kind == "random" else local_mask(H, grid, N, dens)
        ix = ck.mask_to_index(mask.cuda())
        if kind == "shuffled":
            ix = shuffled(ix, gen)
        c, o, w, _, _ = index_on_device(ix, q.device)
        sch = ix.schedule.to(device="cuda", dtype=torch.int32)
        flops = 4 * int(mask.sum()) * BLOCK * BLOCK * D
        calls = {}
        res = dict(shape=shape, mask=kind, density=dens)
        for n, m in mods.items():
            kw = dict(scale=D**-0.5)
            if "records" in inspect.signature(m.block_sparse_attention_gluon).parameters:
                kw["records"] = m.tile_records(c, o, w, sch)
            if m is g:
                kw["persistent"] = n != "tile"
                if n == "persistent":
                    kw["records"], kw["splits"] = g.persistent_records(c, o, w, sch, 1, q.device)
                    res["split"] = 0 if kw["splits"] is None else int(kw["splits"][0].numel())
            calls[n] = (m, kw)
        outs = {n: torch.full_like(q, float("nan")) for n in mods}
        for n, (m, kw) in calls.items():
            launch(m, q, k, v, outs[n], c, o, w, sch, kw)
        mhz = {n: [] for n in calls}
        for _ in range(3):
            for n, (m, kw) in calls.items():
                t, hz = clock.measure(
                    lambda m=m, n=n, kw=kw: do_bench(
                        lambda: launch(m, q, k, v, outs[n], c, o, w, sch, kw),  # noqa: B023
                        warmup=100,
                        rep=200,
                        return_mode="median",
                    )
                )
                res[n] = round(max(res.get(n, 0), flops / t / 1e9), 1)
                mhz[n].append(hz.get("mhz"))
        for n, got in mhz.items():
            if None not in got:
                res[f"mhz_{n}"] = statistics.median(got)
        ref = outs[next(iter(mods))].float()
        for n in mods:
            res[f"rel_{n}"] = float((outs[n].float() - ref).norm() / ref.norm())
            res[f"nan_{n}"] = int(outs[n].isnan().sum())
        rows.append(res)
        print(json.dumps(res), flush=True)
clock.close()
if os.environ.get("OUT"):
    json.dump(rows, open(os.environ["OUT"] + "/ab-gluon.json", "w"), indent=1)
