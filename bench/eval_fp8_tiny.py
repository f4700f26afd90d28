"""precision: fp8 against bf16 on the trained tiny model (CPU): quality, not speed.

    python bench/eval_fp8_tiny.py                      # every held-out prompt (configs/prompts/tiny_eval.txt)
    python bench/eval_fp8_tiny.py --bundle out/tiny.bundle.safetensors --dense --set generate.steps=10

Calibrates once (or takes --bundle), compiles two caches of the same masks (compile.precision bf16 and fp8),
and renders every prompt sparse twice with the same seed: bf16 (on the CPU the fp32 rows path: the bf16
kernels' exact softmax) and fp8 (the scheme of calibatt_kernels/quant.py, emulated element for element in
PyTorch). Per clip: the video PSNR of fp8 against bf16 and each one's judge verdict (tiny/judge.py); with
--dense also the stock pipeline and each sparse run's PSNR against it. Writes
bench/results/fp8-quality-tiny-<date>.json and prints the table; exits 1 when a clip is below --min-psnr or
a verdict changed.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from calibatt_cli import __version__  # noqa: E402
from calibatt_cli.cache.build import compile_cache  # noqa: E402
from calibatt_cli.calibrate import calibrate, read_prompts  # noqa: E402
from calibatt_cli.config import load_config  # noqa: E402
from calibatt_cli.generate import generate  # noqa: E402
from calibatt_cli.tiny.judge import judge  # noqa: E402
from calibatt_cli.util import check_output_path, write_text_atomic  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(x, 3)


def quality_runs(
    prompts: list[str],
    work: Path,
    *,
    sets: list[str] = (),
    steps: int | None = None,
    dense: bool = False,
    bundle: str | None = None,
) -> dict:
    """Calibrate (on the prompts themselves when the config's calibration prompts are not wanted: pass
    calibration.prompts in `sets`) or take `bundle`, compile bf16 and fp8 caches, render `prompts` sparse in
    both precisions (and dense with `dense`), and compare. `steps`: generate.steps (None: the config's)."""
    work = Path(work)
    base = [*sets] + ([f"generate.steps={steps}"] if steps is not None else [])
    # every group sparse: on the CPU the tiny model's groups measure faster dense, and then neither precision
    # would run its sparse kernel at all
    base.append("compile.cost_model=false")
    b = bundle or str(work / "b.safetensors")
    base += [f"calibration.output={b}", f"compile.bundle={b}"]
    t0 = time.perf_counter()
    if bundle is None:
        calibrate(load_config(None, base))
    runs, seconds, kernels = {}, {}, {}
    for precision in ("bf16", "fp8"):
        cfg = load_config(
            None,
            [
                *base,
                f"compile.cache_dir={work}/cache-{precision}",
                f"compile.precision={precision}",
                f"generate.precision={precision}",
            ],
        )
        compile_cache(cfg)
        t1 = time.perf_counter()
        res = generate(cfg, prompts, write=False)
        seconds[precision] = round(time.perf_counter() - t1, 2)
        runs[precision] = [v.frames for v in res.videos]
        kernels[precision] = set(res.kernels["calls"])
        assert not res.kernels["fallbacks"], res.kernels["fallbacks"]  # fp8 on the CPU: the design, no fallback
    if dense:
        cfg = load_config(None, [*base, "generate.dense=true"])
        runs["dense"] = [v.frames for v in generate(cfg, prompts, write=False).videos]
    verdicts = {k: judge(v, prompts) for k, v in runs.items()}
    clips = []
    for i, prompt in enumerate(prompts):
        row = {
            "prompt": prompt,
            "psnr_fp8_vs_bf16_db": _num(psnr(runs["fp8"][i], runs["bf16"][i])),
            "judge_bf16": verdicts["bf16"].verdicts[i].match,
            "judge_fp8": verdicts["fp8"].verdicts[i].match,
        }
        if dense:
            row["psnr_bf16_vs_dense_db"] = _num(psnr(runs["bf16"][i], runs["dense"][i]))
            row["psnr_fp8_vs_dense_db"] = _num(psnr(runs["fp8"][i], runs["dense"][i]))
            row["judge_dense"] = verdicts["dense"].verdicts[i].match
        clips.append(row)
    psnrs = [psnr(runs["fp8"][i], runs["bf16"][i]) for i in range(len(prompts))]
    return {
        "clips": clips,
        "psnr_fp8_vs_bf16_db": {"min": _num(min(psnrs)), "mean": _num(float(np.mean(psnrs)))},
        "judge": {k: v.summary() for k, v in verdicts.items()},
        "verdicts_changed": sum(r["judge_fp8"] != r["judge_bf16"] for r in clips),
        "kernels_bf16": kernels["bf16"],
        "kernels_fp8": kernels["fp8"],
        "generate_seconds": seconds,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=str(ROOT / "configs/prompts/tiny_eval.txt"), help="held-out prompts")
    ap.add_argument("--set", action="append", default=[], help="config override section.key=value")
    ap.add_argument("--bundle", default=None, help="a calibrated bundle of this config (default: calibrate)")
    ap.add_argument("--dense", action="store_true", help="also render dense and score both against it")
    ap.add_argument("--min-psnr", type=float, default=30.0, help="the gate: fp8 vs bf16 PSNR of every clip")
    ap.add_argument("--out", default=None, help="default bench/results/fp8-quality-tiny-<date>.json")
    args = ap.parse_args()
    out = Path(args.out or ROOT / f"bench/results/fp8-quality-tiny-{dt.date.today().isoformat()}.json")
    check_output_path(out, "results")
    prompts = read_prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="fp8-tiny-") as work:
        res = quality_runs(prompts, Path(work), sets=args.set, dense=args.dense, bundle=args.bundle)
    cfg = load_config(None, args.set)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/eval_fp8_tiny.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
        "versions": {"calibatt": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        "config": cfg.to_dict(),
        "bundle": args.bundle,
        "min_psnr_db": args.min_psnr,
        **{k: sorted(v) if isinstance(v, set) else v for k, v in res.items()},
    }
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"{'prompt':60} {'fp8 vs bf16 dB':>14} {'judge bf16':>10} {'judge fp8':>9}")
    for r in res["clips"]:
        print(f"{r['prompt'][:60]:60} {r['psnr_fp8_vs_bf16_db']!s:>14} {r['judge_bf16']!s:>10} {r['judge_fp8']!s:>9}")
    j = res["judge"]
    print(
        f"PSNR fp8 vs bf16: min {res['psnr_fp8_vs_bf16_db']['min']} dB, mean {res['psnr_fp8_vs_bf16_db']['mean']} dB; "
        f"judge bf16 {j['bf16']['score']:.3f}, fp8 {j['fp8']['score']:.3f}, verdicts changed {res['verdicts_changed']}"
    )
    print(f"wrote {out}")
    low = [r for r in res["clips"] if (r["psnr_fp8_vs_bf16_db"] or float("inf")) < args.min_psnr]
    if low or res["verdicts_changed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
