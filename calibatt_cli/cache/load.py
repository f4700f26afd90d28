"""Reading a cache: validate it against this config, machine and software, read its plan, and prewarm the
kernels it holds so that the first denoising step costs what the later ones do.

Builder and reader share the cache's lock file: a reader holds it while reading, so a concurrent compile
never swaps the folder mid-read.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open

import calibatt_kernels as ck
from calibatt_kernels import KernelConfig

from .. import __version__, records
from ..bundle import META_KEY, META_SPEC, check_header_length, check_identity
from ..config import Config, resolve_input
from ..errors import CacheError
from ..runtime import SparsePlan, plan_index
from ..util import sha256_hex

CACHE_SCHEMA = 3  # 3: compressed-row index (offsets + flat indices)
RECOMPILE = "run `calibatt compile --recompile`"

# What load_cache requires of a manifest; the code that reads a cache relies on nothing else.
MANIFEST_SPEC = {
    "bundle": {"path": str, "content_hash": str},
    "model": META_SPEC["model"],
    "grid": {"tokens": [int]},
    "block_size": int,
    "steps": int,
    "sampling": META_SPEC["sampling"],
    "epsilon": (float, None),
    "step_buckets": [int],
    "device": {"type": str, "name": str},
    "versions": dict,
    "kernel_class": {"dtype": str},
    "kernels": {"triton_files": int},
    "groups": [{"bucket": int, "layer": int, "density": float}],
    "plan_sha256": str,
}


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


def lock_file(cache_dir: Path) -> str:
    """The lock a compile holds while it builds and swaps, and a reader while it reads."""
    return str(cache_dir) + ".lock"


@contextlib.contextmanager
def _reading(cache_dir: Path):
    """Hold the cache's lock while reading it, so a concurrent compile never swaps it mid-read (a
    read-only location, where no lock file can be made, is read without it)."""
    try:
        lock = FileLock(lock_file(cache_dir))
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
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])["content_hash"]
    except Exception:  # a missing or odd bundle is compile's business, not generate's
        return None


def _manifest_inconsistency(manifest: dict) -> str | None:
    """What in a well-typed manifest disagrees with itself, or None: the groups must cover every (bucket,
    layer) of the step buckets once."""
    buckets = manifest["step_buckets"]
    nb = 1 + max(buckets, default=-1)
    # sizes are compared before any range is built from them: a corrupt 10**40 must not become a list
    if not (len(buckets) == manifest["steps"] and 1 <= nb <= len(buckets)) or set(buckets) - {-1} != set(range(nb)):
        return f"step_buckets {buckets[:8]}... do not map {manifest['steps']} steps onto buckets 0..n-1"
    keys = [(g["bucket"], g["layer"]) for g in manifest["groups"]]
    layers = 1 + max((layer for _, layer in keys), default=-1)
    cover = nb * layers == len(keys) and sorted(keys) == [(b, layer) for b in range(nb) for layer in range(layers)]
    if manifest["block_size"] < 1 or not cover:
        return f"its groups do not cover {nb} buckets x {layers} layers once each"
    return None


def read_plan(cache_dir: Path, manifest: dict) -> SparsePlan:
    """The plan of a cache on the CPU, with the kernel config chosen per (bucket, layer)."""
    keys = [(g["bucket"], g["layer"]) for g in manifest["groups"]]
    path = cache_dir / "plan.safetensors"
    broken = f"cache plan in '{cache_dir}' is corrupt or incomplete"
    try:
        check_header_length(path, CacheError, RECOMPILE)
        if sha256_hex(path.read_bytes()) != manifest["plan_sha256"]:
            raise CacheError(f"{broken} (it fails the manifest's plan_sha256); {RECOMPILE}")
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        index = plan_index(tensors, keys)
        configs = {
            (g["bucket"], g["layer"]): KernelConfig.from_manifest(g["config"])
            for g in manifest["groups"]
            if g.get("config")
        }
    except CacheError:
        raise
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise CacheError(f"{broken} ({type(e).__name__}); {RECOMPILE}") from None
    nb = 1 + max(manifest["step_buckets"])
    density = torch.tensor([[g["density"] for g in manifest["groups"] if g["bucket"] == b] for b in range(nb)])
    density = density.unsqueeze(-1)  # [buckets, layers, 1]: per-group figures
    # caches built before the guard carry no epsilon: the plan has none and generate runs unguarded
    epsilon = manifest.get("epsilon")
    return SparsePlan(manifest["block_size"], manifest["step_buckets"], index, density, configs, epsilon)


def check_kernels(cache_dir: Path, manifest: dict, device: str) -> None:
    """Refuse a cache whose kernels were built for another GPU architecture or Triton, naming the
    difference and the fix."""
    dev = device_info(device)
    built = manifest["device"]
    if (built["type"], built.get("capability")) != (dev["type"], dev.get("capability")):
        raise CacheError(
            f"cache '{cache_dir}' was compiled for {built['name']} ({built.get('capability')}), this run "
            f"uses {dev['name']} ({dev.get('capability')}); {RECOMPILE} here"
        )
    was, now = manifest["versions"].get("triton"), software_versions()["triton"]
    if was != now:
        raise CacheError(f"cache '{cache_dir}' was compiled with triton {was}, this run has triton {now}; {RECOMPILE}")
    want = manifest["kernels"].get("triton_files", 0)
    have = len(list((cache_dir / "triton").glob("*/__grp__*.json")))
    if have < want:
        raise CacheError(
            f"cache '{cache_dir}' should hold {want} compiled kernels in triton/, it holds {have}; {RECOMPILE}"
        )


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
        except (ValueError, KeyError, TypeError, RecursionError):
            raise CacheError(f"cache manifest '{mpath}' is corrupt; {fix}") from None
        if schema != CACHE_SCHEMA:
            raise CacheError(
                f"cache '{cache_dir}' has schema {schema}, this calibatt reads {CACHE_SCHEMA}; {RECOMPILE}"
            )
        problem = records.problem(manifest, MANIFEST_SPEC) or _manifest_inconsistency(manifest)
        if problem:
            raise CacheError(f"cache manifest '{mpath}' is inconsistent ({problem}); {RECOMPILE}")
        where, fix = f"cache '{cache_dir}'", "calibrate and compile for this config"
        check_identity(manifest, cfg, where=where, verb="built", fix=fix, error=CacheError)
        bundle_path = resolve_input(cfg.compile.bundle, cfg)
        now = _bundle_hash(bundle_path) if bundle_path.is_file() else None
        if now is not None and now != manifest["bundle"]["content_hash"]:
            raise CacheError(
                f"cache '{cache_dir}' was compiled from bundle {manifest['bundle']['content_hash'][:12]} "
                f"('{manifest['bundle']['path']}'), compile.bundle '{bundle_path}' is {now[:12]}; "
                f"{RECOMPILE}"
            )
        check_kernels(cache_dir, manifest, cfg.model.device)
        if manifest["kernel_class"]["dtype"] != cfg.model.dtype:
            raise CacheError(
                f"cache '{cache_dir}' was compiled for {manifest['kernel_class']['dtype']}, model.dtype "
                f"is {cfg.model.dtype}; {RECOMPILE}"
            )
        built = manifest.get("precision", "bf16")
        if built != cfg.generate.precision:
            raise CacheError(
                f"cache '{cache_dir}' was compiled for precision {built}, generate.precision is "
                f"{cfg.generate.precision}; run `calibatt compile --set compile.precision={cfg.generate.precision}` "
                f"(or set generate.precision={built})"
            )
        plan = read_plan(cache_dir, manifest)
    return plan.to(torch.device(cfg.model.device)), manifest


def warm_qk_norm_rope(*, heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device) -> None:
    """Run the fused q/k norm + RoPE kernel once at the model's channel count and dtype: the binary every
    call of the model runs (token count, strides and eps are not specialised on; weights and tables are
    always fp32)."""
    dev = torch.device(device)
    x = torch.zeros(2, 1, 16, heads * head_dim, device=dev, dtype=dtype)
    w = torch.ones(heads * head_dim, device=dev, dtype=dtype)
    table = torch.zeros(16, head_dim, device=dev)
    ck.qk_norm_rope(x[0], x[1], w, w, table, table, heads=heads, eps=1e-6)


def prewarm(
    plan: SparsePlan,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
    return_lse: bool = False,
    qk_norm_rope: bool = False,
    precision: str = "bf16",
) -> float:
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
    ck.dispatch.prewarm_attention(
        heads=heads,
        head_dim=head_dim,
        dtype=dtype,
        device=dev,
        block_size=plan.block_size,
        configs=plan.configs,
        index=plan.index,
        return_lse=return_lse,
        precision=precision,
    )
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
