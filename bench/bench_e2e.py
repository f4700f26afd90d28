"""End-to-end step time: stock diffusers vs calibatt on Wan 2.1 at real sizes (random weights).

One denoising step = two transformer forwards (CFG cond + uncond, batch 1 each), as WanPipeline runs it.
Variants, all measured in this one run:
  stock eager          diffusers' own processors (SDPA -> cuDNN)
  stock compiled       + transformer.compile_repeated_blocks(fullgraph=True)
  stock+fused          stock attention (SDPA) behind calibatt's non-attention fusions: the q/k RMS-norm +
                       RoPE kernel and the FFN up-projection with bias + GELU in its GEMM's epilogue
  no-attn eager/comp.  self-attention replaced by `return v` (for the attention share)
  calibatt eager/comp. our processors with local spatio-temporal masks at each density, the kernel as a
                       registered custom op inside the compiled blocks, with the same two fusions
  calibatt ... unfused-ffn   (--ffn-ab) one density without the FFN fusion: what that fusion alone gives
Wan 14B runs a subset of its 40 layers; step times are scaled to 40 layers (x 40 / layers run), said so.
Each calibatt row also records the density of the blocks its kernels computed (calibatt_kernels.what_ran),
which must be the masks' (`computed_density`; a row where it is not says `mismatch`).

    python bench/bench_e2e.py                     # both shapes (device machine)
    python bench/bench_e2e.py --shapes wan1.3b-480p --densities 0.2 --only stock:eager stock:compiled \
        calibatt:compiled                          # the rows the user path is compared with
    python bench/bench_e2e.py --shapes wan14b-720p --densities 0.2 --precision bf16 fp8  # both kernels' rows
    python bench/bench_e2e.py --smoke             # a tiny CPU run of the whole script

The results file is written after every row (`complete`: false and the row under way in `in_progress` until
the run ends), so a run cut short keeps the rows it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch._dynamo

from calibatt_cli.masks import local_block_mask  # noqa: E402
from calibatt_cli.models.base import restore_modules  # noqa: E402
from calibatt_cli.models.wan import CalibattWanAttnProcessor, fuse_ffn_gelu  # noqa: E402
from calibatt_cli.runtime import AttentionController, SparseController, SparsePlan  # noqa: E402
from calibatt_kernels import mask_to_index, reset_what_ran, what_ran  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "wan2.1"
BLOCK = 128
VARIANTS = ("stock", "stock+fused", "no-attn", "all-true", "calibatt", "unfused-ffn")  # --only's names
MODES = ("eager", "compiled")


class NoAttnProcessor:
    """Self-attention replaced by its values: the rest of the block runs as usual."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        v = attn.to_v(hidden_states)
        return attn.to_out[1](attn.to_out[0](v))


def build(shape: dict, device, dtype):
    from diffusers import WanTransformer3DModel

    cfg = json.loads((SHIPPED / shape["config"]).read_text())
    cfg["num_layers"] = shape["layers_run"]
    for k, v in shape.get("override", {}).items():
        cfg[k] = v
    with torch.device(device):
        tr = WanTransformer3DModel.from_config(cfg).to(dtype).eval()
    # as from_pretrained(torch_dtype=bf16) does: some modules stay fp32 (diffusers' _keep_in_fp32_modules)
    keep = tuple(tr._keep_in_fp32_modules or ())
    for name, module in tr.named_modules():
        if any(part in keep for part in name.split(".")):
            module.float()
    return tr


def make_plan(masks: torch.Tensor, layers: int, config=None) -> SparsePlan:
    """A one-bucket plan of `masks` in every layer (set_density swaps them: compiled blocks read the index
    when the attention op runs, so one graph serves every density)."""
    ix = mask_to_index(masks)
    index = {(0, layer): ix for layer in range(layers)}
    density = masks.float().mean().view(1, 1, 1).expand(1, layers, 1)
    configs = {(0, layer): config for layer in range(layers)} if config is not None else {}
    return SparsePlan(BLOCK, [0], index, density, configs)


def set_density(plan: SparsePlan, processors, masks: torch.Tensor) -> None:
    """Every layer's index becomes `masks`' (as the guard widens one): each processor's layer re-reads it and
    makes what its launches derive (the Gluon kernel's tile records) from the new index."""
    ix = mask_to_index(masks.to(plan.index[(0, 0)].counts.device))
    for p in processors:
        plan.set_index(0, p.layer_index, ix)
    for p in processors:
        p.sparse.refresh()


