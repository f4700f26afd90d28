"""Where one denoising step of the user's `calibatt generate` spends its GPU time: the costliest kernels per
layer call, and how much of the step the GPU is busy at all (idle gaps show host-side work the GPU waits on).

    python bench/bench_cli_wan.py --workdir /tmp/wcli --library      # writes /tmp/wcli/config.yaml, bundle, cache
    python bench/profile_generate.py --config /tmp/wcli/config.yaml --step 5 --tag user

Runs the library's `generate` in this process with the config's settings (the cache's compiled blocks and
kernels, as `calibatt generate` would), starts torch.profiler at the end of step STEP-1 and stops it at the
end of step STEP, then prints a table and writes bench/results/profile-<card>-<date>[-<tag>].json. Profiling
adds host-side work of its own: compare kernel times, not the step's wall time, with unprofiled runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

PROMPT = "a red car driving along a coastal road at sunset"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (kernels on one stream may overlap in the trace)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(events, layers: int, top: int, cuda: bool) -> dict:
    """Kernel time by name (per layer call: a step is two forwards of `layers` blocks), the busy time and the
    span from the first kernel's start to the last one's end. On the CPU (a smoke run of the script): the
    operators that call no other, in place of kernels."""
    rows: dict[str, list] = {}
    spans = []
    for ev in events:
        if ev.device_type.name != ("CUDA" if cuda else "CPU") or (not cuda and ev.cpu_children):
            continue
        start, end = ev.time_range.start, ev.time_range.end
        spans.append((start, end))
        row = rows.setdefault(ev.name[:100], [0, 0.0])
        row[0] += 1
        row[1] += end - start
    if not spans:
        raise SystemExit("the profiler recorded no kernels")
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    calls = 2 * layers
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][1])
    return {
        "kernel_ms": round(sum(us for _, us in rows.values()) / 1e3, 3),
        "busy_ms": round(busy_us(spans) / 1e3, 3),
        "span_ms": round(span / 1e3, 3),
        "kernels": [
            {"name": name, "ms_per_layer_call": round(us / 1e3 / calls, 4), "launches_per_layer_call": n / calls}
            for name, (n, us) in ranked[:top]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a calibatt config (bench_cli_wan.py writes WORKDIR/config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as the CLI's")
    ap.add_argument("--step", type=int, default=5, help="the step to profile (0-based; after the dense warm-up)")
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from calibatt_cli.config import load_config
    from calibatt_cli.generate import generate
    from calibatt_cli.models import model_identity

    cfg = load_config(args.config, args.set)
    if args.step < 1 or args.step >= cfg.generate.steps:
        raise SystemExit(f"--step must be between 1 and {cfg.generate.steps - 1} (generate.steps)")
    cuda = cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and torch.cuda.is_available())
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    ended = 0

    def on_step() -> None:
        nonlocal ended
        ended += 1
        if ended == args.step:
            prof.start()
        elif ended == args.step + 1:
            if cuda:
                torch.cuda.synchronize()
            prof.stop()

    t0 = time.perf_counter()
    res = generate(cfg, [PROMPT], write=False, on_step=on_step)
    wall = time.perf_counter() - t0
    layers = model_identity(cfg).layers
    summary = summarize(prof.events(), layers, args.top, cuda)
    steps = res.videos[0].step_seconds
    card = torch.cuda.get_device_name() if cuda else "cpu"
    out = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "config": str(args.config),
        "overrides": args.set,
        "what": "one denoising step of `calibatt generate` (library call, this process), torch.profiler",
        "step": args.step,
        "step_seconds_profiled": steps[args.step],
        "step_seconds": steps,
        "wall_seconds": round(wall, 2),
        "compiled_blocks": res.compiled_blocks,
        "attention_calls": (res.kernels or {}).get("calls"),
        **summary,
    }
    print(
        f"{card}: step {args.step}: kernels {summary['kernel_ms']:.1f} ms, GPU busy {summary['busy_ms']:.1f} ms of a "
        f"{summary['span_ms']:.1f} ms span; steps (step {args.step} profiled) {[round(s, 4) for s in steps]}"
    )
    print(f"{'ms/layer call':>13} {'launches':>8}  kernel")
    for k in summary["kernels"]:
        print(f"{k['ms_per_layer_call']:13.4f} {k['launches_per_layer_call']:8.2f}  {k['name']}")
    slug = card.lower().replace(" ", "-")
    name = f"profile-{slug}-{out['date']}{'-' + args.tag if args.tag else ''}.json"
    path = args.out or ROOT / "bench" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
