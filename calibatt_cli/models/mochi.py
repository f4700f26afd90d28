"""Mochi 1 family: our processor on every block's joint attention, and loading of Mochi pipelines.

Mochi attends jointly: each block's `attn1` concatenates the visual tokens with the valid (unpadded) text
tokens of each batch item and runs one softmax over both. Our processor computes the same projections,
norms and RoPE as diffusers' `MochiAttnProcessor2_0`, then hands the visual and text q, k, v to
the attention controller's `attend_joint`: masks apply to visual x visual blocks only, text rows and columns stay
dense. CFG runs batched (uncond, cond), so both branches count as calibration samples.

Token grid: MochiPipeline.prepare_latents makes (frames - 1) // 6 + 1 latent frames of (H / 8, W / 8) (its
VAE strides are fixed in the pipeline, not read from the VAE), and the transformer patches each latent frame
by 2 x 2: `ModelIdentity.token_grid` with vae_stride (6, 8, 8) and patch (1, 2, 2) is exactly that.
480 x 848 x 163 -> 28 x 30 x 53 = 44,520 visual tokens (+ up to 256 text tokens).

Models:
- `mochi-1`: a local diffusers-format folder (`model.path`), loaded with MochiPipeline.from_pretrained.
- `mochi-tiny-random`: a toy MochiPipeline with random weights from `model.seed`, built offline (tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from ..config import Config
from .base import LoadedModel, ModelIdentity, carry_parallel_config, place_pipeline, refuse_context_parallel
from .identity import MOCHI_TINY_TRANSFORMER, mochi_path
from .identity import mochi as identity

if TYPE_CHECKING:
    from ..runtime import Controller

# mochi-tiny-random's VAE and text encoder (its transformer config is part of its identity: identity.py)
TINY_VAE = dict(
    latent_channels=12,
    out_channels=3,
    encoder_block_out_channels=(32, 32, 32, 32),  # GroupNorm has 32 groups
    decoder_block_out_channels=(32, 32, 32, 32),
    layers_per_block=(1, 1, 1, 1, 1),
)
TINY_TEXT = dict(
    d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0
)


def _rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Mochi's RoPE on [B, N, H, D], as in diffusers' MochiAttnProcessor2_0 (computed in fp32).
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def _qkv(heads: int, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k):
    """One stream's (visual or text) q, k, v as [B, N, H, D], q and k normed where the block has norms."""
    q, k, v = (proj(x).unflatten(2, (heads, -1)) for proj in (to_q, to_k, to_v))
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class CalibattMochiAttnProcessor(MochiAttnProcessor2_0):
    """Joint attention of one Mochi block, routed through the attention controller."""

    def __init__(self, layer_index: int, controller: Controller):
        super().__init__()
        self.layer_index = layer_index  # baked in: cache hooks may skip blocks, so counting calls is wrong
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        refuse_context_parallel(self)
        query, key, value = _qkv(attn.heads, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        enc_query, enc_key, enc_value = _qkv(
            attn.heads,
            encoder_hidden_states,
            attn.add_q_proj,
            attn.add_k_proj,
            attn.add_v_proj,
            attn.norm_added_q,
            attn.norm_added_k,
        )
        if image_rotary_emb is not None:
            query = _rope(query, *image_rotary_emb)
            key = _rope(key, *image_rotary_emb)

        # [B, N, H, D] -> [B, H, N, D] views: the kernels take any strides, so nothing is copied.
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        eq, ek, ev = enc_query.transpose(1, 2), enc_key.transpose(1, 2), enc_value.transpose(1, 2)
        n_txt = eq.shape[2]
        vis_out, txt_out = [], []
        # Per batch item, as diffusers does: each (uncond, cond) branch has its own number of valid text
        # tokens, and padding is dropped rather than masked.
        for i in range(q.shape[0]):
            valid = torch.nonzero(attention_mask[i].flatten(), as_tuple=False).flatten()
            ov, ot = self.controller.attend_joint(
                self.layer_index,
                q[i : i + 1],
                k[i : i + 1],
                v[i : i + 1],
                eq[i : i + 1, :, valid],
                ek[i : i + 1, :, valid],
                ev[i : i + 1, :, valid],
            )
            vis_out.append(ov)
            # Valid text outputs first, then zeros, exactly as diffusers pads them.
            txt_out.append(F.pad(ot, (0, 0, 0, n_txt - ot.shape[2])))
        hidden_states = torch.cat(vis_out).transpose(1, 2).flatten(2, 3).type_as(query)
        encoder_hidden_states = torch.cat(txt_out).transpose(1, 2).flatten(2, 3).type_as(query)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class MochiModel(LoadedModel):
    batched_cfg = True  # MochiPipeline runs [uncond; cond] as one batch

    def install(self, controller: Controller) -> None:
        self.uninstall()
        for i, block in enumerate(self.pipe.transformer.transformer_blocks):
            self._installed.append((block.attn1, block.attn1.processor))
            processor = CalibattMochiAttnProcessor(i, controller)
            carry_parallel_config(processor, self.pipe.transformer)
            block.attn1.processor = processor

    @staticmethod
    def _set_processor(module, processor) -> None:
        module.processor = processor  # MochiAttention has no set_processor


# --- mochi-tiny-random -------------------------------------------------------------------------------


def build_tiny_pipeline(seed: int):
    """A toy MochiPipeline with random weights, identical for the same seed; nothing is downloaded."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel
    from tokenizers import processors
    from transformers import T5Config, T5EncoderModel

    from ..tiny.model import build_tokenizer

    tokenizer = build_tokenizer()
    # T5 appends </s>: the empty negative prompt then still has one valid token, as with the real tokenizer.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.eos_token_id)]
    )
    tokenizer.model_max_length = MOCHI_TINY_TRANSFORMER["max_sequence_length"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TINY_TEXT)).eval()
        transformer = MochiTransformer3DModel(**MOCHI_TINY_TRANSFORMER).eval()
        # RoPE frequencies start at 0 (no positions at all); random ones make attention depend on position.
        transformer.pos_frequencies.data.normal_(0.0, 0.5)
        vae = AutoencoderKLMochi(**TINY_VAE).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)  # as Mochi 1's scheduler_config.json
    return MochiPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _finish(pipe, cfg: Config, ident: ModelIdentity) -> MochiModel:
    dtype = getattr(torch, cfg.model.dtype)
    place_pipeline(pipe, cfg.model.device, cfg.model.load_threads)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    # The text length the transformer was built for (256 for Mochi 1): the pipeline pads prompts to it.
    return MochiModel(ident, pipe, {"max_sequence_length": pipe.transformer.config.max_sequence_length})


# --- mochi-1 from a local diffusers folder -------------------------------------------------------------


def prepare() -> None:
    """Import what `load` imports (models.prepare_model)."""
    from diffusers import MochiPipeline  # noqa: F401


def load(cfg: Config, name: str) -> MochiModel:
    ident = identity(cfg, name)
    if name == "mochi-tiny-random":
        return _finish(build_tiny_pipeline(cfg.model.seed), cfg, ident)
    from diffusers import MochiPipeline

    pipe = MochiPipeline.from_pretrained(mochi_path(cfg), local_files_only=True, dtype=getattr(torch, cfg.model.dtype))
    return _finish(pipe, cfg, ident)
