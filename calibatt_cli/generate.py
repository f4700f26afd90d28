"""`calibatt generate`: sample videos with the compiled sparse plan (or the stock dense pipeline)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import calibatt_kernels as ck

from . import parallel
from .bundle import forced_record
from .cache import aot, blocks
from .cache.load import RECOMPILE, open_cache, prewarm
from .config import Config, compile_blocks
from .errors import CacheError, ConfigError
from .models import check_device, load_model, model_identity, prepare_model
from .models.parallel import parallelize
from .runtime import DenseController, SparseController
from .runtime.guard import Guard
from .util import check_output_path
from .video import to_uint8, write_mp4


@dataclass
class VideoResult:
    prompt: str
    output: Path | None
    seconds: float  # sampling + decoding + writing, model load excluded
    frames: np.ndarray | None = field(repr=False)  # uint8 [F, H, W, 3]; None: rendered by another process
    step_seconds: list[float] = field(default_factory=list)  # each denoising step, first forward to step end
    shape: tuple[int, int, int] = (0, 0, 0)  # frames, height, width
    # measure_mass: this video's kept-mass sums and row counts per (bucket, layer, head) (SparseController.mass_totals)
    mass_totals: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.frames is not None:
            self.shape = tuple(int(x) for x in self.frames.shape[:3])


@dataclass
class GenerateResult:
    videos: list[VideoResult]
    steps: int
    dense: bool
    mean_density: float  # computed share of attention blocks over all steps (warm-up steps count 1.0)
    sparse_density: float  # the same over the sparse steps only
    load_seconds: float
    retained_mass: float | None = None  # measured live (measure_mass=True): mean kept softmax mass per row
    compilations: int | None = None  # calibatt's Triton kernels compiled during the run (0 with a warm cache)
    # How the transformer blocks ran: enabled (compiled), from_cache, backend, the eager `fallback` and why,
    # and what compiled during the run: inductor_codegen (graphs), builds (C++ kernel files), triton_other
    compiled_blocks: dict = field(default_factory=dict)
    cache_lock: str | None = None  # how the cache was held: shared, or none (read-only location); None: dense
    ready_seconds: float | None = None  # from the generate call to the first denoising step's first forward
    # where ready_seconds went, in order: identity (config checks, the model's identity, which imports its
    # family's code), cache (open, lock, plan), blocks (compiled blocks served from the cache), compiler
    # (torch.compile's imports), prewarm (our kernels loaded), model (weights loaded; in a sparse run on a GPU on
    # a thread from the end of `cache`, and this part is what was left to wait for), install (controller, processors,
    # the layers' launch records), compile_wrap (torch.compile's wrapper), rest (prompt encoding, set-up)
    ready_parts: dict = field(default_factory=dict)
    layout: str = "1 process"  # how the run was spread over processes (parallel.Layout.describe)
    guard: dict | None = None  # the live check of the masks (Guard.report, or why it did not run); None: dense
    forced: list[dict] = field(default_factory=list)  # identity differences --force let through (bundle.py)
    # what the attention calls actually ran (kernel_report): kernels per (bucket, layer), fallbacks, and the
    # density of the blocks they computed; None: dense
    kernels: dict | None = None
    # CUDA: the most GPU memory allocated during the denoising steps of any video (StepClock.peak: the model
    # loaded, the steps' own memory; text encoding and decode excluded); None on the CPU
    peak_memory_bytes: int | None = None
    first_forward_at: float | None = field(default=None, repr=False)  # perf_counter at the first step's start
    load_parts: dict = field(default_factory=dict, repr=False)  # load_seconds by part (ready_parts)

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
            "frames": self.videos[0].shape[0] if self.videos else 0,
            "compilations": self.compilations,
            "compiled_blocks": self.compiled_blocks,
            "cache_lock": self.cache_lock,
            "ready_seconds": None if self.ready_seconds is None else round(self.ready_seconds, 3),
            "ready_parts": {k: round(v, 3) for k, v in self.ready_parts.items()},
            "step_seconds": [[round(t, 4) for t in v.step_seconds] for v in self.videos],
            "layout": self.layout,
            "guard": self.guard,
            "forced": self.forced,
            "measured_density": None if self.kernels is None else self.kernels["measured_density"],
            "measured_sparse_density": None if self.kernels is None else self.kernels["measured_sparse_density"],
            "kernels": self.kernels,
            "peak_memory_bytes": self.peak_memory_bytes,
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
    """Render each prompt to an MP4. Under torchrun the processes split up as `cfg.parallel` says (see
    parallel.py); each video is written once, by its group's first process, and every process returns the
    results of all videos (frames only for its own)."""
    check_device(cfg.model.device)
    t_start = time.perf_counter()
    prompts = check_prompts(prompts)
    g = cfg.generate
    paths = output_paths(output or g.output, len(prompts))
    if write:
        for p in paths:
            check_output_path(p, "output")
    ident = model_identity(cfg)
    check_layout(cfg, ident)
    layout = parallel.setup(cfg.parallel, cfg.model.device)
    cfg = replace(cfg, model=replace(cfg.model, device=parallel.process_device(cfg.model.device, layout)))
    mine = layout.shard(len(prompts))
    plan = full_plan = cache = loading = None
    forced = []
    parts = {"identity": time.perf_counter() - t_start}
    with contextlib.ExitStack() as stack:
        counter = None
        # strict: a kernel fallback (another kernel than the cache chose, a PyTorch path on the GPU) is an error
        stack.enter_context(_fallbacks_as_errors(g.strict))
        if not g.dense:
            # On a GPU the weights load on a thread while this one checks the cache, serves the compiled blocks,
            # imports the compiler and loads our kernels (the load's file reads and host-to-GPU copies run
            # without the GIL). The thread imports the pipeline's classes at once, and loads only once the cache
            # has passed its checks (a stale cache fails before any weights load); an error on either side
            # waits for the thread to end (the pool's exit) before it propagates.
            gate = None
            if load_on_thread(cfg.model.device):
                pool = stack.enter_context(ThreadPoolExecutor(2, thread_name_prefix="calibatt-load"))
                gate = Gate()
                stack.callback(gate.close)  # (before the pool's exit: a load not yet let through never starts)
                loading = pool.submit(_load_through, gate, cfg)
            # validated before spending time on the model, and held (shared lock) until the run ends
            cache = stack.enter_context(open_cache(cfg))
            plan = full_plan = cache.plan
            forced = forced_record(cache.manifest, cfg)
            start, stop = layout.heads(ident.heads)
            if layout.ulysses > 1:  # this rank attends over its heads' masks alone
                plan = plan.heads(start, stop).to(torch.device(cfg.model.device))
            # Triton must look in the cache's folder before the first kernel launch; strict mode fails at the
            # first compilation, which a complete cache never needs.
            stack.enter_context(aot.kernel_cache(cache.folder / "triton"))
            counter = stack.enter_context(aot.CompileCounter(strict=g.strict))
            parts["cache"] = time.perf_counter() - t_start - parts["identity"]
            if gate is not None:
                gate.open()
                pool.submit(aot.warm_triton_key)  # Triton's key of its installation, ahead of the first launch
        t_blocks = time.perf_counter()
        compiled, inductor = _compiled_blocks(cfg, cache, stack)
        parts["blocks"] = time.perf_counter() - t_blocks
        if loading is not None and compiled["enabled"]:
            t_compiler = time.perf_counter()
            blocks.import_compiler(cfg.generate.compile_backend)
            parts["compiler"] = time.perf_counter() - t_compiler
        if plan is not None:
            t_prewarm = time.perf_counter()
            prewarm(
                plan,
                heads=stop - start,
                head_dim=ident.head_dim,
                dtype=getattr(torch, cfg.model.dtype),
                device=cfg.model.device,
                return_lse=ident.joint_attention,
                qk_norm_rope=ident.qk_norm_rope,
                precision=g.precision,
            )
            parts["prewarm"] = time.perf_counter() - t_prewarm
        ck.reset_what_ran()  # (prewarm's launches are not the run's)
        try:
            res = _sample(
                cfg,
                [prompts[i] for i in mine],
                [paths[i] for i in mine],
                plan,
                layout,
                write=write and layout.group_leader,
                on_step=on_step,
                measure_mass=measure_mass,
                compiled=compiled["enabled"],
                loading=loading,
            )
        except Exception as e:  # a strict counter's error, raised inside torch.compile, comes out wrapped
            cause = blocks.strict_cause(e)
            if cause is None or cause is e:
                raise
            raise cause from None
    if inductor is not None:
        compiled.update(inductor_codegen=inductor.codegen, builds=inductor.builds)
    if counter is not None:
        compiled["triton_other"] = counter.others
    res.compiled_blocks = compiled
    if res.first_forward_at is not None:
        res.ready_seconds = res.first_forward_at - t_start
        parts.update(res.load_parts)
        parts["rest"] = res.ready_seconds - sum(parts.values())
        res.ready_parts = parts
    res.cache_lock = None if cache is None else cache.lock
    res.compilations = None if counter is None else counter.count
    res.forced = forced
    if full_plan is not None:  # the whole model's density, not this rank's heads'
        res.mean_density, res.sparse_density = full_plan.mean_density()
        res.kernels = kernel_report(plan, ck.what_ran())
        if g.strict and res.kernels["dense"]:
            raise CacheError(dense_error(res.kernels["dense"]))
    if layout.distributed:
        res.videos = _gather_videos(res.videos, mine, layout)
        res.layout = layout.describe()
    return res


def _compiled_blocks(cfg: Config, cache, stack: contextlib.ExitStack) -> tuple[dict, blocks.InductorCounter | None]:
    """Whether the blocks run compiled and from where, and the counter of inductor's work for the run.
    Sparse: from the cache's compiled blocks (strict: any code generation is an error). A cache without them:
    generate.compile=auto falls back to eager (reported; an error under strict), true compiles now (counted;
    an error under strict). --dense: the stock pipeline with the same setting, compiled by torch's own caches
    (no calibatt cache holds its graphs), counted."""
    g = cfg.generate
    info = {"enabled": False, "from_cache": False, "backend": g.compile_backend, "fallback": None}
    if not compile_blocks(cfg, model_identity(cfg).repeated_blocks):
        return info, None
    if cache is None:
        info["enabled"] = True
        return info, stack.enter_context(blocks.InductorCounter())
    if cache.manifest.get("blocks") is None:
        why = f"the cache holds no compiled blocks; {RECOMPILE} with generate.compile on"
        if g.strict:
            raise CacheError(f"strict mode: generate.compile={g.compile} but {why}")
        if g.compile == "auto":
            info["fallback"] = f"eager: {why}"
            return info, None
        info["enabled"] = True
        return info, stack.enter_context(blocks.InductorCounter())
    blocks.check_blocks(cache.folder, cache.manifest, g.compile_backend, RECOMPILE)
    private = stack.enter_context(blocks.serve_blocks(cache.folder))
    info.update(enabled=True, from_cache=True)
    return info, stack.enter_context(blocks.InductorCounter(private, strict=g.strict))


def check_layout(cfg: Config, ident) -> None:
    """What the model or the sampling settings rule out for cfg.parallel, refused before anything starts."""
    p = cfg.parallel
    parallel.check_parallel_config(p)
    if p.cfg_parallel and cfg.generate.guidance <= 1.0:
        raise ConfigError(
            f"parallel.cfg_parallel needs classifier-free guidance (generate.guidance > 1, got "
            f"{cfg.generate.guidance}): with one forward per step there is nothing to split; drop --cfg-parallel"
        )
    if p.ulysses > 1:
        if not ident.sequence_parallel:
            raise ConfigError(
                f"{ident.name} has no sequence-parallel plan in diffusers, so parallel.ulysses cannot split it; "
                f"use --cfg-parallel (and data parallel over --prompts)"
            )
        if ident.heads % p.ulysses:
            raise ConfigError(
                f"{ident.name} has {ident.heads} heads, not divisible by parallel.ulysses={p.ulysses}; "
                f"choose one of {[d for d in range(2, ident.heads + 1) if ident.heads % d == 0]}"
            )


def _gather_videos(videos: list[VideoResult], mine: list[int], layout: parallel.Layout) -> list[VideoResult]:
    """Every group's videos, in prompt order; frames stay with the processes that rendered them."""
    local = dict(zip(mine, videos, strict=True))
    rows = (
        [
            {
                "index": i,
                "prompt": v.prompt,
                "output": None if v.output is None else str(v.output),
                "seconds": v.seconds,
                "step_seconds": v.step_seconds,
                "shape": list(v.shape),
            }
            for i, v in local.items()
        ]
        if layout.group_leader
        else []
    )
    merged = sorted((r for part in parallel.all_gather_json(rows, layout) for r in part), key=lambda r: r["index"])
    return [
        local[r["index"]]
        if r["index"] in local
        else VideoResult(
            r["prompt"],
            None if r["output"] is None else Path(r["output"]),
            r["seconds"],
            None,
            r["step_seconds"],
            tuple(r["shape"]),
        )
        for r in merged
    ]


