"""Tiny Wan 2.1 checkpoints written in the real on-disk formats (diffusers folder, original release).

The original-format writers invert diffusers' single-file converters; `check_inverse` proves each
inverse against the converter itself, so the tests load what a real release would look like.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from calibatt_cli.models.wan_weights import SHIPPED
from calibatt_cli.tiny.model import build_tokenizer

TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=96,
    num_layers=2,
    rope_max_seq_len=64,
)
# The real VAE's structure (levels, blocks, temporal downsampling) at a toy width: the original key names
# depend on the structure only.
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
TEXT = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
    dropout_rate=0.0,
)


def tiny_wan_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = build_tokenizer()
    torch.manual_seed(seed)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **TEXT)).eval()
    tr = WanTransformer3DModel(**TRANSFORMER).eval()
    vae = AutoencoderKLWan(**VAE).eval()
    sched = UniPCMultistepScheduler.from_pretrained(str(SHIPPED), subfolder="scheduler")
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, transformer=tr)


# --- diffusers -> original key names ---------------------------------------------------------------------

_TRANSFORMER_INV = [  # applied in order
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__tmp"),
    ("norm3", "norm2"),
    ("norm__tmp", "norm3"),
]


def transformer_to_original(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        new = k
        for a, b in _TRANSFORMER_INV:
            new = new.replace(a, b)
        if new == "scale_shift_table":
            new = "head.modulation"
        elif new.startswith("blocks.") and new.endswith("scale_shift_table"):
            new = new.replace("scale_shift_table", "modulation")
        elif new.startswith("proj_out."):
            new = new.replace("proj_out.", "head.head.")
        out[new] = v
    return out


_RES = {
    "norm1.gamma": "residual.0.gamma",
    "conv1": "residual.2",
    "norm2.gamma": "residual.3.gamma",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}


def _res(rest: str) -> str:
    for a, b in _RES.items():
        if rest.startswith(a):
            return b + rest[len(a) :]
    return rest


def vae_to_original(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        new = k
        if k.startswith("quant_conv."):
            new = "conv1." + k.split(".", 1)[1]
        elif k.startswith("post_quant_conv."):
            new = "conv2." + k.split(".", 1)[1]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_in\.(.+)", k):
            new = f"{m[1]}.conv1.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.gamma", k):
            new = f"{m[1]}.head.0.gamma"
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_out\.(.+)", k):
            new = f"{m[1]}.head.2.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", k):
            new = f"{m[1]}.middle.{2 * int(m[2])}.{_res(m[3])}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", k):
            new = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", k):
            new = f"encoder.downsamples.{m[1]}.{_res(m[2])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            new = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_res(m[3])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k):
            new = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        out[new] = v
    return out


def t5_to_original(sd: dict) -> dict:
    from calibatt_cli.models.wan_weights import _t5_key

    out = {}
    names = {}
    for i in range(TEXT["num_layers"]):
        for orig in (
            "norm1.weight",
            "attn.q.weight",
            "attn.k.weight",
            "attn.v.weight",
            "attn.o.weight",
            "pos_embedding.embedding.weight",
            "norm2.weight",
            "ffn.gate.0.weight",
            "ffn.fc1.weight",
            "ffn.fc2.weight",
        ):
            names[_t5_key(f"blocks.{i}.{orig}")] = f"blocks.{i}.{orig}"
    names["shared.weight"] = "token_embedding.weight"
    names["encoder.final_layer_norm.weight"] = "norm.weight"
    for k, v in sd.items():
        if k == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        out[names[k]] = v
    return out


def check_inverse() -> None:
    """The writers' key maps are exact inverses of diffusers' converters (and of ours for T5)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers

    from calibatt_cli.models.wan_weights import convert_wan_t5

    pipe = tiny_wan_pipeline()
    for module, inv, fwd in (
        (pipe.transformer, transformer_to_original, convert_wan_transformer_to_diffusers),
        (pipe.vae, vae_to_original, convert_wan_vae_to_diffusers),
        (pipe.text_encoder, t5_to_original, convert_wan_t5),
    ):
        sd = module.state_dict()
        back = fwd(inv(dict(sd)))
        want = {k for k in sd if k != "encoder.embed_tokens.weight"}
        got = {k for k in back if k != "encoder.embed_tokens.weight"}
        assert got == want, f"{type(module).__name__}: {sorted(got ^ want)[:6]}"


def write_diffusers(pipe, folder: Path) -> Path:
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_original(pipe, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = pipe.transformer.config
    (folder / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "model_type": "t2v",
                "dim": t.num_attention_heads * t.attention_head_dim,
                "ffn_dim": t.ffn_dim,
                "freq_dim": t.freq_dim,
                "num_heads": t.num_attention_heads,
                "num_layers": t.num_layers,
                "in_dim": t.in_channels,
                "out_dim": t.out_channels,
                "eps": t.eps,
                "text_len": 512,  # no text_dim, as in the real release: calibatt reads it from the weights
            }
        )
    )
    sd = {k: v.contiguous() for k, v in transformer_to_original(pipe.transformer.state_dict()).items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    torch.save(vae_to_original(pipe.vae.state_dict()), str(folder / "Wan2.1_VAE.pth"))
    torch.save(t5_to_original(pipe.text_encoder.state_dict()), str(folder / "models_t5_umt5-xxl-enc-bf16.pth"))
    pipe.tokenizer.save_pretrained(str(folder / "google" / "umt5-xxl"))
    # configs the real release does not carry; calibatt falls back to configs/wan2.1/ without them
    pipe.text_encoder.config.to_json_file(str(folder / "text_encoder" / "config.json")) if (
        folder / "text_encoder"
    ).mkdir() is None else None
    (folder / "vae").mkdir()
    pipe.vae.save_config(str(folder / "vae"))
    return folder


def small_wan_transformer(heads: int = 2, head_dim: int = 64, ffn_dim: int = 64, channels: int = 4, text_dim: int = 32):
    """A two-layer WanTransformer3DModel for processor tests (seed 0, eval): `channels` latent channels in and
    out, text and frequency dims `text_dim`."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=channels,
        text_dim=text_dim,
        freq_dim=text_dim,
        ffn_dim=ffn_dim,
        num_layers=2,
    ).eval()
