"""Model registry: a model name from the config -> the family module (models/<family>.py) that loads it.

A family module provides `load(cfg, name) -> LoadedModel`; each family also has an
`identity(cfg, name) -> ModelIdentity` (from configs alone, no weights loaded) in a module that imports no
diffusers (IDENTITIES), so that a command that never builds the model (compile on the CPU, config) does not
pay for that import. Modules are imported only when one of their models is asked for, so a run pays for its
own family's imports alone.
"""

from __future__ import annotations

import importlib

from ..config import Config
from ..errors import ModelError
from .base import LoadedModel, ModelIdentity

# family module -> the model names it serves (in the order the error message lists them)
FAMILIES = {
    "tiny": ("tiny", "tiny-random"),
    "wan": ("wan2.1", "wan2.1-1.3b", "wan2.1-14b", "wan2.1-distill"),
    "mochi": ("mochi-1", "mochi-tiny-random"),
}
# family -> "module:function" of its identity; models/tiny.py imports no diffusers itself, Wan's and Mochi's
# identities are in models/identity.py because their family modules subclass diffusers' processors
IDENTITIES = {"tiny": "tiny:identity", "wan": "identity:wan", "mochi": "identity:mochi"}
MODELS = {name: family for family, names in FAMILIES.items() for name in names}  # name -> family
MODEL_NAMES = tuple(MODELS)


def _family(name: str) -> str:
    if name not in MODELS:
        raise ModelError(f"unknown model '{name}' (model.name); available: {', '.join(MODEL_NAMES)}")
    return MODELS[name]


def model_identity(cfg: Config) -> ModelIdentity:
    """The model's identity and shape from configs alone (no weights loaded); checks the video size."""
    name = cfg.model.name
    module, function = IDENTITIES[_family(name)].split(":")
    ident = getattr(importlib.import_module(f"{__name__}.{module}"), function)(cfg, name)
    ident.check_video(cfg.video.frames, cfg.video.height, cfg.video.width)
    return ident


def load_model(cfg: Config) -> LoadedModel:
    name = cfg.model.name
    check_device(cfg.model.device)
    model_identity(cfg)  # validates the name and the video size before any weights load
    return importlib.import_module(f"{__name__}.{_family(name)}").load(cfg, name)


def prepare_model(cfg: Config) -> None:
    """Import what loading the configured model imports (its family module, and the pipeline's classes where
    the family has a `prepare`), loading nothing: a caller that loads on a thread starts with this while it
    checks what must pass before any weights load."""
    module = importlib.import_module(f"{__name__}.{_family(cfg.model.name)}")
    if hasattr(module, "prepare"):
        module.prepare()


def check_device(device: str) -> None:
    """Every stage that runs on `model.device` calls this first, so a missing GPU is one line, before any work."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is '{device}' but no CUDA GPU is visible; use --set model.device=cpu")
