"""Where a per-tile Gluon program's time goes: the kernel's TRACE build stamps each program's SM cycle counter at
six points (attn_gluon.TRACE_SLOTS), and this script times and traces masks whose rows all list the
same number of key blocks, so the per-tile fixed cost and the per-block rate can be read apart (GPU only).

    python bench/trace_gluon.py                       # Wan 1.3B shape, 13..256 blocks per row, three patterns
    python bench/trace_gluon.py --shape wan14b --counts 30 59 148 591

Patterns: "random" (each row its own uniformly drawn blocks, as bench_kernel.py's random masks), "shared"
(every row of a head the same drawn blocks: concurrent programs read the same K/V), "prefix" (the first k
blocks, in order). Per pattern and count: ms and TFLOP/s (do_bench median, untraced), then from one traced
run the medians over programs of
- launch gap: cycles from the previous program's end on the same SM to this program's start;
- the prologue, from the program's start: its index entries read (schedule, then count and offset), its
  four TMA descriptors made, the loader warp started, the first K/V requested (after reading its block id),
  and both Q and the first K/V in shared memory (to first K/V);
- per block: the loop's time / (count - 1);
- tail: the loop's end -> warpgroup 0's rows stored (the last P V, the normalisation, the store);
- fixed: the program's span plus the launch gap before it, minus count x per block, in block-times;
- busy: the SMs' summed program spans / (132 SMs x the kernel's span).
Writes bench/results/trace-<card>-<date>.json (and a copy under $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib

import torch
import triton
from bench_kernel import SHAPES  # noqa: E402
from triton.testing import do_bench

import calibatt_kernels as ck  # noqa: E402
from calibatt_kernels import attn_gluon as g  # noqa: E402
from calibatt_kernels.index import index_on_device  # noqa: E402

BLOCK = 128
D = 128


def pattern_mask(kind: str, h: int, mb: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """[1, h, mb, mb], every row `count` blocks: "random", "shared", "prefix" (above), or "pool<k>": each
    head's rows drawn from its own k x count blocks (the K/V that rows running at once can touch: 2-4 x 59
    blocks of 14B are 7.7-15 MB, a whole head 38.7 MB)."""
    mask = torch.zeros(1, h, mb, mb, dtype=torch.bool)
    if kind == "prefix":
        mask[..., :count] = True
    elif kind.startswith("pool"):
        for hh in range(h):
            pool = torch.randperm(mb, generator=gen)[: int(kind[4:]) * count]
            pick = torch.argsort(torch.rand(mb, pool.numel(), generator=gen), dim=-1)[:, :count]
            mask[0, hh].scatter_(-1, pool[pick], True)
    elif kind == "shared":
        for hh in range(h):
            mask[0, hh, :, torch.randperm(mb, generator=gen)[:count]] = True
    else:
        idx = torch.argsort(torch.rand(1, h, mb, mb, generator=gen), dim=-1)[..., :count]
        mask.scatter_(-1, idx, True)
    return mask


def shuffled(index: ck.BlockIndex, gen: torch.Generator) -> ck.BlockIndex:
    """The same rows with each row's ids in random order, its last id kept last (the kernels mask keys >= N
    in a row's last block only). Plans list ids ascending, so rows running at once sweep K/V from the first
    block to the last together; this order takes that away. Rows of equal count, back to back."""
    c = index.counts.reshape(-1)
    cnt = int(c[0])
    assert bool((c == cnt).all()) and cnt > 1, "rows of one count"
    ids = index.indices[: c.numel() * cnt].view(-1, cnt)
    perm = torch.argsort(torch.rand(ids.shape[0], cnt - 1, generator=gen), dim=-1).to(ids.device)
    ids = torch.cat([ids[:, :-1].gather(1, perm), ids[:, -1:]], 1).reshape(-1).contiguous()
    return ck.BlockIndex(index.counts, index.offsets, ids, index.schedule)


def launch(q, k, v, out, ix, trace=None):
    counts, offsets, words, sched, records = ix
    # (the per-tile kernel: the persistent one has no TRACE build)
    return g.block_sparse_attention_gluon(
        q, k, v, out, counts, offsets, words, sched, scale=D**-0.5, persistent=False, records=records, trace=trace
    )


def analyse(tr: torch.Tensor) -> dict:
    """Medians over programs of the trace's intervals (cycles, and ns via the global timer)."""
    names = g.TRACE_SLOTS
    t = {n: tr[:, i].to(torch.int64) for i, n in enumerate(names)}

    def span(a, b):  # 32-bit counters: differences modulo 2^32
        return (t[b] - t[a]) % (1 << 32)

    cnt = t["count"]
    end = torch.maximum(span("start", "stored_wg0"), span("start", "stored_wg1"))  # cycles after start
    ns = span("start_ns", "stored_wg0_ns").double()
    cyc = span("start", "stored_wg0").double()
    ghz = float(cyc.sum() / ns.sum())
    loop = span("first_kv_ready", "loop_done").double()
    per_block = float((loop[cnt > 1] / (cnt[cnt > 1] - 1)).median())
    # launch gap: order each SM's programs by start (cycles of one SM's counter are comparable)
    gaps, busy = [], 0.0
    for sm in t["smid"].unique():
        sel = (t["smid"] == sm).nonzero().flatten()
        starts = t["start"][sel]
        order = torch.argsort(starts)
        st = starts[order]
        en = st + end[sel][order]
        busy += float(end[sel].sum())
        gaps += ((st[1:] - en[:-1]) % (1 << 32)).tolist()
    g_ns = torch.tensor(gaps, dtype=torch.float64) if gaps else torch.zeros(1, dtype=torch.float64)
    t0 = t["start_ns"].min()
    kernel_ns = float(((t["stored_wg0_ns"] - t0) % (1 << 32)).max())
    med = lambda x: float(torch.as_tensor(x, dtype=torch.float64).median())  # noqa: E731
    gap = med(g_ns)
    fixed = (end.double() + gap - cnt.double() * per_block) / per_block
    return dict(
        ghz=ghz,
        per_block_us=per_block / ghz / 1e3,
        launch_gap_us=gap / ghz / 1e3,
        to_first_kv_us=med(span("start", "first_kv_ready")) / ghz / 1e3,
        loader_issued_us=med(span("start", "loader_issued")) / ghz / 1e3,
        index_read_us=med(span("start", "index_read")) / ghz / 1e3,
        descriptors_made_us=med(span("start", "descriptors_made")) / ghz / 1e3,
        loader_start_us=med(span("start", "loader_start")) / ghz / 1e3,
        tail_us=med(span("loop_done", "stored_wg0")) / ghz / 1e3,
        wg1_after_wg0_us=med((t["stored_wg1"] - t["stored_wg0"] + (1 << 31)) % (1 << 32) - (1 << 31)) / ghz / 1e3,
        fixed_blocks=med(fixed),
        busy=busy / ghz / (len(t["smid"].unique()) * kernel_ns),
        sms=int(len(t["smid"].unique())),
        kernel_us=kernel_ns / 1e3,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="wan1.3b", choices=list(SHAPES))
    ap.add_argument("--counts", nargs="+", type=int, default=[13, 26, 51, 64, 128, 256])
    ap.add_argument(
        "--patterns", nargs="+", default=["random", "shared", "prefix"], choices=["random", "shared", "prefix"]
    )
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    B, H, grid = SHAPES[args.shape]
    N = grid[0] * grid[1] * grid[2]
    mb = triton.cdiv(N, BLOCK)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    gen = torch.Generator().manual_seed(0)
    env = dict(
        card=torch.cuda.get_device_name(),
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        triton=triton.__version__,
        sms=torch.cuda.get_device_properties(0).multi_processor_count,
    )
    print("ENV", json.dumps(env), flush=True)
    rows = []
    for kind in args.patterns:
        for count in args.counts:
            mask = pattern_mask(kind, H, mb, min(count, mb), gen)
            index = ck.mask_to_index(mask.cuda())
            counts, offsets, ids, _, _ = index_on_device(index, q.device)
            words = ids  # int16 ids as words (mask_to_index gives int16)
            sched = ck.lpt_schedule(index.counts).to(device="cuda", dtype=torch.int32)

            records = g.tile_records(counts, offsets, words, sched)  # made once, as cached_records keeps them
            run = functools.partial(launch, q, k, v, out, (counts, offsets, words, sched, records))
            ms = do_bench(run, warmup=100, rep=200, return_mode="median")
            flops = 4 * B * int(mask.sum()) * BLOCK * BLOCK * D
            trace = torch.zeros(B * H * mb, len(g.TRACE_SLOTS), dtype=torch.int32, device="cuda")
            run(trace)
            torch.cuda.synchronize()
            trace.zero_()
            run(trace)
            torch.cuda.synchronize()
            row = dict(
                shape=args.shape,
                pattern=kind,
                count=min(count, mb),
                ms=ms,
                tflops=flops / ms / 1e9,
                **analyse(trace.cpu()),
            )
            rows.append(row)
            print("ROW", json.dumps(row), flush=True)
    hdr = (
        "pattern",
        "count",
        "ms",
        "tflops",
        "per_block_us",
        "launch_gap_us",
        "index_read_us",
        "descriptors_made_us",
        "loader_start_us",
        "loader_issued_us",
        "to_first_kv_us",
        "tail_us",
        "wg1_after_wg0_us",
        "fixed_blocks",
        "busy",
    )
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in hdr))
    res = dict(env=env, rows=rows)
    name = f"trace-{env['card'].lower().replace(' ', '-')}-{env['date']}{'-' + args.tag if args.tag else ''}.json"
    path = pathlib.Path(__file__).resolve().parent / "results" / name
    path.write_text(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        (pathlib.Path(os.environ["OUT"]) / name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
