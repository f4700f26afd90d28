"""Model registry: a model name from the config -> the family module that loads it."""

from __future__ import annotations

from ..config import Config
from ..errors import ModelError
from .base import LoadedModel, ModelIdentity

WAN_NAMES = ("wan2.1", "wan2.1-1.3b", "wan2.1-14b", "wan2.1-distill")
MOCHI_NAMES = ("mochi-1", "mochi-tiny-random")
MODEL_NAMES = ("tiny", "tiny-random", *WAN_NAMES, *MOCHI_NAMES)


def _unknown(name: str) -> ModelError:
    return ModelError(f"unknown model '{name}' (model.name); available: {', '.join(MODEL_NAMES)}")


def model_identity(cfg: Config) -> ModelIdentity:
    """The model's identity and shape from configs alone (no weights loaded); checks the video size."""
    name = cfg.model.name
    if name in ("tiny", "tiny-random"):
        from .tiny import tiny_identity

        ident = tiny_identity(cfg, name)
    elif name in WAN_NAMES:
        from .wan import wan_real_identity

        ident = wan_real_identity(cfg, name)
    elif name in MOCHI_NAMES:
        from .mochi import mochi_model_identity

        ident = mochi_model_identity(cfg, name)
    else:
        raise _unknown(name)
    ident.check_video(cfg.video.frames, cfg.video.height, cfg.video.width)
    return ident


def load_model(cfg: Config) -> LoadedModel:
    name = cfg.model.name
    _check_device(cfg.model.device)
    model_identity(cfg)  # validates the name and the video size before any weights load
    if name in ("tiny", "tiny-random"):
        from .tiny import load_tiny

        return load_tiny(cfg, name)
    if name in WAN_NAMES:
        from .wan import load_wan

        return load_wan(cfg, name)
    if name in MOCHI_NAMES:
        from .mochi import load_mochi

        return load_mochi(cfg, name)
    raise _unknown(name)


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is '{device}' but no CUDA GPU is visible; use --set model.device=cpu")