def computed_density() -> float | None:
    """The share of blocks the attention calls since reset_what_ran computed (None: no call of ours)."""
    scopes = what_ran()["scopes"]
    total = sum(s.get("total_blocks", 0) for s in scopes)
    return sum(s.get("blocks", 0) for s in scopes) / total if total else None


def kernel_config(name: str | None):
    """A bench_kernel.py config by name (None: the processors' default, what `generate` runs untuned)."""
    if name is None:
        return None
    from bench_kernel import CONFIGS

    return CONFIGS[name]


def timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1000


def profile(step, label: str, layers: int) -> None:
    """Where one step's GPU time goes: the costliest kernels, per layer call (a step is 2 forwards)."""
    from profile_generate import summarize
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    s = summarize(prof.events(), layers, 14, cuda)
    print(f"  profile {label}: {s['kernel_ms']:.1f} ms of kernels in one step; per layer call (x {2 * layers}):")
    for k in s["kernels"]:
        print(f"    {k['ms_per_layer_call']:8.3f} ms  {k['launches_per_layer_call']:5.1f} launches  {k['name'][:90]}")
    print(flush=True)


def inputs(shape: dict, tr, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's inputs at the shape's grid, from seed 0: latents, timestep, cond and uncond text states."""
    f, h, w = shape["grid"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 16, f, h * 2, w * 2, generator=g, device=device, dtype=dtype)
    t = torch.tensor([700.0], device=device)
    text = [
        torch.randn(1, shape["text_len"], tr.config.text_dim, generator=g, device=device, dtype=dtype) for _ in range(2)
    ]
    return x, t, text[0], text[1]


def bench_shape(shape: dict, args, device, dtype, res: dict, save) -> dict:
    """Measures the wanted rows of one shape into `res` (filled in place), calling `save(label)` before each
    row (label: what is under way) and `save(None)` after it."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tr = build(shape, device, dtype)
    f, h, w = shape["grid"]
    x, t, cond, uncond = inputs(shape, tr, device, dtype)
    heads, layers = tr.config.num_attention_heads, tr.config.num_layers
    scale = shape["layers_total"] / layers
    n = f * h * w

    def step():
        with torch.no_grad():
            a = tr(hidden_states=x, timestep=t, encoder_hidden_states=cond).sample
            b = tr(hidden_states=x, timestep=t, encoder_hidden_states=uncond).sample
        return a, b

    def install(make):
        procs = []
        for i, blk in enumerate(tr.blocks):
            p = make(i)
            blk.attn1.set_processor(p)
            procs.append(p)
        return procs

    def measure(label: str, density: float | None = None, **extra) -> None:
        """Time the installed variant into V[label]; with `density` (a calibatt row), also what its kernels
        computed."""
        save(label)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reset_what_ran()
        ms = timed(step, args.reps, sync) * scale
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        row = {"ms": ms, "peak_gib": peak, **extra}
        note = ""
        if density is not None:
            got = computed_density()
            ran = what_ran()  # which kernels the row's calls ran, and any fallback: the row says what it timed
            row.update(density=density, computed_density=got, kernels=ran["calls"], fallbacks=ran["fallbacks"])
            if got is None or abs(got - density) > 1e-6:
                row["mismatch"] = f"the kernels computed density {got}, the masks have {density:.6f}"
                note = f"  MISMATCH: {row['mismatch']}"
        print(f"  {shape['name']:<14} {label:<26} {ms:9.1f} ms/step  peak {peak:6.2f} GiB{note}", flush=True)
        if args.profile and ("compiled" in label or args.no_compile):
            profile(step, f"{shape['name']} {label}", layers)
        V[label] = row
        save(None)

    res.update(
        shape=shape["name"],
        tokens=n,
        grid=shape["grid"],
        heads=heads,
        layers_run=layers,
        layers_total=shape["layers_total"],
        scaled_to_total_layers=scale != 1.0,
        variants={},
    )
    V = res["variants"]
    masks_by_density = {d: local_block_mask(heads, shape["grid"], d, BLOCK).to(device) for d in args.densities}

    def run_all(tag: str):
        stock_out = None
        if wanted("stock", tag):
            install(lambda i: WanAttnProcessor())
            measure(f"stock {tag}")
            stock_out = step()[0].float()
        if wanted("stock+fused", tag):
            # stock attention (SDPA, cuDNN) behind calibatt's fused q/k norm + RoPE and fused FFN GELU: what
            # those fusions alone give, so the speed-up of the sparse kernel can be read apart from them
            swapped = fuse_ffn_gelu(tr)
            dense_ctl = AttentionController("dense")
            install(lambda i: CalibattWanAttnProcessor(i, dense_ctl))
            measure(f"stock+fused {tag}")
            restore_modules(swapped)
        if wanted("no-attn", tag):
            install(lambda i: NoAttnProcessor())
            measure(f"no-attn {tag}")
        if not any(wanted(v, tag) for v in ("all-true", "calibatt", "unfused-ffn")):
            return
        full = torch.ones(heads, *masks_by_density[args.densities[0]].shape[1:], dtype=torch.bool, device=device)
        plan = make_plan(full.cpu(), layers, kernel_config(args.kernel_config)).to(device)
        ctl = SparseController(plan)
        ctl.reset()
        procs = install(lambda i: CalibattWanAttnProcessor(i, ctl))
        if args.ffn_ab and wanted("unfused-ffn", tag):
            m = masks_by_density[args.ffn_ab]
            set_density(plan, procs, m)
            measure(f"calibatt {tag} d={args.ffn_ab} unfused-ffn", density=float(m.float().mean()))
            set_density(plan, procs, full)
        swapped = fuse_ffn_gelu(tr)  # as WanModel.install does
        if wanted("all-true", tag):
            extra = {}
            if stock_out is not None:
                ours = step()[0].float()
                extra["rel_err_vs_stock"] = rel = float((ours - stock_out).norm() / stock_out.norm())
                print(f"  {shape['name']:<14} all-true masks vs stock: relative error {rel:.2e}", flush=True)
            measure(f"calibatt {tag} all-true", density=1.0, **extra)
        if wanted("calibatt", tag):
            for precision in args.precision:
                if precision != "bf16":  # the same plan behind a controller of that precision
                    ctl = SparseController(plan, precision=precision)
                    ctl.reset()
                    procs = install(lambda i, c=ctl: CalibattWanAttnProcessor(i, c))
                name = "calibatt" if precision == "bf16" else f"calibatt-{precision}"
                for d, m in masks_by_density.items():
                    set_density(plan, procs, m)
                    measure(f"{name} {tag} d={d}", density=float(m.float().mean()))
        restore_modules(swapped)

    def wanted(variant: str, mode: str) -> bool:
        return args.only is None or variant in args.only or f"{variant}:{mode}" in args.only

    if any(wanted(v, "eager") for v in VARIANTS):
        run_all("eager")
    if not args.no_compile and any(wanted(v, "compiled") for v in VARIANTS):
        t0 = time.perf_counter()
        tr.compile_repeated_blocks(fullgraph=True, **({"backend": "aot_eager"} if device.type != "cuda" else {}))
        res["compile_setup_s"] = time.perf_counter() - t0
        torch._dynamo.config.cache_size_limit = 64
        run_all("compiled")
    for tag in MODES:
        if f"stock {tag}" in V and f"no-attn {tag}" in V:
            s, na = V[f"stock {tag}"]["ms"], V[f"no-attn {tag}"]["ms"]
            res[f"attention_share_{tag}"] = (s - na) / s
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


SHAPES = [
    {
        "name": "wan1.3b-480p",
        "config": "transformer_1.3b.json",
        "grid": (21, 30, 52),
        "layers_run": 30,
        "layers_total": 30,
        "text_len": 512,
    },
    {
        "name": "wan14b-720p",
        "config": "transformer_14b.json",
        "grid": (21, 45, 80),
        "layers_run": 4,
        "layers_total": 40,
        "text_len": 512,
    },
]
SMOKE = [
    {
        "name": "smoke",
        "config": "transformer_1.3b.json",
        "grid": (4, 8, 16),  # 512 tokens: 4 blocks of 128, so that densities below 1 are sparse
        "layers_run": 2,
        "layers_total": 4,
        "text_len": 8,
        "override": {"num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 64, "text_dim": 32, "freq_dim": 32},
    }
]


def table(results: list[dict]) -> None:
    print()
    print(
        f"{'shape':<14} {'variant':<30} {'ms/step':>9} {'x stock eager':>14} {'x stock comp.':>14} "
        f"{'x comp.+fused':>14} {'peak GiB':>9}"
    )
    for r in results:
        V = r["variants"]
        se = V.get("stock eager", {}).get("ms")
        sc = V.get("stock compiled", {}).get("ms")
        sf = V.get("stock+fused compiled", {}).get("ms")
        for name, v in V.items():
            vs_e = f"{se / v['ms']:14.2f}" if se else f"{'-':>14}"
            vs_c = f"{sc / v['ms']:14.2f}" if sc else f"{'-':>14}"
            vs_f = f"{sf / v['ms']:14.2f}" if sf else f"{'-':>14}"
            flag = "  MISMATCH" if "mismatch" in v else ""
            print(f"{r['shape']:<14} {name:<30} {v['ms']:9.1f} {vs_e} {vs_c} {vs_f} {v['peak_gib']:9.2f}{flag}")
        shares = [f"{tag} {r[f'attention_share_{tag}']:.0%}" for tag in MODES if f"attention_share_{tag}" in r]
        share = f"attention share: {', '.join(shares)}" if shares else "attention share: -"
        note = (
            f" (step times scaled from {r['layers_run']} to {r['layers_total']} layers)"
            if r["scaled_to_total_layers"]
            else ""
        )
        print(f"{r['shape']:<14} {share}{note}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device: checks the script")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=None, help="subset of shape names")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--kernel-config",
        default=None,
        help="a bench_kernel.py config name for the sparse kernel (default: the library's default)",
    )
    ap.add_argument("--profile", action="store_true", help="also print each compiled variant's costliest kernels")
    ap.add_argument(
        "--ffn-ab",
        type=float,
        default=None,
        metavar="DENSITY",
        help="also time calibatt at this density (one of --densities) without the FFN fusion",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="ROW",
        help=f"measure only these rows: VARIANT (both modes) or VARIANT:MODE, VARIANT one of {', '.join(VARIANTS)} "
        f"(calibatt: each of --densities; unfused-ffn: with --ffn-ab), MODE one of {', '.join(MODES)}",
    )
    ap.add_argument(
        "--precision",
        nargs="+",
        choices=("bf16", "fp8"),
        default=["bf16"],
        help="the calibatt rows' attention, each in turn (fp8: generate.precision=fp8's kernels, quantization "
        "included; its rows are named calibatt-fp8)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for row in args.only or []:
        variant, _, mode = row.partition(":")
        if variant not in VARIANTS or (mode and mode not in MODES):
            ap.error(f"--only {row}: expected VARIANT or VARIANT:MODE with VARIANT in {VARIANTS}, MODE in {MODES}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMOKE if args.smoke else [s for s in SHAPES if args.shapes is None or s["name"] in args.shapes]
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    import diffusers
    import triton

    results = []

    meta = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "diffusers": diffusers.__version__,
        "block": BLOCK,
        "kernel_config": args.kernel_config or "default",
        "precision": args.precision,
        "masks": "local spatio-temporal (nearest key blocks on the frame/row/col grid), same for every head",
        "step": "two forwards (CFG cond + uncond), batch 1",
        "weights": "random",
        "only": args.only,
        "complete": False,
        "in_progress": None,
        "results": results,
    }
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).resolve().parent
        / "results"
        / (
            f"e2e-{card.lower().replace(' ', '-')}-{meta['date']}{'-fp8' if 'fp8' in args.precision else ''}"
            f"{'-smoke' if args.smoke else ''}.json"
        )
    )
    n = 2
    while not args.out and out.exists():  # a second run the same day keeps the first's file
        out = out.with_name(f"{out.stem.rsplit('-run', 1)[0]}-run{n}.json")
        n += 1
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(label: str | None) -> None:
        """Write what is measured so far (temp file, then rename: a run killed mid-write keeps the last file)."""
        meta["in_progress"] = label
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out)

    for s in shapes:
        results.append({"shape": s["name"], "variants": {}})
        bench_shape(s, args, device, dtype, results[-1], save)
    meta["complete"] = True
    save(None)
    table(results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
