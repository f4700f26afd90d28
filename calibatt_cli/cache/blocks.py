"""Compiled transformer blocks in the cache: `calibatt compile` builds them, `generate` loads them.

The blocks run under regional torch.compile (`LoadedModel.torch_compile_blocks`: one block class, fullgraph,
the processors' attention a registered custom op inside that reads the step, plan and guard when it runs:
runtime/processor.py). One graph serves every step; compile runs the model once through each step kind (the
dense warm-up, each bucket) on inputs of the real shapes (a pipeline call of one step per kind, latents out: no
decode), so that inductor generates and builds whatever graph a run meets, and keeps what it made in the
cache:

    blocks/artifacts.bin   torch.compiler.save_cache_artifacts(): FX graphs, AOT-autograd entries, autotune
                           results and (on a GPU) inductor's Triton binaries, portable between folders
    blocks/inductor/       the inductor cache folder of the build: what the portable set leaves out (on the
                           CPU, the C++ kernels it built)

inductor's Triton kernels land in the cache's triton/ beside ours (the build runs with Triton pointed there).
`generate` copies blocks/inductor/ into a private folder for the run, hot-loads artifacts.bin into it and
points inductor at it: the cache folder itself is only read. Dynamo still traces at generate time (graphs
are tied to the process's code objects); code generation and compilation do not happen, and
`InductorCounter` counts them if they do (strict mode fails at the first).

Build in a fresh process (`calibatt compile` is one): where inductor has already built some of the same kernels
in this process, it serves them from memory and their files never reach the new folder, so a later generate
would build them (counted: strict fails). `torch._dynamo.reset()` and inductor's `clear_caches()` do not
prevent it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ..config import Config
from ..errors import CacheError

BLOCKS = "blocks"
ARTIFACTS = "artifacts.bin"
# inductor counters that mean "inductor generated code for a graph": a cache miss, or a graph it would not cache
CODEGEN_KEYS = ("fxgraph_cache_miss", "fxgraph_cache_bypass")
# files inductor builds from generated code (CPU: C++ kernels and their wrappers)
BUILT_SUFFIXES = (".so",)


@contextlib.contextmanager
def inductor_folder(folder: Path, *, one_thread: bool = False) -> Iterator[Path]:
    """Point inductor's on-disk caches at `folder` for this block (TORCHINDUCTOR_CACHE_DIR, which inductor reads
    at each use), with its FX-graph cache on. `one_thread`: Triton compiles in this process, where the
    compilation listener (aot.CompileCounter) sees them, rather than in a pool of workers."""
    import torch._inductor.config as inductor_config

    folder.mkdir(parents=True, exist_ok=True)
    prev = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    patch = {"fx_graph_cache": True}
    if one_thread:
        patch["compile_threads"] = 1
    try:
        with inductor_config.patch(patch):
            yield folder
    finally:
        if prev is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = prev


def _built_files(folder: Path | None) -> set[str]:
    if folder is None or not folder.is_dir():
        return set()
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in BUILT_SUFFIXES}


class _Watched(collections.Counter):
    """inductor's counter table, calling `on_codegen` when a code-generation counter goes up (inductor counts
    a cache miss before it generates code: strict mode can stop there instead of after the build)."""

    on_codegen = None

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key in CODEGEN_KEYS and self.on_codegen is not None:
            self.on_codegen(key)

    def copy(self):  # inductor's pattern matcher puts a copy of the table back in its place
        table = _Watched(self)
        table.on_codegen = self.on_codegen
        return table


class InductorCounter:
    """Counts inductor's work while active: `codegen` graphs it generated code for (FX-graph cache misses and
    bypasses, from torch._dynamo.utils.counters["inductor"]) and `builds` files it built from generated code in
    `folder` (the CPU's C++ kernels; a graph served from the cache whose build is missing is rebuilt). With
    `strict`, the first code generation raises CacheError naming the fix; builds are checked on exit."""

    def __init__(self, folder: Path | None = None, *, strict: bool = False, fix: str = ""):
        self.folder = folder
        self.strict = strict
        self.fix = fix or "run `calibatt compile --recompile` with this config"
        self.codegen = 0
        self.builds = 0
        self._base: dict[str, int] = {}
        self._files: set[str] = set()
        self._table = None

    def _raise(self, key: str) -> None:
        raise CacheError(
            f"strict mode: inductor generated code for a compiled block during generate ({key}: the "
            f"cache holds no graph for it); {self.fix}"
        )

    def __enter__(self) -> InductorCounter:
        from torch._dynamo.utils import counters

        self._base = {k: counters["inductor"][k] for k in CODEGEN_KEYS}
        self._files = _built_files(self.folder)
        if self.strict:
            self._table = _Watched(counters["inductor"])
            self._table.on_codegen = self._raise
            counters["inductor"] = self._table
        return self

    def __exit__(self, *exc) -> None:
        from torch._dynamo.utils import counters

        if isinstance(counters.get("inductor"), _Watched):
            counters["inductor"] = collections.Counter(counters["inductor"])
        self._table = None
        self.codegen = sum(counters["inductor"][k] - self._base[k] for k in CODEGEN_KEYS)
        self.builds = len(_built_files(self.folder) - self._files)
        if self.strict and exc[0] is None and self.builds:
            raise CacheError(
                f"strict mode: inductor built {self.builds} kernel file(s) during generate (the cache's compiled "
                f"blocks lack them); {self.fix}"
            )


def strict_cause(e: BaseException) -> CacheError | None:
    """The CacheError a strict counter raised inside torch.compile (dynamo wraps a backend's exceptions)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CacheError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def warm_steps(step_buckets: list[int]) -> list[int]:
    """One step of each kind a generate run takes: dense (if the plan has warm-up steps), then each bucket."""
    return ([-1] if -1 in step_buckets else []) + list(range(1 + max(step_buckets)))


def build_blocks(cfg: Config, plan, build: Path, prompt: str) -> dict:
    """Run the model's compiled blocks once per step kind on the real shapes, in a fresh inductor folder, and
    store what torch made in build/blocks/. `plan` is on the model's device. Returns the manifest's record."""
    import torch._dynamo
    from torch.compiler import save_cache_artifacts

    from ..models import load_model
    from ..runtime import SparseController

    g = cfg.generate
    t0 = time.perf_counter()
    torch._dynamo.reset()  # graphs compiled earlier in this process would be reused, and never reach the cache
    with contextlib.suppress(ImportError, AttributeError):
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager.clear()
    reps = warm_steps(plan.step_buckets)
    run_cfg = replace(cfg, generate=replace(g, steps=len(reps)))
    out = build / BLOCKS
    with tempfile.TemporaryDirectory(prefix="calibatt-inductor-") as tmp:
        with inductor_folder(Path(tmp)) as folder, InductorCounter(folder) as counter:
            model = load_model(cfg)
            # (the guard and the precision act inside the attention op: the graphs are the same with or without)
            controller = SparseController(replace(plan, step_buckets=reps), precision=cfg.compile.precision)
            model.install(controller)
            model.torch_compile_blocks(g.compile_backend)
            with torch.inference_mode():
                model.run(prompt, cfg=run_cfg, controller=controller, seed=g.seed, output_type="latent")
            saved = save_cache_artifacts()
        out.mkdir(parents=True)
        (out / ARTIFACTS).write_bytes(saved[0] if saved is not None else b"")
        shutil.copytree(folder, out / "inductor", ignore=shutil.ignore_patterns("locks", "*.lock", "*.tmp*"))
    del model
    return {
        "backend": g.compile_backend,
        "step_kinds": reps,
        "graphs": counter.codegen,
        "builds": counter.builds,
        "artifacts_bytes": (out / ARTIFACTS).stat().st_size,
        "files": sum(1 for p in (out / "inductor").rglob("*") if p.is_file()),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def check_blocks(folder: Path, manifest: dict, backend: str, recompile: str) -> None:
    """A cache's compiled blocks: present, whole, and for this backend."""
    blocks = manifest["blocks"]
    if blocks["backend"] != backend:
        raise CacheError(
            f"cache '{folder}' holds blocks compiled with compile_backend {blocks['backend']}, this run asks for "
            f"generate.compile_backend={backend}; {recompile}"
        )
    have = sum(1 for p in (folder / BLOCKS / "inductor").rglob("*") if p.is_file())
    if not (folder / BLOCKS / ARTIFACTS).is_file() or have < blocks["files"]:
        raise CacheError(
            f"cache '{folder}' should hold {blocks['files']} compiled-block files in {BLOCKS}/, it holds {have}; "
            f"{recompile}"
        )


def import_compiler(backend: str) -> None:
    """Import what wrapping the blocks in torch.compile imports (its backend's debug wrappers, AOT autograd,
    inductor's code cache: hundreds of modules, tenths of a second), here, so that generate can do it while the
    weights load. Wrapping a function compiles nothing until it is called, and this one never is."""
    import torch

    torch.compile(_never_called, backend=backend, fullgraph=True)


def _never_called(x):
    return x


@contextlib.contextmanager
def serve_blocks(folder: Path) -> Iterator[Path]:
    """For this block, inductor reads a private copy of a cache's compiled blocks (the cache is never written
    to), with the portable artifacts hot-loaded into it. Yields the private folder (which the counter watches)."""
    from torch.compiler import load_cache_artifacts

    with tempfile.TemporaryDirectory(prefix="calibatt-inductor-") as tmp:
        private = Path(tmp) / "inductor"
        shutil.copytree(folder / BLOCKS / "inductor", private)
        with inductor_folder(private, one_thread=True):
            data = (folder / BLOCKS / ARTIFACTS).read_bytes()
            if data:
                load_cache_artifacts(data)
            yield private
