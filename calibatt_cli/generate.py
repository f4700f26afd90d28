"""`calibatt generate`: sample videos with the compiled sparse plan (or the stock dense pipeline)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache import aot
from .cache.load import load_cache, prewarm
from .config import Config
from .errors import ConfigError
from .models import load_model, model_identity
from .runtime import DenseController, SparseController
from .util import check_output_path
from .video import to_uint8, write_mp4


@dataclass
class VideoResult:
    prompt: str
    output: Path | None
    seconds: float  # sampling + decoding + writing, model load excluded
    frames: np.ndarray = field(repr=False)  # uint8 [F, H, W, 3]
    step_seconds: list[float] = field(default_factory=list)  # each denoising step, first forward to step end


@dataclass
class GenerateResult:
    videos: list[VideoResult]
    steps: int
    dense: bool
    mean_density: float  # computed share of attention blocks over all steps (warm-up steps count 1.0)
    sparse_density: float  # the same over the sparse steps only
    load_seconds: float
    retained_mass: float | None = None  # measured live (measure_mass=True): mean kept softmax mass per row
    compilations: int | None = None  # Triton kernels compiled during the run (0 with a warm cache)

    def summary(self) -> dict:
        return {
            "outputs": [str(v.output) for v in self.videos],
            "prompts": [v.prompt for v in self.videos],
            "steps": self.steps,
            "dense": self.dense,
            "mean_density": round(self.mean_density, 6),
            "sparse_density": round(self.sparse_density, 6),
            "seconds": round(sum(v.seconds for v in self.videos), 3),
            "seconds_per_video": [round(v.seconds, 3) for v in self.videos],
            "load_seconds": round(self.load_seconds, 3),
            "retained_mass": None if self.retained_mass is None else round(self.retained_mass, 6),
            "frames": int(self.videos[0].frames.shape[0]) if self.videos else 0,
            "compilations": self.compilations,
            "step_seconds": [[round(t, 4) for t in v.step_seconds] for v in self.videos],
        }


def output_paths(output: str, n: int) -> list[Path]:
    """One prompt writes `output`; several write `<stem>-000<suffix>`, `<stem>-001<suffix>`, ..."""
    p = Path(output)
    if p.suffix.lower() != ".mp4":
        raise ConfigError(f"output '{output}' must end in .mp4")
    if n == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i:03d}{p.suffix}") for i in range(n)]


def check_prompts(prompts: list[str]) -> list[str]:
    if not prompts:
        raise ConfigError("no prompt given; pass a prompt or --prompts FILE")
    for i, prompt in enumerate(prompts):
        if not prompt or not prompt.strip():
            raise ConfigError(f"prompt {i + 1} is empty; give a description of the video")
    return [re.sub(r"\s+", " ", p.strip()) for p in prompts]


def generate(
    cfg: Config,
    prompts: list[str],
    *,
    output: str | None = None,
    write: bool = True,
    on_step: Callable[[], None] | None = None,
    measure_mass: bool = False,
) -> GenerateResult:
    prompts = check_prompts(prompts)
    g = cfg.generate
    paths = output_paths(output or g.output, len(prompts))
    if write:
        for p in paths:
            check_output_path(p, "output")
    plan = None
    with contextlib.ExitStack() as stack:
        counter = None
        if not g.dense:
            plan, _ = load_cache(cfg)  # validate the cache before spending time on the model
            # Triton must look in the cache's folder before the first kernel launch; strict mode fails at the
            # first compilation, which a complete cache never needs.
            stack.enter_context(aot.kernel_cache(Path(cfg.compile.cache_dir) / "triton"))
            counter = stack.enter_context(aot.CompileCounter(strict=g.strict))
            ident = model_identity(cfg)
            prewarm(
                plan,
                heads=ident.heads,
                head_dim=ident.head_dim,
                dtype=getattr(torch, cfg.model.dtype),
                device=cfg.model.device,
                return_lse=ident.joint_attention,
                qk_norm_rope=ident.qk_norm_rope,
            )
        res = _sample(cfg, prompts, paths, plan, write=write, on_step=on_step, measure_mass=measure_mass)
    res.compilations = None if counter is None else counter.count
    return res


def _sample(
    cfg: Config,
    prompts: list[str],
    paths: list[Path],
    plan,
    *,
    write: bool,
    on_step: Callable[[], None] | None,
    measure_mass: bool,
) -> GenerateResult:
    g = cfg.generate
    t0 = time.perf_counter()
    model = load_model(cfg)
    controller = SparseController(plan, measure_mass=measure_mass) if plan is not None else None
    if controller is not None:
        model.install(controller)
    if g.compile:
        # Both the baseline (--dense) and calibatt get the same torch.compile, so they stay comparable.
        model.torch_compile_blocks(g.compile_backend)
    load_seconds = time.perf_counter() - t0

    videos = []
    clock = StepClock(model.pipe.transformer)
    for prompt, path in zip(prompts, paths, strict=True):
        t1 = time.perf_counter()
        clock.start()
        hooks = [clock.step_end]
        if on_step is not None:
            hooks.append(on_step)
        if controller is None:
            # The stock pipeline: no processor of ours installed; steps are followed for progress only.
            frames = _run_with_progress(model, prompt, cfg, hooks)
        else:
            controller.step_hooks[:] = hooks
            with torch.inference_mode():
                frames = model.run(prompt, cfg=cfg, controller=controller, seed=g.seed)[0]
        frames = to_uint8(frames)
        if write:
            write_mp4(path, frames, cfg.video.fps)
        videos.append(VideoResult(prompt, path if write else None, time.perf_counter() - t1, frames, clock.steps()))
    clock.close()
    if plan is not None:
        mean_density, sparse_density = plan.mean_density()
    else:
        mean_density = sparse_density = 1.0
    retained = controller.retained_mass() if controller is not None else None
    return GenerateResult(videos, g.steps, plan is None, mean_density, sparse_density, load_seconds, retained)


class StepClock:
    """Wall time of each denoising step, so a user (and the AOT-cache test) can see whether the first step
    pays for compilation. A step runs from its first transformer forward (a pre-hook: text encoding and
    latent setup before step 0 are not counted) to the pipeline's step-end callback. On CUDA the marks are
    events recorded on the stream, read once at the end: the sampling loop never waits for the GPU."""

    def __init__(self, transformer: torch.nn.Module):
        self.cuda = next(transformer.parameters()).device.type == "cuda"
        self._handle = transformer.register_forward_pre_hook(self._pre)
        self.marks: list = []

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def _pre(self, module, args) -> None:
        if not self.marks:
            self._mark()

    def start(self) -> None:
        self.marks = []

    def step_end(self) -> None:
        self._mark()

    def steps(self) -> list[float]:
        pairs = zip(self.marks[:-1], self.marks[1:], strict=True)
        if self.cuda:
            if self.marks:
                self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in pairs]
        return [b - a for a, b in pairs]

    def close(self) -> None:
        self._handle.remove()


def _run_with_progress(model, prompt: str, cfg: Config, hooks: list) -> np.ndarray:
    step_counter = DenseController()  # used only for its step callback
    step_counter.step_hooks[:] = hooks
    with torch.inference_mode():
        return model.run(prompt, cfg=cfg, controller=step_counter, seed=cfg.generate.seed)[0]
