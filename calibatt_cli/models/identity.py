"""Model identity from configs alone, without importing diffusers: the Wan and Mochi families' `identity`.

A ModelIdentity hashes the transformer's config with every default filled in, which only the diffusers class
knows (it is instantiated on the meta device). Importing diffusers costs seconds, and `calibatt compile` on
the CPU and `calibatt config` need nothing else from it; so the filled-in config is remembered in a small JSON
file, keyed by the input config and the bytes of the diffusers sources that define the class and its config
handling. The first command that computes it (calibrate, which builds the model anyway) writes the memo;
later ones read it. A missing, unreadable or unwritable memo only means diffusers is imported. The tiny
family's identity is in models/tiny.py (a Wan at toy size: it calls `wan_identity`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
from pathlib import Path

from ..config import Config
from ..errors import ModelError
from ..util import canonical_json, sha256_hex, user_cache_dir, write_text_atomic
from .base import ModelIdentity, scheduler_class
from .fingerprint import folder_fingerprint

# diffusers' config machinery: with the class's own module, what decides a class's filled-in config
CONFIG_SOURCES = ("configuration_utils.py", "models/modeling_utils.py")
MEMO_SCHEME = "fc1"  # a change of what the memo holds changes every key


def memo_dir() -> Path | None:
    """Where the memos live ($XDG_CACHE_HOME or ~/.cache); None without a home directory."""
    return user_cache_dir("model-configs")


def _memo_path(module: str, cls_name: str, transformer_config: str) -> Path | None:
    """The memo file of (class, input config); None if the diffusers sources cannot be found and read
    without importing diffusers."""
    folder = memo_dir()
    spec = importlib.util.find_spec(module.split(".")[0])  # finds the top-level package, imports nothing
    if folder is None or spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    own = "/".join(module.split(".")[1:]) + ".py"
    h = hashlib.sha256(f"{MEMO_SCHEME}:{module}.{cls_name}:{transformer_config}".encode())
    try:
        for rel in (own, *CONFIG_SOURCES):
            h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    except OSError:
        return None
    return folder / f"{h.hexdigest()[:32]}.json"


def _read_memo(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("config"), dict)
    ok = ok and all(isinstance(data.get(k), bool) for k in ("sequence_parallel", "repeated_blocks"))
    return canonical_json(data) if ok else None


def _compute(module: str, cls_name: str, transformer_config: str) -> str:
    import torch

    model_cls = getattr(importlib.import_module(module), cls_name)
    with torch.device("meta"):
        tcfg = dict(model_cls.from_config(json.loads(transformer_config)).config)
    return canonical_json(
        {
            "config": {k: v for k, v in tcfg.items() if not k.startswith("_")},
            # the transformer has a context-parallel plan in diffusers: Ulysses can split its tokens
            "sequence_parallel": getattr(model_cls, "_cp_plan", None) is not None,
            # it declares repeated blocks (diffusers' compile_repeated_blocks)
            "repeated_blocks": bool(getattr(model_cls, "_repeated_blocks", None)),
        }
    )


@functools.lru_cache(maxsize=16)
def _full_config(module: str, cls_name: str, transformer_config: str) -> str:
    """{"config": the transformer's config with every default filled in, "sequence_parallel", "repeated_blocks"}
    as JSON (the cache hands out copies): from the memo file, else from diffusers (then memoised)."""
    path = _memo_path(module, cls_name, transformer_config)
    if path is not None and (found := _read_memo(path)) is not None:
        return found
    result = _compute(module, cls_name, transformer_config)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, result)
        except OSError:
            pass  # a read-only home: the next run imports diffusers again, with the same result
    return result


def identity_from_config(
    family: str,
    model_cls: str,
    name: str,
    model_id: str,
    transformer_config: dict,
    weights_id: str,
    vae_stride: tuple[int, int, int],
    patch=None,
    joint_attention: bool = False,
    qk_norm_rope: bool = False,
    scheduler: str = "",
    flow_shift: bool = True,
) -> ModelIdentity:
    """Identity from configs alone. `model_cls` is the diffusers transformer class as "module:Class" (its
    defining module); its config carries every default, whether or not config.json spelled it out: equal
    models hash equal. `patch` maps the full config to the (time, height, width) patch; default: its
    `patch_size`."""
    module, cls_name = model_cls.split(":")
    full = json.loads(_full_config(module, cls_name, canonical_json(transformer_config)))
    tcfg = full["config"]
    h = sha256_hex(canonical_json({"family": family, "name": name, "config": tcfg, "weights": weights_id}))[:16]
    return ModelIdentity(
        name=name,
        model_id=model_id,
        model_hash=h,
        layers=tcfg["num_layers"],
        heads=tcfg["num_attention_heads"],
        head_dim=tcfg["attention_head_dim"],
        vae_stride=tuple(vae_stride),
        patch=tuple(patch(tcfg) if patch else tcfg["patch_size"]),
        joint_attention=joint_attention,
        qk_norm_rope=qk_norm_rope,
        sequence_parallel=full["sequence_parallel"],
        scheduler=scheduler,
        flow_shift=flow_shift,
        repeated_blocks=full["repeated_blocks"],
    )


# --- Wan 2.1 ---------------------------------------------------------------------------------------------

WAN_TRANSFORMER = "diffusers.models.transformers.transformer_wan:WanTransformer3DModel"
KNOWN_SIZES = {"wan2.1-1.3b": (30, 1536), "wan2.1-14b": (40, 5120)}


def wan_identity(
    name: str, model_id: str, transformer_config: dict, vae_config: dict, weights_id: str, scheduler: str
) -> ModelIdentity:
    st = vae_config.get("scale_factor_temporal") or 4
    ss = vae_config.get("scale_factor_spatial") or 8
    return identity_from_config(
        "wan",
        WAN_TRANSFORMER,
        name,
        model_id,
        transformer_config,
        weights_id,
        (st, ss, ss),
        qk_norm_rope=True,
        scheduler=scheduler,
    )


def wan_source(cfg: Config, name: str) -> str:
    from .wan_weights import HUB_IDS

    if cfg.model.path:
        return cfg.model.path
    if name in HUB_IDS:
        return HUB_IDS[name]  # the shape of a named size, from configs alone; loading needs model.path
    wan_no_weights(name)


def wan_no_weights(name: str):
    from .wan_weights import SOURCE_HINT

    raise ModelError(f"model '{name}' needs local weights: set model.path (or --weights DIR); {SOURCE_HINT}")


def wan(cfg: Config, name: str) -> ModelIdentity:
    """The identity of a real Wan 2.1 model (the family's registry entry)."""
    from .wan_weights import SHIPPED, detect_layout, transformer_config, vae_config

    if not cfg.model.path and name in KNOWN_SIZES:
        # No weights named yet: the shipped config of that size gives the shape (for `calibatt config`,
        # presets and grids); loading will still require the weights.
        size = "1.3b" if name.endswith("1.3b") else "14b"
        tcfg = json.loads((SHIPPED / f"transformer_{size}.json").read_text())
        src = wan_source(cfg, name)
        return wan_identity(name, src, tcfg, {}, f"hub:{src}", _wan_scheduler(src, "hub"))
    src = wan_source(cfg, name)
    layout = detect_layout(src)
    tcfg = transformer_config(src, layout)
    # A Hub id names a repository, not bytes: its content is known only once downloaded.
    weights = f"hub:{src}" if layout == "hub" else folder_fingerprint(src)
    ident = wan_identity(name, src, tcfg, vae_config(src, layout), weights, _wan_scheduler(src, layout))
    if name in KNOWN_SIZES:
        layers, dim = KNOWN_SIZES[name]
        if (ident.layers, ident.heads * ident.head_dim) != (layers, dim):
            raise ModelError(
                f"'{src}' holds a Wan model of {ident.layers} layers x dim "
                f"{ident.heads * ident.head_dim}, "
                f"not {name} ({layers} x {dim}); use --model wan2.1 to take the size from the weights"
            )
    return ident


def _wan_scheduler(src: str, layout: str) -> str:
    """The scheduler class the pipeline will sample with: a diffusers folder's own, else the one the original
    release is loaded with (configs/wan2.1/scheduler), which the Hub's Wan 2.1 repositories also use."""
    from .wan_weights import SHIPPED

    return scheduler_class(src if layout == "diffusers" else SHIPPED)


# --- Mochi 1 ---------------------------------------------------------------------------------------------

MOCHI_TRANSFORMER = "diffusers.models.transformers.transformer_mochi:MochiTransformer3DModel"
MOCHI_VAE_STRIDE = (6, 8, 8)  # MochiPipeline's vae_temporal_scale_factor and vae_spatial_scale_factor

# mochi-tiny-random: heads x head dim 2 x 64 (64: the Triton kernels' smallest head dim), 2 blocks.
MOCHI_TINY_SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # mochi.build_tiny_pipeline's; also unloaded mochi-1's
MOCHI_TINY_TRANSFORMER = dict(
    patch_size=2,
    num_attention_heads=2,
    attention_head_dim=64,
    num_layers=2,
    pooled_projection_dim=32,
    in_channels=12,  # MochiPipeline assumes 12 latent channels (latents_mean.view(1, 12, ...))
    text_embed_dim=32,  # = mochi.TINY_TEXT d_model
    time_embed_dim=32,
    max_sequence_length=16,
)
MOCHI_EXPECTED_FILES = (
    "model_index.json",
    "transformer/config.json + diffusion_pytorch_model*.safetensors",
    "vae/config.json + diffusion_pytorch_model*.safetensors",
    "text_encoder/config.json + model*.safetensors",
    "tokenizer/ (tokenizer_config.json + spiece.model or tokenizer.json)",
    "scheduler/scheduler_config.json",
)


def mochi_identity(
    name: str, model_id: str, transformer_config: dict, weights_id: str, scheduler: str = MOCHI_TINY_SCHEDULER
) -> ModelIdentity:
    # PatchEmbed patches each latent frame in 2-D
    return identity_from_config(
        "mochi",
        MOCHI_TRANSFORMER,
        name,
        model_id,
        transformer_config,
        weights_id,
        MOCHI_VAE_STRIDE,
        patch=lambda c: (1, c["patch_size"], c["patch_size"]),
        joint_attention=True,
        scheduler=scheduler,
        flow_shift=False,  # the pipeline keeps its scheduler's shift
    )


def mochi_path(cfg: Config) -> Path:
    if not cfg.model.path:
        raise ModelError(
            f"model '{cfg.model.name}' needs local weights: pass --set model.path=/path/to/mochi-1 "
            "(a diffusers-format folder, e.g. a download of genmo/mochi-1-preview)"
        )
    return Path(cfg.model.path).expanduser()


def check_mochi_checkpoint(path: Path) -> None:
    """A clear error listing what a diffusers-format Mochi folder holds, before from_pretrained fails."""
    missing = []
    if not (path / "model_index.json").is_file():
        missing.append("model_index.json")
    for sub, config, weights in (
        ("transformer", "config.json", "*.safetensors"),
        ("vae", "config.json", "*.safetensors"),
        ("text_encoder", "config.json", "*.safetensors"),
        ("tokenizer", "tokenizer_config.json", None),
        ("scheduler", "scheduler_config.json", None),
    ):
        if not (path / sub / config).is_file():
            missing.append(f"{sub}/{config}")
        if weights and not list((path / sub).glob(weights)):
            missing.append(f"{sub}/{weights}")
    if missing:
        raise ModelError(
            f"model.path '{path}' is not a complete diffusers-format Mochi folder: missing {', '.join(missing)}. "
            f"Expected: {'; '.join(MOCHI_EXPECTED_FILES)}"
        )


def mochi(cfg: Config, name: str) -> ModelIdentity:
    """The identity of a Mochi model (the family's registry entry)."""
    if name == "mochi-tiny-random":
        return mochi_identity(name, f"builtin:{name}", MOCHI_TINY_TRANSFORMER, f"random-seed-{cfg.model.seed}")
    if not cfg.model.path:
        # No weights named yet: diffusers' default MochiTransformer3DModel config is Mochi 1's, which gives
        # the shape (for `calibatt config` and grids); loading still requires model.path.
        return mochi_identity(name, "unloaded:mochi-1", {}, "none")
    path = mochi_path(cfg)
    check_mochi_checkpoint(path)
    tcfg = json.loads((path / "transformer" / "config.json").read_text())
    return mochi_identity(name, str(path.resolve()), tcfg, folder_fingerprint(path), scheduler_class(path))
