"""diffusers' side of the multi-process layouts (see ../parallel.py for the layouts themselves).

- Ulysses: diffusers' own context parallelism (`ContextParallelConfig`, `enable_parallelism`) splits the tokens
  and does the all-to-alls; our processors hand it their attention as the `forward_op` of
  `_templated_context_parallel_attention`, which receives [B, N, H/K, D] for this rank's heads over the whole
  sequence in token order.
- CFG parallel: a diffusers `ModelHook` on the transformer runs this rank's branch and exchanges the outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import ConfigError, ModelError
from ..parallel import Layout

CFG_HOOK = "calibatt_cfg_parallel"


def enable_ulysses(transformer, layout: Layout) -> None:
    """diffusers' Ulysses over this layout's `ulysses` mesh dimension."""
    from diffusers import ContextParallelConfig

    if getattr(transformer, "_cp_plan", None) is None:
        raise ConfigError(
            f"{type(transformer).__name__} has no sequence-parallel plan in diffusers; "
            f"use --cfg-parallel (and data parallel over --prompts) instead of --ulysses"
        )
    heads = transformer.config.num_attention_heads
    if heads % layout.ulysses:
        raise ConfigError(
            f"the model has {heads} heads, not divisible by parallel.ulysses={layout.ulysses}; "
            f"choose a divisor of {heads}"
        )
    config = ContextParallelConfig(ulysses_degree=layout.ulysses, mesh=layout.mesh)
    with _cpu_device_count():
        transformer.enable_parallelism(config=config)


@contextlib.contextmanager
def _cpu_device_count():
    """diffusers resolves the process's device as `rank % torch.accelerator.device_count()`, which divides by
    zero on a CPU-only torch (CI runs the layouts under gloo on CPUs). There, and only there, count one device."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def context_parallel_attention(
    parallel_config,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention of this rank's token shard under diffusers' Ulysses. q, k, v: [B, N/K, H, D];
    `attend` takes and returns [B, H/K, N, D] (this rank's heads over the whole sequence); returns [B, N/K, H, D]."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    cp = parallel_config.context_parallel_config
    if cp is None or cp.ring_degree != 1 or cp.ulysses_anything or cp.ring_anything:
        raise ModelError(
            "calibatt's attention runs under Ulysses context parallelism only (ring_degree=1, "
            "no ulysses_anything); configure diffusers' parallelism with ContextParallelConfig("
            "ulysses_degree=K)"
        )

    def forward_op(
        ctx,
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        return_lse,
        _save_ctx=True,
        _parallel_config=None,
    ):
        if attn_mask is not None or return_lse:
            raise ModelError("calibatt's context-parallel attention takes no attention mask and returns no LSE")
        return attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)

    return _templated_context_parallel_attention(
        q, k, v, forward_op=forward_op, backward_op=None, _parallel_config=parallel_config
    )


class CFGParallelHook(ModelHook):
    """The two classifier-free-guidance branches of each step on the two ranks of a `cfg` group.

    Two-forward pipelines (Wan: cond, then uncond, every step): the second rank's pipeline is called with prompt
    and negative prompt swapped, so at the step's first call each rank computes one branch (rank 0 the
    conditional, rank 1 the unconditional); the outputs are all-gathered and the step's two calls return the
    conditional and the unconditional on both ranks, so both hold the same latents. Batched pipelines (Mochi:
    one forward over [uncond; cond]): each rank computes its half of the batch and the halves are gathered."""

    def __init__(self, group, cfg_rank: int, batched: bool):
        super().__init__()
        self.group = group
        self.cfg_rank = cfg_rank
        self.batched = batched
        self.reset()

    def reset(self) -> None:
        self._calls = 0
        self._other = None

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if self.batched:
            return self._batched(forward, *args, **kwargs)
        if self._calls % 2 == 0:
            out = forward(*args, **kwargs)
            mine = _sample(out)
            parts = self._gather(mine)
            self._other = parts[1]
            result = parts[0]
        else:
            result, self._other = self._other, None
            out = None
        self._calls += 1
        return _with_sample(out, result, kwargs)

    def _batched(self, forward, *args, **kwargs):
        batch = kwargs["hidden_states"].shape[0] if "hidden_states" in kwargs else args[0].shape[0]
        if batch % 2:
            raise ModelError(f"CFG parallel expects the pipeline's batched [uncond; cond] forward, got batch {batch}")

        def half(x):
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
                return x.chunk(2)[self.cfg_rank]
            return x

        out = forward(*[half(a) for a in args], **{k: half(v) for k, v in kwargs.items()})
        return _with_sample(out, torch.cat(self._gather(_sample(out))), kwargs)

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t, group=self.group)
        return parts


def _sample(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out, sample: torch.Tensor, kwargs: dict):
    if out is None:
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)
    if isinstance(out, tuple):
        return (sample, *out[1:])
    out.sample = sample
    return out


class Parallelized:
    """What `parallelize` set up on a model; `reset()` before each pipeline call."""

    def __init__(self, cfg_hook: CFGParallelHook | None = None):
        self.cfg_hook = cfg_hook

    def reset(self) -> None:
        if self.cfg_hook is not None:
            self.cfg_hook.reset()


def parallelize(model, layout: Layout) -> Parallelized:
    """Spread one video over this layout's `ulysses` and `cfg` mesh dimensions. Call after installing our
    processors: `enable_parallelism` gives its config to the processors present (and install carries it)."""
    transformer = model.pipe.transformer
    if layout.ulysses > 1:
        enable_ulysses(transformer, layout)
    if layout.cfg == 1:
        return Parallelized()
    hook = CFGParallelHook(layout.group("cfg"), layout.cfg_rank, model.batched_cfg)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, CFG_HOOK)
    return Parallelized(hook)
