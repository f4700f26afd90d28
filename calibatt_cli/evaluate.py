"""`calibatt evaluate`: what the masks cost on the user's own prompts, as a report page and a CI gate.

For every prompt and seed the same noise is sampled twice, dense (the stock pipeline) and sparse with the live
mass measurement on; the sparse clip is scored against the dense one frame by frame (torchmetrics' PSNR and
SSIM; LPIPS is left out: its backbone weights would be a download). The results go to `report.json` (every
number) and `index.html` (one self-contained page: tables whose cells carry the JSON's numbers as data
attributes, and matplotlib plots embedded as PNG data URIs).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .bundle import forced_record
from .cache.load import device_info, load_cache, software_versions
from .config import Config
from .errors import ConfigError
from .generate import GenerateResult, check_prompts, generate
from .models import check_device, model_identity
from .runtime.controllers import mass_table
from .util import canonical_json, check_output_dir, sha256_hex, write_text_atomic

LPIPS_NOTE = "not measured: LPIPS needs backbone weights calibatt never downloads"
STEP_NOTE = "sparse steps include the live mass measurement (one block-mass pass per attention call)"
WORST_SHOWN = 3  # clips with thumbnails in the page


@dataclass
class ClipEval:
    prompt: str
    seed: int
    psnr_db: float  # sparse vs dense over the whole clip (MSE of all frames); inf: identical
    psnr_db_frames: list[float]
    ssim: float  # mean over frames
    ssim_frames: list[float]
    retained_mass: float | None  # mean kept softmax mass per query-block row, measured live
    dense_step_seconds: list[float]
    sparse_step_seconds: list[float]
    frames: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (dense, sparse) uint8 [F, H, W, 3]

    def row(self) -> dict:
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "psnr_db": _num(self.psnr_db),
            "psnr_db_frames": [_num(x) for x in self.psnr_db_frames],
            "ssim": _num(self.ssim),
            "ssim_frames": [_num(x) for x in self.ssim_frames],
            "retained_mass": _num(self.retained_mass),
            "dense_step_seconds": [_num(x) for x in self.dense_step_seconds],
            "sparse_step_seconds": [_num(x) for x in self.sparse_step_seconds],
        }


@dataclass
class EvalReport:
    clips: list[ClipEval]
    data: dict  # report.json's content
    json_path: Path
    html_path: Path
    failures: list[ClipEval]  # clips below --min-psnr or --min-mass
    gate_line: str | None  # one line naming the worst failing clip; None: the gate passed (or none was set)

    @property
    def passed(self) -> bool:
        return not self.failures


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds '{text}' is not a comma-separated list of integers, e.g. 0,1") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds '{text}' must list distinct non-negative integers, e.g. 0,1")
    return seeds


def evaluate(
    cfg: Config,
    prompts: list[str],
    seeds: list[int],
    out_dir: str | Path,
    min_psnr: float | None = None,
    min_mass: float | None = None,
    *,
    on_step: Callable[[], None] | None = None,
) -> EvalReport:
    """Render each prompt dense and sparse per seed, score sparse against dense, write report.json and
    index.html into `out_dir` (created if missing; its parent must exist), and apply the gate."""
    check_device(cfg.model.device)
    prompts = check_prompts(prompts)
    if not seeds:
        raise ConfigError("no seed given; pass --seeds, e.g. 0,1")
    out_dir = check_output_dir(Path(out_dir), "report")
    json_path, html_path = out_dir / "report.json", out_dir / "index.html"
    plan, manifest = load_cache(cfg)  # no compiled cache: fail before rendering anything

    clips: list[ClipEval] = []
    runs: list[tuple[GenerateResult, GenerateResult]] = []
    for seed in seeds:
        dense = generate(_with(cfg, dense=True, seed=seed), prompts, write=False, on_step=on_step)
        sparse = generate(_with(cfg, dense=False, seed=seed), prompts, write=False, on_step=on_step, measure_mass=True)
        runs.append((dense, sparse))
        for d, s in zip(dense.videos, sparse.videos, strict=True):
            clips.append(_score(d, s, seed))

    totals = [v.mass_totals for _, s in runs for v in s.videos if v.mass_totals is not None]
    kept = mass_table(sum(t[0] for t in totals), sum(t[1] for t in totals)) if totals else None
    density = plan.computed_density().double().mean(-1)  # [buckets, layers], over heads; 1 where it runs dense
    failures = [
        c
        for c in clips
        if (min_psnr is not None and c.psnr_db < min_psnr)
        or (min_mass is not None and (c.retained_mass is None or c.retained_mass < min_mass))
    ]
    gate_line = _gate_line(clips, failures, min_psnr, min_mass) if failures else None
    data = _report_data(cfg, manifest, clips, runs, kept, density, plan.step_buckets, min_psnr, min_mass, gate_line)
    out_dir.mkdir(exist_ok=True)
    write_text_atomic(json_path, json.dumps(data, indent=1) + "\n")
    write_text_atomic(html_path, render_html(data, clips))
    return EvalReport(clips, data, json_path, html_path, failures, gate_line)


def _with(cfg: Config, **generate_keys) -> Config:
    return replace(cfg, generate=replace(cfg.generate, **generate_keys))


def _score(dense, sparse, seed: int) -> ClipEval:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    d = torch.from_numpy(dense.frames).permute(0, 3, 1, 2).double() / 255  # [F, 3, H, W]
    s = torch.from_numpy(sparse.frames).permute(0, 3, 1, 2).double() / 255
    psnr = float(peak_signal_noise_ratio(s, d, data_range=1.0))
    psnr_frames = peak_signal_noise_ratio(s, d, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim_frames = structural_similarity_index_measure(s, d, data_range=1.0, reduction="none")
    mass = None
    if sparse.mass_totals is not None:
        sums, rows = sparse.mass_totals
        mass = float(sums.sum() / rows.sum()) if int(rows.sum()) else None
    return ClipEval(
        dense.prompt,
        seed,
        psnr,
        [float(x) for x in psnr_frames],
        float(ssim_frames.mean()),
        [float(x) for x in ssim_frames],
        mass,
        dense.step_seconds,
        sparse.step_seconds,
        (dense.frames, sparse.frames),
    )


def _gate_line(clips, failures, min_psnr, min_mass) -> str:
    by_psnr = [c for c in failures if min_psnr is not None and c.psnr_db < min_psnr]
    worst = min(by_psnr or failures, key=lambda c: c.psnr_db if by_psnr else (c.retained_mass or 0.0))
    limits = ", ".join(
        f"{name} {value}" for name, value in (("--min-psnr", min_psnr), ("--min-mass", min_mass)) if value is not None
    )
    mass = "not measured" if worst.retained_mass is None else f"{worst.retained_mass:.5f}"
    return (
        f"{len(failures)} of {len(clips)} clip(s) below {limits}; worst: '{worst.prompt}' (seed {worst.seed}): "
        f"PSNR {worst.psnr_db:.2f} dB, retained mass {mass}"
    )


def _report_data(cfg, manifest, clips, runs, kept, density, step_buckets, min_psnr, min_mass, gate_line) -> dict:
    import diffusers
    import torchmetrics

    ident = model_identity(cfg)
    rows = [c.row() for c in clips]
    finite = [c.psnr_db for c in clips if math.isfinite(c.psnr_db)]
    masses = [c.retained_mass for c in clips if c.retained_mass is not None]
    sparse0 = runs[0][1]

    def mean_steps(key: str) -> list[float | None]:
        per_clip = [r[key] for r in rows]
        return [_num(float(np.mean(col))) for col in zip(*per_clip, strict=True)] if per_clip else []

    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "model": {"name": ident.name, "id": ident.model_id, "hash": ident.model_hash},
        "bundle": {"content_hash": manifest["bundle"]["content_hash"], "path": manifest["bundle"]["path"]},
        "forced": forced_record(manifest, cfg),  # identity differences --force let through
        "config_hash": sha256_hex(canonical_json(cfg.to_dict())),
        "config": cfg.to_dict(),
        "versions": {
            **software_versions(),
            "diffusers": diffusers.__version__,
            "torchmetrics": torchmetrics.__version__,
        },
        "device": device_info(cfg.model.device),
        "lpips": LPIPS_NOTE,
        "gate": {"min_psnr": min_psnr, "min_mass": min_mass, "passed": gate_line is None, "summary": gate_line},
        "summary": {
            "clips": len(clips),
            "psnr_db_mean": _num(float(np.mean(finite))) if finite else None,  # identical clips left out
            "psnr_db_min": _num(min(c.psnr_db for c in clips)),
            "identical_clips": sum(not math.isfinite(c.psnr_db) for c in clips),
            "ssim_mean": _num(float(np.mean([c.ssim for c in clips]))),
            "ssim_min": _num(min(c.ssim for c in clips)),
            "retained_mass_mean": _num(float(np.mean(masses))) if masses else None,
            "retained_mass_min": _num(min(masses)) if masses else None,
            "mean_density": _num(sparse0.mean_density),
            "sparse_density": _num(sparse0.sparse_density),
        },
        "clips": rows,
        "step_buckets": list(step_buckets),
        "retained_mass": None if kept is None else _nested(kept),  # [bucket][layer][head]
        "density": _nested(density),  # [bucket][layer], mean over heads
        "step_seconds": {"dense": mean_steps("dense_step_seconds"), "sparse": mean_steps("sparse_step_seconds")},
        "step_seconds_note": STEP_NOTE,
        "guard": [s.guard for _, s in runs],  # per seed: what generate.guard measured and widened (or why off)
    }


def _num(x: float | None, digits: int = 6) -> float | None:
    """A JSON-safe number: rounded, None for NaN or inf (an infinite PSNR means identical frames)."""
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _nested(t: torch.Tensor):
    return [_nested(x) for x in t] if t.dim() else _num(float(t))


# ---- the page ------------------------------------------------------------------------------------------------


def render_html(data: dict, clips: list[ClipEval]) -> str:
    """One self-contained page. Every number shown sits in a `data-value` attribute holding its JSON text
    (json.dumps of report.json's value), so a test or a script can check the page against the JSON."""
    s = data["summary"]
    esc = html.escape

    def cell(value, fmt: str = "{:.4f}", none: str = "-") -> str:
        shown = none if value is None else (fmt.format(value) if isinstance(value, float) else str(value))
        return f'<td data-value="{esc(json.dumps(value))}">{esc(shown)}</td>'

    summary_rows = "".join(
        f'<tr data-key="{esc(k)}"><th>{esc(k)}</th>{cell(v, none="inf (identical)" if k == "psnr_db_min" else "-")}'
        "</tr>"
        for k, v in s.items()
    )
    clip_rows = "".join(
        f'<tr data-clip="{i}"><td>{esc(r["prompt"])}</td>{cell(r["seed"])}{cell(r["psnr_db"], "{:.2f}", "inf")}'
        f"{cell(r['ssim'])}{cell(r['retained_mass'], '{:.5f}')}</tr>"
        for i, r in enumerate(data["clips"])
    )
    worst = sorted(range(len(clips)), key=lambda i: clips[i].psnr_db)[:WORST_SHOWN]
    thumbs = "".join(
        f"<figure>{_img(_thumbs_png(clips[i]), 'dense vs sparse')}<figcaption>{esc(clips[i].prompt)} (seed "
        f"{clips[i].seed}, PSNR {clips[i].psnr_db:.2f} dB)</figcaption></figure>"
        for i in worst
    )
    gate = data["gate"]
    gate_text = (
        "no gate set"
        if gate["min_psnr"] is None and gate["min_mass"] is None
        else ("passed" if gate["passed"] else gate["summary"])
    )
    heatmaps = ""
    if data["retained_mass"] is not None:
        mass = np.nanmean(np.array(data["retained_mass"], dtype=float), axis=-1)  # over heads
        heatmaps += _img(_heatmap_png(mass, "retained mass (mean over heads)", "{:.4f}"), "retained mass")
    heatmaps += _img(
        _heatmap_png(np.array(data["density"], dtype=float), "density (mean over heads)", "{:.3f}"), "density"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>calibatt evaluate: {esc(data["model"]["name"])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
img{{max-width:100%}}.meta{{color:#666;font-size:90%}}
.row{{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}}.row figure{{margin:0;flex:1 1 30%}}
figcaption{{font-size:90%}}</style></head><body>
<h1>Is it still the same video?</h1>
<p class="meta">model {esc(data["model"]["name"])} ({esc(data["model"]["hash"][:12])}), bundle
{esc(data["bundle"]["content_hash"][:12])}, config {esc(data["config_hash"][:12])}, device
{esc(data["device"]["name"])}, {esc(" ".join(f"{k} {v}" for k, v in data["versions"].items()))}, {esc(data["date"])}.
Sparse vs dense from the same noise. LPIPS {esc(data["lpips"])}.</p>
<p id="gate">gate: {esc(gate_text)}</p>
<h2>Summary</h2><table id="summary">{summary_rows}</table>
<h2>Per clip</h2>{_img(_quality_png(data["clips"]), "PSNR and SSIM per clip")}
<table id="clips"><tr><th>prompt</th><th>seed</th><th>PSNR dB</th><th>SSIM</th><th>retained mass</th></tr>
{clip_rows}</table>
<h2>Masks per layer and step bucket</h2><div class="row">{heatmaps}</div>
<h2>Time per denoising step</h2>{_img(_steps_png(data["step_seconds"]), "step time")}
<p class="meta">{esc(data["step_seconds_note"])}.</p>
<h2>Worst clips: first, middle and last frame</h2><div class="row">{thumbs}</div>
</body></html>
"""


def _img(png: bytes, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def _figure(*args, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _quality_png(rows: list[dict]) -> bytes:
    labels = [textwrap.fill(f"{r['prompt']} (s{r['seed']})", 40) for r in rows]
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
    cap = (max(finite) if finite else 60.0) + 5  # identical clips (inf PSNR) drawn at the cap
    height = sum(0.25 + 0.1 * (t.count("\n") + 1) for t in labels) + 1.2  # a bar per clip, its label's lines
    fig, (a, b) = _figure(1, 2, figsize=(12, height), sharey=True)
    y = np.arange(len(rows))
    a.barh(y, [cap if r["psnr_db"] is None else r["psnr_db"] for r in rows], color="#4878a8")
    a.set_yticks(y, labels, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("PSNR sparse vs dense (dB)")
    b.barh(y, [r["ssim"] for r in rows], color="#6a9f58")
    b.set_xlabel("SSIM sparse vs dense")
    b.set_xlim(min(0.9, min(r["ssim"] for r in rows) - 0.01), 1.0)
    return _png(fig)


def _heatmap_png(values: np.ndarray, title: str, fmt: str) -> bytes:
    """values [buckets, layers]: drawn layers down, buckets across."""
    v = values.T
    fig, ax = _figure(figsize=(1.3 * v.shape[1] + 2.5, 0.4 * v.shape[0] + 1.2))
    im = ax.imshow(v, aspect="auto", cmap="viridis")
    for (i, j), x in np.ndenumerate(v):
        if np.isfinite(x):
            ax.text(j, i, fmt.format(x), ha="center", va="center", fontsize=8, color="w" if x < np.nanmean(v) else "k")
    ax.set_xticks(range(v.shape[1]), [f"bucket {b}" for b in range(v.shape[1])])
    ax.set_yticks(range(v.shape[0]), [f"layer {i}" for i in range(v.shape[0])])
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _png(fig)


def _steps_png(steps: dict) -> bytes:
    fig, ax = _figure(figsize=(8, 3))
    for name, color in (("dense", "#888888"), ("sparse", "#4878a8")):
        ys = [np.nan if t is None else t for t in steps[name]]
        ax.plot(range(len(ys)), ys, marker="o", label=name, color=color)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("seconds (mean over clips)")
    ax.legend()
    return _png(fig)


def _thumbs_png(clip: ClipEval) -> bytes:
    dense, sparse = clip.frames
    picks = sorted({0, len(dense) // 2, len(dense) - 1})
    fig, axes = _figure(3, len(picks), figsize=(2.2 * len(picks), 6.6), squeeze=False)
    for j, f in enumerate(picks):
        diff = np.clip(4 * np.abs(dense[f].astype(np.int16) - sparse[f].astype(np.int16)), 0, 255).astype(np.uint8)
        for i, (img, name) in enumerate(((dense[f], "dense"), (sparse[f], "sparse"), (diff, "|difference| x4"))):
            axes[i, j].imshow(img, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].set_title(f"{name}, frame {f}", fontsize=8)
    return _png(fig)
