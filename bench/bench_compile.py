"""Ahead-of-time kernel cache at Wan 2.1 1.3B 480p shapes: compile time, and zero compilations after.

    python bench/bench_compile.py all --cache-dir /tmp/cc      # build, then load in fresh processes
    python bench/bench_compile.py build --cache-dir /tmp/cc    # one phase (what `all` runs first)
    python bench/bench_compile.py load --cache-dir /tmp/cc     # another process: launch every group

`build` fabricates a bundle-like set of masks (layers x heads x Mq x Mk, a local band plus scattered
blocks and a sink column, density varying by layer and bucket) and runs compile's library path: index
form + LPT schedule, per-group measurement of the candidate configs against dense SDPA, binaries into
<cache>/triton. `load` then, in a new process, loads the plan, preloads the chosen binaries
(`compiler.prewarm`, what generate does), launches every (bucket, layer) kernel several times and
counts Triton compilations (must be 0). `all` also loads from a moved copy of the cache (the group
files must not pin the old path) and, for contrast, from a copy with an empty triton/ folder (cold).
Needs a CUDA GPU. Imports no diffusers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import calibatt_kernels as ck
from calibatt_cli.cache import aot
from calibatt_cli.cache.build import write_cache
from calibatt_cli.cache.load import CACHE_SCHEMA, check_kernels, device_info, prewarm, read_plan, software_versions
from calibatt_cli.cache.tune import tune_kernels
from calibatt_cli.runtime import plan_index, plan_tensors


def fake_masks(
    buckets: int, layers: int, heads: int, tokens: int, block: int, seed: int = 0, scale: float = 1.0
) -> torch.Tensor:
    """bool [buckets, layers, heads, M, M]: a band of half-width w around the diagonal, a sink column and
    random blocks, with a per-(bucket, layer) density between ~0.08 and ~0.45 (later buckets sparser), each
    layer's target times `scale` (bench_cli_wan.py picks it to reach a mean density)."""
    g = torch.Generator().manual_seed(seed)
    m = math.ceil(tokens / block)
    i = torch.arange(m)
    masks = torch.zeros(buckets, layers, heads, m, m, dtype=torch.bool)
    for b in range(buckets):
        for layer in range(layers):
            target = min(1.0, scale * (0.45 - 0.37 * ((layer * 7 + b * 11) % layers) / max(layers - 1, 1)))
            w = max(1, int(target * m * 0.3))
            band = (i[:, None] - i[None, :]).abs() <= w
            rand = torch.rand(heads, m, m, generator=g) < max(target - band.float().mean().item(), 0.0)
            masks[b, layer] = band | rand
            masks[b, layer, :, :, 0] = True
    return masks


