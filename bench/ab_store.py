"""Temporary A/B: the previous commit's v5 (register-store epilogue) against this one (TMA store)."""
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, "bench")
import ab_prev as old  # noqa: E402
from bench_kernel import BLOCK, D, SHAPES, local_mask, random_mask  # noqa: E402

import calibatt_kernels as ck  # noqa: E402
from calibatt_kernels import block_sparse_gluon as g  # noqa: E402
from calibatt_kernels.block_sparse import _device_index  # noqa: E402

print("card", torch.cuda.get_device_name(), flush=True)
rows = []
for shape in ("wan1.3b", "wan14b"):
    B, H, grid = SHAPES[shape]
    N = grid[0] * grid[1] * grid[2]
    mb = triton.cdiv(N, BLOCK)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gen = torch.Generator().manual_seed(0)
    for kind, dens in (("random", 1.0), ("random", 0.25), ("random", 0.1), ("local", 0.25), ("local", 0.1)):
        mask = random_mask(H, mb, mb, dens, gen) if kind == "random" else local_mask(H, grid, N, dens)
        ix = ck.mask_to_index(mask.cuda())
        c, o, w, _, _ = _device_index(ix, q.device)
        sch = ix.schedule.to(device="cuda", dtype=torch.int32)
        flops = 4 * int(mask.sum()) * BLOCK * BLOCK * D
        mods = {"regstore": old, "tmastore": g}
        outs = {n: torch.full_like(q, float("nan")) for n in mods}
        res = dict(shape=shape, mask=kind, density=dens)
        for n, m in mods.items():
            m.block_sparse_attention_gluon(q, k, v, outs[n], c, o, w, sch, scale=D ** -0.5)
        for _ in range(2):
            for n, m in mods.items():
                t = do_bench(lambda m=m, n=n: m.block_sparse_attention_gluon(q, k, v, outs[n], c, o, w, sch,
                                                                             scale=D ** -0.5),
                             warmup=100, rep=200, return_mode="median")
                res[n] = max(res.get(n, 0), flops / t / 1e9)
        ref = outs["regstore"].float()
        res["rel"] = float((outs["tmastore"].float() - ref).norm() / ref.norm())
        res["nan"] = int(outs["tmastore"].isnan().sum())
        rows.append(res)
        print(json.dumps(res), flush=True)
if os.environ.get("OUT"):
    json.dump(rows, open(os.environ["OUT"] + "/ab-store.json", "w"), indent=1)
