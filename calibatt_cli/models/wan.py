"""Wan 2.1 family: our processor on every block's attn1, and loading of Wan pipelines.

Only this module (and the other family modules) import diffusers model internals.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from ..attention import AttentionController
from ..errors import CalibattError
from ..util import canonical_json, sha256_hex
from .base import LoadedModel, ModelIdentity


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved RoPE, as in diffusers' WanAttnProcessor (cos/sin are [1, N, 1, D]).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class CalibattWanAttnProcessor(WanAttnProcessor):
    """Self-attention of one Wan block, routed through the AttentionController."""

    def __init__(self, layer_index: int, controller: AttentionController):
        super().__init__()
        self.layer_index = layer_index  # baked in: cache hooks may skip blocks, so counting calls is wrong
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self._parallel_config is not None:
            # Under context parallelism each rank holds a shard of the tokens; attending over it alone
            # would be silently wrong.
            raise CalibattError(
                "calibatt's sparse attention does not support diffusers context parallelism yet; "
                "disable parallelism (do not call enable_parallelism) or run --dense"
            )
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        # [B, N, H, D] -> [B, H, N, D] views: the kernels take any strides, so nothing is copied.
        out = self.controller.attend(self.layer_index, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class WanModel(LoadedModel):
    def install(self, controller: AttentionController) -> None:
        self.uninstall()
        for i, block in enumerate(self.pipe.transformer.blocks):
            self._installed.append((block.attn1, block.attn1.processor))
            block.attn1.set_processor(CalibattWanAttnProcessor(i, controller))


def wan_identity(name: str, model_id: str, transformer_config: dict, vae_config: dict, weights_id: str) -> ModelIdentity:
    """Identity from configs alone: the transformer is instantiated on the meta device (no memory) so
    its config carries every default, whether or not config.json spelled it out."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        tcfg = dict(WanTransformer3DModel.from_config(transformer_config).config)
    tcfg = {k: v for k, v in tcfg.items() if not k.startswith("_")}
    h = sha256_hex(canonical_json({"family": "wan", "name": name, "config": tcfg, "weights": weights_id}))[:16]
    st = vae_config.get("scale_factor_temporal") or 4
    ss = vae_config.get("scale_factor_spatial") or 8
    return ModelIdentity(
        name=name,
        model_id=model_id,
        model_hash=h,
        layers=tcfg["num_layers"],
        heads=tcfg["num_attention_heads"],
        head_dim=tcfg["attention_head_dim"],
        vae_stride=(st, ss, ss),
        patch=tuple(tcfg["patch_size"]),
    )
