"""Where Wan 2.1 weights come from: a diffusers-format folder, the original release layout, or a Hub id.

The original release (Wan-AI/Wan2.1-T2V-*) ships
    config.json                               the transformer's own config (dim, ffn_dim, num_heads, ...)
    diffusion_pytorch_model*.safetensors      the transformer, original key names
    Wan2.1_VAE.pth                            the VAE (a torch state dict)
    models_t5_umt5-xxl-enc-bf16.pth           the UMT5-XXL encoder, Wan's own key names
    google/umt5-xxl/                          the tokenizer
The transformer and VAE go through diffusers' single-file converters; the T5 keys are renamed here to
transformers' UMT5EncoderModel. Configs the release lacks (VAE, text encoder, scheduler) ship in
configs/wan2.1/. .pth files are read with torch.load(weights_only=True): tensors only, no code.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from ..errors import ModelError

SHIPPED = Path(__file__).resolve().parent.parent.parent / "configs" / "wan2.1"
HUB_IDS = {"wan2.1-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan2.1-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}
SOURCE_HINT = (
    "download e.g. `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR` "
    "(diffusers format) or Wan-AI/Wan2.1-T2V-1.3B (original release); a Hub id as --weights downloads on load"
)

DIFFUSERS_FILES = {
    "model_index.json": "model_index.json",
    "transformer/config.json": "transformer/config.json",
    "transformer/diffusion_pytorch_model*.safetensors": "transformer/diffusion_pytorch_model*.safetensors",
    "vae/config.json": "vae/config.json",
    "vae/diffusion_pytorch_model*.safetensors": "vae/diffusion_pytorch_model*.safetensors",
    "text_encoder/config.json": "text_encoder/config.json",
    "text_encoder/model*.safetensors": "text_encoder/model*.safetensors",
    "tokenizer/": "tokenizer/*",
    "scheduler/scheduler_config.json": "scheduler/scheduler_config.json",
}
ORIGINAL_FILES = {
    "config.json": "config.json",
    "diffusion_pytorch_model*.safetensors": "diffusion_pytorch_model*.safetensors",
    "Wan2.1_VAE.pth": "Wan2.1_VAE.pth",
    "models_t5_umt5-xxl-enc-bf16.pth": "models_t5_umt5-xxl-enc-bf16.pth",
    "google/umt5-xxl/ (tokenizer)": "google/umt5-xxl/*",
}


def detect_layout(path: str) -> str:
    """'diffusers', 'original' or 'hub'; a clear error for anything else."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            layout, files = "diffusers", DIFFUSERS_FILES
        elif (p / "config.json").is_file() and list(p.glob("diffusion_pytorch_model*.safetensors")):
            layout, files = "original", ORIGINAL_FILES
        else:
            raise ModelError(
                f"'{path}' holds no Wan 2.1 weights: expected a diffusers folder ({', '.join(DIFFUSERS_FILES)}) "
                f"or the original release ({', '.join(ORIGINAL_FILES)}); {SOURCE_HINT}"
            )
        missing = [name for name, pattern in files.items() if not list(p.glob(pattern))]
        if missing:
            raise ModelError(
                f"'{path}' is an incomplete {layout}-format Wan 2.1 folder: missing {', '.join(missing)}; {SOURCE_HINT}"
            )
        return layout
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not p.exists():
        return "hub"
    raise ModelError(f"model.path '{path}' does not exist; point it at local Wan 2.1 weights ({SOURCE_HINT})")


# Dimensions the original config.json may omit (the release has no text_dim), read from the tensors that
# carry them, as diffusers' single-file loader infers its config from the checkpoint:
# config key -> (tensor, axis).
FROM_WEIGHTS = {
    "text_dim": ("text_embedding.0.weight", 1),
    "in_dim": ("patch_embedding.weight", 1),
    "freq_dim": ("time_embedding.0.weight", 1),
}


