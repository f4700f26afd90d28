"""`calibatt compile`: turn a mask bundle into a cache directory that `generate` loads as is.

Layout of a cache directory:
    manifest.json       bundle hash, model, grid, steps, device, versions, per-group figures
    plan.safetensors    per (bucket, layer): key-block counts, indices and an LPT schedule
    triton/             room for ahead-of-time compiled GPU kernels (Triton's cache)
The directory is built beside its final path and renamed into place, under a lock, so a reader never
sees a half-written cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

import calibatt_kernels as ck

from . import __version__
from .attention import SparsePlan
from .bundle import MaskBundle, check_bundle_matches, load_bundle
from .config import Config, resolve_input
from .errors import CacheError
from .models import model_identity

CACHE_SCHEMA = 1


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


def _plan_tensors(bundle: MaskBundle) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, groups = {}, []
    nb, nl = bundle.masks.shape[:2]
    for b in range(nb):
        for layer in range(nl):
            ix = ck.mask_to_index(bundle.masks[b, layer])
            key = f"b{b}.l{layer}"
            tensors[f"{key}.counts"] = ix.counts[0]
            tensors[f"{key}.indices"] = ix.indices[0]
            tensors[f"{key}.schedule"] = ix.schedule
            groups.append({
                "bucket": b,
                "layer": layer,
                "density": float(bundle.masks[b, layer].float().mean()),
                "max_blocks_per_row": ix.num_key_blocks,
            })
    return tensors, groups


def compile_cache(cfg: Config, *, bundle_path: str | None = None, cache_dir: str | None = None,
                  recompile: bool = False) -> CompileResult:
    bundle_path = resolve_input(bundle_path or cfg.compile.bundle, cfg)
    cache_dir = Path(cache_dir or cfg.compile.cache_dir)
    if cfg.compile.target is not None:
        raise CacheError(f"compile.target={cfg.compile.target}: cross-compiling GPU kernels is not available in this "
                         f"version; leave compile.target unset")
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
        "kernels": {"backend": "triton" if ck.triton_usable(torch.device(cfg.model.device)) else "reference"},
    }
    with FileLock(str(cache_dir) + ".lock"):
        if not recompile and _up_to_date(cache_dir, manifest):
            old = json.loads((cache_dir / "manifest.json").read_text())
            return CompileResult(cache_dir, old, time.perf_counter() - t0, True)
        tensors, groups = _plan_tensors(bundle)
        manifest["groups"] = groups
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=parent))
        try:
            (tmp / "triton").mkdir()
            save_file(tensors, str(tmp / "plan.safetensors"))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _swap_in(tmp, cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return CompileResult(cache_dir, manifest, time.perf_counter() - t0, False)


def _up_to_date(cache_dir: Path, manifest: dict) -> bool:
    try:
        old = json.loads((cache_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    keys = ("schema_version", "bundle", "model", "grid", "step_buckets", "device", "versions")
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


def load_cache(cfg: Config, cache_dir: str | Path | None = None) -> tuple[SparsePlan, dict]:
    """Load and validate a cache for this config; the plan comes back on the model's device."""
    cache_dir = Path(cache_dir or cfg.compile.cache_dir)
    fix = "run `calibatt compile` (add --recompile to rebuild)"
    mpath = cache_dir / "manifest.json"
    if not mpath.is_file():
        raise CacheError(f"no compiled cache at '{cache_dir}'; {fix}")
    try:
        manifest = json.loads(mpath.read_text())
        schema = manifest["schema_version"]
    except (ValueError, KeyError, TypeError):
        raise CacheError(f"cache manifest '{mpath}' is corrupt; {fix}") from None
    if schema != CACHE_SCHEMA:
        raise CacheError(f"cache '{cache_dir}' has schema {schema}, this calibatt reads {CACHE_SCHEMA}; {fix}")
    ident = model_identity(cfg)
    grid = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    if manifest["model"]["hash"] != ident.model_hash:
        raise CacheError(f"cache '{cache_dir}' was built for model '{manifest['model']['name']}' "
                         f"(hash {manifest['model']['hash']}), the config loads '{ident.name}' (hash "
                         f"{ident.model_hash}); calibrate and compile for this model")
    if list(manifest["grid"]["tokens"]) != grid:
        raise CacheError(f"cache '{cache_dir}' was built for token grid {manifest['grid']['tokens']}, the config's "
                         f"video gives {grid}; calibrate and compile for this video size")
    if len(manifest["step_buckets"]) != cfg.generate.steps:
        raise CacheError(f"cache '{cache_dir}' was built for {len(manifest['step_buckets'])} steps, generate.steps is "
                         f"{cfg.generate.steps}; calibrate and compile with this step count")
    dev = device_info(cfg.model.device)
    built = manifest["device"]
    if (built["type"], built.get("capability")) != (dev["type"], dev.get("capability")):
        raise CacheError(f"cache '{cache_dir}' was compiled for {built['name']} ({built.get('capability')}), this run "
                         f"uses {dev['name']} ({dev.get('capability')}); run `calibatt compile --recompile` here")
    nb = 1 + max(manifest["step_buckets"])
    index = {}
    try:
        with safe_open(str(cache_dir / "plan.safetensors"), framework="pt") as f:
            for b in range(nb):
                for layer in range(ident.layers):
                    key = f"b{b}.l{layer}"
                    index[(b, layer)] = ck.BlockIndex(
                        f.get_tensor(f"{key}.counts").unsqueeze(0),
                        f.get_tensor(f"{key}.indices").unsqueeze(0),
                        f.get_tensor(f"{key}.schedule"),
                    )
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise CacheError(f"cache plan in '{cache_dir}' is corrupt or incomplete ({type(e).__name__}); "
                         f"run `calibatt compile --recompile`") from None
    density = torch.tensor([[g["density"] for g in manifest["groups"] if g["bucket"] == b] for b in range(nb)])
    density = density.unsqueeze(-1)  # [buckets, layers, 1]: per-group figures
    plan = SparsePlan(manifest["block_size"], manifest["step_buckets"], index, density)
    return plan.to(torch.device(cfg.model.device)), manifest
