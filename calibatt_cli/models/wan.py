"""Wan 2.1 family: our processor on every block's attn1, and loading of Wan pipelines.

Only this module (and the other family modules) import diffusers model internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

import calibatt_kernels as ck
from calibatt_kernels import ops as ck_ops

from ..config import Config
from ..errors import ModelError
from .base import LoadedModel, carry_parallel_config, place_pipeline
from .identity import wan as identity
from .identity import wan_no_weights
from .parallel import context_parallel_attention

if TYPE_CHECKING:
    from ..runtime import Controller


def _fusable_norms(attn) -> bool:
    """Whether q and k get the RMS norms (with weights, one eps) that `qk_norm_rope` fuses with RoPE."""
    nq, nk = attn.norm_q, attn.norm_k
    return (
        isinstance(nq, torch.nn.RMSNorm)
        and isinstance(nk, torch.nn.RMSNorm)
        and nq.weight is not None
        and nk.weight is not None
        and nq.eps == nk.eps
    )


def _eps(attn, query: torch.Tensor) -> float:
    return attn.norm_q.eps if attn.norm_q.eps is not None else torch.finfo(query.dtype).eps


def _norm_rope(attn, query, key, rotary_emb, fusable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k [B, N, C] -> normed and rotated [B, N, H, D], as diffusers' processor makes them."""
    if fusable:
        # both norms and rotations in one kernel (a registered op: compiled blocks keep it)
        w_q, w_k = attn.norm_q.weight, attn.norm_k.weight
        return ck_ops.qk_norm_rope_op(query, key, w_q, w_k, *rotary_emb, attn.heads, _eps(attn, query))
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = ck.rope_interleaved_ref(query, *rotary_emb)
        key = ck.rope_interleaved_ref(key, *rotary_emb)
    return query, key


class CalibattWanAttnProcessor(WanAttnProcessor):
    """Self-attention of one Wan block, routed through the attention controller."""

    def __init__(self, layer_index: int, controller: Controller):
        super().__init__()
        self.layer_index = layer_index  # baked in: cache hooks may skip blocks, so counting calls is wrong
        self.controller = controller
        self.sparse = controller.sparse_layer(layer_index) if controller.mode == "sparse" else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is not None and self.controller.mode != "dense":
            # the masks (and their calibration) cover every token: a caller's own mask cannot be honoured
            raise ModelError(
                f"Wan attn1 of layer {self.layer_index} got an attention_mask, which {self.controller.mode} "
                "attention cannot apply; call it without one, or run dense"
            )
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        value = value.unflatten(2, (attn.heads, -1))
        fusable = rotary_emb is not None and _fusable_norms(attn)
        if fusable and self._fp8_fast_path():
            # the layer's op takes the projections: on fp8's sparse steps q is quantized in the norm + RoPE
            # kernel rather than by a pass of its own (SparseLayer.run_qk decides per call: the step is known)
            w_q, w_k = attn.norm_q.weight, attn.norm_k.weight
            out = self.sparse.attend_qk(query, key, value, w_q, w_k, *rotary_emb, _eps(attn, query)).transpose(1, 2)
        else:
            query, key = _norm_rope(attn, query, key, rotary_emb, fusable)
            if self._parallel_config is not None:
                # Ulysses: this rank holds a token shard; diffusers' all-to-all hands `_attend` this rank's heads
                # over the whole sequence (the controller's plan holds those heads' masks).
                out = context_parallel_attention(self._parallel_config, query, key, value, self._attend)
            else:
                # [B, N, H, D] -> [B, H, N, D] views: the kernels take any strides, so nothing is copied.
                out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _fp8_fast_path(self) -> bool:
        """A sparse fp8 run's fast path, on one process (Ulysses' all-to-all moves the normed q, not codes)."""
        return (
            self.sparse is not None
            and self.controller.precision == "fp8"
            and self.controller.fast()
            and self._parallel_config is None
        )

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, N, D] views -> [B, H, N, D]."""
        if self.sparse is not None and self.controller.fast():
            # one opaque op whatever the step: the sparse layer reads the step, plan and guard when it runs
            return self.sparse(q, k, v)
        if self.sparse is not None and self.controller.guard_due():
            self.controller.guard_check(self.layer_index, q, k)  # may widen: the next attend reads the new index
        return self.controller.attend(self.layer_index, q, k, v)


class FusedGELUProjection(torch.nn.Module):
    """diffusers' `GELU(approximate="tanh")` (the first layer of Wan's FFN) as one GEMM whose epilogue adds
    the bias and applies the GELU (`calibatt::linear_gelu`). It holds the original module's Linear: the same
    parameters under the same state_dict keys."""

    def __init__(self, gelu: torch.nn.Module):
        super().__init__()
        self.proj = gelu.proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ck_ops.linear_gelu_op(hidden_states, self.proj.weight, self.proj.bias)


def fuse_ffn_gelu(transformer) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap each block's FFN up-projection + tanh-GELU for `FusedGELUProjection`. Returns (parent, name,
    original) for each swap, which `base.restore_modules` puts back. Blocks whose FFN is not a tanh-GELU with a
    bias are left alone."""
    from diffusers.models.activations import GELU

    swapped = []
    for block in transformer.blocks:
        net = block.ffn.net
        first = net[0]
        if isinstance(first, GELU) and first.approximate == "tanh" and first.proj.bias is not None:
            net[0] = FusedGELUProjection(first)
            swapped.append((net, "0", first))
    return swapped


