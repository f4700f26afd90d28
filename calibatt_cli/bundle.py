"""Mask bundles: one safetensors file holding bit-packed masks, with JSON metadata in its header.

Never pickle: a bundle is data a user may receive from someone else. The content hash covers the
metadata and the packed masks, so corruption and tampering are detected on load.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import records
from .config import Config
from .errors import BundleError, CalibattError
from .masks import pack_bits, unpack_bits
from .models import ModelIdentity, model_identity
from .util import atomic_path, canonical_json, check_output_dir, sha256_hex

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the sampling settings and the weights' content are part of the identity
META_KEY = "calibatt_bundle"
# A bundle's header is its JSON metadata (the prompts, per-head figures): far below this. safetensors refuses
# headers over 100 MB itself; refusing first means a corrupt length field never makes us read that much.
MAX_HEADER = 100_000_000
RECALIBRATE = "re-run `calibatt calibrate` to write a new one"

# What load_bundle requires of the metadata; the code that reads a bundle relies on nothing else.
META_SPEC = {
    "content_hash": str,
    "mask_shape": [int],
    "model": {"name": str, "id": str, "hash": str},
    "grid": {"tokens": [int], "num_tokens": int},
    "block_size": int,
    "steps": int,
    "step_buckets": [int],
    "warmup_steps": int,
    "epsilon": float,
    "sampling": {"guidance": float, "scheduler": str, "shift": (float, None), "negative_prompt": str},
    "prompts": [str],
    "samples_per_bucket": [int],
    "entries": {"density": [[[float]]], "retained_mass": [[[float]]]},
    "summary": {"density": float, "retained_mass": float},
}


@dataclass
class MaskBundle:
    masks: torch.Tensor  # bool [buckets, layers, heads, Mq, Mk]
    meta: dict  # see calibrate.bundle_meta for the fields

    @property
    def content_hash(self) -> str:
        return self.meta["content_hash"]

    @property
    def step_buckets(self) -> list[int]:
        return list(self.meta["step_buckets"])

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])


def _content_hash(meta: dict, packed: torch.Tensor) -> str:
    body = {k: v for k, v in meta.items() if k != "content_hash"}
    return sha256_hex(canonical_json(body), packed.contiguous().numpy().tobytes())


def save_bundle(path: Path, masks: torch.Tensor, meta: dict) -> MaskBundle:
    if masks.dtype != torch.bool or masks.dim() != 5:
        raise ValueError(f"masks must be bool [buckets, layers, heads, Mq, Mk], got {masks.dtype} {tuple(masks.shape)}")
    packed = pack_bits(masks)
    meta = dict(meta, schema_version=SCHEMA_VERSION, mask_shape=list(masks.shape))
    meta["content_hash"] = _content_hash(meta, packed)
    with atomic_path(Path(path), suffix=".safetensors") as tmp:
        save_file({"masks_packed": packed}, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return MaskBundle(masks, meta)


def check_header_length(path: Path, error: type[CalibattError], fix: str) -> None:
    """Refuse a safetensors file whose header length field runs past the file or MAX_HEADER, before any
    reader allocates or maps that much."""
    with open(path, "rb") as f:
        head = f.read(8)
    size = path.stat().st_size
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= MAX_HEADER or 8 + n > size:
        raise error(f"'{path}' is corrupt or truncated: header length {n} for a file of {size} bytes; {fix}")


def load_bundle(path: Path) -> MaskBundle:
    path = Path(path)
    fix = RECALIBRATE
    if not path.is_file():
        raise BundleError(f"bundle '{path}' not found; run `calibatt calibrate` first or pass --bundle")
    check_header_length(path, BundleError, fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if META_KEY not in header:
                raise BundleError(f"'{path}' is a safetensors file but not a calibatt mask bundle; {fix}")
            packed = f.get_tensor("masks_packed")
    except BundleError:
        raise
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise BundleError(f"bundle '{path}' is corrupt or truncated ({type(e).__name__}); {fix}") from None
    try:
        meta = json.loads(header[META_KEY])
        version = meta["schema_version"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BundleError(f"bundle '{path}' has unreadable metadata; {fix}") from None
    if version != SCHEMA_VERSION:
        raise BundleError(f"bundle '{path}' has schema version {version}, this calibatt reads {SCHEMA_VERSION}; {fix}")
    try:
        intact = meta.get("content_hash") == _content_hash(meta, packed)
    except (ValueError, TypeError, RecursionError):  # unhashable: values JSON cannot write back
        intact = False
    if not intact:
        raise BundleError(f"bundle '{path}' failed its content-hash check (corrupt or edited); {fix}")
    problem = records.problem(meta, META_SPEC) or _inconsistency(meta, packed)
    if problem:
        raise BundleError(f"bundle '{path}' has inconsistent metadata ({problem}); {fix}")
    return MaskBundle(unpack_bits(packed, meta["mask_shape"][-1]), meta)


def _inconsistency(meta: dict, packed: torch.Tensor) -> str | None:
    """What in well-typed metadata disagrees with itself or with the packed masks, or None."""
    shape = meta["mask_shape"]
    if len(shape) != 5 or min(shape) < 1:
        return f"mask_shape {shape} is not 5 positive sizes"
    if packed.dtype != torch.uint8 or list(packed.shape) != [*shape[:-1], (shape[-1] + 7) // 8]:
        return f"packed masks {packed.dtype} {list(packed.shape)} do not fit mask_shape {shape}"
    tokens, block = meta["grid"]["tokens"], meta["block_size"]
    if len(tokens) != 3 or min(tokens) < 1 or block < 1 or meta["grid"]["num_tokens"] != math.prod(tokens):
        return f"grid {tokens} / {meta['grid']['num_tokens']} tokens / block size {block} is not a token grid"
    nb = -(-math.prod(tokens) // block)
    if shape[3:] != [nb, nb]:
        return f"mask_shape {shape} does not have {nb} x {nb} blocks for the grid"
    buckets = meta["step_buckets"]
    if len(buckets) != meta["steps"] or sorted(set(buckets) - {-1}) != list(range(shape[0])):
        return f"step_buckets {buckets} do not map {meta['steps']} steps onto {shape[0]} buckets"
    for key in ("density", "retained_mass"):
        rows = meta["entries"][key]
        if [len(rows), *{len(r) for r in rows}, *{len(h) for r in rows for h in r}] != shape[:3]:
            return f"entries.{key} is not [buckets, layers, heads] = {shape[:3]}"
    return None


# --- identity: which run a bundle (and a cache, which copies these fields) belongs to -------------------------


def sampling_identity(cfg: Config, ident: ModelIdentity) -> dict:
    """The sampling settings a bundle is tied to besides the step count: attention patterns follow them."""
    g = cfg.generate
    return {
        "guidance": g.guidance,
        "scheduler": ident.scheduler,
        "shift": g.flow_shift if ident.flow_shift else None,
        "negative_prompt": g.negative_prompt,
    }


@dataclass(frozen=True)
class Difference:
    field: str  # the config key (or what the config determines) that differs
    was: str  # what the bundle or cache records, abbreviated
    now: str  # what this config gives, abbreviated
    forceable: bool  # False: the masks cannot be applied at all (another shape), --force or not

    def line(self, where: str, verb: str) -> str:
        return f"{where} was {verb} with {self.field}={self.was}, this config gives {self.now}"


def _abbrev(value, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _model(name, digest) -> str:
    return f"'{name}' (hash {str(digest)[:12]})"


def identity_differences(meta: dict, cfg: Config) -> list[Difference]:
    """How a bundle's (or cache's) recorded run differs from the one this config makes: model weights, token
    grid, step count, guidance, scheduler and its shift, negative prompt."""
    ident = model_identity(cfg)
    grid = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    out = []
    m = meta["model"]
    if m["hash"] != ident.model_hash:
        out.append(Difference("model", _model(m["name"], m["hash"]), _model(ident.name, ident.model_hash), True))
    if list(meta["grid"]["tokens"]) != list(grid):
        out.append(Difference("token grid", _abbrev(meta["grid"]["tokens"]), _abbrev(grid), False))
    if meta["steps"] != cfg.generate.steps:
        out.append(Difference("generate.steps", str(meta["steps"]), str(cfg.generate.steps), False))
    now = sampling_identity(cfg, ident)
    keys = {"guidance": "generate.guidance", "scheduler": "scheduler", "shift": "generate.flow_shift"}
    keys["negative_prompt"] = "generate.negative_prompt"
    for key, label in keys.items():
        if meta["sampling"][key] != now[key]:
            out.append(Difference(label, _abbrev(meta["sampling"][key]), _abbrev(now[key]), True))
    return out


def check_identity(
    meta: dict, cfg: Config, *, where: str, verb: str, fix: str, error: type[CalibattError]
) -> list[dict]:
    """Refuse a bundle or cache made for another run, naming the first difference. Under compile.force
    (--force) the differences that still leave the masks applicable are allowed: each is logged as a warning
    and returned (forced_record), for the run to record."""
    diffs = identity_differences(meta, cfg)
    hard = [d for d in diffs if not d.forceable]
    if hard:
        raise error(f"{hard[0].line(where, verb)}; {fix}")
    if diffs and not cfg.compile.force:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise error(f"{diffs[0].line(where, verb)}{more}; {fix}, or pass --force to use it anyway")
    for d in diffs:
        log.warning("warning: --force: %s", d.line(where, verb))
    return forced_record(meta, cfg)


def forced_record(meta: dict, cfg: Config) -> list[dict]:
    """What --force let through for a bundle or cache that passed check_identity: [{field, was, now}]."""
    if not cfg.compile.force:
        return []
    return [{"field": d.field, "was": d.was, "now": d.now} for d in identity_differences(meta, cfg)]


def check_bundle_matches(bundle: MaskBundle, cfg: Config, *, where: str) -> list[dict]:
    """Refuse a bundle made for another run or model shape, naming the difference; returns the differences
    --force let through (see check_identity)."""
    fix = "re-run `calibatt calibrate` with this config, or pass the matching config"
    m = bundle.meta
    if m["block_size"] != cfg.calibration.block_size:
        raise BundleError(
            f"{where} uses block size {m['block_size']}, but calibration.block_size is "
            f"{cfg.calibration.block_size}; {fix}"
        )
    ident = model_identity(cfg)
    shape = m["mask_shape"]
    if shape[1] != ident.layers or shape[2] != ident.heads:
        raise BundleError(
            f"{where} has masks for {shape[1]} layers x {shape[2]} heads, the model has {ident.layers} x "
            f"{ident.heads}; {fix}"
        )
    return check_identity(m, cfg, where=where, verb="calibrated", fix=fix, error=BundleError)


def write_heatmaps(bundle: MaskBundle, out_dir: Path, scale: int = 4) -> list[Path]:
    """One PNG per (bucket, layer): the heads' masks side by side, kept blocks white."""
    from PIL import Image

    out_dir = check_output_dir(out_dir, "heatmap")
    out_dir.mkdir(exist_ok=True)
    masks = bundle.masks.numpy()
    nb, nl, nh, mq, mk = masks.shape
    written = []
    for b in range(nb):
        for layer in range(nl):
            gap = 2
            canvas = np.full((mq, nh * mk + (nh - 1) * gap), 96, np.uint8)
            for h in range(nh):
                canvas[:, h * (mk + gap) : h * (mk + gap) + mk] = masks[b, layer, h] * 255
            img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, mq * scale), Image.NEAREST)
            path = out_dir / f"bucket{b}-layer{layer:02d}.png"
            with atomic_path(path, suffix=".png") as tmp:
                img.save(tmp, format="PNG")
            written.append(path)
    return written
