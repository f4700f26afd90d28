"""`calibatt compile`: turn a mask bundle into a cache directory that `generate` loads as is.

Layout of a cache directory:
    manifest.json       bundle hash, model, grid, steps, device, versions, per-group figures and the
                        kernel config chosen per (bucket, layer)
    plan.safetensors    per (bucket, layer): key-block counts, row offsets, indices and an LPT schedule
    triton/             Triton's cache holding every kernel variant generate launches (GPU only)
On a GPU, compile measures the candidate kernel configs (`block_sparse.candidate_configs`) per mask group
on random q, k, v of the model's shape, keeps the fastest, and does so with Triton's cache pointed at
triton/, so the binaries land there and a later `generate` compiles nothing (see aot.py).
The directory is built beside its final path and renamed into place, under a lock, so a reader never
sees a half-written cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import save_file

import calibatt_kernels as ck
from calibatt_kernels import norm_rope
from calibatt_kernels.block_sparse import KernelConfig

from . import __version__, aot
from .attention import SparsePlan
from .bundle import check_bundle_matches, identity_mismatch, load_bundle
from .config import Config, resolve_input
from .errors import CacheError
from .models import model_identity

CACHE_SCHEMA = 3  # 3: compressed-row index (offsets + flat indices)
RECOMPILE = "run `calibatt compile --recompile`"


def device_info(device: str) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        return {"type": "cuda", "name": torch.cuda.get_device_name(idx), "capability": f"sm_{cap[0]}{cap[1]}"}
    return {"type": dev.type, "name": dev.type, "capability": None}


def software_versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency, but may be absent on odd platforms
        triton_version = None
    return {"calibatt": __version__, "torch": torch.__version__, "triton": triton_version}


@dataclass
class CompileResult:
    cache_dir: Path
    manifest: dict
    seconds: float
    reused: bool  # the cache was already up to date


def plan_tensors(masks: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """bool [buckets, layers, heads, Mq, Mk] -> the plan's tensors and one record per (bucket, layer)."""
    tensors, groups = {}, []
    nb, nl = masks.shape[:2]
    for b in range(nb):
        for layer in range(nl):
            ix = ck.mask_to_index(masks[b, layer])
            key = f"b{b}.l{layer}"
            tensors[f"{key}.counts"] = ix.counts[0]
            tensors[f"{key}.offsets"] = ix.offsets[0]
            tensors[f"{key}.indices"] = ix.indices
            tensors[f"{key}.schedule"] = ix.schedule
            groups.append({
                "bucket": b,
                "layer": layer,
                "density": float(masks[b, layer].float().mean()),
                "max_blocks_per_row": ix.max_blocks_per_row,
            })
    return tensors, groups


def plan_index(tensors: dict[str, torch.Tensor], keys: list[tuple[int, int]]) -> dict[tuple[int, int], ck.BlockIndex]:
    return {(b, layer): ck.BlockIndex(tensors[f"b{b}.l{layer}.counts"].unsqueeze(0),
                                      tensors[f"b{b}.l{layer}.offsets"].unsqueeze(0),
                                      tensors[f"b{b}.l{layer}.indices"],
                                      tensors[f"b{b}.l{layer}.schedule"]) for b, layer in keys}


