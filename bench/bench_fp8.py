"""The INT8/FP8 block-sparse attention kernel (attn_fp8.py) against the bf16 kernel, side by side (GPU only).

    python bench/bench_fp8.py                           # Wan 1.3B 480p and 14B 720p, densities 1.0 .. 0.1
    python bench/bench_fp8.py --sweep                   # every attn_fp8.SWEEP_CONFIGS config, within 85 s
    python bench/bench_fp8.py --quant-only              # where quantizing q, k, v spends its time

Rows per (shape, density): "bf16" is `dispatch.block_sparse_attention_indexed` with `dispatch.default_config`
(the Gluon kernel on sm_90); "fp8" the full fp8 call (quantize q, k, v, then attend); "fp8-attn/<config>" the
attention launch alone on codes quantized beforehand (what runs when q/k arrive quantized from the norm +
RoPE kernel), one row per fp8 kernel config; "fp8-quant" the quantization alone (quantize_qkv, five launches
over q, k, v), "fp8-quant/<launch>" each of its launches alone and "fp8-quant-kv" k's and v's (what runs when
q's codes come from the norm + RoPE kernel), with the bandwidth each achieves (`quant_rows`); "norm-rope" and
"norm-rope-quant" the q/k norm + RoPE kernel without and with q's quantization.
Masks: round(density * Mk) random key blocks per query-block row (bench_kernel.random_mask), 128 x 128
blocks, head dim 128, B = 1, q/k/v as [B, N, H, D] buffers viewed [B, H, N, D] (diffusers' layout).

TFLOP/s-equivalent counts computed blocks only, 4 * blocks * 128 * 128 * D, as bench_kernel.py does; "x bf16"
is the bf16 row's time over this row's. Times are medians of triton.testing.do_bench, with the SM clock
and power meanwhile (gpu_clock.py). Prints a table last; writes bench/results/fp8-<card>-<date>.json (and a
copy under $OUT when set).

--sweep: the attention launch alone under each config of `attn_fp8.SWEEP_CONFIGS` against the bf16 kernel,
Wan 1.3B 480p, densities 0.2 and 0.5, within --budget seconds. One process per config compiles it first, all
at once (the Triton cache is shared: the timing process then loads the binaries). A config that fails to
compile, or is not done within --compile-limit seconds, is recorded with its error's first (and last) line
and not timed. Configs compiled to the same binary (the cubin's hash) are timed once; the others' rows say
`same_binary_as`. A timed row gives its output's difference from the first config's (`rel_vs_default`: the
same arithmetic, ~0) and from the bf16 kernel's (`rel_vs_bf16`: fp8's rounding, a few per cent on random
inputs). The bf16 kernel is timed before and after the configs at each density, "x bf16" divides their
mean. Writes bench/results/fp8-<card>-<date>-sweep.json (--out: elsewhere). --smoke runs the same path on
the CPU under the Triton interpreter at a toy size (tests/test_fp8_sweep.py).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from bench_kernel import BLOCK, SHAPES, _clock_cols, bench, random_mask  # noqa: E402
from gpu_clock import ClockLog  # noqa: E402

import calibatt_kernels as ck  # noqa: E402
from calibatt_kernels import KernelConfig, attn_fp8, dispatch  # noqa: E402
from calibatt_kernels.attn_fp8 import (  # noqa: E402
    SWEEP_CONFIGS,
    _attn_fp8_fwd,
    _quantize_launches,
    attention_fp8_quantized,
    block_sparse_attention_fp8_indexed,
    quantize_qkv,
)

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
    for row in quant_rows(q, k, v, bs, clock):
        res["rows"].append(dict(row, shape=shape, N=N))
        log("ROW", json.dumps(res["rows"][-1]))
    if args.quant_only:
        return
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


def quant_rows(q, k, v, bs, clock) -> list[dict]:
    """The quantization's launches timed one by one ("fp8-quant/<launch>", after one run of all in order: the
    stats they read are there), all together ("fp8-quant": quantize_qkv; "fp8-quant-kv": k and v alone, as when
    q's codes come from the norm + RoPE kernel), and the q/k norm + RoPE kernel plain ("norm-rope") and with
    q's quantization ("norm-rope-quant"), on q, k as [B, N, C] projections. "GB/s": the bytes each must move
    (read and written once) over its time."""
    B, H, N, D = q.shape
    x, codes, bf16 = B * H * N * D, B * H * triton.cdiv(N, bs[0]) * bs[0] * D, q.element_size()
    chunks = B * H * triton.cdiv(N, attn_fp8.STATS_CHUNK) * D
    moved = {
        "stats": 2 * x * bf16 + chunks * (8 + 4),  # K, V in; K's float64 sums and V's maxima per chunk out
        "finalize": chunks * (8 + 4) + B * H * D * 8,
        "q": x * bf16 + codes + codes // D * 4,  # q in; codes and a scale per token out
        "k": x * bf16 + codes,
        "v": x * bf16 + codes,
    }
    moved["all"] = sum(moved.values())
    moved["kv"] = moved["all"] - moved["q"]
    moved["norm-rope"] = 2 * x * bf16 * 2  # q, k in and out
    moved["norm-rope-quant"] = 2 * x * bf16 + x * bf16 + codes + codes // D * 4  # q, k in; k, q's codes out

    _, launches = _quantize_launches(q, k, v, bs, True)
    for launch in launches.values():
        launch()
    qc, kc = (t.transpose(1, 2).reshape(B, N, H * D) for t in (q, k))  # the projections' [B, N, C] layout
    w = torch.ones(H * D, device=q.device)
    table = torch.zeros(N, D, device=q.device)
    fns = {f"fp8-quant/{name}": (launch, name) for name, launch in launches.items()}
    fns["fp8-quant"] = (lambda: quantize_qkv(q, k, v, bs), "all")
    qz = quantize_qkv(q, k, v, bs)
    fns["fp8-quant-kv"] = (lambda: quantize_qkv((qz.q8, qz.q_scale), k, v, bs), "kv")
    fns["norm-rope"] = (lambda: ck.qk_norm_rope(qc, kc, w, w, table, table, heads=H, eps=1e-6), "norm-rope")
    fns["norm-rope-quant"] = (
        lambda: attn_fp8.qk_norm_rope_quant(qc, kc, w, w, table, table, heads=H, eps=1e-6, block_size=bs),
        "norm-rope-quant",
    )
    rows = []
    for name, (fn, what) in fns.items():
        fn()
        torch.cuda.synchronize()
        ms, hz = bench(clock, 1, fn)
        rows.append(dict(kernel=name, ms=ms, gbps=moved[what] / ms / 1e6, bytes=moved[what], **hz))
    return rows


def table(res) -> str:
    lines = [
        f"card: {res['env']['card']}  torch {res['env']['torch']}  triton {res['env']['triton']}",
        f"{'shape':8} {'dens':>5} {'kernel':30} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>6} {'x bf16':>7} "
        f"{'MHz':>5} {'W':>4} {'capped':>6}",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"{r['shape']:8} {r.get('density', ''):>5} {r['kernel']:30} ERROR")
            continue
        tf = f"{r['tflops']:8.0f}" if "tflops" in r else f"{'':>8}"
        gb = f"{r['gbps']:6.0f}" if "gbps" in r else f"{'':>6}"
        x = f"{r['x_bf16']:7.2f}" if "x_bf16" in r else f"{'':>7}"
        lines.append(
            f"{r['shape']:8} {r.get('density', ''):>5} {r['kernel']:30} {r['ms']:8.3f} {tf} {gb} {x} {_clock_cols(r)}"
        )
    lines.append(
        "TFLOP/s-equivalent: 4 * computed blocks * 128^2 * D over the time; x bf16: the bf16 kernel's time over "
        "this row's; fp8 = quantize + attend; fp8-attn = the attention launch alone on quantized codes; GB/s: "
        "the bytes a quantize or norm row must move over its time (fp8-quant/<launch>: one launch alone)"
    )
    return "\n".join(lines)


# ---- --sweep ----

SWEEP_SHAPE = "wan1.3b"
SWEEP_DENSITIES = (0.2, 0.5)
WORKER_TAG = "SWEEP-WORKER "


def _first_last(e: BaseException) -> dict:
    """An error as the sweep records it: its type and first line, and its last line (a Triton compile error's
    first line is only a source position)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    return dict(error=f"{type(e).__name__}: {lines[0]}"[:300], error_last=lines[-1][:300])


def _sweep_inputs(smoke: bool):
    """The sweep's q, k, v (bf16 [B, N, H, D] buffers viewed [B, H, N, D]) and block size: the same shapes and
    strides in every process, so that the binaries compiled match."""
    if smoke:
        B, H, N, D, bs, dev = 1, 1, 200, 64, (64, 64), "cpu"
    else:
        B, H, grid = SHAPES[SWEEP_SHAPE]
        N, D, bs, dev = grid[0] * grid[1] * grid[2], 128, (BLOCK, BLOCK), "cuda"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=gen).to(dev, torch.bfloat16).transpose(1, 2) for _ in range(3))
    return q, k, v, bs


