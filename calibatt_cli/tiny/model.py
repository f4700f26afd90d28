"""The tiny model's definition: a real diffusers WanPipeline at toy size, built offline from code.

The weights shipped in weights/ were trained by train.py on the procedural clips of procedural.py (see
docs/training.md). The same architecture with random weights drawn from a seed serves the fast tests. It
uses a word-level tokenizer, a small UMT5 encoder and the fixed pixel-unshuffle latent of latent.py:
nothing is downloaded. Video: 17 frames of 64 x 64 -> latent 24 x 9 x 32 x 32 -> 9 x 16 x 16 = 2,304 tokens.
The models registry serves it through models/tiny.py (`tiny`, `tiny-random`); training builds it from here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..errors import ModelError

# Words of the procedural captions first (their ids must stay stable: trained weights depend on them).
VOCAB_WORDS = (
    "a an the on of and with in at to is moving moves move going slowly quickly "
    "red green blue yellow white orange purple cyan magenta black gray grey pink brown "
    "circle square triangle ball box disc star shape object "
    "left right up down upward downward diagonally diagonal bouncing bounce growing shrinking "
    "small medium large big tiny "
    "background gradient plain dark light sky floor scene video clip frame"
).split()

TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=3,  # dim 192: > the 96 values per token, so the velocity fits through
    attention_head_dim=64,  # 64 so the Triton kernels (head dim 64/128) run on tiny too
    in_channels=24,  # = LATENT z_dim
    out_channels=24,
    text_dim=64,
    freq_dim=64,
    ffn_dim=768,
    num_layers=6,
    rope_max_seq_len=64,
)
LATENT = dict(scale_factor_temporal=2, scale_factor_spatial=2, in_channels=3, z_dim=24)
TEXT = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0
)
MAX_TEXT_TOKENS = 32
WEIGHTS = Path(__file__).resolve().parent / "weights" / "tiny.safetensors"
WEIGHTS_INFO = WEIGHTS.with_suffix(".json")  # architecture + training record of the shipped weights


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in VOCAB_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=MAX_TEXT_TOKENS
    )


def build_modules(seed: int, transformer: dict | None = None, text: dict | None = None):
    """(tokenizer, text encoder, transformer, latent) with random weights, identical for the same seed.
    `transformer` / `text` override the architecture (small models for tests)."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .latent import PixelShuffleLatent

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **(text or TEXT))).eval()
        net = WanTransformer3DModel(**(transformer or TRANSFORMER)).eval()
    return tokenizer, text_encoder, net, PixelShuffleLatent(**LATENT).eval()


def encode_text(tokenizer, text_encoder, prompts: list[str], max_length: int = MAX_TEXT_TOKENS) -> torch.Tensor:
    """Prompt embeddings exactly as WanPipeline._get_t5_prompt_embeds makes them (padding slots zeroed),
    with gradients (training needs them; the pipeline's own method is called under no_grad)."""
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def build_tiny_pipeline(seed: int):
    """The tiny WanPipeline with random weights, identical for the same seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer, text_encoder, transformer, vae = build_modules(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


@functools.lru_cache(maxsize=4)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    from ..util import sha256_hex

    return sha256_hex(Path(path).read_bytes())


def weights_sha256() -> str:
    if not WEIGHTS.is_file():
        raise ModelError(
            f"the trained tiny weights are missing ({WEIGHTS}); reinstall calibatt, or use --model tiny-random"
        )
    st = WEIGHTS.stat()
    return _file_sha256(str(WEIGHTS), st.st_mtime_ns, st.st_size)


def load_trained(pipe) -> None:
    """Load the shipped weights into a pipeline built by build_tiny_pipeline."""
    from safetensors.torch import load_file

    weights_sha256()  # a clear error if missing
    info = json.loads(WEIGHTS_INFO.read_text()) if WEIGHTS_INFO.is_file() else {}
    arch = info.get("architecture", {})
    for key, ours in (("transformer", TRANSFORMER), ("text", TEXT), ("latent", LATENT)):
        if key in arch and _jsonable(arch[key]) != _jsonable(ours):
            raise ModelError(f"{WEIGHTS_INFO}: architecture '{key}' differs from calibatt_cli/tiny/model.py")
    state = load_file(str(WEIGHTS))
    for prefix, module in (("transformer.", pipe.transformer), ("text_encoder.", pipe.text_encoder)):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sub, strict=False)
        missing = [k for k in missing if k != "encoder.embed_tokens.weight"]  # tied to `shared`
        if missing or unexpected:
            raise ModelError(
                f"{WEIGHTS}: does not fit the tiny model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )


def _jsonable(x):
    return json.loads(json.dumps(x))