def _time_ms(fn, reps: int) -> float:
    """Mean milliseconds of fn() on the current CUDA stream (one untimed call first)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


@dataclass
class TuneResult:
    configs: dict[tuple[int, int], KernelConfig]
    groups: dict[tuple[int, int], dict]  # per group: config, ms, dense_ms, speedup
    info: dict  # dense time, candidates, rejected candidates, seconds, compilations


def tune_kernels(index: dict[tuple[int, int], ck.BlockIndex], *, heads: int, tokens: int, head_dim: int,
                 dtype: torch.dtype, block_size: int, device: str | torch.device = "cuda",
                 batches: tuple[int, ...] = (1,), reps: int = 3, return_lse: bool = False) -> TuneResult:
    """Measure every candidate config on every (bucket, layer) mask with random q, k, v [B, H, N, D] laid
    out as the models hand them over ([B, N, H, D] storage), keep the fastest per group, and launch each
    winner once per batch size in `batches` (a batch of 1 and of B specialise differently). `return_lse`:
    the model's calls ask for the row log-sum-exp (joint attention), a kernel variant of its own.

    Call it inside `aot.kernel_cache(...)`: every binary it compiles lands in that folder."""
    from calibatt_kernels import block_sparse

    t0 = time.perf_counter()
    dev = torch.device(device)
    cap = torch.cuda.get_device_capability(dev)
    bs = (block_size, block_size)
    gen = torch.Generator(device=dev).manual_seed(0)

    def qkv(b: int):
        x = torch.randn(3, b, tokens, heads, head_dim, device=dev, dtype=dtype, generator=gen)
        return [t.transpose(1, 2) for t in x]

    q, k, v = qkv(batches[0])
    out = torch.empty_like(q)
    dense_ms = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    for fn in block_sparse.kernel_fns():  # a binary held in memory would never reach the folder
        aot.forget_compiled(fn)
    index = {key: ck.BlockIndex(ix.counts.to(dev), ix.offsets.to(dev), ix.indices.to(dev), ix.schedule.to(dev))
             for key, ix in index.items()}
    first = next(iter(index.values()))

    def run(ix, c, qq=q, kk=k, vv=v, oo=out):
        return block_sparse.block_sparse_attention_triton(qq, kk, vv, ix, block_size=bs, out=oo, config=c,
                                                          return_lse=return_lse)

    with aot.CompileCounter() as counter:
        usable, rejected = [], {}
        for c in block_sparse.candidate_configs(cap, bs, head_dim, dtype, return_lse=return_lse):
            try:  # compiles; a config that does not fit this GPU fails here (out of shared memory, ...)
                run(first, c)
                torch.cuda.synchronize(dev)
                usable.append(c)
            except Exception as e:
                rejected[aot.config_label(asdict(c), bs)] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if not usable:
            raise CacheError(f"no kernel config runs on this GPU ({rejected}); report this with the GPU's name")
        configs, groups = {}, {}
        for key, ix in index.items():
            times = [(_time_ms(lambda ix=ix, c=c: run(ix, c), reps), i) for i, c in enumerate(usable)]
            ms, best = min(times)
            configs[key] = usable[best]
            groups[key] = {"config": asdict(usable[best]), "ms": round(ms, 4), "dense_ms": round(dense_ms, 4),
                           "speedup": round(dense_ms / ms, 3) if ms > 0 else None,
                           "candidates_ms": [round(t, 4) for t, _ in times]}
        winners = set(configs.values())
        for b in batches[1:]:
            qb, kb, vb = qkv(b)
            ob = torch.empty_like(qb)
            for c in winners:
                run(first, c, qb, kb, vb, ob)
        if any(c.gluon and c.persistent for c in winners) and not return_lse:
            # v9's merge of split last-wave rows: into the cache whether or not these masks split (prewarm
            # launches it; generate's masks may split where these did not)
            from calibatt_kernels import split_merge

            split_merge.warm(dev, dtype, head_dim)
        torch.cuda.synchronize(dev)
    info = {"dense_ms": round(dense_ms, 4), "candidates": [asdict(c) for c in usable], "rejected": rejected,
            "winners": [asdict(c) for c in winners], "batches": list(batches), "tune_seconds":
            round(time.perf_counter() - t0, 2), "compilations": counter.count}
    return TuneResult(configs, groups, info)


def write_cache(cache_dir: Path, build: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """Finish a cache built in `build` (a temp folder beside cache_dir) and rename it into place."""
    triton_dir = build / "triton"
    triton_dir.mkdir(exist_ok=True)
    aot.relink_groups(triton_dir, absolute=False)  # no build path may leak into the cache
    manifest.setdefault("kernels", {})["triton_files"] = len(list(triton_dir.glob("*/__grp__*.json")))
    save_file(tensors, str(build / "plan.safetensors"))
    (build / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _swap_in(build, cache_dir)


def kernel_class(cfg: Config, ident) -> dict:
    """What the compiled binaries depend on beyond device and versions."""
    return {"dtype": cfg.model.dtype, "head_dim": ident.head_dim, "batches": [1], "lse": ident.joint_attention,
            "qk_norm_rope": ident.qk_norm_rope}


def compile_cache(cfg: Config, *, bundle_path: str | None = None, cache_dir: str | None = None,
                  recompile: bool = False) -> CompileResult:
    bundle_path = resolve_input(bundle_path or cfg.compile.bundle, cfg)
    cache_dir = Path(cache_dir or cfg.compile.cache_dir)
    if cfg.compile.target is not None:
        raise CacheError(f"compile.target={cfg.compile.target} cross-compiles the kernels only (no cache); use "
                         f"`calibatt compile --target {cfg.compile.target}`, or leave compile.target unset here")
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path)
    ident = model_identity(cfg)
    grid = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    check_bundle_matches(bundle, where=f"bundle '{bundle_path}'", model_name=ident.name, model_hash=ident.model_hash,
                         grid=grid, steps=cfg.generate.steps, block_size=cfg.calibration.block_size,
                         layers=ident.layers, heads=ident.heads)
    parent = cache_dir.parent if str(cache_dir.parent) else Path(".")
    if not parent.is_dir():
        raise CacheError(f"cache folder's parent '{parent}' does not exist; create it or choose another --cache-dir")
    if cache_dir.exists() and not (cache_dir / "manifest.json").is_file():
        if not cache_dir.is_dir() or any(cache_dir.iterdir()):
            raise CacheError(f"'{cache_dir}' exists and is not a calibatt cache; choose another --cache-dir")

    device = torch.device(cfg.model.device)
    tuned = device.type == "cuda" and ck.triton_usable(device) and ident.head_dim in (64, 128)
    manifest = {
        "schema_version": CACHE_SCHEMA,
        "bundle": {"path": str(bundle_path), "content_hash": bundle.content_hash},
        "model": dict(bundle.meta["model"]),
        "grid": bundle.meta["grid"],
        "block_size": bundle.block_size,
        "steps": bundle.meta["steps"],
        "step_buckets": bundle.step_buckets,
        "device": device_info(cfg.model.device),
        "versions": software_versions(),
        "kernel_class": kernel_class(cfg, ident),
        "kernels": {"backend": "triton" if ck.triton_usable(device) else "reference", "tuned": tuned},
    }
    with FileLock(str(cache_dir) + ".lock"):
        if not recompile and _up_to_date(cache_dir, manifest):
            old = json.loads((cache_dir / "manifest.json").read_text())
            return CompileResult(cache_dir, old, time.perf_counter() - t0, True)
        tensors, groups = plan_tensors(bundle.masks)
        build = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=parent))
        try:
            if tuned:
                keys = [(g["bucket"], g["layer"]) for g in groups]
                with aot.kernel_cache(build / "triton"):
                    res = tune_kernels(plan_index(tensors, keys), heads=ident.heads, tokens=grid[0] * grid[1] * grid[2],
                                       head_dim=ident.head_dim, dtype=getattr(torch, cfg.model.dtype),
                                       block_size=bundle.block_size, device=device,
                                       return_lse=ident.joint_attention)
                    if ident.qk_norm_rope:
                        aot.forget_compiled(norm_rope.kernel_fn())
                        warm_qk_norm_rope(heads=ident.heads, head_dim=ident.head_dim,
                                          dtype=getattr(torch, cfg.model.dtype), device=device)
                for g in groups:
                    g.update(res.groups[(g["bucket"], g["layer"])])
                manifest["kernels"].update(res.info)
            manifest["groups"] = groups
            # the masks' index as stored (compressed rows: it follows the kept blocks); on the device each
            # layer's buckets are padded to its longest, a little more
            manifest["index_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
            write_cache(cache_dir, build, tensors, manifest)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return CompileResult(cache_dir, manifest, time.perf_counter() - t0, False)


def _up_to_date(cache_dir: Path, manifest: dict) -> bool:
    try:
        old = json.loads((cache_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    keys = ("schema_version", "bundle", "model", "grid", "step_buckets", "device", "versions", "kernel_class")
    return all(old.get(k) == manifest[k] for k in keys) and (cache_dir / "plan.safetensors").is_file()


def _swap_in(tmp: Path, cache_dir: Path) -> None:
    """Replace cache_dir by tmp with renames only (a directory cannot be renamed over a non-empty one)."""
    old = None
    if cache_dir.exists():
        old = cache_dir.with_name(f".{cache_dir.name}.old-{os.getpid()}")
        os.replace(cache_dir, old)
    os.replace(tmp, cache_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _reading(cache_dir: Path):
    """Hold the cache's lock while reading it, so a concurrent compile never swaps it mid-read (a
    read-only location, where no lock file can be made, is read without it)."""
    try:
        lock = FileLock(str(cache_dir) + ".lock")
        lock.acquire(timeout=600)
    except (OSError, Timeout):
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _bundle_hash(path: Path) -> str | None:
    """The content hash a bundle file records (its header only: cheap), or None if unreadable."""
    from .bundle import META_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])["content_hash"]
    except Exception:  # a missing or odd bundle is compile's business, not generate's
        return None


def read_plan(cache_dir: Path, manifest: dict) -> SparsePlan:
    """The plan of a cache on the CPU, with the kernel config chosen per (bucket, layer)."""
    keys = [(g["bucket"], g["layer"]) for g in manifest["groups"]]
    try:
        with safe_open(str(cache_dir / "plan.safetensors"), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        index = plan_index(tensors, keys)
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise CacheError(f"cache plan in '{cache_dir}' is corrupt or incomplete ({type(e).__name__}); "
                         f"{RECOMPILE}") from None
    nb = 1 + max(manifest["step_buckets"])
    density = torch.tensor([[g["density"] for g in manifest["groups"] if g["bucket"] == b] for b in range(nb)])
    density = density.unsqueeze(-1)  # [buckets, layers, 1]: per-group figures
    configs = {(g["bucket"], g["layer"]): KernelConfig(**g["config"]) for g in manifest["groups"] if g.get("config")}
    return SparsePlan(manifest["block_size"], manifest["step_buckets"], index, density, configs)


def check_kernels(cache_dir: Path, manifest: dict, device: str) -> None:
    """Refuse a cache whose kernels were built for another GPU architecture or Triton, naming the
    difference and the fix."""
    dev = device_info(device)
    built = manifest["device"]
    if (built["type"], built.get("capability")) != (dev["type"], dev.get("capability")):
        raise CacheError(f"cache '{cache_dir}' was compiled for {built['name']} ({built.get('capability')}), this run "
                         f"uses {dev['name']} ({dev.get('capability')}); {RECOMPILE} here")
    was, now = manifest["versions"].get("triton"), software_versions()["triton"]
    if was != now:
        raise CacheError(f"cache '{cache_dir}' was compiled with triton {was}, this run has triton {now}; "
                         f"{RECOMPILE}")
    want = manifest["kernels"].get("triton_files", 0)
    have = len(list((cache_dir / "triton").glob("*/__grp__*.json")))
    if have < want:
        raise CacheError(f"cache '{cache_dir}' should hold {want} compiled kernels in triton/, it holds {have}; "
                         f"{RECOMPILE}")


def load_cache(cfg: Config, cache_dir: str | Path | None = None) -> tuple[SparsePlan, dict]:
    """Load and validate a cache for this config; the plan comes back on the model's device."""
    cache_dir = Path(cache_dir or cfg.compile.cache_dir)
    fix = "run `calibatt compile` (add --recompile to rebuild)"
    mpath = cache_dir / "manifest.json"
    if not mpath.is_file():
        raise CacheError(f"no compiled cache at '{cache_dir}'; {fix}")
    with _reading(cache_dir):
        try:
            manifest = json.loads(mpath.read_text())
            schema = manifest["schema_version"]
        except (ValueError, KeyError, TypeError):
            raise CacheError(f"cache manifest '{mpath}' is corrupt; {fix}") from None
        if schema != CACHE_SCHEMA:
            raise CacheError(f"cache '{cache_dir}' has schema {schema}, this calibatt reads {CACHE_SCHEMA}; "
                             f"{RECOMPILE}")
        ident = model_identity(cfg)
        grid = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
        problem = identity_mismatch(manifest, where=f"cache '{cache_dir}'", verb="built", model_name=ident.name,
                                    model_hash=ident.model_hash, grid=grid, steps=cfg.generate.steps)
        if problem:
            raise CacheError(f"{problem}; calibrate and compile for this config")
        bundle_path = resolve_input(cfg.compile.bundle, cfg)
        now = _bundle_hash(bundle_path) if bundle_path.is_file() else None
        if now is not None and now != manifest["bundle"]["content_hash"]:
            raise CacheError(f"cache '{cache_dir}' was compiled from bundle {manifest['bundle']['content_hash'][:12]} "
                             f"('{manifest['bundle']['path']}'), compile.bundle '{bundle_path}' is {now[:12]}; "
                             f"{RECOMPILE}")
        check_kernels(cache_dir, manifest, cfg.model.device)
        if manifest["kernel_class"]["dtype"] != cfg.model.dtype:
            raise CacheError(f"cache '{cache_dir}' was compiled for {manifest['kernel_class']['dtype']}, model.dtype "
                             f"is {cfg.model.dtype}; {RECOMPILE}")
        plan = read_plan(cache_dir, manifest)
    return plan.to(torch.device(cfg.model.device)), manifest


