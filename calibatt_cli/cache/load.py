"""Reading a cache: validate it against this config, machine and software, read its plan, and prewarm the
kernels it holds so that the first denoising step costs what the later ones do.

Builder and reader share the cache's lock file (`cache_lock`): generate holds it shared for as long as it
uses the cache, compile exclusive while it builds and swaps, so a compile never replaces a cache in use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

import calibatt_kernels as ck

from .. import __version__, records
from ..bundle import META_KEY, META_SPEC, check_header_length, check_identity
from ..config import Config, cache_paths
from ..errors import CacheError
from ..runtime import SparsePlan, group_configs, plan_index
from ..util import sha256_hex

CACHE_SCHEMA = 4  # 4: the cache folder is a link to a versioned build; card and kernel-source identity
RECOMPILE = "run `calibatt compile --recompile`"
LOCK_TIMEOUT = 600.0  # seconds a generate waits for a running compile (and a compile for running generates)
log = logging.getLogger(__name__)

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
    """The card a cache is built for: name, architecture and SM count (the tuned configs and the persistent
    kernels' grids depend on the SM count, not only on the architecture)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"sm_{props.major}{props.minor}",
            "sm_count": props.multi_processor_count,
        }
    return {"type": dev.type, "name": dev.type, "capability": None, "sm_count": None}