def _sample(
    cfg: Config,
    prompts: list[str],
    paths: list[Path],
    plan,
    layout: parallel.Layout,
    *,
    write: bool,
    on_step: Callable[[], None] | None,
    measure_mass: bool,
    compiled: bool,
    loading: Future | None = None,
) -> GenerateResult:
    """`loading`: the model's load, already under way on a thread (its result: the model and its seconds);
    None: load it here."""
    g = cfg.generate
    t0 = time.perf_counter()
    model, model_seconds = _timed(load_model, cfg) if loading is None else loading.result()
    t_loaded = time.perf_counter()
    guard, guard_off = _guard(cfg, plan)
    controller = None
    if plan is not None:
        controller = SparseController(plan, measure_mass=measure_mass, guard=guard, precision=g.precision)
    if controller is not None:
        model.install(controller)
    split = parallelize(model, layout)  # after install: diffusers hands its parallel config to our processors
    t_installed = time.perf_counter()
    if compiled:
        # Both the baseline (--dense) and calibatt get the same torch.compile, so they stay comparable.
        model.torch_compile_blocks(g.compile_backend)
    t_wrapped = time.perf_counter()
    # the load's own seconds (on a thread, most of them overlapped what came before), then install and wrap
    load_seconds = model_seconds + t_wrapped - t_loaded
    load_parts = {
        "model": t_loaded - t0,  # waited for here
        "install": t_installed - t_loaded,
        "compile_wrap": t_wrapped - t_installed,
    }

    videos = []
    clock = StepClock(model.pipe.transformer)
    for prompt, path in zip(prompts, paths, strict=True):
        t1 = time.perf_counter()
        clock.start()
        split.reset()
        hooks = [clock.step_end]
        if on_step is not None:
            hooks.append(on_step)
        # The stock pipeline (--dense) has no processor of ours: a dense controller only follows its steps.
        ctl = controller if controller is not None else DenseController()
        ctl.step_hooks[:] = hooks
        before = controller.mass_totals() if measure_mass and controller is not None else None
        with torch.inference_mode():
            frames = model.run(prompt, cfg=cfg, controller=ctl, seed=g.seed, cfg_branch=layout.cfg_rank)[0]
        frames = to_uint8(frames)
        if write:
            write_mp4(path, frames, cfg.video.fps)
        videos.append(VideoResult(prompt, path if write else None, time.perf_counter() - t1, frames, clock.steps()))
        if measure_mass and controller is not None and (after := controller.mass_totals()) is not None:
            videos[-1].mass_totals = after if before is None else (after[0] - before[0], after[1] - before[1])
    clock.close()
    first_forward_at = clock.first_forward_at
    if plan is not None:
        mean_density, sparse_density = plan.mean_density()
    else:
        mean_density = sparse_density = 1.0
    retained = controller.retained_mass() if controller is not None else None
    res = GenerateResult(videos, g.steps, plan is None, mean_density, sparse_density, load_seconds, retained)
    res.guard = guard.report() if guard is not None else guard_off
    res.first_forward_at = first_forward_at
    res.load_parts = load_parts
    res.peak_memory_bytes = clock.peak if clock.cuda else None
    return res