# ---- cross-compiling (no GPU needed) ----

@dataclass
class CrossResult:
    target: str
    dtype: str
    head_dim: int
    block_size: int
    variants: list[aot.VariantReport]
    seconds: float

    @property
    def failed(self) -> list[aot.VariantReport]:
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
    reports = aot.cross_compile(target, dtype=getattr(torch, cfg.model.dtype), block_size=(bs, bs),
                                head_dim=ident.head_dim, return_lse=ident.joint_attention,
                                qk_norm_rope_heads=ident.heads if ident.qk_norm_rope else 0)
    return CrossResult(target, cfg.model.dtype, ident.head_dim, bs, reports, time.perf_counter() - t0)


def warm_qk_norm_rope(*, heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device) -> None:
    """Run the fused q/k norm + RoPE kernel once at the model's channel count and dtype: the binary every
    call of the model runs (token count, strides and eps are not specialised on; weights and tables are
    always fp32)."""
    dev = torch.device(device)
    x = torch.zeros(2, 1, 16, heads * head_dim, device=dev, dtype=dtype)
    w = torch.ones(heads * head_dim, device=dev, dtype=dtype)
    table = torch.zeros(16, head_dim, device=dev)
    ck.qk_norm_rope(x[0], x[1], w, w, table, table, heads=heads, eps=1e-6)


