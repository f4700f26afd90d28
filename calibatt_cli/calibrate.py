"""`calibatt calibrate`: measure block attention mass on the dense model and keep the blocks that matter."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .bundle import MaskBundle, save_bundle
from .config import Config, resolve_input
from .errors import ConfigError
from .masks import retained_mass, select_blocks
from .models import load_model, model_identity
from .runtime import MassRecorder, RecordController
from .util import check_output_path


def step_buckets(steps: int, warmup_steps: int, buckets: int) -> list[int]:
    """step -> bucket; warm-up steps are -1 (always dense); the rest split into contiguous groups."""
    sparse = steps - warmup_steps
    if buckets > sparse:
        raise ConfigError(
            f"calibration.buckets ({buckets}) exceeds the {sparse} sparse steps (generate.steps - warmup_steps); "
            f"lower calibration.buckets"
        )
    out = [-1] * warmup_steps
    for i in range(sparse):
        out.append(i * buckets // sparse)
    return out


def read_prompts(path: str | Path, cfg: Config | None = None) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    p = resolve_input(path, cfg) if cfg is not None else Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts file '{path}' not found; pass an existing file (one prompt a line)")
    prompts = [line.strip() for line in p.read_text().splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts file '{path}' has no prompts; write one prompt a line")
    return prompts


@dataclass
class CalibrationResult:
    bundle: MaskBundle
    path: Path
    seconds: float
    mass: torch.Tensor  # float64 [buckets, layers, heads, Mq, Mk], the averaged block mass


def calibrate(cfg: Config, on_step: Callable[[], None] | None = None) -> CalibrationResult:
    c = cfg.calibration
    out_path = check_output_path(Path(c.output), "bundle")
    prompts = read_prompts(c.prompts, cfg)
    ident = model_identity(cfg)
    buckets = step_buckets(cfg.generate.steps, c.warmup_steps, c.buckets)
    grid = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)

    t0 = time.perf_counter()
    model = load_model(cfg)
    recorder = MassRecorder(buckets, c.block_size)
    controller = RecordController(recorder)
    if on_step is not None:
        controller.step_hooks.append(on_step)
    model.install(controller)
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            # No VAE decode: calibration only needs the transformer's attention.
            model.run(prompt, cfg=cfg, controller=controller, seed=c.seed + i, output_type="latent")
    model.uninstall()

    mass = torch.stack(
        [torch.stack([recorder.mean(b, layer) for layer in range(ident.layers)]) for b in range(c.buckets)]
    )  # [buckets, layers, heads, Mq, Mk]
    masks = select_blocks(mass, c.epsilon)
    density = masks.double().mean(dim=(-1, -2))
    retained = retained_mass(mass, masks)
    meta = {
        "calibatt_version": __version__,
        "model": {"name": ident.name, "id": ident.model_id, "hash": ident.model_hash},
        "grid": {
            "tokens": grid,
            "num_tokens": grid[0] * grid[1] * grid[2],
            "video": {"frames": cfg.video.frames, "height": cfg.video.height, "width": cfg.video.width},
        },
        "block_size": c.block_size,
        "steps": cfg.generate.steps,
        "step_buckets": buckets,
        "warmup_steps": c.warmup_steps,
        "epsilon": c.epsilon,
        "guidance": cfg.generate.guidance,
        "prompts": prompts,
        "samples_per_bucket": [recorder.counts[(b, 0)] for b in range(c.buckets)],
        "entries": {
            "density": _rounded(density),
            "retained_mass": _rounded(retained),
        },
        "summary": {"density": float(density.mean()), "retained_mass": float(retained.mean())},
    }
    bundle = save_bundle(out_path, masks, meta)
    return CalibrationResult(bundle, out_path, time.perf_counter() - t0, mass)


def _rounded(x: torch.Tensor) -> list:
    return torch.round(x * 1e6).div(1e6).tolist()