class WanModel(LoadedModel):
    def install(self, controller: Controller) -> None:
        self.uninstall()
        for i, block in enumerate(self.pipe.transformer.blocks):
            self._installed.append((block.attn1, block.attn1.processor))
            processor = CalibattWanAttnProcessor(i, controller)
            carry_parallel_config(processor, self.pipe.transformer)
            block.attn1.set_processor(processor)
        # not attention, but on the same path: the FFN's GELU in its GEMM's epilogue (linear_gelu.py)
        self._swapped.extend(fuse_ffn_gelu(self.pipe.transformer))  # LoadedModel.uninstall puts them back


# --- real Wan 2.1 weights -------------------------------------------------------------------------------


def prepare() -> tuple:
    """Import what `load` imports (models.prepare_model): the pipeline's classes, which `load` takes from here."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from . import wan_weights  # noqa: F401

    return AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline


def load(cfg: Config, name: str) -> WanModel:
    from safetensors import SafetensorError

    from .wan_weights import SHIPPED, detect_layout, load_original_modules

    AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline = prepare()
    if not cfg.model.path:
        # No implicit download: offline, the Hub client would retry for half a minute before failing. A Hub
        # id given as model.path still downloads.
        wan_no_weights(name)
    ident = identity(cfg, name)
    src = ident.model_id
    layout = detect_layout(src)
    dtype = getattr(torch, cfg.model.dtype)
    offline = layout != "hub"
    try:
        if layout == "original":
            tokenizer, text_encoder, transformer, vae = load_original_modules(src, dtype)
            scheduler = UniPCMultistepScheduler.from_pretrained(str(SHIPPED), subfolder="scheduler")
            pipe = WanPipeline(
                tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
            )
        else:
            # Wan's VAE is meant to run in fp32; the rest in the configured dtype.
            vae = AutoencoderKLWan.from_pretrained(src, subfolder="vae", dtype=torch.float32, local_files_only=offline)
            pipe = WanPipeline.from_pretrained(src, vae=vae, dtype=dtype, local_files_only=offline)
    except ModelError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load Wan weights from '{src}' ({first}); check model.path") from None
    sched = pipe.scheduler
    key = "flow_shift" if "flow_shift" in sched.config else "shift"
    pipe.scheduler = type(sched).from_config(sched.config, **{key: cfg.generate.flow_shift})
    place_pipeline(pipe, cfg.model.device, cfg.model.load_threads)
    pipe.set_progress_bar_config(disable=True)
    return WanModel(ident, pipe)