def load_on_thread(device: str) -> bool:
    """Whether a sparse run loads the weights on a thread: on a GPU, where there is our kernels' prewarm and the
    compiled blocks to overlap. On the CPU there is nothing to overlap, and the tiny model's denoising steps
    ran 11-15 % slower after a load on another thread (cause not pinned down; with one OpenMP thread 3 %)."""
    return torch.device(device).type == "cuda"


class Gate:
    """Holds a thread until the caller lets it through (`open`) or gives up on it (`close`)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._passed = False

    def open(self) -> None:
        self._passed = True
        self._event.set()

    def close(self) -> None:
        self._event.set()

    def wait(self) -> bool:
        """Whether the thread may go on."""
        self._event.wait()
        return self._passed


def _load_through(gate: Gate, cfg: Config) -> tuple | None:
    """The pipeline's imports, then (once `gate` lets it through) the model's load: (model, the seconds of both,
    the wait at the gate excluded), or None if the gate closed first."""
    _, imports = _timed(prepare_model, cfg)
    if not gate.wait():
        return None
    model, seconds = _timed(load_model, cfg)
    return model, imports + seconds


def _timed(fn: Callable, *args):
    """fn(*args) and its wall seconds."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _guard(cfg: Config, plan) -> tuple[Guard | None, dict | None]:
    """The guard of a sparse run, or (None, why it is off for the report)."""
    g = cfg.generate
    if plan is None:
        return None, None
    why = None
    if not g.guard:
        why = "generate.guard=false"
    elif plan.epsilon is None:
        why = "the cache records no epsilon; run `calibatt compile --recompile`"
    if why is not None:
        return None, {"enabled": False, "reason": why}
    return Guard(plan, g.guard_factor, g.guard_floor), None


