"""Multi-GPU step time: calibatt (sparse, density 0.2) vs diffusers' own dense Ulysses at the same GPU count.

Wan 2.1 at real sizes with random weights and synthetic local masks (bench_e2e's), one denoising step = the two
CFG forwards. For each GPU count N the layouts that fit: N=1 one process; N=2 CFG parallel, Ulysses 2;
N=4 CFG 2 x Ulysses 2, Ulysses 4. calibatt runs its processors with the sparse kernel (each Ulysses rank on its
heads' masks); the baseline is diffusers' stock processors under the same layout (its context parallelism for
Ulysses, calibatt's CFG hook for CFG parallel, as diffusers has none). Blocks run eager. Wan 14B runs a subset of
its 40 layers, scaled to 40 (x 40 / layers run), as bench_e2e does.

    python bench/bench_parallel.py                    # every N <= the GPUs visible (device machine)
    python bench/bench_parallel.py --gpus 1           # the one-GPU rows
    python bench/bench_parallel.py --smoke            # CPU processes under gloo, a tiny shape (CI smoke)

It launches `torchrun` once per (N, layout) and collects rank 0's JSON; the table compares, at each N,
calibatt with the stock baseline, and each layout with the one-GPU step (speed-up, parallel efficiency).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_e2e import BLOCK, SHAPES, SMOKE, build, inputs, make_plan

LAYOUTS = {1: [(False, 1)], 2: [(True, 1), (False, 2)], 4: [(True, 2), (False, 4)], 8: [(True, 4), (False, 8)]}


def layout_name(cfg: bool, ulysses: int) -> str:
    parts = (["cfg2"] if cfg else []) + ([f"ulysses{ulysses}"] if ulysses > 1 else [])
    return " x ".join(parts) or "one GPU"


# ---- the worker: one process of a torchrun launch ----------------------------------------------------------


def worker(args) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from calibatt_cli import parallel
    from calibatt_cli.config import ParallelConfig
    from calibatt_cli.masks import local_block_mask
    from calibatt_cli.models.parallel import parallelize
    from calibatt_cli.models.wan import CalibattWanAttnProcessor, fuse_ffn_gelu
    from calibatt_cli.runtime import SparseController

    shape = json.loads(args.shape)
    cuda = torch.cuda.is_available() and not args.cpu
    layout = parallel.setup(ParallelConfig(cfg_parallel=args.cfg, ulysses=args.ulysses), "cuda" if cuda else "cpu")
    device = torch.device("cuda", layout.local_rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    tr = build(shape, device, dtype)
    heads, layers = tr.config.num_attention_heads, tr.config.num_layers
    x, t, *text = inputs(shape, tr, device, dtype)
    embeds = list(text)
    if layout.cfg_rank == 1:  # as LoadedModel.run(cfg_branch=1): this rank's first forward is the unconditional
        embeds.reverse()

    if args.variant == "calibatt":
        masks = local_block_mask(heads, shape["grid"], args.density, BLOCK)
        plan = make_plan(masks, layers).to(device)
        if layout.ulysses > 1:
            plan = plan.heads(*layout.heads(heads)).to(device)
        ctl = SparseController(plan)
        ctl.reset()
        for i, blk in enumerate(tr.blocks):
            blk.attn1.set_processor(CalibattWanAttnProcessor(i, ctl))
        fuse_ffn_gelu(tr)
    else:
        for blk in tr.blocks:
            blk.attn1.set_processor(WanAttnProcessor())
    split = parallelize(SimpleNamespace(pipe=SimpleNamespace(transformer=tr), batched_cfg=False), layout)

    def step():
        split.reset()
        with torch.no_grad():
            a = tr(hidden_states=x, timestep=t, encoder_hidden_states=embeds[0], return_dict=False)[0]
            b = tr(hidden_states=x, timestep=t, encoder_hidden_states=embeds[1], return_dict=False)[0]
        return a, b

    times = []
    for i in range(args.reps + 1):
        parallel.barrier(layout)
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    scale = shape["layers_total"] / layers
    ms = sorted(times)[len(times) // 2] * 1000 * scale
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    rows = parallel.all_gather_json({"ms": ms, "peak_gib": peak}, layout)
    if layout.is_main:
        Path(args.out).write_text(
            json.dumps(
                {
                    "ms": max(r["ms"] for r in rows),  # the step ends when the slowest rank ends
                    "peak_gib_per_gpu": max(r["peak_gib"] for r in rows),
                    "world": layout.world,
                }
            )
        )
    parallel.teardown(layout)


# ---- the driver --------------------------------------------------------------------------------------------


def launch(n: int, cfg: bool, ulysses: int, variant: str, shape: dict, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            __file__,
            "--worker",
            "--variant",
            variant,
            "--ulysses",
            str(ulysses),
            "--shape",
            json.dumps(shape),
            "--density",
            str(args.density),
            "--reps",
            str(args.reps),
            "--out",
            str(out),
        ]
        cmd += ["--cfg"] if cfg else []
        cmd += ["--cpu"] if args.smoke else []
        env = dict(
            os.environ,
            NCCL_NVLS_ENABLE="0",
            OMP_NUM_THREADS="1" if args.smoke else os.environ.get("OMP_NUM_THREADS", "4"),
        )
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if res.returncode != 0:
            raise SystemExit(f"torchrun N={n} {layout_name(cfg, ulysses)} {variant} failed:\n{res.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=("calibatt", "stock"), default="calibatt")
    ap.add_argument("--cfg", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ulysses", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--gpus", default=None, help="GPU counts to run, e.g. 1,2,4 (default: 1, 2, 4, 8 up to those visible)"
    )
    ap.add_argument("--shapes", nargs="*", default=None, help="shape names (default: all)")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--smoke", action="store_true", help="CPU processes under gloo, a tiny shape")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    if args.smoke:
        shapes, card = SMOKE, "cpu"
        counts = [int(x) for x in args.gpus.split(",")] if args.gpus else [1, 2]
        args.reps = 1
    else:
        shapes = [s for s in SHAPES if args.shapes is None or s["name"] in args.shapes]
        visible = torch.cuda.device_count()
        if visible == 0:
            raise SystemExit("no CUDA GPU visible; run on the device machine, or --smoke on the CPU")
        counts = [int(x) for x in args.gpus.split(",")] if args.gpus else [n for n in (1, 2, 4, 8) if n <= visible]
        card = torch.cuda.get_device_name(0)
    rows = []
    for shape in shapes:
        for n in counts:
            for cfg, uly in LAYOUTS[n]:
                if shape.get("override", {}).get("num_attention_heads", 12 if "1.3b" in shape["config"] else 40) % uly:
                    continue
                for variant in ("stock", "calibatt"):
                    r = launch(n, cfg, uly, variant, shape, args)
                    row = {"shape": shape["name"], "gpus": n, "layout": layout_name(cfg, uly), "variant": variant, **r}
                    rows.append(row)
                    print(
                        f"  {row['shape']:<14} N={n} {row['layout']:<18} {variant:<9} {r['ms']:9.1f} ms/step  "
                        f"peak {r['peak_gib_per_gpu']:6.2f} GiB/GPU",
                        flush=True,
                    )
    for row in rows:
        one = next(r for r in rows if r["shape"] == row["shape"] and r["gpus"] == 1 and r["variant"] == row["variant"])
        stock = next(
            r
            for r in rows
            if r["shape"] == row["shape"]
            and r["gpus"] == row["gpus"]
            and r["layout"] == row["layout"]
            and r["variant"] == "stock"
        )
        row["speedup_vs_one_gpu"] = one["ms"] / row["ms"]
        row["efficiency"] = row["speedup_vs_one_gpu"] / row["gpus"]
        row["x_stock_same_layout"] = stock["ms"] / row["ms"]
    print()
    print(
        f"{'shape':<14} {'N':>2} {'layout':<18} {'variant':<9} {'ms/step':>9} {'x 1 GPU':>8} {'effic.':>7} "
        f"{'x stock':>8} {'GiB/GPU':>8}"
    )
    for r in rows:
        print(
            f"{r['shape']:<14} {r['gpus']:>2} {r['layout']:<18} {r['variant']:<9} {r['ms']:9.1f} "
            f"{r['speedup_vs_one_gpu']:8.2f} {r['efficiency']:7.2f} {r['x_stock_same_layout']:8.2f} "
            f"{r['peak_gib_per_gpu']:8.2f}"
        )
    result = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "density": args.density,
        "weights": "random",
        "masks": "synthetic local masks (bench_e2e's local_block_mask)",
        "blocks": "eager",
        "rows": rows,
    }
    try:
        import diffusers
        import triton

        result.update(diffusers=diffusers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    out = args.out or f"bench/results/parallel-{card.lower().replace(' ', '-')}-{result['date']}.json"
    if not args.smoke or args.out:
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
