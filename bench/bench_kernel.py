"""Block-sparse attention and block-mass kernels against FlexAttention and cuDNN SDPA (GPU only).

    python bench/bench_kernel.py                      # the full table (Wan 1.3B 480p and 14B 720p)
    python bench/bench_kernel.py --shapes wan1.3b --sweep   # also time every kernel config in CONFIGS

Masks: "random" lists round(density * Mk) key blocks per query-block row, drawn uniformly; "local" lists
the round(density * Mk) key blocks nearest to the query block on the latent token grid (frame, row, col),
by the largest per-axis distance of block centroids, each axis scaled by its extent. Both use 128 x 128
blocks, bf16, head dim 128, B = 1, q/k/v contiguous [B, H, N, D] as in bench/anchors.md.

TFLOP/s counts computed blocks only: 4 * (listed blocks) * 128 * 128 * D per head, the partial last
block (N = 32760 and 75600 are not multiples of 128) counted as full. Dense cuDNN counts 4 * N^2 * D.
Times are medians of triton.testing.do_bench; beside each, the median SM clock and power draw while it was
timed and the share of samples under the software power cap (bench/gpu_clock.py: the card is power-capped
under this load, so the clock, and with it every rate, moves between runs). Prints a table last; writes
bench/results/kernel-<card>-<date>.json (and a copy under $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from gpu_clock import ClockLog  # noqa: E402
from triton.testing import do_bench

import calibatt_kernels as ck
from calibatt_cli.masks import local_block_mask
from calibatt_kernels import KernelConfig, block_sparse_attention_indexed

SHAPES = {
    # name: (B, H, (frames, rows, cols)); N = frames * rows * cols
    "wan1.3b": (1, 12, (21, 30, 52)),
    "wan14b": (1, 40, (21, 45, 80)),
}
DENSITIES = (1.0, 0.5, 0.25, 0.1)
BLOCK = 128
D = 128
CONFIGS = {
    # The Gluon kernels: a loader warp + two consumer warpgroups (attn_gluon.py). The labels are the results
    # files' row names: "gluon-ws-s3" is the persistent kernel (attn_gluon.GLUON_PERSISTENT, the default on
    # sm_90: Q double-buffered, K/V rings of 3 and 2 stages), "gluon-tile-s3" the per-tile one (GLUON_TILE).
    "gluon-ws-s3": KernelConfig(kernel="gluon_persistent", num_stages=3, num_warps=4),
    "gluon-tile-s3": KernelConfig(kernel="gluon_tile", num_stages=3, num_warps=4),
    # the tl kernel's default (and the fallback elsewhere): TMA, 128 x 128 tiles, 8 warps, 3 stages,
    # persistent LPT grid
    "tl": KernelConfig(),
    "tma-s2": KernelConfig(kernel="tl_tile", num_stages=2),
    "tma-s3": KernelConfig(kernel="tl_tile"),
    "tma-ws-s3": KernelConfig(kernel="tl_tile", tl_warp_specialize=True),
    "ptr-s3": KernelConfig(kernel="tl_tile", use_tma=False),
    "m64-n64-w4-s4": KernelConfig(kernel="tl_tile", block_m=64, block_n=64, num_warps=4, num_stages=4),
    "pipelined-qk": KernelConfig(tl_pipeline_qk=True),  # won no group in compile's tuning (bench/NOTES.md)
    "gluon-tile-s2": KernelConfig(kernel="gluon_tile", num_stages=2, num_warps=4),
}


def log(*a):
    print(*a, flush=True)


def random_mask(h, mq, mk, density, gen):
    kk = max(1, round(density * mk))
    idx = torch.argsort(torch.rand(1, h, mq, mk, generator=gen), dim=-1)[..., :kk]
    mask = torch.zeros(1, h, mq, mk, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask


def local_mask(h, grid, n, density):
    """Each query block lists the key blocks whose token centroids are nearest on the (f, r, c) grid."""
    assert n == grid[0] * grid[1] * grid[2]
    return local_block_mask(h, grid, density, BLOCK).unsqueeze(0)


def schedule_variant(counts, name):
    """The work order to time: "lpt" (what plans hold), "grouped<L>" (LPT over L count levels, rows in
    natural order inside a level), "none" (natural order: batch, head, row)."""
    if name == "none":
        return None
    if name == "lpt":
        return ck.lpt_schedule(counts)
    return ck.lpt_schedule(counts, levels=int(name.removeprefix("grouped")))


def bench(clock, ms_hint, fn, *args, **kwargs):
    """(median ms of fn(*args, **kwargs), the card's clock meanwhile): ~20 timed runs, at least 100 ms of
    warm-up and 200 ms of timing; the clock as `ClockLog.window` gives it ({} without samples)."""
    return clock.measure(
        lambda: do_bench(
            lambda: fn(*args, **kwargs), warmup=max(100, 3 * ms_hint), rep=max(200, 20 * ms_hint), return_mode="median"
        )
    )


def flex_fn(mask, n):
    from torch.nn.attention.flex_attention import BlockMask

    fa = _compiled_flex()
    m = mask.to(torch.int32)
    cnt = m.sum(-1).to(torch.int32)
    idx = torch.argsort(-m, dim=-1, stable=True).to(torch.int32).contiguous()
    zero = torch.zeros_like(cnt)
    bm = BlockMask.from_kv_blocks(
        zero.cuda(),
        idx.cuda(),
        full_kv_num_blocks=cnt.cuda(),
        full_kv_indices=idx.cuda(),
        BLOCK_SIZE=BLOCK,
        seq_lengths=(n, n),
    )
    return lambda q, k, v: fa(q, k, v, block_mask=bm)


_FLEX = []


def _compiled_flex():
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def run(args):
    res = dict(
        layout=args.layout,
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
    configs = CONFIGS if args.sweep else {name: CONFIGS[name] for name in args.configs}
    clock = ClockLog()
    try:
        for shape in args.shapes:
            bench_shape(shape, configs, args, res, clock)
            torch.cuda.empty_cache()
    finally:
        clock.close()
    return res


def bench_shape(shape, configs, args, res, clock):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, grid = SHAPES[shape]
    N = grid[0] * grid[1] * grid[2]
    mb = triton.cdiv(N, BLOCK)
    gen = torch.Generator().manual_seed(0)
    if args.layout == "bnhd":  # diffusers' layout: [B, N, H, D] buffers viewed as [B, H, N, D]
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense_flops = 4 * B * H * N * N * D
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_cudnn, hz = bench(clock, 200, F.scaled_dot_product_attention, q, k, v)
    row = dict(shape=shape, N=N, kernel="cudnn-dense", ms=t_cudnn, tflops=dense_flops / t_cudnn / 1e9, **hz)
    res["rows"].append(row)
    log("ROW", json.dumps(row))
    try:
        t_mass, hz = bench(clock, 3 * t_cudnn, ck.block_mass, q, k, block_size=(BLOCK, BLOCK))
        row = dict(shape=shape, N=N, kernel="block_mass", ms=t_mass, vs_cudnn=t_mass / t_cudnn, **hz)
    except Exception:
        row = dict(shape=shape, kernel="block_mass", error=traceback.format_exc(limit=-2)[-600:])
    res["rows"].append(row)
    log("ROW", json.dumps(row))

    for kind in args.masks:
        for dens in args.densities:
            if kind == "local" and dens == 1.0:
                continue  # the same mask as random at 1.0
            mask = random_mask(H, mb, mb, dens, gen) if kind == "random" else local_mask(H, grid, N, dens)
            blocks = int(mask.sum())
            flops = 4 * B * blocks * BLOCK * BLOCK * D
            index = ck.mask_to_index(mask.cuda())
            variants = []
            for sched in args.schedules:
                ix = ck.BlockIndex(index.counts, index.offsets, index.indices, schedule_variant(index.counts, sched))
                variants += [(name if sched == "lpt" else f"{name}/{sched}", cfg, ix) for name, cfg in configs.items()]
            if args.index_ab:  # the same masks with int32 block ids (the kernel's ID_WORDS=False path)
                index32 = ck.BlockIndex(index.counts, index.offsets, index.indices.to(torch.int32), index.schedule)
                variants += [(f"{name}/i32-ids", cfg, index32) for name, cfg in configs.items()]
            base = dict(shape=shape, N=N, mask=kind, density=dens)
            times, clocks = {}, {}
            if not args.no_flex:
                try:
                    fl = flex_fn(mask, N)
                    fl(q, k, v)
                    times["flex"], clocks["flex"] = bench(clock, dens * t_cudnn, fl, q, k, v)
                except Exception:
                    res["rows"].append(dict(base, kernel="flex", error=traceback.format_exc(limit=-2)[-600:]))
                    log("ERR flex", traceback.format_exc(limit=-2)[-600:])
            for name, cfg, index in variants:
                try:
                    t0 = time.time()
                    block_sparse_attention_indexed(q, k, v, index, block_size=(BLOCK, BLOCK), config=cfg)
                    torch.cuda.synchronize()
                    first = time.time() - t0
                    times[name], clocks[name] = bench(
                        clock,
                        dens * t_cudnn,
                        block_sparse_attention_indexed,
                        q,
                        k,
                        v,
                        index,
                        block_size=(BLOCK, BLOCK),
                        config=cfg,
                    )
                    if first > 1:
                        log(f"  {name}: first call {first:.1f} s (compile)")
                except Exception:
                    res["rows"].append(dict(base, kernel=name, error=traceback.format_exc(limit=-2)[-600:]))
                    log("ERR", name, traceback.format_exc(limit=-2)[-600:])
            for name, t in times.items():
                row = dict(
                    base,
                    kernel=name,
                    ms=t,
                    tflops=flops / t / 1e9,
                    vs_cudnn_dense=t_cudnn / t,
                    vs_flex=times["flex"] / t if "flex" in times else None,
                    **clocks[name],
                )
                res["rows"].append(row)
                log("ROW", json.dumps(row))


def table(res):
    lines = [
        f"card: {res['env']['card']}  torch {res['env']['torch']}  triton {res['env']['triton']}",
        f"{'shape':8} {'mask':6} {'dens':>5} {'kernel':16} {'ms':>8} {'TFLOP/s':>8} {'x flex':>7} {'x cuDNN':>8} "
        f"{'MHz':>5} {'W':>4} {'capped':>6}",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"{r['shape']:8} {r.get('mask', ''):6} {r.get('density', ''):>5} {r['kernel']:16} ERROR")
            continue
        if r["kernel"] == "block_mass":
            lines.append(
                f"{r['shape']:8} {'dense':6} {'':>5} {'block_mass':16} {r['ms']:8.2f} {'':>8} {'':>7} "
                f"{r['vs_cudnn']:7.2f}t {_clock_cols(r)}"
            )
            continue
        vs_flex = f"{r['vs_flex']:7.2f}" if r.get("vs_flex") else f"{'':>7}"
        vs_cudnn = f"{r['vs_cudnn_dense']:8.2f}" if "vs_cudnn_dense" in r else f"{'':>8}"
        lines.append(
            f"{r['shape']:8} {r.get('mask', 'dense'):6} {r.get('density', 1.0):>5} {r['kernel']:16} "
            f"{r['ms']:8.2f} {r['tflops']:8.0f} {vs_flex} {vs_cudnn} {_clock_cols(r)}"
        )
    lines.append(
        "x flex / x cuDNN: speed-up (their time / ours); block_mass: its time in units of one dense cuDNN "
        "call ('t'); MHz, W: median SM clock and power while timed; capped: share of those samples under "
        "the software power cap"
    )
    return "\n".join(lines)


def _clock_cols(r: dict) -> str:
    if "mhz" not in r:
        return f"{'':>5} {'':>4} {'':>6}"
    w = f"{r['watts']:4.0f}" if r.get("watts") is not None else f"{'':>4}"
    return f"{r['mhz']:5.0f} {w} {r['power_capped']:6.0%}"


def _schedule_name(s):
    if s in ("lpt", "none") or (s.startswith("grouped") and s.removeprefix("grouped").isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"unknown schedule {s!r}: use lpt, none or grouped<levels>")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--masks", nargs="+", default=["random", "local"], choices=["random", "local"])
    ap.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["gluon-ws-s3", "gluon-tile-s3", "tl"],
        choices=list(CONFIGS),
        help="kernel configs to time",
    )
    ap.add_argument("--sweep", action="store_true", help="time every config in CONFIGS")
    ap.add_argument(
        "--index-ab",
        action="store_true",
        help="also time each config with int32 block ids (vs the int16 ids plans hold)",
    )
    ap.add_argument(
        "--schedules",
        nargs="+",
        default=["lpt"],
        type=_schedule_name,
        help="work orders to time: lpt (plans' default), grouped<L> (e.g. grouped8), none",
    )
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (for A/B runs of our kernels)")
    ap.add_argument(
        "--layout",
        default="bhnd",
        choices=["bhnd", "bnhd"],
        help="q/k/v memory: contiguous [B, H, N, D], or [B, N, H, D] viewed (what diffusers passes)",
    )
    ap.add_argument("--tag", default="", help="results file suffix (kernel-<card>-<date>-<tag>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernel: needs a CUDA GPU")
    res = run(args)
    card = re.sub(r"[^A-Za-z0-9]+", "-", res["env"]["card"]).strip("-").lower()
    name = f"kernel-{card}-{res['env']['date']}{'-' + args.tag if args.tag else ''}.json"
    outdir = pathlib.Path(__file__).parent / "results"
    outdir.mkdir(exist_ok=True)
    for d in [outdir] + ([pathlib.Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        (d / name).write_text(json.dumps(res, indent=1))
    log("\n" + table(res))


if __name__ == "__main__":
    main()
