"""`calibatt compile`: turn a mask bundle into a cache directory that `generate` loads as is.

Layout of a cache directory:
    manifest.json       bundle hash, model, grid, steps, card, versions (calibatt, torch, Triton, the kernels'
                        source hash), per-group figures and the kernel config chosen per (bucket, layer)
    plan.safetensors    per (bucket, layer): key-block counts, row offsets, indices and an LPT schedule, and on
                        a GPU the launch records the chosen kernel derives from them (runtime/plan.py)
    triton/             Triton's cache holding every kernel variant generate launches (GPU only)
    blocks/             the compiled transformer blocks (generate.compile on; see blocks.py)
On a GPU, compile measures the candidate kernel configs (`block_sparse.candidate_configs`, tune.py) per mask group
on random q, k, v of the model's shape, keeps the fastest, and does so with Triton's cache pointed at
triton/, so the binaries land there and a later `generate` compiles nothing (see aot.py). load.py
reads a cache back.
The cache path is a symbolic link to a versioned folder beside it (`.NAME.v-XXXX`). A compile builds a new
folder, under the cache's exclusive lock, and swaps the link with one rename: a reader sees the old cache or
the new one, and a compile killed at any point leaves one of them (the next compile removes its leftovers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import calibatt_kernels as ck
from calibatt_kernels import norm_rope

from ..bundle import check_bundle_matches, load_bundle
from ..config import Config, cache_paths, compile_blocks
from ..errors import CacheError
from ..models import check_device, model_identity
from ..runtime import group_configs, plan_index, plan_tensors, record_tensors
from ..util import sha256_hex
from . import aot, blocks
from .load import CACHE_SCHEMA, cache_lock, device_info, lock_file, read_plan, software_versions, warm_qk_norm_rope
from .tune import cpu_costs, tune_kernels


@dataclass
class CompileResult:
    cache_dir: Path
    manifest: dict
    seconds: float
    reused: bool  # the cache was already up to date


# A test hook: the name of a compile step at which the process dies (os._exit), to check that a kill at any
# point leaves a usable cache.
KILL_AT = "CALIBATT_TEST_KILL_AT"


def _step(name: str) -> None:
    if os.environ.get(KILL_AT) == name:
        os._exit(9)


def save_plan(build: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """Write the plan into a build and record its hash in the manifest (read_plan checks it)."""
    save_file(tensors, str(build / "plan.safetensors"))
    manifest["plan_sha256"] = sha256_hex((build / "plan.safetensors").read_bytes())


def write_cache(cache_dir: Path, build: Path, tensors: dict[str, torch.Tensor] | None, manifest: dict) -> None:
    """Finish a cache built in `build` (a folder beside cache_dir, see new_build) and swap it into place. The
    plan is written first unless `tensors` is None (already written), the manifest last."""
    triton_dir = build / "triton"
    triton_dir.mkdir(exist_ok=True)
    aot.relink_groups(triton_dir)  # no build path may leak into the cache
    manifest.setdefault("kernels", {})["triton_files"] = len(list(triton_dir.glob("*/__grp__*.json")))
    if tensors is not None:
        save_plan(build, tensors, manifest)
    (build / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _step("written")
    _swap_in(build, cache_dir)


def new_build(cache_dir: Path) -> Path:
    """A fresh versioned folder beside cache_dir for a build, with the user's umask (not mkdtemp's 0700: a
    cache may be shared)."""
    path = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.v-", dir=cache_dir.parent))
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    path.chmod(0o777 & ~mask)
    return path


def kernel_class(cfg: Config, ident) -> dict:
    """What the compiled binaries depend on beyond device and versions."""
    return {
        "dtype": cfg.model.dtype,
        "head_dim": ident.head_dim,
        "batches": [1],
        "lse": ident.joint_attention,
        "qk_norm_rope": ident.qk_norm_rope,
        "precision": cfg.compile.precision,
    }


def compile_cache(
    cfg: Config, *, bundle_path: str | None = None, cache_dir: str | None = None, recompile: bool = False
) -> CompileResult:
    bundle_path, cache_dir = cache_paths(cfg, bundle_path, cache_dir)
    if cfg.compile.target is not None:
        raise CacheError(
            f"compile.target={cfg.compile.target} cross-compiles the kernels only (no cache); use "
            f"`calibatt compile --target {cfg.compile.target}`, or leave compile.target unset here"
        )
    check_device(cfg.model.device)
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path)
    ident = model_identity(cfg)
    grid = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    forced = check_bundle_matches(bundle, cfg, where=f"bundle '{bundle_path}'")
    parent = cache_dir.parent if str(cache_dir.parent) else Path(".")
    if not parent.is_dir():
        raise CacheError(f"cache folder's parent '{parent}' does not exist; create it or choose another --cache-dir")
    if cache_dir.exists() and not (cache_dir / "manifest.json").is_file():
        if not cache_dir.is_dir() or any(cache_dir.iterdir()):
            raise CacheError(f"'{cache_dir}' exists and is not a calibatt cache; choose another --cache-dir")

    device = torch.device(cfg.model.device)
    tuned = device.type == "cuda" and ck.triton_usable(device) and ident.head_dim in (64, 128)
    want_blocks = compile_blocks(cfg, ident.repeated_blocks)
    precision = _precision_record(cfg, device, bundle.block_size, ident)
    manifest = {
        "schema_version": CACHE_SCHEMA,
        "bundle": {"path": str(bundle_path), "content_hash": bundle.content_hash},
        "model": dict(bundle.meta["model"]),
        "grid": bundle.meta["grid"],
        "block_size": bundle.block_size,
        "steps": bundle.meta["steps"],
        "sampling": bundle.meta["sampling"],
        "forced": forced,  # the differences from compile's config that --force let through
        "epsilon": bundle.meta.get("epsilon"),  # what generate's guard checks against
        "step_buckets": bundle.step_buckets,
        "device": device_info(cfg.model.device),
        "versions": software_versions(),
        "kernel_class": kernel_class(cfg, ident),
        "compiled_blocks": {"enabled": want_blocks, "backend": cfg.generate.compile_backend if want_blocks else None},
        "precision": cfg.compile.precision,  # generate refuses another generate.precision
        # the attention backend the calls will run ("gluon", "tl", "cpu" or "reference": the fp32 reference
        # for a head dim the kernels do not take)
        "kernels": {
            "backend": ck.dispatch.attention_backend(
                device,
                (bundle.block_size, bundle.block_size),
                ident.head_dim,
                getattr(torch, cfg.model.dtype),
                return_lse=ident.joint_attention,
            ),
            "tuned": tuned,
        },
        "cost_model": cfg.compile.cost_model,  # groups' "attention": what tune.py measured faster, or all sparse
    }
    with cache_lock(cache_dir, shared=False):
        _step("locked")
        _remove_leftovers(cache_dir)
        if not recompile and _up_to_date(cache_dir, manifest):
            old = json.loads((cache_dir / "manifest.json").read_text())
            return CompileResult(cache_dir, old, time.perf_counter() - t0, True)
        tensors, groups = plan_tensors(bundle.masks)
        keys = [(g["bucket"], g["layer"]) for g in groups]
        build = new_build(cache_dir)
        try:
            if tuned:
                with aot.kernel_cache(build / "triton"):
                    res = tune_kernels(
                        plan_index(tensors, keys),
                        heads=ident.heads,
                        tokens=grid[0] * grid[1] * grid[2],
                        head_dim=ident.head_dim,
                        dtype=getattr(torch, cfg.model.dtype),
                        block_size=bundle.block_size,
                        device=device,
                        return_lse=ident.joint_attention,
                        fp8=precision["fp8_runs"],
                    )
                    if ident.qk_norm_rope:
                        aot.forget_compiled(norm_rope.kernel_fn())
                        warm_qk_norm_rope(
                            heads=ident.heads,
                            head_dim=ident.head_dim,
                            dtype=getattr(torch, cfg.model.dtype),
                            device=device,
                            precision=cfg.compile.precision,
                        )
                for g in groups:
                    g.update(res.groups[(g["bucket"], g["layer"])])
                manifest["kernels"].update(res.info)
            elif device.type == "cpu" and cfg.compile.cost_model:
                costs = cpu_costs(
                    plan_index(tensors, keys),
                    heads=ident.heads,
                    tokens=grid[0] * grid[1] * grid[2],
                    head_dim=ident.head_dim,
                    block_size=bundle.block_size,
                )
                for g in groups:
                    g.update(costs[(g["bucket"], g["layer"])])
            for g in groups:
                g["attention"] = g.get("attention", "sparse") if cfg.compile.cost_model else "sparse"
            manifest["kernels"]["fp8"] = precision
            manifest["groups"] = groups
            # the masks' index as stored (compressed rows: it follows the kept blocks); on the device each
            # layer's buckets are padded to its longest, a little more
            manifest["index_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
            if tuned and cfg.compile.precision != "fp8":  # (the fp8 kernel reads the index itself)
                tensors.update(record_tensors(plan_index(tensors, keys), group_configs(groups), device))
            save_plan(build, tensors, manifest)
            _step("planned")
            manifest["blocks"] = None
            if want_blocks:  # from the plan as generate reads it back
                plan = read_plan(build, manifest).to(device)
                with aot.kernel_cache(build / "triton"):
                    manifest["blocks"] = blocks.build_blocks(cfg, plan, build, BLOCKS_PROMPT)
                _step("blocks")
            write_cache(cache_dir, build, None, manifest)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return CompileResult(cache_dir, manifest, time.perf_counter() - t0, False)


# What the compiled blocks are traced with: any prompt does (text is padded to the model's fixed length).
BLOCKS_PROMPT = "a red circle moving left on a black background"


def _precision_record(cfg: Config, device: torch.device, block_size: int, ident) -> dict:
    """What compile.precision=fp8 will run here: "fp8_runs" (compile measures the fp8 kernel's configs), the
    kernel's name, or why the calls fall back to bf16 (compile then measures the bf16 configs they run)."""
    if cfg.compile.precision != "fp8":
        return {"fp8_runs": False, "ran": None, "fallback": None}
    bs = (block_size, block_size)
    why = ck.dispatch.fp8_why_not(device, ident.head_dim, bs, return_lse=ident.joint_attention)
    ran = None if why is not None else ck.dispatch.fp8_kernel_name(device, ident.head_dim, bs)
    return {"fp8_runs": why is None, "ran": ran, "fallback": why}


def _up_to_date(cache_dir: Path, manifest: dict) -> bool:
    try:
        old = json.loads((cache_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    keys = (
        "schema_version",
        "bundle",
        "model",
        "grid",
        "step_buckets",
        "device",
        "versions",
        "kernel_class",
        "compiled_blocks",
        "cost_model",
    )
    return all(old.get(k) == manifest[k] for k in keys) and (cache_dir / "plan.safetensors").is_file()


def _swap_in(build: Path, cache_dir: Path) -> None:
    """Point cache_dir at build with one rename of a symbolic link over it (atomic), then remove the folder it
    pointed at before. A cache folder of the layout before links (a real folder) is moved aside first."""
    link = cache_dir.with_name(f".{cache_dir.name}.link-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(build.name)  # relative: the cache's parent folder can be moved or copied whole
    _step("linked")
    if cache_dir.is_dir() and not cache_dir.is_symlink():
        if any(cache_dir.iterdir()):
            os.replace(cache_dir, new_build(cache_dir))  # removed below with the other leftovers
        else:
            cache_dir.rmdir()
    os.replace(link, cache_dir)
    _step("swapped")
    _remove_leftovers(cache_dir)


def _remove_leftovers(cache_dir: Path) -> None:
    """Remove the versioned folders and temporary links beside cache_dir that it does not point at: folders
    of earlier caches and of killed builds. Called under the exclusive lock (no reader holds any of them)."""
    current = os.readlink(cache_dir) if cache_dir.is_symlink() else None
    for p in cache_dir.parent.glob(f".{cache_dir.name}.*"):
        if p.name == current or p.name == lock_name(cache_dir):
            continue
        if p.name.startswith((f".{cache_dir.name}.v-", f".{cache_dir.name}.link-")):
            if p.is_symlink() or not p.is_dir():
                p.unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)


def lock_name(cache_dir: Path) -> str:
    return lock_file(cache_dir).name