def build(args) -> dict:
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    masks = fake_masks(args.buckets, args.layers, args.heads, args.tokens, args.block)
    tensors, groups = plan_tensors(masks)
    t_plan = time.perf_counter() - t0
    cache_dir = Path(args.cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    keys = [(g["bucket"], g["layer"]) for g in groups]
    with aot.kernel_cache(tmp / "triton"):
        res = tune_kernels(
            plan_index(tensors, keys),
            heads=args.heads,
            tokens=args.tokens,
            head_dim=args.head_dim,
            dtype=torch.bfloat16,
            block_size=args.block,
            device=dev,
            reps=args.reps,
        )
    for g in groups:
        g.update(res.groups[(g["bucket"], g["layer"])])
    manifest = {
        "schema_version": CACHE_SCHEMA,
        "block_size": args.block,
        "step_buckets": list(range(args.buckets)),
        "device": device_info("cuda"),
        "versions": software_versions(),
        "kernel_class": {"dtype": "bfloat16", "head_dim": args.head_dim, "batches": [1]},
        "kernels": {"backend": "triton", "tuned": True, **res.info},
        "groups": groups,
        "bench": {k: getattr(args, k) for k in ("buckets", "layers", "heads", "tokens", "block", "head_dim")},
    }
    write_cache(cache_dir, tmp, tensors, manifest)
    total = time.perf_counter() - t0
    return {
        "phase": "build",
        "seconds": round(total, 2),
        "plan_seconds": round(t_plan, 2),
        "tune_seconds": res.info["tune_seconds"],
        "compilations": res.info["compilations"],
        "dense_ms": res.info["dense_ms"],
        "winners": res.info["winners"],
        "rejected": res.info["rejected"],
        "triton_files": manifest["kernels"]["triton_files"],
        "groups": len(groups),
        "mean_density": round(sum(g["density"] for g in groups) / len(groups), 4),
        "sparse_ms_total": round(sum(g["ms"] for g in groups), 3),
        "dense_ms_total": round(res.info["dense_ms"] * len(groups), 3),
    }


def load(args) -> dict:
    cache_dir = Path(args.cache_dir)
    t0 = time.perf_counter()
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    cold = args.cold
    if not cold:
        check_kernels(cache_dir, manifest, "cuda")
    plan = read_plan(cache_dir, manifest).to(torch.device("cuda"))
    b = manifest["bench"]
    bs = (plan.block_size, plan.block_size)
    x = torch.randn(3, 1, b["tokens"], b["heads"], b["head_dim"], device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in x)
    keys = sorted(plan.index)
    passes = []
    with aot.kernel_cache(cache_dir / "triton"), aot.CompileCounter() as counter:
        t_load = time.perf_counter() - t0
        t_pre = prewarm(plan, heads=b["heads"], head_dim=b["head_dim"], dtype=torch.bfloat16, device="cuda")
        after_prewarm = counter.count
        for _ in range(args.passes):
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            for key in keys:
                ck.block_sparse_attention_indexed(q, k, v, plan.index[key], block_size=bs, config=plan.configs.get(key))
            torch.cuda.synchronize()
            passes.append((time.perf_counter() - t1) * 1e3)
    later = sorted(passes[1:])[len(passes[1:]) // 2]
    return {
        "phase": "load-cold" if cold else "load",
        "cache_dir": str(cache_dir),
        "compilations": counter.count,
        "compilations_in_prewarm": after_prewarm,
        "cache_hits": counter.hits,
        "load_seconds": round(t_load, 3),
        "prewarm_seconds": round(t_pre, 3),
        "first_pass_ms": round(passes[0], 2),
        "later_pass_ms": round(later, 2),
        "first_over_later": round(passes[0] / later, 3),
        "launches_per_pass": len(keys),
    }


def _phase(*argv: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("all", "build", "load"))
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--buckets", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--tokens", type=int, default=32760)  # Wan 2.1 480p, 81 frames: 21 x 30 x 52
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--cold", action="store_true", help="load: skip the kernel-cache check (an emptied triton/)")
    p.add_argument("--json", help="all: write the results here (default bench/results/compile-<card>-<date>.json)")
    args = p.parse_args()
    if args.phase == "build":
        print(json.dumps(build(args)))
        return
    if args.phase == "load":
        print(json.dumps(load(args)))
        return
    shape = [
        f"--{k}={getattr(args, k.replace('-', '_'))}"
        for k in ("buckets", "layers", "heads", "tokens", "block", "head-dim", "reps")
    ]
    res = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": software_versions(),
        "args": vars(args),
    }
    res["build"] = _phase("build", "--cache-dir", args.cache_dir, *shape)
    res["load"] = _phase("load", "--cache-dir", args.cache_dir, f"--passes={args.passes}")
    moved = Path(args.cache_dir).with_name(Path(args.cache_dir).name + "-moved")
    shutil.rmtree(moved, ignore_errors=True)
    shutil.copytree(args.cache_dir, moved)
    shutil.rmtree(Path(args.cache_dir).resolve())  # the original is gone (the cache path links to its build):
    Path(args.cache_dir).unlink()  # only the copy can serve
    res["load_moved"] = _phase("load", "--cache-dir", str(moved), f"--passes={args.passes}")
    shutil.rmtree(moved / "triton")
    res["load_cold"] = _phase("load", "--cache-dir", str(moved), f"--passes={args.passes}", "--cold")
    out = (
        Path(args.json)
        if args.json
        else Path(__file__).resolve().parent
        / "results"
        / (f"compile-{res['card'].lower().replace(' ', '-')}-{res['date']}.json")
    )
    out.write_text(json.dumps(res, indent=1))
    b, rows = res["build"], []
    for name in ("load", "load_moved", "load_cold"):
        r = res[name]
        rows.append(
            f"| {name} | {r['compilations']} | {r['prewarm_seconds']:.3f} | {r['first_pass_ms']:.1f} | "
            f"{r['later_pass_ms']:.1f} | {r['first_over_later']:.3f} |"
        )
    print(f"card {res['card']}, triton {res['versions']['triton']}, torch {res['versions']['torch']}")
    print(
        f"build: {b['seconds']:.1f} s ({b['groups']} groups, plan {b['plan_seconds']:.1f} s, tune+compile "
        f"{b['tune_seconds']:.1f} s, {b['compilations']} compilations, {b['triton_files']} kernels cached); "
        f"mean density {b['mean_density']}, sparse {b['sparse_ms_total']:.1f} ms vs dense {b['dense_ms_total']:.1f}"
        f" ms per pass over all groups"
    )
    print(f"wrote {out}")
    print("| process | compilations | prewarm s | first pass ms | later pass ms | first/later |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