def prewarm(plan: SparsePlan, *, heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device,
            return_lse: bool = False, qk_norm_rope: bool = False) -> float:
    """Launch every kernel config of the plan once on a one-block input of the model's heads, head dim and
    dtype (the same specialisation as the real calls), and the fused q/k norm + RoPE kernel if the model
    uses it, so that the binaries are loaded from the cache before sampling: the first denoising step then
    costs what the later ones do. Returns seconds."""
    dev = torch.device(device)
    if dev.type != "cuda" or not ck.triton_usable(dev) or head_dim not in (64, 128):
        return 0.0
    t0 = time.perf_counter()
    if qk_norm_rope:
        warm_qk_norm_rope(heads=heads, head_dim=head_dim, dtype=dtype, device=dev)
    bs = (plan.block_size, plan.block_size)
    x = torch.zeros(3, 1, plan.block_size, heads, head_dim, device=dev, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in x)
    one = ck.mask_to_index(torch.ones(heads, 1, 1, dtype=torch.bool, device=dev))
    for c in set(plan.configs.values()) or {None}:
        ck.block_sparse_attention_indexed(q, k, v, one, block_size=bs, config=c, return_lse=return_lse)
    if any(c is not None and c.gluon and c.persistent for c in plan.configs.values()) and not return_lse:
        # v9's records (its last wave split, made once per index) and the merge of split rows: else the first
        # step pays for them
        from calibatt_kernels import block_sparse, block_sparse_gluon, split_merge

        if block_sparse_gluon.supports(q, k, v, bs):
            for key, c in plan.configs.items():
                if c is not None and c.gluon and c.persistent and key in plan.index:
                    block_sparse.gluon_records(plan.index[key], dev, True)
            split_merge.warm(dev, dtype, head_dim)
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
