"""Ahead-of-time kernels: where Triton keeps its cache, proving nothing compiles, cross-compiling.

- `kernel_cache(dir)` points Triton's on-disk cache at a folder (a calibatt cache's `triton/`) for the
  duration of a block, with a cache manager whose group files survive moving the folder: Triton's own
  `__grp__*.json` files store absolute paths, so a copied or moved cache would silently miss.
- `CompileCounter` counts compilations (cache misses) through `triton.knobs.compilation.listener`.
- `cross_compile` builds every candidate kernel config for an architecture without a GPU
  (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`): a CI check that every config
  compiles. Its binaries hash differently from the JIT's, so it does not fill the JIT cache.
  `cross_compile_configs` does so for a config's model (`calibatt compile --target`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.runtime.cache import FileCacheManager

from calibatt_kernels import dispatch

from ..config import Config
from ..errors import CacheError
from ..models import model_identity

# Largest shared memory one block may use (opt-in), bytes: a config above it compiles but cannot launch.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class RelocatableCacheManager(FileCacheManager):
    """Triton's file cache, but a group file lists its children by file name, and they are looked up in
    the entry's own folder: the cache can be moved or copied and still hits."""

    def get_group(self, filename: str) -> dict[str, str] | None:
        grp = self.get_file(f"__grp__{filename}")
        if grp is None:
            return None
        try:
            with open(grp) as f:
                children = json.load(f)["child_paths"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        found = {}
        for name, path in children.items():
            local = os.path.join(self.cache_dir, os.path.basename(path))
            if not os.path.exists(local):
                return None
            found[name] = local
        return found

    def put_group(self, filename: str, group: dict[str, str]) -> str:
        children = {name: os.path.basename(path) for name, path in group.items()}
        return self.put(json.dumps({"child_paths": children}), f"__grp__{filename}", binary=False)


def relink_groups(triton_dir: Path) -> int:
    """Rewrite every group file under triton_dir to list its children by file name (what a cache stores:
    Triton's own manager, e.g. in inductor's compile workers, writes absolute paths). Atomic per file.
    Returns the number of files rewritten."""
    n = 0
    for grp in Path(triton_dir).glob("*/__grp__*.json"):
        try:
            data = json.loads(grp.read_text())
            children = data["child_paths"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        new = {c: os.path.basename(p) for c, p in children.items()}
        if new != children:
            tmp = grp.with_name(f".{grp.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"child_paths": new}))
            os.replace(tmp, grp)
            n += 1
    return n


@contextlib.contextmanager
def kernel_cache(triton_dir: str | Path) -> Iterator[Path]:
    """Point Triton's cache at triton_dir (created) for this block; restores the previous setting after.
    Must be entered before the first launch of a kernel it should serve: a kernel already compiled in
    this process is served from memory and never touches the folder."""
    triton_dir = Path(triton_dir).resolve()
    triton_dir.mkdir(parents=True, exist_ok=True)
    knobs = triton.knobs.cache
    with knobs.scope():
        knobs.dir = str(triton_dir)  # also sets TRITON_CACHE_DIR for child processes
        knobs.manager_class = RelocatableCacheManager
        yield triton_dir


def forget_compiled(fn) -> None:
    """Drop a JIT function's in-memory binaries so its next launch goes through the on-disk cache (and a
    fresh cache folder receives the files)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        caches.clear()


def warm_triton_key() -> None:
    """Make Triton's key of its own installation (a hash over its sources and libraries, ~0.5 s, once per
    process, kept by Triton) now: every kernel's first launch, from the cache or not, needs it. generate runs
    this on a thread while the weights load (the hashing mostly runs without the GIL). A Triton without it
    where it is looked for: nothing to do."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return
    triton_key()


# The kernels a calibatt cache holds, named apart from other Triton kernels (torch.compile's inductor kernels
# in compiled blocks, which the cache holds too) in CompileCounter's counts.
OUR_KERNELS = dispatch.kernel_names()


class CompileCounter:
    """Counts Triton compilations while active, through Triton's compilation listener. `compiled` lists (kernel
    name, hash) of cache misses of calibatt's kernels, `others` counts compilations of other kernels
    (inductor's), `hits` counts cache hits of ours. With `strict`, the first compilation of any kernel raises
    CacheError (the message names the kernel and the fix)."""

    def __init__(self, *, strict: bool = False, fix: str = ""):
        self.strict = strict
        self.fix = fix or "run `calibatt compile --recompile` on this machine"
        self.compiled: list[tuple[str, str]] = []
        self.hits = 0
        self.others = 0
        self._prev = None

    def _listener(self, *, src, metadata, metadata_group, times, cache_hit, **_):
        if self._prev is not None:
            self._prev(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)
        md = metadata if isinstance(metadata, dict) else getattr(metadata, "__dict__", {})
        name = str(md.get("name", getattr(src, "name", "?")))
        if cache_hit:
            self.hits += name in OUR_KERNELS
            return
        if name in OUR_KERNELS:
            self.compiled.append((name, str(md.get("hash", "?"))))
        else:
            self.others += 1
        if self.strict:
            raise CacheError(
                f"strict mode: Triton compiled kernel {name} during generate (the kernel cache does not hold it); "
                f"{self.fix}"
            )

    def __enter__(self) -> CompileCounter:
        self._prev = triton.knobs.compilation.listener
        triton.knobs.compilation.listener = self._listener
        return self

    def __exit__(self, *exc) -> None:
        triton.knobs.compilation.listener = self._prev

    @property
    def count(self) -> int:
        return len(self.compiled)


# ---- cross-compiling without a GPU ----


def parse_target(target: str) -> tuple[int, int]:
    """'sm_90' / 'sm90' / 'sm_90a' / '9.0' -> (9, 0)."""
    m = re.fullmatch(r"(?:sm_?)?(\d)\.?(\d)a?", target.strip().lower())
    if not m:
        raise CacheError(f"compile.target '{target}' is not an architecture; use e.g. sm_80, sm_89 or sm_90")
    cap = (int(m.group(1)), int(m.group(2)))
    if cap[0] * 10 + cap[1] not in SHARED_LIMIT:
        raise CacheError(f"compile.target '{target}': the kernels target sm_80, sm_86, sm_87, sm_89 and sm_90")
    return cap


@dataclass
class VariantReport:
    config: dict  # the KernelConfig's fields
    status: str  # "ok", "no fit" (compiles, too much shared memory to launch) or "failed"
    seconds: float
    shared_kib: float | None = None
    error: str | None = None


def cross_compile(
    target: str,
    *,
    dtype: torch.dtype,
    block_size: tuple[int, int],
    head_dim: int,
    return_lse: bool = False,
    qk_norm_rope_heads: int = 0,
) -> list[VariantReport]:
    """Compile every candidate config for `target` on this machine (no GPU needed; ptxas ships in the
    Triton wheel), and the fused q/k norm + RoPE kernel for `qk_norm_rope_heads` heads if not 0 (a report
    with config {"kernel": "qk_norm_rope"}). Uses a throw-away cache folder so that every variant really
    compiles."""
    from triton.backends.compiler import GPUTarget

    cap = parse_target(target)
    arch = cap[0] * 10 + cap[1]
    reports = []
    with tempfile.TemporaryDirectory(prefix="calibatt-xc-") as tmp, kernel_cache(tmp):
        jobs = [
            (cfg.to_manifest(), lambda cfg=cfg: dispatch.aot_source(cfg, dtype, block_size, head_dim, cap, return_lse))
            for cfg in dispatch.candidate_configs(cap, block_size, head_dim, dtype, return_lse=return_lse)
        ]
        if qk_norm_rope_heads:
            jobs.append(
                (
                    {"kernel": "qk_norm_rope", "heads": qk_norm_rope_heads},
                    lambda: _norm_rope_source(dtype, qk_norm_rope_heads, head_dim),
                )
            )
        for label, make_source in jobs:
            t0 = time.perf_counter()
            try:
                source, opts = make_source()
                kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=opts)
            except Exception as e:  # the report names the variant and the compiler's message
                msg = " ".join(str(e).split())[:300]
                reports.append(
                    VariantReport(label, "failed", time.perf_counter() - t0, None, f"{type(e).__name__}: {msg}")
                )
                continue
            shared = int(getattr(kernel.metadata, "shared", 0) or 0)
            status = "ok" if shared <= SHARED_LIMIT[arch] else "no fit"
            reports.append(VariantReport(label, status, time.perf_counter() - t0, shared / 1024))
    return reports


@dataclass
class CrossResult:
    target: str
    dtype: str
    head_dim: int
    block_size: int
    variants: list[VariantReport]
    seconds: float

    @property
    def failed(self) -> list[VariantReport]:
        return [r for r in self.variants if r.status == "failed"]


def cross_compile_configs(cfg: Config) -> CrossResult:
    """`calibatt compile --target sm_XY`: compile every kernel config the tool can choose for that
    architecture, for the config's model (head dim, dtype) and block size."""
    target = cfg.compile.target
    ident = model_identity(cfg)
    if ident.head_dim not in (64, 128):
        raise CacheError(f"model '{ident.name}' has head dim {ident.head_dim}; the kernels serve 64 and 128 only")
    t0 = time.perf_counter()
    bs = cfg.calibration.block_size
    reports = cross_compile(
        target,
        dtype=getattr(torch, cfg.model.dtype),
        block_size=(bs, bs),
        head_dim=ident.head_dim,
        return_lse=ident.joint_attention,
        qk_norm_rope_heads=ident.heads if ident.qk_norm_rope else 0,
    )
    return CrossResult(target, cfg.model.dtype, ident.head_dim, bs, reports, time.perf_counter() - t0)


def _norm_rope_source(dtype: torch.dtype, heads: int, head_dim: int):
    from triton.compiler import ASTSource

    from calibatt_kernels import norm_rope

    sig, consts, attrs, opts = norm_rope.aot_source_args(dtype, heads, head_dim)
    return ASTSource(norm_rope.kernel_fn(), sig, consts, attrs), opts


def config_label(c: dict, block_size: tuple[int, int]) -> str:
    """A short name for a KernelConfig's fields, e.g. '128x64 w8 s3 persistent' (or another kernel's)."""
    if "kernel" in c:
        return f"{c['kernel']} ({c['heads']} heads)"
    tma = {None: "", True: " tma", False: " ptr"}[c.get("use_tma")]
    if c.get("gluon"):
        kind = "persistent" if c["persistent"] else "grid"
        return f"gluon {block_size[0]}x{block_size[1]} s{c['num_stages']} ws {kind}"
    return (
        f"{c.get('block_m') or block_size[0]}x{c.get('block_n') or block_size[1]} w{c['num_warps']} "
        f"s{c['num_stages']} {'persistent' if c['persistent'] else 'grid'}{tma}"
        f"{' ws' if c.get('warp_specialize') else ''}{' pipelined-qk' if c.get('pipeline_qk') else ''}"
    )
