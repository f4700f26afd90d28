"""The built-in `tiny` model: a real diffusers WanPipeline at toy size, built offline from code.

`tiny-random` has random weights drawn from `model.seed` (fast tests). `tiny` loads the trained weights
shipped in calibatt_cli/weights/ when they are there, and is otherwise the random model. Both use a
word-level tokenizer and a small UMT5 encoder, so nothing is downloaded.
"""

from __future__ import annotations

import torch

from ..config import Config
from .base import ModelIdentity
from .wan import WanModel, wan_identity

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
    num_attention_heads=2,
    attention_head_dim=64,  # 64 so the Triton kernels (head dim 64/128) run on tiny too
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    rope_max_seq_len=64,
)
VAE = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8)
MAX_TEXT_TOKENS = 32


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


def build_tiny_pipeline(seed: int):
    """The tiny WanPipeline with random weights, identical for the same seed."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT)).eval()
        transformer = WanTransformer3DModel(**TRANSFORMER).eval()
        vae = AutoencoderKLWan(**VAE).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


def tiny_identity(cfg: Config, name: str) -> ModelIdentity:
    return wan_identity(name, f"builtin:{name}", TRANSFORMER, {}, f"random-seed-{cfg.model.seed}")


def load_tiny(cfg: Config, name: str) -> WanModel:
    pipe = build_tiny_pipeline(cfg.model.seed)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=cfg.generate.flow_shift)
    dtype = getattr(torch, cfg.model.dtype)
    pipe.to(device=cfg.model.device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return WanModel(tiny_identity(cfg, name), pipe, {"max_sequence_length": MAX_TEXT_TOKENS})
