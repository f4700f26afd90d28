"""Mask bundles: one safetensors file holding bit-packed masks, with JSON metadata in its header.

Never pickle: a bundle is data a user may receive from someone else. The content hash covers the
metadata and the packed masks, so corruption and tampering are detected on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BundleError
from .masks import pack_bits, unpack_bits
from .util import atomic_path, canonical_json, check_output_dir, sha256_hex

SCHEMA_VERSION = 1
META_KEY = "calibatt_bundle"


@dataclass
class MaskBundle:
    masks: torch.Tensor  # bool [buckets, layers, heads, Mq, Mk]
    meta: dict  # see calibrate.build_bundle_meta for the fields

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


def load_bundle(path: Path) -> MaskBundle:
    path = Path(path)
    fix = "re-run `calibatt calibrate` to write a new one"
    if not path.is_file():
        raise BundleError(f"bundle '{path}' not found; run `calibatt calibrate` first or pass --bundle")
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
        shape = meta["mask_shape"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"bundle '{path}' has unreadable metadata; {fix}") from None
    if version != SCHEMA_VERSION:
        raise BundleError(f"bundle '{path}' has schema version {version}, this calibatt reads {SCHEMA_VERSION}; {fix}")
    if meta.get("content_hash") != _content_hash(meta, packed):
        raise BundleError(f"bundle '{path}' failed its content-hash check (corrupt or edited); {fix}")
    if list(packed.shape[:-1]) != list(shape[:-1]) or packed.shape[-1] != (shape[-1] + 7) // 8:
        raise BundleError(f"bundle '{path}' masks do not match their recorded shape; {fix}")
    return MaskBundle(unpack_bits(packed, shape[-1]), meta)


def identity_mismatch(
    meta: dict, *, where: str, verb: str, model_name: str, model_hash: str, grid: list[int], steps: int
) -> str | None:
    """How a bundle's (or a cache's, which copies these fields) model, token grid or step count differs
    from the config's, or None. `verb` says what was done for them: 'calibrated', 'built'."""
    if meta["model"]["hash"] != model_hash:
        return (
            f"{where} was {verb} for model '{meta['model']['name']}' (hash {meta['model']['hash']}), but the "
            f"config loads '{model_name}' (hash {model_hash})"
        )
    if list(meta["grid"]["tokens"]) != list(grid):
        return (
            f"{where} was {verb} for token grid {meta['grid']['tokens']} (frames x rows x cols), but the "
            f"config's video gives {grid}"
        )
    if len(meta["step_buckets"]) != steps:
        return f"{where} was {verb} for {len(meta['step_buckets'])} steps, but generate.steps is {steps}"
    return None


def check_bundle_matches(
    bundle: MaskBundle,
    *,
    where: str,
    model_name: str,
    model_hash: str,
    grid: list[int],
    steps: int,
    block_size: int,
    layers: int,
    heads: int,
) -> None:
    """Refuse a bundle made for another model, grid, step count or block size, naming the difference."""
    m = bundle.meta
    fix = "re-run `calibatt calibrate` with this config, or pass the matching config"
    problem = identity_mismatch(
        m, where=where, verb="calibrated", model_name=model_name, model_hash=model_hash, grid=grid, steps=steps
    )
    if problem:
        raise BundleError(f"{problem}; {fix}")
    if m["block_size"] != block_size:
        raise BundleError(
            f"{where} uses block size {m['block_size']}, but calibration.block_size is {block_size}; {fix}"
        )
    shape = m["mask_shape"]
    if shape[1] != layers or shape[2] != heads:
        raise BundleError(
            f"{where} has masks for {shape[1]} layers x {shape[2]} heads, the model has {layers} x {heads}; {fix}"
        )


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
