"""Does `generate.guard` catch faulty mask bundles? PSNR vs dense on the trained tiny model's held-out prompts.

Three bundles, all from one calibration pass over configs/prompts/tiny_calibrate.txt (the recorded block mass
is turned into masks at each epsilon, as `calibatt calibrate` does):
  correct    the config's epsilon (0.001): the guard must widen nothing and leave the video bit-identical
  loose      epsilon 0.2: every row keeps its promised 80 % of the mass, and that is too little
  permuted   the correct masks with the heads of every layer rotated by one (head h gets head h-1's masks)
For each held-out prompt (configs/prompts/tiny_eval.txt) the dense video, then each bundle sparse without and
with the guard, all from the same noise; PSNR of each sparse video vs the dense one (torchmetrics, as
`calibatt evaluate`), and what the guard widened and measured.

    python bench/bench_guard_faults.py                 # all 16 held-out prompts: 1 dense + 6 sparse renders each
    python bench/bench_guard_faults.py --prompts 4     # the first 4
Writes bench/results/guard-faults-tiny-<date>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calibatt_cli import parallel
from calibatt_cli.bundle import save_bundle
from calibatt_cli.cache.build import compile_cache
from calibatt_cli.calibrate import bundle_meta, finish_bundle, read_prompts, record_mass
from calibatt_cli.config import load_config
from calibatt_cli.evaluate import _score
from calibatt_cli.generate import generate

ROOT = Path(__file__).resolve().parent.parent
LOOSE = 0.2


def held_out(n: int | None) -> list[str]:
    lines = (ROOT / "configs/prompts/tiny_eval.txt").read_text().splitlines()
    prompts = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    return prompts[:n] if n else prompts


def calibration_mass(cfg, path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-point block-mass sums and counts of the calibration prompts (record_mass), from `path`
    when an earlier run saved them there (safetensors)."""
    if path is not None and path.is_file():
        t = load_file(str(path))
        return t["totals"], t["counts"]
    prompts = read_prompts(cfg.calibration.prompts, cfg)
    totals, counts = record_mass(cfg, prompts, list(range(len(prompts))), parallel.Layout())
    if path is not None:
        save_file({"totals": totals, "counts": counts}, str(path))
    return totals, counts


def bundles(cfg, work: Path, mass_path: Path | None) -> dict[str, tuple[Path, float]]:
    """name -> (bundle path, epsilon) for the three bundles."""
    meta = bundle_meta(cfg, read_prompts(cfg.calibration.prompts, cfg))
    totals, counts = calibration_mass(cfg, mass_path)
    eps = cfg.calibration.epsilon
    correct = finish_bundle(dict(meta, epsilon=eps), totals, counts, work / "correct.safetensors", write=True)
    finish_bundle(dict(meta, epsilon=LOOSE), totals, counts, work / "loose.safetensors", write=True)
    permuted = correct.bundle.masks.roll(1, dims=2).contiguous()  # [buckets, layers, heads, Mq, Mk]
    body = {k: v for k, v in correct.bundle.meta.items() if k not in ("content_hash", "entries", "summary")}
    save_bundle(work / "permuted.safetensors", permuted, dict(body, fault="heads rotated by one in every layer"))
    return {
        "correct": (work / "correct.safetensors", eps),
        "loose": (work / "loose.safetensors", LOOSE),
        "permuted": (work / "permuted.safetensors", eps),
    }


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="guard-faults-"))
    base = load_config(ROOT / "configs/tiny.yaml", args.set)
    prompts = held_out(args.prompts)
    t0 = time.perf_counter()
    made = bundles(base, work, Path(args.mass) if args.mass else None)
    dense = generate(replace(base, generate=replace(base.generate, dense=True)), prompts, write=False)
    rows = {p: {"prompt": p} for p in prompts}
    guards = {}
    for name, (path, _eps) in made.items():
        sets = [*args.set, f"compile.bundle={path}", f"compile.cache_dir={work / name}.cache"]
        compile_cache(load_config(ROOT / "configs/tiny.yaml", sets))
        videos = {}
        for guard in (False, True):
            cfg = load_config(ROOT / "configs/tiny.yaml", [*sets, f"generate.guard={str(guard).lower()}"])
            res = generate(cfg, prompts, write=False)
            videos[guard] = res.videos
            if guard:
                g = res.guard
                guards[name] = {k: g[k] for k in ("factor", "epsilon", "floor", "threshold", "checks", "seconds")}
            for i, (d, s) in enumerate(zip(dense.videos, res.videos, strict=True)):
                psnr = _score(d, s, base.generate.seed).psnr_db
                row = rows[prompts[i]]
                row[f"{name}{'+guard' if guard else ''}_psnr_db"] = None if math.isinf(psnr) else round(psnr, 3)
                if guard:
                    mine = [w for w in g["widened"] if w["video"] == i]
                    masses = [x for b in g["mass"][i] for layer in b if layer is not None for x in layer]
                    row[f"{name}+guard_widened"] = [[w["bucket"], w["layer"], w["head"], w["mass"]] for w in mine]
                    row[f"{name}+guard_min_mass"] = round(min(masses), 6)
        row_same = [bool((a.frames == b.frames).all()) for a, b in zip(videos[False], videos[True], strict=True)]
        for p, same in zip(prompts, row_same, strict=True):
            rows[p][f"{name}_guard_bit_identical"] = same
        print(f"  {name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {
        "model": "tiny (trained), configs/tiny.yaml",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device": base.model.device,
        "overrides": args.set,
        "bundles": {n: {"epsilon": e} for n, (_, e) in made.items()},
        "guard": guards,
        "seconds": round(time.perf_counter() - t0, 1),
        "prompts": list(rows.values()),
    }


def table(res: dict) -> None:
    names = list(res["bundles"])
    print()
    head = "".join(f"{n:>10} {n + '+g':>12} {'widened':>8}" for n in names)
    print(f"{'prompt':<58}{head}")
    for r in res["prompts"]:
        cells = ""
        for n in names:
            a, b = r[f"{n}_psnr_db"], r[f"{n}+guard_psnr_db"]
            cells += f"{'inf' if a is None else f'{a:.2f}':>10} {'inf' if b is None else f'{b:.2f}':>12}"
            cells += f"{len(r[f'{n}+guard_widened']):>8}"
        print(f"{r['prompt'][:57]:<58}{cells}")
    for n in names:
        with_guard = [r[f"{n}+guard_psnr_db"] for r in res["prompts"]]
        finite = [x for x in with_guard if x is not None]
        low = f"{min(finite):.2f} dB" if finite else "inf (identical)"
        print(f"{n}: with the guard, lowest PSNR {low}; threshold {res['guard'][n]['threshold']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=None, help="only the first N held-out prompts")
    ap.add_argument("--mass", default=None, help="safetensors file keeping the calibration pass between runs")
    ap.add_argument("--set", action="append", default=[], help="config override, as the CLI's --set")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = run(args)
    table(res)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"guard-faults-tiny-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