def _sweep_mask(q, bs, density: float):
    """round(density * Mk) random key blocks per query-block row (bench_kernel.random_mask), and its index."""
    mb = triton.cdiv(q.shape[2], bs[0])
    mask = random_mask(q.shape[1], mb, mb, density, torch.Generator().manual_seed(1))
    return mask, ck.mask_to_index(mask.to(q.device))


def _binary(fn) -> dict:
    """The newest binary of a JIT function in this process: its cubin's hash, shared memory, registers and
    spills ({} under the interpreter, or where a Triton version keeps its binaries otherwise)."""
    try:
        kern = [kern for cache in fn.device_caches.values() for kern in cache[0].values()][-1]
        info = dict(binary=hashlib.sha1(kern.asm["cubin"]).hexdigest()[:12], shared_kib=kern.metadata.shared / 1024)
        kern._init_handles()
        return dict(info, regs=kern.n_regs, spills=kern.n_spills)
    except Exception:
        return {}


def sweep_worker(args) -> None:
    """Compile one config: run it once on the sweep's inputs, then print what came of it as one JSON line."""
    t0 = time.perf_counter()
    try:
        q, k, v, bs = _sweep_inputs(args.smoke)
        qz = quantize_qkv(q, k, v, bs)
        _, index = _sweep_mask(q, bs, args.densities[0])
        attention_fp8_quantized(qz, index, torch.empty_like(q), config=SWEEP_CONFIGS[args.sweep_worker])
        if q.is_cuda:
            torch.cuda.synchronize()
        res = dict(ok=True, compile_s=time.perf_counter() - t0, **_binary(_attn_fp8_fwd))
    except Exception as e:
        res = dict(ok=False, compile_s=time.perf_counter() - t0, **_first_last(e))
    print(WORKER_TAG + json.dumps(res), flush=True)


