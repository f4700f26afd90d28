"""The user's path on a GPU, at Wan 2.1 1.3B 480p x 81 frames: calibrate -> compile -> generate --strict.

    python bench/bench_cli_wan.py --workdir /tmp/wcli --library      # device machine

1. Writes a random-weight Wan 2.1 1.3B pipeline as a diffusers folder: the real transformer and VAE configs
   (configs/wan2.1/), a one-layer UMT5 of the real width (4096) instead of the 5.7 B-parameter encoder, and
   the tiny word-level tokenizer. Nothing is downloaded.
2. Calibrates it (library call, so the measured block mass is at hand). Random weights attend almost
   uniformly, so their calibrated masks are near dense; the bundle's masks are then replaced by synthetic
   masks of mean density --density: by default (--masks local) bench_e2e.py's local spatio-temporal masks,
   the same in every bucket, layer and head, so that `--library` can time bench_e2e.py's rows on exactly
   these masks in the same call; with --masks varied, a local band, scattered blocks and a sink column,
   denser in some layers than others (bench_compile.py's), scaled to the density to within 0.002. Their
   retained mass is computed from the measured mass, not invented; the realised density is recorded and the
   bundle says what it holds in its metadata (`synthetic_masks`).
3. Runs `calibatt compile` and `calibatt generate --strict --json` as a user would, in fresh processes, with
   the defaults: on a GPU `generate.compile=auto` compiles the transformer blocks, and `calibatt compile` builds
   them into the cache, so generate reports zero Triton compilations and zero inductor code generation. Then
   the stock pipeline (`--dense`) compiled (the same default) and eager (`--set generate.compile=false`), and
   with --sparse-eager calibatt's sparse run eager too. Reports compile time (kernels and compiled blocks),
   compilations during generate, the first sparse step against the later ones, time from `calibatt generate`'s
   call to its first step against the stock pipeline's, each step's time, and the peak GPU memory of each
   run's denoising loop (torch.cuda.max_memory_allocated, reset at the loop's first transformer forward):
   `generate --json`'s `peak_memory_bytes`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "a red car driving along a coastal road at sunset"


def write_weights(folder: Path, device: str, text_encoder: str = "one-layer", **transformer) -> None:
    """A random-weight Wan 2.1 1.3B pipeline folder in diffusers' layout, the transformer's config overridden by
    `transformer` (bench_ready.py narrows it). `text_encoder`: "one-layer" (a UMT5 of the real width, one layer:
    the steps' inputs have their real shape, the folder stays small) or "full" (the real UMT5-XXL encoder's
    shape, 24 layers and 5.7 B parameters, 11.4 GB in bf16: what a user's pipeline loads)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from calibatt_cli.models.wan_weights import SHIPPED
    from calibatt_cli.tiny.model import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    tcfg = json.loads((SHIPPED / "transformer_1.3b.json").read_text())
    tcfg.update(transformer)
    if text_encoder == "full":
        te_cfg = UMT5Config.from_pretrained(str(SHIPPED / "text_encoder"))
        te_cfg.dropout_rate = 0.0
    else:
        te_cfg = UMT5Config(
            vocab_size=len(tok),
            d_model=4096,
            d_kv=64,
            d_ff=256,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            dropout_rate=0.0,
        )
    with torch.device(device):
        tr = WanTransformer3DModel.from_config(tcfg).to(torch.bfloat16)
        vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(str(SHIPPED), subfolder="vae"))
        te = UMT5EncoderModel(te_cfg).to(torch.bfloat16)
    sched = UniPCMultistepScheduler.from_pretrained(str(SHIPPED), subfolder="scheduler")
    WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, transformer=tr).save_pretrained(
        str(folder), safe_serialization=True
    )


