"""The `tiny` family: the built-in tiny model (tiny/model.py) behind the registry.

`tiny` loads the shipped weights (tiny/weights/); `tiny-random` is the same architecture with random weights
drawn from `model.seed` (fast tests). The model itself is a WanPipeline, so the Wan adapter serves it.
Its definition lives in the tiny model's kit (tiny/), which also trains it; this file is only what the
registry needs, as every family's is. Its identity imports no diffusers (models/identity.py); loading does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import Config
from ..tiny.model import LATENT, MAX_TEXT_TOKENS, TRANSFORMER, WEIGHTS, build_tiny_pipeline, load_trained
from ..tiny.model import weights_sha256 as check_weights
from .base import ModelIdentity, place_pipeline
from .fingerprint import file_fingerprint
from .identity import wan_identity

if TYPE_CHECKING:
    from .wan import WanModel

SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # build_tiny_pipeline's


def identity(cfg: Config, name: str) -> ModelIdentity:
    # `tiny` is tied to the content of its weights file: retraining invalidates bundles made before.
    if name == "tiny":
        check_weights()  # a clear error if the file is missing
        weights_id = file_fingerprint(WEIGHTS)
    else:
        weights_id = f"random-seed-{cfg.model.seed}"
    return wan_identity(name, f"builtin:{name}", TRANSFORMER, LATENT, weights_id, SCHEDULER)


def load(cfg: Config, name: str) -> WanModel:
    from .wan import WanModel

    pipe = build_tiny_pipeline(cfg.model.seed)
    if name == "tiny":
        load_trained(pipe)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=cfg.generate.flow_shift)
    dtype = getattr(torch, cfg.model.dtype)
    place_pipeline(pipe, cfg.model.device, cfg.model.load_threads)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return WanModel(identity(cfg, name), pipe, {"max_sequence_length": MAX_TEXT_TOKENS})