def _spawn_workers(names: list[str], args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--densities", str(args.densities[0])]
    cmd += ["--smoke"] if args.smoke else []
    return {
        n: subprocess.Popen(cmd + ["--sweep-worker", n], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in names
    }


def _collect_workers(procs: dict, deadline: float, limit: float) -> dict:
    """Each worker's JSON line, or why there is none: an exit without one (its stderr's last line), or no end
    by the deadline, `limit` seconds from the sweep's start (then the worker is killed)."""
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out[name] = dict(ok=False, error=f"compile not done within {limit:.0f} s of the start")
            continue
        lines = [ln for ln in stdout.splitlines() if ln.startswith(WORKER_TAG)]
        if lines:
            out[name] = json.loads(lines[-1][len(WORKER_TAG) :])
        else:
            tail = [ln for ln in stderr.splitlines() if ln.strip()] or [""]
            out[name] = dict(ok=False, error=f"worker exited with rc {proc.returncode}: {tail[-1][:300]}")
    return out


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sweep(args) -> dict:
    start = time.monotonic()
    names = args.configs or list(SWEEP_CONFIGS)
    procs = _spawn_workers(names, args)  # first: they compile while this process sets up and runs bf16
    on_gpu = not args.smoke
    res = dict(
        env=dict(
            card=torch.cuda.get_device_name() if on_gpu else "cpu",
            date=datetime.date.today().isoformat(),
            torch=torch.__version__,
            triton=triton.__version__,
        ),
        sweep=dict(
            shape="toy (smoke)" if args.smoke else SWEEP_SHAPE,
            densities=args.densities,
            budget_s=args.budget,
            configs={n: {f: x for f, x in vars(SWEEP_CONFIGS[n]).items() if x is not None} for n in names},
        ),
        workers={},
        rows=[],
        skipped=[],
    )
    log("ENV", json.dumps(res["env"]))
    clock = ClockLog() if on_gpu else None

    def timed(fn, ms_hint):
        if not on_gpu:  # the interpreter: one call, for the path, not the number
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3, {}
        return bench(clock, ms_hint, fn)

    def budget_spent(what: str) -> bool:
        if time.monotonic() - start > args.budget - 3:
            res["skipped"].append(what)
            return True
        return False

    try:
        q, k, v, bs = _sweep_inputs(args.smoke)
        masks = {d: _sweep_mask(q, bs, d) for d in args.densities}
        index = {d: ix for d, (_, ix) in masks.items()}
        out = torch.empty_like(q)
        qz = quantize_qkv(q, k, v, bs)
        bf16_cfg = dispatch.default_config(q.device, bs, q.shape[-1])
        bf16_out = {  # compiles the bf16 kernel meanwhile
            d: ck.block_sparse_attention_indexed(q, k, v, index[d], block_size=bs, config=bf16_cfg)
            for d in args.densities
        }
        t, hz = timed(lambda: quantize_qkv(q, k, v, bs), 1)
        res["rows"].append(dict(kernel="fp8-quant", ms=t, **hz))

        res["workers"] = workers = _collect_workers(procs, start + args.compile_limit, args.compile_limit)
        log("WORKERS", json.dumps(workers))
        first, same = {}, {}  # binary -> the first config with it; config -> that config
        for n in names:
            if workers[n].get("ok") and workers[n].get("binary"):
                same[n] = first.setdefault(workers[n]["binary"], n)
        to_time = [n for n in names if workers[n].get("ok") and same.get(n, n) == n]

        for d in args.densities:
            base = dict(shape=res["sweep"]["shape"], density=d)
            flops = 4 * int(masks[d][0].sum()) * bs[0] * bs[1] * q.shape[-1]
            if budget_spent(f"density {d}"):
                continue

            def bf16(d=d):
                return ck.block_sparse_attention_indexed(q, k, v, index[d], block_size=bs, config=bf16_cfg, out=out)

            t_before, hz = timed(bf16, 5 * d)
            res["rows"].append(dict(base, kernel="bf16", config=bf16_cfg.kernel, when="before", ms=t_before, **hz))
            rows, default_out = [], None
            for n in to_time:
                if budget_spent(f"density {d} {n}"):
                    continue

                def fn(n=n, d=d):
                    return attention_fp8_quantized(qz, index[d], out, config=SWEEP_CONFIGS[n])

                try:
                    got = fn().clone()
                    t, hz = timed(fn, 5 * d)
                except Exception as e:
                    rows.append(dict(base, kernel="fp8-attn", config=n, **_first_last(e)))
                    continue
                default_out = got if default_out is None else default_out
                row = dict(base, kernel="fp8-attn", config=n, ms=t, tflops=flops / t / 1e9, **hz)
                rows.append(dict(row, rel_vs_default=_rel(got, default_out), rel_vs_bf16=_rel(got, bf16_out[d])))
            t_after, hz = timed(bf16, 5 * d)
            res["rows"].append(dict(base, kernel="bf16", config=bf16_cfg.kernel, when="after", ms=t_after, **hz))
            for row in rows:
                if "ms" in row:
                    row["x_bf16"] = (t_before + t_after) / 2 / row["ms"]
                res["rows"].append(row)
                log("ROW", json.dumps(row))
            for n in names:
                if same.get(n, n) != n:
                    res["rows"].append(dict(base, kernel="fp8-attn", config=n, same_binary_as=same[n]))
                elif not workers[n].get("ok"):
                    res["rows"].append(dict(base, kernel="fp8-attn", config=n, error=workers[n]["error"]))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        if clock is not None:
            clock.close()
    res["wall_s"] = time.monotonic() - start
    return res


def sweep_table(res) -> str:
    lines = [
        f"card: {res['env']['card']}  torch {res['env']['torch']}  triton {res['env']['triton']}  "
        f"({res['wall_s']:.0f} s)",
        f"{'dens':>5} {'config':26} {'ms':>8} {'TFLOP/s':>8} {'x bf16':>7} {'vs dflt':>8} {'vs bf16':>8} "
        f"{'MHz':>5} {'W':>4} {'capped':>6}",
    ]
    for r in res["rows"]:
        name = f"bf16 ({r['when']})" if r["kernel"] == "bf16" else r.get("config", r["kernel"])
        d = r.get("density", "")
        if "error" in r:
            lines.append(f"{d:>5} {name:26} FAILED: {r['error'][:90]}")
        elif "same_binary_as" in r:
            lines.append(f"{d:>5} {name:26} = {r['same_binary_as']} (the same binary)")
        else:
            cols = [
                f"{r[key]:{fmt}}" if key in r else " " * width
                for key, fmt, width in [
                    ("tflops", "8.0f", 8),
                    ("x_bf16", "7.2f", 7),
                    ("rel_vs_default", "8.1e", 8),
                    ("rel_vs_bf16", "8.1e", 8),
                ]
            ]
            lines.append(f"{d:>5} {name:26} {r['ms']:8.3f} {' '.join(cols)} {_clock_cols(r)}")
    if res["skipped"]:
        lines.append(f"not timed (budget spent): {', '.join(res['skipped'])}")
    for n, w in res["workers"].items():
        if w.get("ok") and "regs" in w:
            lines.append(
                f"  {n:26} {w['binary']} {w['shared_kib']:5.0f} KiB shared, {w['regs']} regs, {w['spills']} "
                f"spills, compiled in {w['compile_s']:.0f} s"
            )
    lines.append(
        "x bf16: the bf16 kernel's time (mean of before and after) over this row's; vs dflt / vs bf16: relative "
        "difference of the output from the first config's and from the bf16 kernel's"
    )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--densities", nargs="+", type=float, help=f"default {DENSITIES}; with --sweep {SWEEP_DENSITIES}")
    ap.add_argument("--tag", help="results file suffix (fp8-<card>-<date>-<tag>.json); with --sweep: sweep")
    ap.add_argument("--quant-only", action="store_true", help="only the quantize and norm + RoPE rows (seconds)")
    ap.add_argument("--sweep", action="store_true", help="time every attn_fp8.SWEEP_CONFIGS config (see above)")
    ap.add_argument("--configs", nargs="+", choices=list(SWEEP_CONFIGS), help="--sweep: these configs only")
    ap.add_argument("--budget", type=float, default=85.0, help="--sweep: seconds for the whole run")
    ap.add_argument("--compile-limit", type=float, default=50.0, help="--sweep: seconds from the start to compile")
    ap.add_argument("--smoke", action="store_true", help="--sweep on the CPU under the Triton interpreter, toy size")
    ap.add_argument("--out", help="results file (default bench/results/fp8-<card>-<date>[-<tag>].json)")
    ap.add_argument("--sweep-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.densities is None:
        args.densities = list(SWEEP_DENSITIES if args.sweep or args.sweep_worker else DENSITIES)
    if args.sweep_worker:
        return sweep_worker(args)
    if args.smoke and not args.sweep:
        sys.exit("bench_fp8: --smoke goes with --sweep")
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("bench_fp8: needs a CUDA GPU (or --sweep --smoke)")
    res = sweep(args) if args.sweep else run(args)
    tag = args.tag if args.tag is not None else ("sweep" if args.sweep else "quant" if args.quant_only else "")
    card = re.sub(r"[^A-Za-z0-9]+", "-", res["env"]["card"]).strip("-").lower()
    name = f"fp8-{card}-{res['env']['date']}{'-' + tag if tag else ''}.json"
    paths = [pathlib.Path(args.out)] if args.out else [pathlib.Path(__file__).parent / "results" / name]
    if os.environ.get("OUT"):
        paths.append(pathlib.Path(os.environ["OUT"]) / name)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
    log("\n" + (sweep_table(res) if args.sweep else table(res)))
    log(f"wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
