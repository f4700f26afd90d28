"""The adapter seam: everything model-specific sits behind `LoadedModel`.

The stages (calibrate, compile, generate) only ever see a LoadedModel: a pipeline to call, the model's
identity (id + config hash), its token grid for a video size, and a way to install our attention
processors. One module per family (`wan`, `tiny`, ...) builds it, registered by name in models/__init__.py; nothing
else imports model internals.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..config import Config

if TYPE_CHECKING:  # models/ sits below runtime/: processors only call the controller they are given
    from ..runtime import Controller


def refuse_context_parallel(processor) -> None:
    """The processor of a family without Ulysses support calls this first. Under diffusers context
    parallelism each rank holds a shard of the tokens; attending over it alone would be silently wrong."""
    if getattr(processor, "_parallel_config", None) is not None:
        from ..errors import CalibattError

        raise CalibattError(
            "this model's calibatt attention does not run under diffusers context parallelism; "
            "use --cfg-parallel (and data parallel over --prompts) instead"
        )


def carry_parallel_config(processor, module: torch.nn.Module) -> None:
    """diffusers' `enable_parallelism` sets `_parallel_config` on the processors present at that moment; a
    processor installed later must take it from the model, or each rank would attend over its own shard."""
    processor._parallel_config = getattr(module, "_parallel_config", None)


@dataclass(frozen=True)
class ModelIdentity:
    """What a bundle and a cache are tied to; computable without loading weights."""

    name: str  # the model name from the config (tiny, wan2.1-1.3b, ...)
    model_id: str  # what is loaded: built-in id, local path or Hub id
    model_hash: str  # hash of the transformer config and the weights' content (models/fingerprint.py)
    layers: int
    heads: int
    head_dim: int
    vae_stride: tuple[int, int, int]  # (time, height, width) of the VAE
    patch: tuple[int, int, int]  # (time, height, width) of the transformer's patch embedding
    # Joint attention (Mochi): the sparse kernel also returns each row's log-sum-exp, to merge the dense text
    # keys in; compile then tunes and caches that kernel variant.
    joint_attention: bool = False
    # The processor prepares q and k with calibatt's fused RMS-norm + RoPE kernel (Wan): compile caches it
    # too, so that generate --strict compiles nothing.
    qk_norm_rope: bool = False
    # The transformer has a context-parallel plan in diffusers (Wan): Ulysses can split its tokens.
    sequence_parallel: bool = False
    scheduler: str = ""  # the pipeline's scheduler class: a bundle is tied to it
    flow_shift: bool = True  # generate.flow_shift sets the scheduler's shift (Mochi keeps its own)
    # The transformer declares repeated blocks (diffusers' compile_repeated_blocks): generate.compile=auto
    # compiles them on a GPU.
    repeated_blocks: bool = False

    def token_grid(self, frames: int, height: int, width: int) -> list[int]:
        st, sh, sw = self.vae_stride
        pt, ph, pw = self.patch
        return [((frames - 1) // st + 1) // pt, height // sh // ph, width // sw // pw]

    def check_video(self, frames: int, height: int, width: int) -> None:
        """Sizes the pipeline would silently round are errors instead."""
        from ..errors import ConfigError

        st, sh, sw = self.vae_stride
        if (frames - 1) % st:
            raise ConfigError(
                f"video.frames={frames} does not fit {self.name}: it must be {st}k+1 "
                f"(e.g. {((frames - 1) // st) * st + 1})"
            )
        mult_h, mult_w = sh * self.patch[1], sw * self.patch[2]
        if height % mult_h or width % mult_w:
            raise ConfigError(
                f"video size {height}x{width} does not fit {self.name}: height must be a multiple of {mult_h} "
                f"and width of {mult_w}"
            )


def scheduler_class(folder) -> str:
    """The scheduler class a diffusers-layout folder's pipeline samples with (its scheduler/ config)."""
    from pathlib import Path

    from ..errors import ModelError

    path = Path(folder) / "scheduler" / "scheduler_config.json"
    try:
        return str(json.loads(path.read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"'{path}' is missing or unreadable; check model.path") from None


def place_pipeline(pipe, device: str | torch.device, workers: int = 1) -> None:
    """pipe.to(device) for a pipeline without offloading; with `workers` > 1 its modules' tensors are copied by
    that many threads (model.load_threads, see to_device)."""
    if workers == 1:
        pipe.to(device)
        return
    to_device([m for m in pipe.components.values() if isinstance(m, torch.nn.Module)], torch.device(device), workers)


# Copies are cut into pieces of at most this many bytes, so that one large tensor (UMT5-XXL's 2 GB embedding
# table) is spread over the threads instead of being one thread's tail; each thread stages pieces through two
# pinned buffers of this size.
PIECE_BYTES = 32 << 20


def to_device(
    modules: list[torch.nn.Module],
    device: torch.device,
    workers: int,
    *,
    staged: bool = True,
    piece_bytes: int = PIECE_BYTES,
) -> None:
    """Move every parameter and buffer of `modules` to `device`, copied by `workers` threads; each distinct
    tensor is copied once, in pieces (`pieces`).

    Where a checkpoint's tensors are views of its memory-mapped file, a copy to the GPU first faults the file's
    pages in, then moves them over the bus: host work that .to does one tensor at a time. Here each thread,
    with its own CUDA stream, copies a piece into one of its two pinned buffers (the page faults and memcpy,
    with the GIL released) while the GPU reads the other (`staged`; without it, the driver stages the pageable
    copy itself, synchronously). The copies are allocated on this thread's stream, and made on the workers'
    streams, each waited for before its worker returns. Each tensor is put in place by the modules' own
    _apply, as .to does (a parameter tied to another stays tied); a buffer shared by two modules stays one
    tensor, where .to copies it twice."""
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # the tensors say cuda:N
        device = torch.device("cuda", torch.cuda.current_device())
    moving: dict[int, torch.Tensor] = {}
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            if t.device != device:
                moving.setdefault(id(t), t)
    if not moving:
        return
    copies = {k: torch.empty_like(t, device=device) for k, t in moving.items()}
    if cuda:  # the allocations are this stream's: the workers' copies start after them
        ready = torch.cuda.current_stream(device).record_event()
    # the largest first, so that no thread is left with a large one at the end
    work = sorted((p for k, t in moving.items() for p in pieces(t, copies[k], piece_bytes)), key=lambda p: -p[1].nbytes)
    queue = iter(work)
    lock = threading.Lock()

    def worker() -> None:
        """Copy pieces until none is left, then wait for this thread's stream."""
        stream = torch.cuda.Stream(device) if cuda else None
        if cuda:
            stream.wait_event(ready)
        buffers, done, turn = [], [None, None], 0  # done[i]: after it, buffer i may be written again
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            while True:
                with lock:
                    piece = next(queue, None)
                if piece is None:
                    break
                dst, src = piece
                if staged and cuda and _stageable(src, piece_bytes):
                    if not buffers:
                        buffers = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                    if done[turn] is not None:
                        done[turn].synchronize()
                    buf = buffers[turn][: src.nbytes]
                    # numpy's copy: this thread alone, the GIL released (torch's CPU copy would run an OpenMP
                    # team of its own in every worker, on the cores the main thread's set-up needs)
                    np.copyto(buf.numpy(), src.detach().reshape(-1).view(torch.uint8).numpy())
                    dst.copy_(buf.view(src.dtype).view(src.shape), non_blocking=True)
                    done[turn] = stream.record_event()
                    turn ^= 1
                else:
                    dst.copy_(src)
        if cuda:
            stream.synchronize()

    n = max(1, min(workers, len(work)))
    with ThreadPoolExecutor(n, thread_name_prefix="calibatt-to") as pool:
        for f in [pool.submit(worker) for _ in range(n)]:
            f.result()
    for m in modules:
        m._apply(lambda t: copies.get(id(t), t))


def _stageable(src: torch.Tensor, piece_bytes: int) -> bool:
    """Whether a piece goes through a pinned buffer: pageable host memory, one span that fits the buffer."""
    return src.device.type == "cpu" and src.is_contiguous() and src.nbytes <= piece_bytes and not src.is_pinned()


def pieces(src: torch.Tensor, dst: torch.Tensor, piece_bytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dst piece, src piece) pairs that together copy src into dst: flat slices of at most `piece_bytes` where
    both are contiguous (a slice of a tensor's memory is then a slice of its elements), else the whole tensor."""
    if not (src.is_contiguous() and dst.is_contiguous()) or src.nbytes <= piece_bytes:
        return [(dst, src)]
    step = max(1, piece_bytes // src.element_size())
    s, d = src.view(-1), dst.view(-1)
    return [(d[a : a + step], s[a : a + step]) for a in range(0, s.numel(), step)]


def restore_modules(swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    """Undo submodule swaps: (parent, name, original) back in place, last swap first; empties the list."""
    for parent, name, original in reversed(swapped):
        setattr(parent, name, original)
    swapped.clear()


@dataclass
class LoadedModel:
    ident: ModelIdentity
    pipe: Any
    call_defaults: dict = field(default_factory=dict)  # extra pipeline kwargs (e.g. max_sequence_length)
    _installed: list = field(default_factory=list)  # (attention module, its original processor)
    _swapped: list = field(default_factory=list)  # (parent, name, original module) of swapped submodules
    # The pipeline runs both guidance branches as one batched forward (Mochi) rather than two (Wan): CFG
    # parallel splits that batch instead of swapping prompts.
    batched_cfg: ClassVar[bool] = False

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def install(self, controller: Controller) -> None:  # pragma: no cover - per family
        raise NotImplementedError

    def torch_compile_blocks(self, backend: str = "inductor") -> None:
        """Regional torch.compile of the repeated transformer blocks (diffusers' compile_repeated_blocks).
        Processors must be installed first: the compiled graphs trace them."""
        from ..errors import ConfigError

        if not getattr(self.pipe.transformer, "_repeated_blocks", None):
            raise ConfigError(
                f"generate.compile is not supported for {self.ident.name} (its transformer declares "
                f"no repeated blocks); set generate.compile=false"
            )
        import torch._dynamo

        # All blocks share one code object, so their graphs share dynamo's cache: one per (dense step or
        # bucket) x distinct kernel config. Room for them all, instead of the default 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)

    def uninstall(self) -> None:
        """Put back every original processor and swapped submodule (install is undone in full)."""
        for module, processor in self._installed:
            self._set_processor(module, processor)
        self._installed.clear()
        restore_modules(self._swapped)

    @staticmethod
    def _set_processor(module, processor) -> None:
        module.set_processor(processor)

    def run(
        self,
        prompt: str,
        *,
        cfg: Config,
        controller: Controller | None,
        seed: int,
        output_type: str = "np",
        cfg_branch: int = 0,
    ):
        """One pipeline call with the config's sampling settings; the controller follows its steps.
        `cfg_branch=1` (the second rank of CFG parallel, two-forward pipelines) swaps prompt and negative
        prompt, so that the step's first forward on that rank is the unconditional one (see CFGParallelHook)."""
        g = cfg.generate
        prompt, negative = prompt, g.negative_prompt
        if cfg_branch == 1 and not self.batched_cfg:
            prompt, negative = negative, prompt
        kwargs = dict(self.call_defaults)
        if controller is not None:
            controller.reset()
            kwargs["callback_on_step_end"] = controller.on_step_end
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = self.pipe(
            prompt=prompt,
            negative_prompt=negative,
            height=cfg.video.height,
            width=cfg.video.width,
            num_frames=cfg.video.frames,
            num_inference_steps=g.steps,
            guidance_scale=g.guidance,
            generator=generator,
            output_type=output_type,
            **kwargs,
        )
        return out.frames