def kernel_source_hash() -> str:
    """sha256 over the kernels' Python sources (calibatt_kernels/*.py, by name): an edited kernel must not
    meet binaries built from the old one."""
    root = Path(ck.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def software_versions() -> dict:
    import triton

    return {
        "calibatt": __version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "kernels_source": kernel_source_hash(),
    }


def lock_file(cache_dir: Path) -> Path:
    """The lock a compile holds exclusive while it builds and swaps, and a generate shared while it reads."""
    return Path(str(cache_dir) + ".lock")


@contextlib.contextmanager
def cache_lock(cache_dir: Path, *, shared: bool, timeout: float | None = None) -> Iterator[str]:
    """Hold the cache's lock (flock: shared for readers, exclusive for a compile); yields how it is held:
    "shared", "exclusive", or "none (read-only location)" where no lock file can be made, which the caller
    reports. A lock not had within `timeout` seconds is a one-line error, never a read without it. The lock
    file is removed by its last holder: one who finds the file replaced or removed after locking it locks
    the new one instead."""
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    path = lock_file(cache_dir)
    what = "compile" if shared else "generate or compile"
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and shared:
                log.warning("cache '%s': read-only location, read without a lock", cache_dir)
                yield "none (read-only location)"
                return
            raise CacheError(f"cannot create the cache lock '{path}' ({e.strerror}); check the folder") from None
        got = False
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                got = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        if not got:
            os.close(fd)
            raise CacheError(
                f"cache '{cache_dir}' is locked by a running {what} (waited {timeout:.0f} s on '{path}'); "
                f"try again when it has finished"
            )
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its last holder removed it after we opened it: lock the current file
    try:
        yield "shared" if shared else "exclusive"
    finally:
        try:  # the last holder (an exclusive lock is had at once) removes the file
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def _bundle_hash(path: Path) -> str | None:
    """The content hash a bundle file records (its header only: cheap). None when the file does not exist:
    the cache holds everything generate needs, and a cache moved to another machine without its bundle is
    still usable. A bundle that exists but cannot be read is an error: the check must not be skipped."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])["content_hash"]
    except Exception as e:  # safetensors raises several types for a truncated or foreign file
        raise CacheError(
            f"compile.bundle '{path}' cannot be read ({type(e).__name__}), so the cache cannot be checked "
            f"against it; fix or remove the file, or point compile.bundle at the bundle the cache was built from"
        ) from None


def _manifest_inconsistency(manifest: dict) -> str | None:
    """What in a well-typed manifest disagrees with itself, or None: the groups must cover every (bucket,
    layer) of the step buckets once."""
    buckets = manifest["step_buckets"]
    nb = 1 + max(buckets, default=-1)
    # sizes are compared before any range is built from them: a corrupt 10**40 must not become a list
    if not (len(buckets) == manifest["steps"] and 1 <= nb <= len(buckets)) or set(buckets) - {-1} != set(range(nb)):
        return f"its step_buckets ({len(buckets)} entries) do not map {manifest['steps']} steps onto buckets 0..n-1"
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
        configs = group_configs(manifest["groups"])
    except CacheError:
        raise
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise CacheError(f"{broken} ({type(e).__name__}); {RECOMPILE}") from None
    nb = 1 + max(manifest["step_buckets"])
    density = torch.tensor([[g["density"] for g in manifest["groups"] if g["bucket"] == b] for b in range(nb)])
    density = density.unsqueeze(-1)  # [buckets, layers, 1]: per-group figures
    # caches built before the guard carry no epsilon: the plan has none and generate runs unguarded
    epsilon = manifest.get("epsilon")
    dense = frozenset((g["bucket"], g["layer"]) for g in manifest["groups"] if g.get("attention") == "dense")
    return SparsePlan(manifest["block_size"], manifest["step_buckets"], index, density, configs, epsilon, dense)


def check_kernels(cache_dir: Path, manifest: dict, device: str) -> None:
    """Refuse a cache built for another card (name, architecture, SM count) or other software (calibatt,
    torch, Triton, the kernels' sources), naming the field that differs and the fix: its binaries and tuned
    configs would otherwise be JIT-compiled or wrong at step 1."""
    dev = device_info(device)
    built = manifest["device"]
    for field in ("type", "name", "capability", "sm_count"):
        if built.get(field) != dev.get(field):
            raise CacheError(
                f"cache '{cache_dir}' was compiled for {built['name']} ({built.get('capability')}, "
                f"{built.get('sm_count')} SMs), this run uses {dev['name']} ({dev.get('capability')}, "
                f"{dev.get('sm_count')} SMs): device {field} differs; {RECOMPILE} here"
            )
    now = software_versions()
    for field, have in now.items():
        was = manifest["versions"].get(field)
        if was != have:
            name = "the kernels' source hash" if field == "kernels_source" else field
            raise CacheError(
                f"cache '{cache_dir}' was compiled with {name} {was}, this run has {name} {have}; {RECOMPILE}"
            )
    want = manifest["kernels"].get("triton_files", 0)
    have = len(list((cache_dir / "triton").glob("*/__grp__*.json")))
    if have < want:
        raise CacheError(
            f"cache '{cache_dir}' should hold {want} compiled kernels in triton/, it holds {have}; {RECOMPILE}"
        )


@dataclass
class OpenCache:
    """A validated cache, held (see open_cache): `folder` is the build the cache path points at."""

    plan: SparsePlan  # on the model's device
    manifest: dict
    folder: Path
    lock: str  # how the cache is locked: "shared", or "none (read-only location)"


@contextlib.contextmanager
def open_cache(cfg: Config, cache_dir: str | Path | None = None) -> Iterator[OpenCache]:
    """Validate and read a cache for this config, and hold its lock shared while the block runs: a compile
    waits until the caller no longer uses the cache's files (its Triton binaries, compiled blocks)."""
    bundle_path, cache_dir = cache_paths(cfg, cache_dir=cache_dir)
    fix = "run `calibatt compile` (add --recompile to rebuild)"
    if not (cache_dir / "manifest.json").is_file():
        raise CacheError(f"no compiled cache at '{cache_dir}'; {fix}")
    with cache_lock(cache_dir, shared=True) as lock:
        folder = cache_dir.resolve()  # the build it links to now: a later swap does not move it under us
        mpath = folder / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text())
            schema = manifest["schema_version"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
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
        now = _bundle_hash(bundle_path)
        if now is not None and now != manifest["bundle"]["content_hash"]:
            raise CacheError(
                f"cache '{cache_dir}' was compiled from bundle {manifest['bundle']['content_hash'][:12]} "
                f"('{manifest['bundle']['path']}'), compile.bundle '{bundle_path}' is {now[:12]}; "
                f"{RECOMPILE}"
            )
        check_kernels(folder, manifest, cfg.model.device)
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
        plan = read_plan(folder, manifest)
        yield OpenCache(plan.to(torch.device(cfg.model.device)), manifest, folder, lock)


def load_cache(cfg: Config, cache_dir: str | Path | None = None) -> tuple[SparsePlan, dict]:
    """Load and validate a cache for this config (its lock held while reading); the plan comes back on the
    model's device."""
    with open_cache(cfg, cache_dir) as c:
        return c.plan, c.manifest


def warm_qk_norm_rope(
    *, heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device, precision: str = "bf16"
) -> None:
    """Run the fused q/k norm + RoPE kernel once at the model's channel count and dtype: the binary every
    call of the model runs (token count, strides and eps are not specialised on; weights and tables are
    always fp32). With precision fp8 also its variant that quantizes q (what fp8's sparse steps run)."""
    dev = torch.device(device)
    x = torch.zeros(2, 1, 16, heads * head_dim, device=dev, dtype=dtype)
    w = torch.ones(heads * head_dim, device=dev, dtype=dtype)
    table = torch.zeros(16, head_dim, device=dev)
    ck.qk_norm_rope(x[0], x[1], w, w, table, table, heads=heads, eps=1e-6)
    if precision == "fp8" and head_dim in (64, 128):
        ck.attn_fp8.qk_norm_rope_quant(x[0], x[1], w, w, table, table, heads=heads, eps=1e-6)


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
        warm_qk_norm_rope(heads=heads, head_dim=head_dim, dtype=dtype, device=dev, precision=precision)
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