def write_config(work: Path, weights: Path, args) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "wan2.1-1.3b-480p.yaml").read_text())
    (work / "prompts.txt").write_text(PROMPT + "\n")
    cfg["model"].update(path=str(weights), device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32")
    cfg["video"].update(height=args.height, width=args.width, frames=args.frames)
    cfg["calibration"].update(
        prompts=str(work / "prompts.txt"), buckets=3, warmup_steps=2, output=str(work / "bundle.safetensors")
    )
    cfg["compile"].update(bundle=str(work / "bundle.safetensors"), cache_dir=str(work / "cache"))
    # The guard off: on random weights no synthetic mask keeps the mass it would demand, so it would run every
    # head dense; what it costs is bench_guard.py's to measure.
    cfg["generate"].update(steps=args.steps, output=str(work / "video.mp4"), guard=False)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def masks_at_density(
    buckets: int, layers: int, heads: int, tokens: int, block: int, mq: int, mk: int, density: float, tol: float = 0.002
) -> tuple[torch.Tensor, float]:
    """bench_compile.fake_masks cropped to [..., :mq, :mk], its per-layer targets scaled so that the mean
    density is `density` to within `tol`, and that scale. The random draws do not depend on the scale (one
    seeded generator), so the density grows with it: regula falsi between scale 0 (taken as density 0; the
    band and the sink column keep a little more) and a scale that reaches `density`."""
    from bench_compile import fake_masks

    def make(scale: float) -> tuple[torch.Tensor, float]:
        m = fake_masks(buckets, layers, heads, tokens, block, scale=scale)[..., :mq, :mk]
        return m, float(m.double().mean())

    lo, d_lo = 0.0, 0.0
    hi = 1.0
    masks, d_hi = make(hi)
    while d_hi < density and hi < 64:
        lo, d_lo, hi = hi, d_hi, hi * 2
        masks, d_hi = make(hi)
    scale, got = hi, d_hi
    for _ in range(12):
        if abs(got - density) <= tol:
            return masks, scale
        scale = lo + (density - d_lo) * (hi - lo) / (d_hi - d_lo)
        masks, got = make(scale)
        if got < density:
            lo, d_lo = scale, got
        else:
            hi, d_hi = scale, got
    raise SystemExit(f"synthetic masks: density {density} not reached (got {got:.4f} at scale {scale:.3f})")


def synthetic_bundle(cfg_path: Path, density: float, kind: str) -> dict:
    """Calibrate, then replace the masks: `local` (bench_e2e.py's masks at this density, the same in every
    bucket, layer and head, so that its library-path row runs exactly these) or `varied`
    (masks_at_density)."""
    from calibatt_cli.bundle import save_bundle
    from calibatt_cli.calibrate import calibrate
    from calibatt_cli.config import load_config
    from calibatt_cli.masks import local_block_mask, retained_mass

    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    res = calibrate(cfg)
    seconds = time.perf_counter() - t0
    calibrated = res.bundle.masks
    b, layers, heads, mq, mk = calibrated.shape
    n = res.bundle.meta["grid"]["num_tokens"]
    if kind == "local":
        grid = tuple(res.bundle.meta["grid"]["tokens"])
        masks = local_block_mask(heads, grid, density, res.bundle.block_size).expand(b, layers, -1, -1, -1)
        masks, how = masks.contiguous(), f"calibatt_cli.masks.local_block_mask at density {density} (as bench_e2e.py)"
    else:
        masks, scale = masks_at_density(b, layers, heads, n, res.bundle.block_size, mq, mk, density)
        how = f"bench_compile.fake_masks scaled x{scale:.4f} to mean density {density}"
    requested = density
    density = masks.double().mean(dim=(-1, -2))
    kept = retained_mass(res.mass, masks)
    meta = {k: v for k, v in res.bundle.meta.items() if k not in ("content_hash", "schema_version", "mask_shape")}
    meta["entries"] = {"density": density.tolist(), "retained_mass": kept.tolist()}
    meta["summary"] = {"density": float(density.mean()), "retained_mass": float(kept.mean())}
    meta["synthetic_masks"] = (
        f"bench_cli_wan.py: calibrated masks of a random-weight model replaced by {how}; retained mass from the "
        "measured mass"
    )
    save_bundle(Path(cfg.calibration.output), masks, meta)
    return {
        "calibrate_seconds": round(seconds, 2),
        "calibrated_density": float(calibrated.double().mean()),
        "calibrated_retained_mass": res.bundle.meta["summary"]["retained_mass"],
        "requested_density": requested,
        "masks": how,
        "synthetic_density": meta["summary"]["density"],
        "synthetic_retained_mass": meta["summary"]["retained_mass"],
    }


def cli(*args: str, log: Path) -> tuple[float, str]:
    """Run `calibatt ARGS` in a fresh process."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "calibatt_cli", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.write_text(f"$ calibatt {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    if r.returncode != 0:
        raise SystemExit(f"calibatt {args[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return seconds, r.stdout


def phase_stats(steps: list[float], start: int) -> dict:
    """The steps from `start` on: the first of them against the median of the rest. Like with like: a
    sparse run's first `warmup_steps` run dense (SDPA), the rest sparse (our kernels); the first sparse
    step is where a missing kernel would compile. A run's very first step also pays CUDA libraries'
    one-time set-up (cuBLAS/cuDNN), which the stock pipeline's first step shows too."""
    rest = sorted(steps[start + 1 :])
    later = rest[len(rest) // 2]
    return {"first_s": steps[start], "later_median_s": later, "first_over_later": round(steps[start] / later, 3)}


def library_rows(work: Path, args) -> dict:
    """bench_e2e.py's rows the user path is held to, in a fresh process of this call: the transformer's two
    forwards per step alone, stock eager and compiled, and calibatt compiled with the same masks."""
    if (args.height, args.width, args.frames) != (480, 832, 81):
        raise SystemExit("--library: bench_e2e.py's Wan 1.3B shape is 480x832, 81 frames")
    out = work / "e2e.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_e2e.py"),
        "--shapes",
        "wan1.3b-480p",
        "--densities",
        str(args.density),
        "--only",
        "stock:eager",
        "stock:compiled",
        "calibatt:compiled",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    (work / "e2e.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"bench_e2e.py failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    v = json.loads(out.read_text())["results"][0]["variants"]
    return {
        "command": " ".join(cmd[1:]),
        "stock_eager_ms": v["stock eager"]["ms"],
        "stock_compiled_ms": v["stock compiled"]["ms"],
        "calibatt_compiled_ms": v[f"calibatt compiled d={args.density}"]["ms"],
        "calibatt_computed_density": v[f"calibatt compiled d={args.density}"].get("computed_density"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--density", type=float, default=0.2, help="mean density of the synthetic masks")
    ap.add_argument("--json", help="write the results here (default bench/results/cli-wan-<card>-<date>.json)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (use a small video)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--sparse-eager", action="store_true", help="also run calibatt's sparse path eager")
    ap.add_argument(
        "--masks",
        choices=("local", "varied"),
        default="local",
        help="local: bench_e2e.py's masks (the library path's row runs the same); varied: per-layer synthetic masks",
    )
    ap.add_argument(
        "--library",
        action="store_true",
        help="also run bench_e2e.py's stock and calibatt-compiled rows at this shape and density (--masks local)",
    )
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "weights"
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    res = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "shape": f"Wan 2.1 1.3B, {args.height}x{args.width}, {args.frames} frames, block 128",
        "steps": args.steps,
    }
    t0 = time.perf_counter()
    if not (weights / "model_index.json").is_file():
        write_weights(weights, args.device)
    res["write_weights_seconds"] = round(time.perf_counter() - t0, 1)
    cfg = write_config(work, weights, args)
    if args.library and args.masks != "local":
        raise SystemExit("--library compares with bench_e2e.py's masks: use --masks local")
    res["calibration"] = synthetic_bundle(cfg, args.density, args.masks)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    res["compile_seconds"], table = cli("compile", "--config", str(cfg), "--recompile", log=work / "compile.log")
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    res["compile"] = {
        k: manifest["kernels"].get(k)
        for k in ("tune_seconds", "compilations", "dense_ms", "winners", "triton_files", "candidates")
    }
    res["compile"]["blocks"] = manifest.get("blocks")
    from calibatt_cli.config import load_config

    warmup = load_config(cfg).calibration.warmup_steps
    res["peak_memory_source"] = "generate --json peak_memory_bytes"

    def run(label: str, *flags: str) -> dict:
        seconds, out = cli(
            "generate",
            PROMPT,
            "--config",
            str(cfg),
            "--json",
            "-o",
            str(work / f"{label}.mp4"),
            *flags,
            log=work / f"{label}.log",
        )
        g = json.loads(out.strip().splitlines()[-1])
        kernels = g.get("kernels") or {}
        steps = g["step_seconds"][0]
        first = 0 if g["dense"] else warmup  # the phase whose first step is checked: dense, or the sparse steps
        row = dict(
            phase_stats(steps, first),
            wall_seconds=round(seconds, 2),
            step_seconds=steps,
            compilations=g["compilations"],
            compiled_blocks=g["compiled_blocks"],
            mean_density=g["mean_density"],
            sparse_density=g.get("sparse_density"),
            # what the attention calls computed (kernel_report), and the groups compile's cost model runs dense
            measured_density=g.get("measured_density"),
            measured_sparse_density=g.get("measured_sparse_density"),
            planned_dense_groups=sum(1 for x in kernels.get("groups", []) if x.get("plan") == "dense"),
            attention_calls=kernels.get("calls"),
            peak_memory_bytes=g.get("peak_memory_bytes"),
            sampling_seconds=g["seconds"],
            load_seconds=g["load_seconds"],
            ready_seconds=g["ready_seconds"],
            ready_parts=g.get("ready_parts"),
        )
        if not g["dense"] and warmup > 1:
            row["first_over_second_dense"] = round(steps[0] / steps[1], 3)
        return row

    res["generate"] = run("sparse", "--strict")  # the user's default: compiled on a GPU, from the cache
    res["stock_compiled"] = run("dense-compiled", "--dense", "--set", "generate.compile=true")
    res["stock_eager"] = run("dense-eager", "--dense", "--set", "generate.compile=false")
    if args.sparse_eager:
        res["sparse_eager"] = run("sparse-eager", "--strict", "--set", "generate.compile=false")
    if args.library:
        res["library"] = library_rows(work, args)
    g, se, sc = res["generate"], res["stock_eager"], res["stock_compiled"]
    res["ratios"] = {
        "sparse_step_vs_stock_eager": round(se["later_median_s"] / g["later_median_s"], 3),
        "sparse_step_vs_stock_compiled": round(sc["later_median_s"] / g["later_median_s"], 3),
        "first_sparse_step_over_later": g["first_over_later"],
        # time to the first step: from the generate call (model load, cache, compiled-block set-up, text
        # encoding) to the first transformer forward, against the stock pipeline's load alone and its own
        "ready_vs_stock_load": round(g["ready_seconds"] / se["load_seconds"], 3),
        "ready_vs_stock_eager_ready": round(g["ready_seconds"] / se["ready_seconds"], 3),
    }
    if args.library:
        lib = res["library"]
        res["ratios"]["user_step_over_library_step"] = round(g["later_median_s"] * 1e3 / lib["calibatt_compiled_ms"], 4)
        res["ratios"]["library_vs_stock_compiled"] = round(lib["stock_compiled_ms"] / lib["calibatt_compiled_ms"], 3)
        res["ratios"]["library_vs_stock_eager"] = round(lib["stock_eager_ms"] / lib["calibatt_compiled_ms"], 3)
    for key, row in (("peak_vs_stock_compiled", sc), ("peak_vs_stock_eager", se)):
        if g.get("peak_memory_bytes") and row.get("peak_memory_bytes"):
            res["ratios"][key] = round(g["peak_memory_bytes"] / row["peak_memory_bytes"], 4)
    out = (
        Path(args.json)
        if args.json
        else ROOT / "bench" / "results" / (f"cli-wan-{card.lower().replace(' ', '-')}-{res['date']}.json")
    )
    n = 2
    while not args.json and out.exists():  # a second run the same day keeps the first's file
        out = out.with_name(f"{out.stem.rsplit('-run', 1)[0]}-run{n}.json")
        n += 1
    out.write_text(json.dumps(res, indent=1))
    c, g, r = res["calibration"], res["generate"], res["ratios"]
    cb, blocks = g["compiled_blocks"], res["compile"]["blocks"] or {}
    print(f"card {res['card']}; {res['shape']}; {args.steps} steps; random weights, synthetic masks")
    print(
        f"calibrate (library, random weights): {c['calibrate_seconds']} s, density {c['calibrated_density']:.3f}; "
        f"synthetic masks: density {c['synthetic_density']:.4f} (asked {c['requested_density']}), retained mass "
        f"{c['synthetic_retained_mass']:.3f}; generate's sparse steps computed density {g['measured_sparse_density']} "
        f"({g['planned_dense_groups']} groups planned dense)"
    )
    print(
        f"calibatt compile: {res['compile_seconds']:.1f} s wall (tune+compile {res['compile']['tune_seconds']} s, "
        f"{res['compile']['compilations']} compilations, {res['compile']['triton_files']} kernels cached; compiled "
        f"blocks {blocks.get('graphs')} graphs in {blocks.get('seconds')} s)"
    )
    print(
        f"calibatt generate --strict: compiled blocks {cb.get('enabled')} (from cache {cb.get('from_cache')}), "
        f"{g['compilations']} Triton compilations of ours, {cb.get('triton_other')} other, inductor codegen "
        f"{cb.get('inductor_codegen')}; first sparse step {g['first_s']:.3f} s vs later median "
        f"{g['later_median_s']:.3f} s (x{g['first_over_later']}); ready in {g['ready_seconds']:.1f} s "
        f"(x{r['ready_vs_stock_load']} the stock load {res['stock_eager']['load_seconds']:.1f} s)"
    )
    print(
        f"later steps: sparse {g['later_median_s']:.3f} s, stock eager {res['stock_eager']['later_median_s']:.3f} s "
        f"(x{r['sparse_step_vs_stock_eager']}), stock compiled {res['stock_compiled']['later_median_s']:.3f} s "
        f"(x{r['sparse_step_vs_stock_compiled']})"
    )
    gib = {k: res[k].get("peak_memory_bytes") for k in ("generate", "stock_compiled", "stock_eager")}
    if all(gib.values()):
        print(
            f"peak GPU memory of the denoising loop: sparse {gib['generate'] / 2**30:.2f} GiB, stock compiled "
            f"{gib['stock_compiled'] / 2**30:.2f} GiB (x{r['peak_vs_stock_compiled']}), stock eager "
            f"{gib['stock_eager'] / 2**30:.2f} GiB (x{r['peak_vs_stock_eager']})" + f" ({res['peak_memory_source']})"
        )
    if args.library:
        lib = res["library"]
        print(
            f"library path (bench_e2e.py, same masks, this call): calibatt compiled {lib['calibatt_compiled_ms']:.1f} "
            f"ms, stock compiled {lib['stock_compiled_ms']:.1f} ms, stock eager {lib['stock_eager_ms']:.1f} ms; the "
            f"user's step is x{r['user_step_over_library_step']} the library's"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