def original_to_diffusers_config(orig: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """The original release's config.json (+ the checkpoint's tensor shapes) -> WanTransformer3DModel config."""
    if orig.get("model_type", "t2v") != "t2v":
        raise ModelError(f"only text-to-video Wan 2.1 weights are supported, got model_type={orig.get('model_type')}")
    orig = dict(orig)
    for key, (tensor, axis) in FROM_WEIGHTS.items():
        if key not in orig and tensor in (shapes or {}) and len(shapes[tensor]) > axis:
            orig[key] = shapes[tensor][axis]
    try:
        dim, heads = int(orig["dim"]), int(orig["num_heads"])
        cfg = json.loads((SHIPPED / "transformer_1.3b.json").read_text())
        cfg.update(
            num_attention_heads=heads,
            attention_head_dim=dim // heads,
            ffn_dim=int(orig["ffn_dim"]),
            num_layers=int(orig["num_layers"]),
            in_channels=int(orig.get("in_dim", 16)),
            out_channels=int(orig.get("out_dim", 16)),
            freq_dim=int(orig.get("freq_dim", 256)),
            eps=float(orig.get("eps", 1e-6)),
            text_dim=int(orig.get("text_dim", 4096)),
        )
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        raise ModelError(f"original Wan config.json lacks or garbles {e}; is this a Wan 2.1 release folder?") from None
    return cfg


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors header (reads the header only), after checking that the file
    holds every byte the header promises: a truncated download fails here, in one line, before any loading."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError):
        raise ModelError(f"'{path}' is not a readable safetensors file; re-download it") from None
    if 8 + n + end > size:
        raise ModelError(f"'{path}' is truncated: {size} bytes, its header promises {8 + n + end}; re-download it")
    return shapes


def _original_shards(p: Path) -> list[Path]:
    return sorted(p.glob("diffusion_pytorch_model*.safetensors"))


def transformer_config(path: str, layout: str) -> dict:
    if layout == "diffusers":
        return json.loads((Path(path) / "transformer" / "config.json").read_text())
    if layout == "original":
        shapes = {k: s for f in _original_shards(Path(path)) for k, s in safetensors_shapes(f).items()}
        return original_to_diffusers_config(json.loads((Path(path) / "config.json").read_text()), shapes)
    from diffusers import WanTransformer3DModel

    return dict(WanTransformer3DModel.load_config(path, subfolder="transformer"))


def vae_config(path: str, layout: str) -> dict:
    if layout == "hub":
        from diffusers import AutoencoderKLWan

        return dict(AutoencoderKLWan.load_config(path, subfolder="vae"))
    return json.loads((_local_or_shipped(Path(path), "vae") / "config.json").read_text())


# --- original layout -> diffusers modules -------------------------------------------------------------


def _t5_key(key: str) -> str | None:
    """Wan's T5 encoder key -> transformers UMT5EncoderModel key."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m:
        return None
    i, rest = m.groups()
    table = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    return f"encoder.block.{i}.{table[rest]}" if rest in table else None


def convert_wan_t5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        new = _t5_key(k)
        if new is None:
            raise ModelError(f"unexpected key '{k}' in the T5 checkpoint; is it models_t5_umt5-xxl-enc-bf16.pth?")
        out[new] = v
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ModelError(f"cannot read '{path}' as a tensor state dict ({type(e).__name__}); re-download it") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_original_modules(path: str, dtype: torch.dtype):
    """(tokenizer, text_encoder, transformer, vae) from the original release layout."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    p = Path(path)
    with params_on_meta():
        transformer = WanTransformer3DModel.from_config(transformer_config(path, "original"))
    converted, files = {}, {}
    for f in _original_shards(p):  # converted shard by shard, so a mismatch names its file
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError) as e:
            msg = " ".join(str(e).split())[:120]
            raise ModelError(f"cannot read '{f}' as safetensors ({msg}); re-download it") from None
        for k, v in convert_wan_transformer_to_diffusers(shard).items():
            converted[k], files[k] = v.to(dtype), f
    _load_strict(transformer, converted, files)

    vae_state = convert_wan_vae_to_diffusers(_torch_state(p / "Wan2.1_VAE.pth"))
    with params_on_meta():
        vae = AutoencoderKLWan.from_config(vae_config(path, "original"))
    _load_strict(vae, {k: v.float() for k, v in vae_state.items()}, p / "Wan2.1_VAE.pth")  # VAE stays fp32

    t5_cfg = UMT5Config.from_pretrained(str(_local_or_shipped(p, "text_encoder")))
    with params_on_meta():
        text_encoder = UMT5EncoderModel(t5_cfg)
    t5_state = {k: v.to(dtype) for k, v in convert_wan_t5(_torch_state(p / "models_t5_umt5-xxl-enc-bf16.pth")).items()}
    _load_strict(text_encoder, t5_state, p / "models_t5_umt5-xxl-enc-bf16.pth")
    if text_encoder.config.d_model != transformer.config.text_dim:
        raise ModelError(
            f"'{p / 'models_t5_umt5-xxl-enc-bf16.pth'}' encodes text of width {text_encoder.config.d_model}, but "
            f"the transformer's text_embedding.0.weight takes {transformer.config.text_dim}; "
            "is it the matching release?"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(p / "google" / "umt5-xxl"), local_files_only=True)
    return tokenizer, text_encoder.eval(), transformer.eval(), vae.eval()


@contextlib.contextmanager
def params_on_meta():
    """Build modules with parameters on the meta device (no memory, no random init) but real buffers
    (RoPE tables and the like are computed in __init__ and not stored in checkpoints)."""
    register = torch.nn.Module.register_parameter

    def to_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _local_or_shipped(p: Path, sub: str) -> Path:
    """A config inside the weights folder wins (diffusers folders; tests' tiny originals), else ours."""
    return p / sub if (p / sub / "config.json").is_file() else SHIPPED / sub


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


def _load_strict(module: torch.nn.Module, state: dict, source: Path | dict[str, Path]) -> None:
    """Load `state` into `module` (built on meta) or fail in one line; `source` is the file, or the file of
    each key."""
    for k, v in sorted(state.items()):  # sorted: the same tensor is named on every run
        try:
            want = tuple(_tensor(module, k).shape)
        except AttributeError:
            continue  # an unexpected key: reported below
        if tuple(v.shape) != want:
            where = source[k] if isinstance(source, dict) else source
            raise ModelError(
                f"'{where}': tensor '{k}' has shape {tuple(v.shape)} but the model built from the config expects "
                f"{want}; is it the matching Wan 2.1 release?"
            )
    if isinstance(source, dict):
        source = ", ".join(sorted({str(f) for f in source.values()}))
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    # tied weights (the T5 embedding) are reported missing under one name yet loaded under the other
    missing = [k for k in missing if _tensor(module, k).device.type == "meta"]
    if missing or unexpected:
        raise ModelError(
            f"'{source}' does not fit the expected architecture (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); is it the matching Wan 2.1 release?"
        )
