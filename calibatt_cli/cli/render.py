"""What the commands print: rich tables and one-line summaries of the library's results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # the CLI starts without torch; the commands import what they run
    from ..bundle import MaskBundle

console = Console(stderr=True)  # tables and summaries
out = Console()  # what a script reads: the written path, the resolved config, --json


def progress() -> Progress:
    # Only on a terminal: in logs and pipes a half-drawn bar would sit above an error line.
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def table(title: str, columns) -> Table:
    t = Table(title=title)
    for col in columns:
        t.add_column(col)
    return t


def token_grid(cfg, ident) -> None:
    f, h, w = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    n, bs = f * h * w, cfg.calibration.block_size
    out.print(
        f"# token grid (derived): {f} x {h} x {w} = {n:,} tokens; {-(-n // bs)} blocks of {bs}; "
        f"{ident.layers} layers x {ident.heads} heads x head dim {ident.head_dim}",
        highlight=False,
        soft_wrap=True,
    )


def calibration(res) -> None:
    s = res.bundle.meta["summary"]
    t = table(f"mask bundle {res.path}", ("bucket", "steps", "density", "retained mass", "samples"))
    dens = res.bundle.meta["entries"]["density"]
    kept = res.bundle.meta["entries"]["retained_mass"]
    for b in range(len(dens)):
        steps = [i for i, x in enumerate(res.bundle.step_buckets) if x == b]
        d = sum(map(sum, dens[b])) / (len(dens[b]) * len(dens[b][0]))
        r = sum(map(sum, kept[b])) / (len(kept[b]) * len(kept[b][0]))
        t.add_row(
            str(b), f"{steps[0]}-{steps[-1]}", f"{d:.3f}", f"{r:.5f}", str(res.bundle.meta["samples_per_bucket"][b])
        )
    console.print(t)
    console.print(
        f"density {s['density']:.3f}, retained mass {s['retained_mass']:.5f}, "
        f"{res.seconds:.1f} s, hash {res.bundle.content_hash[:12]}"
    )
    out.print(str(res.path), highlight=False)


def shard(res) -> None:
    i, n = res.shard
    console.print(
        f"shard {i}/{n}: {res.prompts} prompt(s), {res.seconds:.1f} s; merge all {n} with "
        f"`calibatt merge-shards ... -o BUNDLE`"
    )
    out.print(str(res.path), highlight=False)


def cross_compile(xres) -> None:
    from ..cache.aot import config_label

    bs = (xres.block_size, xres.block_size)
    t = table(
        f"kernels for {xres.target} ({xres.dtype}, head dim {xres.head_dim}, block {xres.block_size})",
        ("config", "status", "shared KiB", "seconds", "error"),
    )
    for r in xres.variants:
        t.add_row(
            config_label(r.config, bs),
            r.status,
            "-" if r.shared_kib is None else f"{r.shared_kib:.0f}",
            f"{r.seconds:.1f}",
            r.error or "",
        )
    console.print(t)
    n_ok = sum(r.status == "ok" for r in xres.variants)
    console.print(
        f"{n_ok} of {len(xres.variants)} kernels compile and fit {xres.target}, "
        f"{len(xres.failed)} failed, {xres.seconds:.1f} s"
    )


def cross_compile_failures(xres) -> str:
    from ..cache.aot import config_label

    bs = (xres.block_size, xres.block_size)
    return f"{len(xres.failed)} kernel(s) failed to compile for {xres.target}: " + "; ".join(
        f"{config_label(r.config, bs)}: {r.error}" for r in xres.failed
    )


def cache(res) -> None:
    from ..cache.aot import config_label

    m = res.manifest
    bs = (m["block_size"], m["block_size"])
    t = table(
        f"cache {res.cache_dir} ({'up to date' if res.reused else 'built'})",
        (
            "bucket",
            "layer",
            "density",
            "max blocks/row",
            "config",
            "ms",
            "vs dense",
            "runs",
            "predicted attention speedup",
        ),
    )
    for g in m["groups"]:
        timed = g.get("ms") is not None
        t.add_row(
            str(g["bucket"]),
            str(g["layer"]),
            f"{g['density']:.3f}",
            str(g["max_blocks_per_row"]),
            config_label(g["config"], bs) if g.get("config") else "default",
            f"{g['ms']:.3f}" if timed else "-",
            f"{g['speedup']:.2f}x" if timed else "-",
            g.get("attention", "sparse"),  # what the cost model chose (tune.py)
            f"{1 / max(g['density'], 1e-9):.2f}x",
        )
    console.print(t)
    k = m["kernels"]
    tuned = ""
    if k.get("tuned"):
        rejected = k.get("rejected") or {}  # configs that failed to compile, fit or run as themselves here
        tuned = (
            f", dense SDPA {k['dense_ms']:.3f} ms, {len(k['winners'])} config(s) chosen of "
            f"{len(k['candidates']) + len(rejected)} candidates"
            + (
                f" ({len(rejected)} rejected: {'; '.join(f'{c}: {why}' for c, why in rejected.items())})"
                if rejected
                else ""
            )
            + f", {k['triton_files']} kernels cached"
        )
    index = f", mask index {m['index_bytes'] / 2**20:.1f} MiB" if "index_bytes" in m else ""
    console.print(f"device {m['device']['name']}, backend {k['backend']}{tuned}{index}, {res.seconds:.2f} s")
    b = m.get("blocks")
    if b:
        console.print(
            f"compiled blocks ({b['backend']}): {b['graphs']} graph(s) for step kinds {b['step_kinds']} "
            f"(-1: dense warm-up), {b['files']} files, {b['seconds']:.1f} s"
        )
    out.print(str(res.cache_dir), highlight=False)


def generation(res) -> None:
    s = res.summary()
    for v in res.videos:
        console.print(f"wrote {v.output} ({v.shape[0]} frames {v.shape[2]}x{v.shape[1]}, {v.seconds:.1f} s)")
    k = res.kernels
    if res.dense:
        mode = "dense (stock pipeline)"
    elif k is None:
        mode = f"sparse: planned density {res.mean_density:.3f} (sparse steps {res.sparse_density:.3f})"
    else:  # the density of the blocks the kernels computed, not the plan's
        mode = (
            f"sparse: density {k['measured_density']:.3f} as run (sparse steps {k['measured_sparse_density']:.3f}; "
            f"planned {res.sparse_density:.3f})"
        )
    kept = "" if res.retained_mass is None else f", retained mass {res.retained_mass:.5f}"
    console.print(
        f"{len(res.videos)} video(s), {res.steps} steps, {mode}{kept}, {s['seconds']:.1f} s sampling, "
        f"{res.load_seconds:.1f} s model load" + ("" if res.layout == "1 process" else f"; {res.layout}")
    )
    if k is not None:
        ran = ", ".join(f"{kernel} {n}" for kernel, n in sorted(k["calls"].items(), key=lambda x: -x[1]))
        console.print(f"attention calls: {ran or 'none through calibatt'}", highlight=False)
        for f in k["fallbacks"]:
            console.print(
                f"fallback: {f['op']} wanted {f['wanted']}, ran {f['ran']} in {f['calls']} call(s): {f['reason']}",
                highlight=False,
            )
        for d in k["dense"]:
            where = f"bucket {d['bucket']}" + ("" if d["layer"] == "*" else f", layer {d['layer']}")
            n = "every call" if d["missing"] is None else f"{d['missing']} of {d['expected']} calls"
            console.print(f"dense: {where} ran {n} outside calibatt's kernels where the plan is sparse")
    cb = res.compiled_blocks
    if cb.get("fallback"):
        console.print(f"compiled blocks: fell back to {cb['fallback']}", highlight=False, soft_wrap=True)
    elif cb.get("enabled"):
        where = "from the cache" if cb["from_cache"] else "compiled during this run"
        console.print(
            f"compiled blocks ({cb['backend']}) {where}: inductor generated {cb.get('inductor_codegen', 0)} "
            f"graph(s), built {cb.get('builds', 0)} file(s); Triton compiled {res.compilations or 0} of ours, "
            f"{cb.get('triton_other', 0)} other",
            highlight=False,
        )
    guard_line(res)


def guard_line(res) -> None:
    """One stderr line when the guard widened heads (also under --json, whose stdout is the JSON alone)."""
    g = res.guard
    if g and g.get("widened"):
        worst = min(g["widened"], key=lambda w: w["mass"])
        console.print(
            f"guard: widened {len(g['widened'])} head(s) to dense for the rest of their bucket (kept mass below "
            f"{g['threshold']:.4f}; lowest {worst['mass']:.4f} at bucket {worst['bucket']}, layer {worst['layer']}, "
            f"head {worst['head']}): the masks do not fit this prompt as calibrated",
            soft_wrap=True,
        )


def bundle_summary(bundle: MaskBundle, path: Path) -> None:
    m = bundle.meta
    header, rows = density_table(bundle)
    t = table(
        f"{path}: model {m['model']['name']} ({m['model']['hash']}), grid {m['grid']['tokens']}, "
        f"block {m['block_size']}, epsilon {m['epsilon']}",
        header,
    )
    for r in rows:
        t.add_row(*r)
    out.print(t)


def density_table(bundle: MaskBundle) -> tuple[list[str], list[list[str]]]:
    """Rows: layers; columns: density per bucket (mean over heads), then retained mass."""
    import numpy as np

    dens = np.asarray(bundle.meta["entries"]["density"])  # [buckets, layers, heads]
    kept = np.asarray(bundle.meta["entries"]["retained_mass"])
    buckets = bundle.step_buckets
    header = ["layer"]
    for b in range(dens.shape[0]):
        steps = [i for i, x in enumerate(buckets) if x == b]
        header.append(f"density b{b} (steps {steps[0]}-{steps[-1]})")
    header.append("retained mass (min over heads)")
    rows = []
    for layer in range(dens.shape[1]):
        row = [str(layer)] + [f"{dens[b, layer].mean():.3f}" for b in range(dens.shape[0])]
        row.append(f"{kept[:, layer].min():.5f}")
        rows.append(row)
    rows.append(["all"] + [f"{dens[b].mean():.3f}" for b in range(dens.shape[0])] + [f"{kept.min():.5f}"])
    return header, rows


def evaluation(rep, json_out: bool) -> None:
    """The clips table and summary on stderr; report paths (or, with --json, one JSON line) on stdout."""
    if json_out:
        d = rep.data
        per_clip = ("prompt", "seed", "psnr_db", "ssim", "retained_mass")  # per-frame lists: see report.json
        line = {
            "summary": d["summary"],
            "gate": d["gate"],
            "forced": d["forced"],
            "clips": [{k: c[k] for k in per_clip} for c in d["clips"]],
            "report": str(rep.json_path),
            "page": str(rep.html_path),
        }
        out.print(json.dumps(line), highlight=False, markup=False, soft_wrap=True)
        return
    t = table("sparse vs dense", ("prompt", "seed", "PSNR dB", "SSIM", "retained mass"))
    for c in rep.clips:
        mass = "-" if c.retained_mass is None else f"{c.retained_mass:.5f}"
        t.add_row(c.prompt, str(c.seed), f"{c.psnr_db:.2f}", f"{c.ssim:.4f}", mass)
    console.print(t)
    s = rep.data["summary"]
    console.print(
        f"{s['clips']} clip(s): PSNR min {_fmt(s['psnr_db_min'], 'inf')} dB, SSIM min {s['ssim_min']:.4f}, "
        f"retained mass min {_fmt(s['retained_mass_min'])}, sparse density {s['sparse_density']:.3f}",
        highlight=False,
    )
    out.print(str(rep.html_path), highlight=False)


def _fmt(x, none: str = "-") -> str:
    return none if x is None else f"{x:.5g}"
