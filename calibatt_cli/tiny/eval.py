"""Prompt adherence and sparse-vs-dense fidelity of the trained `tiny` model on held-out prompts.

    python -m calibatt_cli.tiny.eval [--prompts configs/prompts/tiny_eval.txt] [--set generate.steps=10 ...]
    python -m calibatt_cli.tiny.eval --judge-seeds 0,1,2     # dense prompt adherence only, per seed and clip

Calibrates on the training-style prompts (calibration.prompts), compiles, then generates every held-out
prompt dense and sparse with the same seed, and prints judge scores, PSNR (sparse vs dense), the plan's
density and, where GenerateResult exposes it, the retained attention mass measured live. Full results go
to bench/results/eval-tiny-<date>.json. With --judge-seeds, only the dense judge of every prompt for each
sampling seed (the figures behind docs/training.md's dense judge table), to judge-tiny-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..cache.build import compile_cache
from ..calibrate import calibrate, read_prompts
from ..config import load_config
from ..generate import generate
from ..util import check_output_path, write_text_atomic
from .judge import judge
from .model import weights_sha256

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ and bench/results/ live there


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=str(ROOT / "configs/prompts/tiny_eval.txt"), help="held-out prompts")
    ap.add_argument("--set", action="append", default=[], help="config override section.key=value")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/<kind>-tiny-<date>.json)")
    ap.add_argument("--judge-seeds", default=None, help="e.g. 0,1,2: dense judge per seed only (no sparse run)")
    args = ap.parse_args()
    kind = "judge" if args.judge_seeds else "eval"
    out = Path(args.out) if args.out else ROOT / f"bench/results/{kind}-tiny-{dt.date.today().isoformat()}.json"
    check_output_path(out, "results")  # before minutes of rendering
    if args.judge_seeds:
        seeds = [int(s) for s in args.judge_seeds.split(",")]
        result = judge_seeds(read_prompts(args.prompts), seeds, args.set)
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")
        for seed, r in zip(seeds, result["seeds"], strict=True):
            s = r["judge"]
            print(f"seed {seed}: {s['matches']} of {s['clips']} clips right (score {s['score']:.3f})")
        print(f"wrote {out}")
        return

    prompts = read_prompts(args.prompts)
    work = Path(tempfile.mkdtemp(prefix="eval-tiny-"))
    sets = [
        f"calibration.output={work}/b.safetensors",
        f"compile.bundle={work}/b.safetensors",
        f"compile.cache_dir={work}/cache",
        *args.set,
    ]
    cfg = load_config(None, sets)
    t0 = time.perf_counter()
    cal = calibrate(cfg)
    compile_cache(cfg)
    t_cal = time.perf_counter() - t0

    dense_cfg = load_config(None, [*sets, "generate.dense=true"])
    dense = generate(dense_cfg, prompts, write=False)
    kw = {"measure_mass": True} if "measure_mass" in generate.__code__.co_varnames else {}
    sparse = generate(cfg, prompts, write=False, **kw)

    dj = judge([v.frames for v in dense.videos], prompts)
    sj = judge([v.frames for v in sparse.videos], prompts)
    psnrs = [psnr(d.frames, s.frames) for d, s in zip(dense.videos, sparse.videos, strict=True)]
    retained = getattr(sparse, "retained_mass", None)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {"calibatt": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        "weights_sha256": weights_sha256(),
        "config": cfg.to_dict(),
        "calibration": {
            "prompts": cal.bundle.meta["prompts"],
            "summary": cal.bundle.meta["summary"],
            "seconds": round(t_cal, 2),
        },
        "dense": {
            "judge": dj.summary(),
            "seconds": sum(v.seconds for v in dense.videos),
            "clips": [v.as_dict() for v in dj.verdicts],
        },
        "sparse": {
            "judge": sj.summary(),
            "seconds": sum(v.seconds for v in sparse.videos),
            "mean_density": sparse.mean_density,
            "sparse_density": sparse.sparse_density,
            "retained_mass": retained,
            "clips": [v.as_dict() for v in sj.verdicts],
        },
        "psnr_db": {"mean": float(np.mean(psnrs)), "min": float(np.min(psnrs)), "per_clip": psnrs},
    }
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")

    print(f"{'':8} {'score':>6} {'colour':>6} {'shape':>6} {'motion':>6}")
    for name, j in (("dense", dj), ("sparse", sj)):
        s = j.summary()
        print(f"{name:8} {s['score']:6.3f} {s['colour']:6.3f} {s['shape']:6.3f} {s['motion']:6.3f}")
    kept = "n/a" if retained is None else f"{retained:.5f}"
    print(
        f"PSNR sparse vs dense: mean {np.mean(psnrs):.2f} dB, min {np.min(psnrs):.2f} dB; "
        f"density {sparse.mean_density:.3f} (sparse steps {sparse.sparse_density:.3f}); retained mass {kept}"
    )
    print(f"wrote {out}")


def judge_seeds(prompts: list[str], seeds: list[int], sets: list[str]) -> dict:
    """The dense pipeline's prompt adherence on every prompt for each sampling seed (raw frames, as
    `generate --dense` renders them before the MP4 encoder)."""
    per_seed = []
    for seed in seeds:
        cfg = load_config(None, [*sets, "generate.dense=true", f"generate.seed={seed}"])
        res = generate(cfg, prompts, write=False)
        report = judge([v.frames for v in res.videos], prompts)
        summary = report.summary()
        summary["matches"] = sum(v.match for v in report.verdicts)
        per_seed.append(
            {
                "seed": seed,
                "judge": summary,
                "seconds": sum(v.seconds for v in res.videos),
                "clips": [v.as_dict() for v in report.verdicts],
            }
        )
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m calibatt_cli.tiny.eval --judge-seeds " + ",".join(map(str, seeds)),
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
        "versions": {"calibatt": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        "weights_sha256": weights_sha256(),
        "config": cfg.to_dict(),
        "matches": sum(r["judge"]["matches"] for r in per_seed),
        "clips": sum(r["judge"]["clips"] for r in per_seed),
        "seeds": per_seed,
    }


if __name__ == "__main__":
    main()