class StepClock:
    """Wall time of each denoising step, so a user (and the AOT-cache test) can see whether the first step
    pays for compilation. A step runs from its first transformer forward (a pre-hook: text encoding and
    latent setup before step 0 are not counted) to the pipeline's step-end callback. On CUDA the marks are
    events recorded on the stream, read once at the end: the sampling loop never waits for the GPU. On CUDA it
    also keeps the peak of allocated GPU memory over the steps (`peak`: the allocator's counters, host-side)."""

    def __init__(self, transformer: torch.nn.Module):
        self.cuda = next(transformer.parameters()).device.type == "cuda"
        self._handle = transformer.register_forward_pre_hook(self._pre)
        self.marks: list = []
        self.first_forward_at: float | None = None  # host clock at the run's first forward (time to first step)
        self.peak = 0  # bytes, the most allocated during any video's steps (CUDA)

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def _pre(self, module, args) -> None:
        if not self.marks:
            if self.first_forward_at is None:
                self.first_forward_at = time.perf_counter()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            self._mark()

    def start(self) -> None:
        self.marks = []

    def step_end(self) -> None:
        self._mark()
        if self.cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    def steps(self) -> list[float]:
        pairs = zip(self.marks[:-1], self.marks[1:], strict=True)
        if self.cuda:
            if self.marks:
                self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in pairs]
        return [b - a for a, b in pairs]

    def close(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def _fallbacks_as_errors(strict: bool):
    """With `strict`, a kernel fallback stops the run with a one-line CacheError naming it."""
    try:
        with ck.dispatch.strict_fallbacks(strict):
            yield
    except ck.dispatch.KernelFallback as e:
        raise CacheError(
            f"strict mode: {e}; run without --strict to accept the fallback, or `calibatt compile --recompile` "
            f"on this machine"
        ) from e


def kernel_report(plan, ran: dict) -> dict:
    """What the sparse run's attention calls actually ran (`ran`: calibatt_kernels.what_ran()), against the
    plan: per (bucket, layer) the kernels and the density of the blocks they computed; "dense": the groups
    the plan runs sparse with fewer calls than the others of their bucket (each forward calls every layer
    once, so the difference ran outside calibatt's kernels: dense), or a bucket with none at all; the
    densities over all steps (warm-up steps, dense calls and the groups compile measured faster dense,
    `plan.dense`, count 1.0) and over the sparse steps. Every sparse call names its (bucket, layer), compiled
    or not (the layer's op sets the scope when it runs: runtime/processor.py)."""
    layers = sorted({key[1] for key in plan.index})
    buckets = sorted({b for b in plan.step_buckets if b >= 0})
    scopes = {tuple(s["scope"]): s for s in ran["scopes"] if isinstance(s["scope"], (list, tuple))}
    empty = {"ran": {}, "blocks": 0, "total_blocks": 0}
    groups, dense, density = [], [], {}
    for b in buckets:
        planned_dense = [layer for layer in layers if (b, layer) in plan.dense]
        sparse_layers = [layer for layer in layers if (b, layer) not in plan.dense]
        for layer in planned_dense:
            groups.append({"bucket": b, "layer": layer, "ran": {}, "plan": "dense", "dense_calls": 0, "density": 1.0})
        if not sparse_layers:
            density[b] = 1.0
            continue
        keys = [(b, layer) for layer in sparse_layers]
        calls = {key: sum(scopes.get(key, empty)["ran"].values()) for key in keys}
        n_calls = sum(calls.values())
        if n_calls == 0:
            dense.append({"bucket": b, "layer": "*", "missing": None, "expected": None})
        # the calls each group should have made: every layer runs once per forward
        expected = max(calls.values())
        blocks = sum(scopes.get(key, empty)["blocks"] for key in keys)
        total = sum(scopes.get(key, empty)["total_blocks"] for key in keys)
        per_call = total / n_calls if n_calls else 0  # blocks of one call (a dense call computes them all)
        # the planned-dense layers compute every block of as many calls as a sparse layer makes
        blocks += len(planned_dense) * expected * per_call
        total += len(planned_dense) * expected * per_call
        for key in keys:
            s = scopes.get(key, empty)
            layer = key[1]
            missing = expected - calls[key]
            if missing:
                dense.append({"bucket": b, "layer": layer, "missing": missing, "expected": expected})
                blocks += missing * per_call
                total += missing * per_call
            groups.append(
                {
                    "bucket": b,
                    "layer": layer,
                    "ran": dict(s["ran"]),
                    "dense_calls": missing,
                    "density": round(s["blocks"] / s["total_blocks"], 6) if s["total_blocks"] else 1.0,
                }
            )
        density[b] = blocks / total if total else 1.0
    per_step = [1.0 if b < 0 else density[b] for b in plan.step_buckets]
    sparse = [density[b] for b in plan.step_buckets if b >= 0]
    calls: dict[str, int] = {}
    for key, n in ran["calls"].items():
        op, kernel = key.split(":", 1)
        if op == "attention":
            calls[kernel] = calls.get(kernel, 0) + n
    return {
        "calls": calls,  # attention calls per kernel
        "fallbacks": ran["fallbacks"],  # every operation's
        "groups": groups,
        "dense": dense,
        "measured_density": round(sum(per_step) / len(per_step), 6),
        "measured_sparse_density": round(sum(sparse) / len(sparse), 6) if sparse else 1.0,
    }


def dense_error(dense: list[dict]) -> str:
    """strict mode's one line for groups that ran dense where the plan is sparse (kernel_report's "dense")."""
    d = dense[0]
    where = f"bucket {d['bucket']}" + ("" if d["layer"] == "*" else f", layer {d['layer']}")
    what = (
        "ran no attention call through calibatt's kernels"
        if d["missing"] is None
        else f"ran {d['missing']} of {d['expected']} attention calls outside calibatt's kernels"
    )
    more = f" (and {len(dense) - 1} more group(s))" if len(dense) > 1 else ""
    return f"strict mode: {where} {what} (dense) where the plan is sparse{more}; run without --strict to accept it"
