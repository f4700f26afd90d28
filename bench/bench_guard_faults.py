"""Does `generate.guard` catch faulty mask bundles? PSNR vs dense on the trained tiny model's held-out prompts.

Three bundles, all from one calibration pass over configs/prompts/tiny_calibrate.txt (the recorded block mass
is turned into masks at each epsilon, as `calibatt calibrate` does):
  correct    the config's epsilon (0.001): where the masks hold, the guard widens nothing and the video is
             bit-identical; a held-out prompt may still widen a head whose attention the calibration never saw
  loose      epsilon 0.2: every row keeps its promised 80 % of the mass, and that is too little
  permuted   the correct masks with the heads of every layer rotated by one (head h gets head h-1's masks)
For each held-out prompt (configs/prompts/tiny_eval.txt) the dense video, then each bundle sparse without and
with the guard, all from the same noise; PSNR of each sparse video vs the dense one (torchmetrics, as
`calibatt evaluate`), and what the guard widened and measured. Every run is sparse in every (bucket, layer)
(compile.cost_model=false), as the guard has nothing to check where a layer runs dense.

    python bench/bench_guard_faults.py                 # all 16 held-out prompts: 1 dense + 6 sparse renders each
    python bench/bench_guard_faults.py --prompts 4     # the first 4
    python bench/bench_guard_faults.py --bundles loose,permuted --set video.frames=5 --set generate.steps=6
Writes bench/results/guard-faults-tiny-<date>.json (after each bundle, so a cut run keeps what it finished:
"complete" says whether it ran to the end) and prints a table last. At full size (17 frames, 10 steps) one
prompt's seven renders take ~15 minutes on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
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
from calibatt_cli.masks import retained_mass

ROOT = Path(__file__).resolve().parent.parent
LOOSE = 0.2
TARGET_DB = 35.0  # the target with the guard, on every held-out prompt
# On the CPU the cost model runs every (bucket, layer) of the tiny dense (dense is faster at its density): no
# mask would be used, and nothing to guard. The faults are tested where the masks run, as tests/test_guard.py.
SPARSE_EVERYWHERE = "compile.cost_model=false"


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
    body = {k: v for k, v in correct.bundle.meta.items() if k != "content_hash"}
    # the permuted masks' own figures on the recorded mass, as calibrate writes them (load_bundle checks them)
    density, kept = permuted.double().mean(dim=(-1, -2)), retained_mass(correct.mass, permuted)
    figures = {
        "entries": {"density": density.tolist(), "retained_mass": kept.tolist()},
        "summary": {"density": float(density.mean()), "retained_mass": float(kept.mean())},
    }
    save_bundle(work / "permuted.safetensors", permuted, dict(body, **figures))
    return {
        "correct": (work / "correct.safetensors", eps),
        "loose": (work / "loose.safetensors", LOOSE),
        "permuted": (work / "permuted.safetensors", eps),
    }


def run(args, out: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="guard-faults-"))
    sets0 = [SPARSE_EVERYWHERE, *args.set]
    base = load_config(ROOT / "configs/tiny.yaml", sets0)
    prompts = held_out(args.prompts)
    t0 = time.perf_counter()
    made = {n: v for n, v in bundles(base, work, Path(args.mass) if args.mass else None).items() if n in args.bundles}
    dense = generate(replace(base, generate=replace(base.generate, dense=True)), prompts, write=False)
    rows = {p: {"prompt": p, "dense_seconds": round(v.seconds, 2)} for p, v in zip(prompts, dense.videos, strict=True)}
    v = base.video
    res = {
        "model": "tiny (trained), configs/tiny.yaml",
        "date": datetime.date.today().isoformat(),
        "device": "CPU",
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "settings": {
            "frames": v.frames,
            "height": v.height,
            "width": v.width,
            "steps": base.generate.steps,
            "guidance": base.generate.guidance,
            "seed": base.generate.seed,
            "overrides": sets0,
            "calibration_prompts": read_prompts(base.calibration.prompts, base),
            "held_out_prompts": len(prompts),
            "target_db": TARGET_DB,
        },
        "bundles": {n: {"epsilon": e} for n, (_, e) in made.items()},
        "guard": {},
        "summary": {},
        "complete": False,
        "prompts": list(rows.values()),
    }
    for name, (path, _eps) in made.items():
        sets = [*sets0, f"compile.bundle={path}", f"compile.cache_dir={work / name}.cache"]
        compile_cache(load_config(ROOT / "configs/tiny.yaml", sets))
        videos = {}
        for guard in (False, True):
            cfg = load_config(ROOT / "configs/tiny.yaml", [*sets, f"generate.guard={str(guard).lower()}"])
            r = generate(cfg, prompts, write=False)
            videos[guard] = r.videos
            tag = f"{name}{'+guard' if guard else ''}"
            if guard:
                g = r.guard
                res["guard"][name] = {k: g[k] for k in ("factor", "epsilon", "floor", "threshold", "checks", "seconds")}
            for i, (d, s) in enumerate(zip(dense.videos, r.videos, strict=True)):
                psnr = _score(d, s, base.generate.seed).psnr_db
                row = rows[prompts[i]]
                row[f"{tag}_psnr_db"] = None if math.isinf(psnr) else round(psnr, 3)
                row[f"{tag}_seconds"] = round(s.seconds, 2)
                if guard:
                    mine = [w for w in g["widened"] if w["video"] == i]
                    masses = [x for b in g["mass"][i] for layer in b if layer is not None for x in layer]
                    row[f"{tag}_widened"] = [[w["bucket"], w["layer"], w["head"], w["mass"]] for w in mine]
                    row[f"{tag}_min_mass"] = round(min(masses), 6) if masses else None
        same = [bool((a.frames == b.frames).all()) for a, b in zip(videos[False], videos[True], strict=True)]
        for p, x in zip(prompts, same, strict=True):
            rows[p][f"{name}_guard_bit_identical"] = x
        res["summary"][name] = _summary(list(rows.values()), name)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        _write(out, res)  # after each bundle: a run cut short keeps what it finished
        print(f"  {name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    res["complete"] = True
    _write(out, res)
    return res


def _summary(rows: list[dict], name: str) -> dict:
    """Min / median / max PSNR vs dense without and with the guard (null: identical to dense, infinite), how
    many prompts reach TARGET_DB with the guard, and the heads widened per prompt."""

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {
            k: None if math.isinf(x) else round(x, 3)
            for k, x in (("min", xs[0]), ("median", statistics.median(xs)), ("max", xs[-1]))
        }

    def psnr(tag: str) -> list[float]:
        return [math.inf if r[f"{tag}_psnr_db"] is None else r[f"{tag}_psnr_db"] for r in rows]

    widened = [len(r[f"{name}+guard_widened"]) for r in rows]
    return {
        "prompts": len(rows),
        "psnr_db": stats(psnr(name)),
        "guard_psnr_db": stats(psnr(f"{name}+guard")),
        "below_target": sum(x < TARGET_DB for x in psnr(name)),
        "guard_below_target": sum(x < TARGET_DB for x in psnr(f"{name}+guard")),
        "heads_widened": {"total": sum(widened), **stats([float(x) for x in widened])},
        "guard_bit_identical": sum(r[f"{name}_guard_bit_identical"] for r in rows),
    }


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")


def _write(out: Path, res: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(out)


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
    print()
    for n in names:
        s = res["summary"][n]

        def fmt(d: dict) -> str:
            return "/".join("inf" if d[k] is None else f"{d[k]:.2f}" for k in ("min", "median", "max"))

        print(
            f"{n}: PSNR min/median/max {fmt(s['psnr_db'])} dB unguarded, {fmt(s['guard_psnr_db'])} dB guarded; "
            f"{s['guard_below_target']} of {s['prompts']} below {TARGET_DB:g} dB guarded; "
            f"heads widened {s['heads_widened']['total']} (per prompt {fmt(s['heads_widened'])}); "
            f"threshold {res['guard'][n]['threshold']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=None, help="only the first N held-out prompts")
    ap.add_argument("--bundles", default="correct,loose,permuted", help="which of the three bundles to run")
    ap.add_argument("--mass", default=None, help="safetensors file keeping the calibration pass between runs")
    ap.add_argument("--set", action="append", default=[], help="config override, as the CLI's --set")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.bundles = [b for b in args.bundles.split(",") if b]
    unknown = set(args.bundles) - {"correct", "loose", "permuted"}
    if unknown:
        ap.error(f"unknown bundle(s) {sorted(unknown)}: pick from correct, loose, permuted")
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"guard-faults-tiny-{date}.json"
    res = run(args, out)
    table(res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
