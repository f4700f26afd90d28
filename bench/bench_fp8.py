"""The INT8/FP8 block-sparse attention kernel (attn_fp8.py) against the bf16 kernel, side by side (GPU only).

    python bench/bench_fp8.py                           # Wan 1.3B 480p and 14B 720p, densities 1.0 .. 0.1

Rows per (shape, density): "bf16" is `dispatch.block_sparse_attention_indexed` with `dispatch.default_config`
(the Gluon kernel on sm_90); "fp8" the full fp8 call (quantize q, k, v, then attend); "fp8-attn/<config>" the
attention launch alone on codes quantized beforehand (what runs when q/k arrive quantized from the norm +
RoPE kernel), one row per fp8 kernel config; "fp8-quant" the quantization alone (two launches over q, k, v).
Masks: round(density * Mk) random key blocks per query-block row (bench_kernel.random_mask), 128 x 128
blocks, head dim 128, B = 1, q/k/v as [B, N, H, D] buffers viewed [B, H, N, D] (diffusers' layout).

TFLOP/s-equivalent counts computed blocks only, 4 * blocks * 128 * 128 * D, as bench_kernel.py does; "x bf16"
is the bf16 row's time over this row's. Times are medians of triton.testing.do_bench, with the SM clock
and power meanwhile (gpu_clock.py). Prints a table last; writes bench/results/fp8-<card>-<date>.json (and a
copy under $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import sys
import traceback

import torch
import triton
from bench_kernel import BLOCK, SHAPES, _clock_cols, bench, random_mask
from gpu_clock import ClockLog

import calibatt_kernels as ck
from calibatt_kernels import KernelConfig, dispatch
from calibatt_kernels.attn_fp8 import attention_fp8_quantized, block_sparse_attention_fp8_indexed, quantize_qkv

D = 128
DENSITIES = (1.0, 0.5, 0.25, 0.1)
FP8_CONFIGS = {
    # attn_fp8.default_config: one warpgroup per program, so that two programs on an SM overlap one's MMAs
    # with the other's softmax
    "tile-m64-w4-s2": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=2),
    "tile-m64-w4-s3": KernelConfig(kernel="tl_tile", block_m=64, num_warps=4, num_stages=3),
    "persistent-w8-s3": KernelConfig(num_warps=8, num_stages=3),
    "tile-w8-s2": KernelConfig(kernel="tl_tile", num_warps=8, num_stages=2),
}


def log(*a):
    print(*a, flush=True)


def run(args) -> dict:
    res = dict(
        env=dict(
            card=torch.cuda.get_device_name(),
            date=datetime.date.today().isoformat(),
            torch=torch.__version__,
            triton=triton.__version__,
            sms=torch.cuda.get_device_properties(0).multi_processor_count,
        ),
        rows=[],
    )
    log("ENV", json.dumps(res["env"]))
    clock = ClockLog()
    try:
        for shape in args.shapes:
            bench_shape(shape, args, res, clock)
            torch.cuda.empty_cache()
    finally:
        clock.close()
    return res


def bench_shape(shape, args, res, clock):
    B, H, grid = SHAPES[shape]
    N = grid[0] * grid[1] * grid[2]
    mb = triton.cdiv(N, BLOCK)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    bs = (BLOCK, BLOCK)
    bf16_cfg = dispatch.default_config(q.device, bs, D)
    qz = quantize_qkv(q, k, v, bs)
    out = torch.empty_like(q)
    t_quant, hz = bench(clock, 1, quantize_qkv, q, k, v, bs)
    row = dict(shape=shape, N=N, kernel="fp8-quant", ms=t_quant, **hz)
    res["rows"].append(row)
    log("ROW", json.dumps(row))
    for dens in args.densities:
        mask = random_mask(H, mb, mb, dens, gen)
        flops = 4 * B * int(mask.sum()) * BLOCK * BLOCK * D
        index = ck.mask_to_index(mask.cuda())
        base = dict(shape=shape, N=N, density=dens)
        fns = {
            "bf16": lambda ix=index: ck.block_sparse_attention_indexed(
                q, k, v, ix, block_size=bs, config=bf16_cfg, out=out
            ),
            "fp8": lambda ix=index: block_sparse_attention_fp8_indexed(q, k, v, ix, block_size=bs, out=out),
        }
        for name, cfg in FP8_CONFIGS.items():
            fns[f"fp8-attn/{name}"] = lambda cfg=cfg, ix=index: attention_fp8_quantized(qz, ix, out, config=cfg)
        times = {}
        for name, fn in fns.items():
            try:
                fn()
                torch.cuda.synchronize()
                times[name], hz = bench(clock, 5 * dens, fn)
            except Exception:
                res["rows"].append(dict(base, kernel=name, error=traceback.format_exc(limit=-2)[-600:]))
                log("ERR", name, traceback.format_exc(limit=-2)[-600:])
                continue
            row = dict(base, kernel=name, ms=times[name], tflops=flops / times[name] / 1e9, **hz)
            if name == "bf16":
                row["config"] = bf16_cfg.kernel
                ran = ck.what_ran()["last"].get("attention")
                row["ran"] = ran  # a fallback would show here
            if "bf16" in times:
                row["x_bf16"] = times["bf16"] / times[name]
            res["rows"].append(row)
            log("ROW", json.dumps(row))


def table(res) -> str:
    lines = [
        f"card: {res['env']['card']}  torch {res['env']['torch']}  triton {res['env']['triton']}",
        f"{'shape':8} {'dens':>5} {'kernel':30} {'ms':>8} {'TFLOP/s':>8} {'x bf16':>7} "
        f"{'MHz':>5} {'W':>4} {'capped':>6}",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"{r['shape']:8} {r.get('density', ''):>5} {r['kernel']:30} ERROR")
            continue
        tf = f"{r['tflops']:8.0f}" if "tflops" in r else f"{'':>8}"
        x = f"{r['x_bf16']:7.2f}" if "x_bf16" in r else f"{'':>7}"
        lines.append(
            f"{r['shape']:8} {r.get('density', ''):>5} {r['kernel']:30} {r['ms']:8.3f} {tf} {x} {_clock_cols(r)}"
        )
    lines.append(
        "TFLOP/s-equivalent: 4 * computed blocks * 128^2 * D over the time; x bf16: the bf16 kernel's time over "
        "this row's; fp8 = quantize + attend; fp8-attn = the attention launch alone on quantized codes"
    )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    ap.add_argument("--tag", default="", help="results file suffix (fp8-<card>-<date>-<tag>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fp8: needs a CUDA GPU")
    res = run(args)
    card = re.sub(r"[^A-Za-z0-9]+", "-", res["env"]["card"]).strip("-").lower()
    name = f"fp8-{card}-{res['env']['date']}{'-' + args.tag if args.tag else ''}.json"
    outdir = pathlib.Path(__file__).parent / "results"
    outdir.mkdir(exist_ok=True)
    for d in [outdir] + ([pathlib.Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        (d / name).write_text(json.dumps(res, indent=1))
    log("\n" + table(res))


if __name__ == "__main__":
    main()
