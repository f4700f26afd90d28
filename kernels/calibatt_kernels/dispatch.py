"""The one entry to the kernels: which backend runs each call, and a record of what ran.

Attention goes through a small backend protocol (`AttentionBackend`). The backends, most preferred first:
"gluon" (attn_gluon.py, sm_90), "tl" (attn_tl.py, any GPU from Ampere on and the CPU interpreter), "cpu"
(cpu.py) and "reference" (reference.py, takes every call). A call with a `KernelConfig` runs on the backend
the config names (`config.backend`); a call without one runs on the first backend that takes it, with that
backend's default config. Adding a backend is one module that defines a `BACKEND` object with the protocol's
members, and one `_register` line below.

Nothing falls back silently: when the config's backend cannot take a call, or a "cpu"/"reference" path runs
because Triton cannot, the fallback is logged at WARNING (once per kind) and counted; inside
`strict_fallbacks()` it raises `KernelFallback` instead (`generate --strict`, and the tuner, which must not
time one kernel under another's name). `what_ran()` tells, per operation, how many calls each backend ran,
the latest one, and the fallbacks, and per scope (`set_scope`: a generate run's (bucket, layer)) which
attention kernel ran and how many of the blocks it could have computed it did; `reset_what_ran()` starts
over (a benchmark or a test that wants to know what its calls ran).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from typing import Protocol

import torch

from . import attn_fp8, attn_gluon, attn_tl, cpu, quant, reference
from . import block_mass as _block_mass
from . import linear_gelu as _linear_gelu
from . import norm_rope as _norm_rope
from . import split_merge as _split_merge
from ._common import BackendUnavailable, KernelConfig, KernelFallback, triton_usable
from .index import BlockIndex, index_to_mask, mask_to_index
from .reference import num_blocks

log = logging.getLogger("calibatt.kernels")


class AttentionBackend(Protocol):
    """What `dispatch` needs of a block-sparse attention backend."""

    name: str  # what `what_ran` and `KernelConfig.backend` call it
    is_fallback: bool  # a PyTorch path: running it because Triton cannot is a fallback (logged, counted)

    def supports(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        block_size: tuple[int, int],
        *,
        return_lse: bool = False,
    ) -> bool:
        """Whether it takes this call (device, dtype, layout, block size, head dim, lse)."""

    def default_config(self, device: torch.device, block_size: tuple[int, int]) -> KernelConfig | None:
        """Its config for a call that brings none (None: it has no configs)."""

    def candidates(
        self,
        capability: tuple[int, int],
        block_size: tuple[int, int],
        head_dim: int,
        dtype: torch.dtype | None = None,
        *,
        return_lse: bool = False,
    ) -> list[KernelConfig]:
        """The configs `calibatt compile` measures on a GPU of this compute capability."""

    def launch(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        index: BlockIndex,
        *,
        block_size: tuple[int, int],
        scale: float | None,
        out: torch.Tensor | None,
        config: KernelConfig | None,
        return_lse: bool,
    ):
        """Run the call: the output (and the row lse with `return_lse`). May raise `BackendUnavailable`."""

    def kernel_fns(self) -> list:
        """Its Triton JIT functions (for the cache tools)."""

    def aot_source(
        self,
        config: KernelConfig,
        dtype: torch.dtype,
        block_size: tuple[int, int],
        head_dim: int,
        capability: tuple[int, int],
        return_lse: bool = False,
    ):
        """(compiler source, options) of a config for `triton.compile(..., target=...)` without a GPU."""

    def prewarm(
        self,
        configs: dict,
        index: dict,
        *,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int,
        return_lse: bool = False,
    ) -> None:
        """Make what its launches derive once (beyond the binaries), before the first step."""


BACKENDS: dict[str, AttentionBackend] = {}


def _register(backend: AttentionBackend) -> None:
    BACKENDS[backend.name] = backend


# most preferred first
_register(attn_gluon.BACKEND)
_register(attn_tl.BACKEND)
_register(cpu.BACKEND)
_register(reference.BACKEND)

_disabled: dict[str, str] = {}  # backend -> why it cannot run in this process (BackendUnavailable)


# ---- what ran ----


class RunRecord:
    """Per process: calls per (operation, what ran), the latest per operation, the fallbacks, and per scope
    the attention kernels that ran and the blocks they computed."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()  # (op, ran) -> calls; ran: a KernelConfig.kernel or a backend name
        self.last: dict[str, str] = {}  # op -> what ran its latest call
        self.fallbacks: Counter = Counter()  # (op, wanted, ran, reason) -> calls
        self.scoped: Counter = Counter()  # (scope, ran) -> attention calls
        # scope -> {"total": blocks of its calls, and the blocks they computed as device tensors (summing the
        # counts must not wait for the GPU): "per_index": {id: [a plan index's sum, calls x batch repeats]},
        # "running": the sum of the one-call indexes'}
        self.blocks: dict = {}
        self.strict = False  # a fallback raises KernelFallback (strict_fallbacks)
        self._warned: set = set()

    def note(self, op: str, ran: str) -> None:
        self.calls[op, ran] += 1
        self.last[op] = ran

    def note_attention(self, ran: str, q: torch.Tensor, index: BlockIndex, block_size: tuple[int, int]) -> None:
        """An attention call that ran `ran`, under the current scope, with the blocks its index lists out of
        all B x H x Mq x Mk. The listed blocks are summed on the index's device, never waited for: a plan's
        index (kept alive by the plan) sums once and is counted per call here; an index made for one call
        (the custom op's) adds its sum to the scope's running total, one small kernel."""
        self.note("attention", ran)
        self.scoped[_scope, ran] += 1
        B, H, N, _ = q.shape
        mq, mk = -(-N // block_size[0]), -(-N // block_size[1])
        reps = B // index.counts.shape[0]
        entry = self.blocks.setdefault(_scope, {"total": 0, "per_index": {}, "running": None})
        entry["total"] += B * H * mq * mk
        kept = index.derived.get("kept_blocks")
        if kept is not None or index.derived.get("seen"):
            if kept is None:
                kept = index.derived["kept_blocks"] = index.counts.sum(dtype=torch.int64)
            held = entry["per_index"].setdefault(id(kept), [kept, 0])
            held[1] += reps
            return
        index.derived["seen"] = True  # a second call with this index object: it lives on, sum it once
        kept = index.counts.sum(dtype=torch.int64)
        kept = kept * reps if reps != 1 else kept
        running = entry["running"]
        # (out of place: a total begun under torch.inference_mode is an inference tensor, which later calls
        # outside it could not update in place)
        entry["running"] = kept if running is None else running + kept.to(running.device)

    def fallback(self, op: str, wanted: str, ran: str, reason: str) -> None:
        where = "" if _scope is None else f" at {_scope_label(_scope)}"
        if self.strict:
            raise KernelFallback(f"{op}{where} wanted {wanted} but would run {ran} ({reason})")
        self.fallbacks[op, wanted, ran, reason] += 1
        if (op, wanted, ran, reason) not in self._warned:
            self._warned.add((op, wanted, ran, reason))
            log.warning(
                "calibatt_kernels: %s%s wanted %s, ran %s instead (%s); same results", op, where, wanted, ran, reason
            )

    def snapshot(self) -> dict:
        scopes = {}
        for (key, ran), n in self.scoped.items():
            scopes.setdefault(key, {"scope": key, "ran": {}})["ran"][ran] = n
        for key, entry in self.blocks.items():
            kept = sum(int(t) * n for t, n in entry["per_index"].values())
            kept += 0 if entry["running"] is None else int(entry["running"])
            scopes[key].update(blocks=kept, total_blocks=entry["total"])
        return {
            "calls": {f"{op}:{ran}": n for (op, ran), n in self.calls.items()},
            "last": dict(self.last),
            "fallbacks": [
                {"op": op, "wanted": w, "ran": r, "reason": why, "calls": n}
                for (op, w, r, why), n in self.fallbacks.items()
            ],
            "scopes": list(scopes.values()),
        }

    def reset(self) -> None:
        self.calls.clear()
        self.last.clear()
        self.fallbacks.clear()
        self.scoped.clear()
        self.blocks.clear()


RECORD = RunRecord()


def _on_tensor_device(fn):
    """Run `fn` with its first tensor's GPU current: Triton launches on the current device's stream and the TMA
    allocator allocates there, so a cuda:1 tensor with cuda:0 current (one process driving several GPUs, or
    a library caller) would otherwise launch on the wrong GPU."""

    @functools.wraps(fn)
    def wrapper(t: torch.Tensor, *args, **kwargs):
        if t.is_cuda:
            with torch.cuda.device(t.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return wrapper


def what_ran() -> dict:
    """{"calls": {"attention:gluon_persistent": 40, "block_mass:triton": 3, ...}, "last": {op: what ran},
    "fallbacks": [{"op", "wanted", "ran", "reason", "calls"}, ...], "scopes": [{"scope": key, "ran": {kernel:
    calls}, "blocks": computed, "total_blocks": all}, ...]} since the process started (or `reset_what_ran`).
    Reading "scopes" waits for the GPU (the block counts are summed there)."""
    return RECORD.snapshot()


# The scope later attention calls are attributed to (set_scope). A plain global, read when a kernel runs: the
# custom op (ops.py) is opaque to torch.compile and runs eagerly, so it sees the value set before it even
# inside a compiled graph.
_scope = None


def set_scope(key) -> None:
    """Attribute the attention calls that follow to `key` (a generate run: (bucket, layer); None: none).

    Not while torch.compile traces: dynamo would replay the assignment after its graph, i.e. after the
    kernels it should label. Call it outside compiled code, or guard the call with
    `torch.compiler.is_compiling()` (so that the key's values are not read, and guarded on, while tracing)."""
    global _scope
    if not torch.compiler.is_compiling():
        _scope = key


def scope():
    """The current scope (set_scope)."""
    return _scope


def _scope_label(key) -> str:
    if isinstance(key, tuple) and len(key) == 2:
        return f"bucket {key[0]}, layer {'*' if key[1] is None else key[1]}"
    return str(key)


@contextlib.contextmanager
def strict_fallbacks(on: bool = True):
    """While active (with `on`), a fallback raises KernelFallback (naming what fell back, where and why)
    instead of running the other backend."""
    prev = RECORD.strict
    RECORD.strict = prev or on
    try:
        yield
    finally:
        RECORD.strict = prev


def reset_what_ran() -> None:
    RECORD.reset()


def disabled_backends() -> dict[str, str]:
    """Backends this process stopped using (why), e.g. a Gluon kernel the installed triton cannot compile."""
    return dict(_disabled)


# ---- attention ----


def _ran_name(backend: AttentionBackend, config: KernelConfig | None) -> str:
    return config.kernel if config is not None else backend.name


def _takes(backend: AttentionBackend, q, k, v, block_size, return_lse) -> bool:
    return backend.name not in _disabled and backend.supports(q, k, v, block_size, return_lse=return_lse)


def _why_not(backend_name: str, q: torch.Tensor, k=None, v=None, block_size=None, return_lse=False) -> str:
    if backend_name in _disabled:
        return _disabled[backend_name]
    if backend_name == "gluon" and k is not None:
        return attn_gluon.why_not(q, k, v, block_size, return_lse=return_lse) or "the Gluon kernel refused the call"
    if backend_name in ("tl", "triton"):
        if not triton_usable(q.device):
            return f"Triton unavailable for {q.device.type}"
        return f"head dim {q.shape[-1]} (the kernels take 64 or 128)"
    return f"the {backend_name} kernel does not take this call"


@_on_tensor_device
def block_sparse_attention_indexed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention from the precomputed index form (see `index.py`); q, k, v [B, H, N, D] (any
    strides), index rows [B or 1, H, Mq]. Returns [B, H, N, D] in q's dtype and memory layout (or writes
    `out`). `config`: the kernel configuration `calibatt compile` chose (None: the first backend that takes
    the call, with its default); the PyTorch paths ignore it. `return_lse`: also return each row's
    log-sum-exp, float32 [B, H, N] (-inf for rows with no block)."""
    block_size = tuple(block_size)
    wanted = None  # (the kernel the call asked for, why it cannot run) once it cannot
    if config is not None:
        backend = BACKENDS[config.backend]
        if _takes(backend, q, k, v, block_size, return_lse):
            try:
                res = backend.launch(
                    q, k, v, index, block_size=block_size, scale=scale, out=out, config=config, return_lse=return_lse
                )
                RECORD.note_attention(config.kernel, q, index, block_size)
                return res
            except BackendUnavailable as e:
                _disabled[backend.name] = str(e)
        wanted = (config.kernel, _why_not(backend.name, q, k, v, block_size, return_lse))
    for backend in BACKENDS.values():
        if wanted is not None and config is not None and backend.name == config.backend:
            continue
        if not _takes(backend, q, k, v, block_size, return_lse):
            continue
        cfg = backend.default_config(q.device, block_size)
        ran = _ran_name(backend, cfg)
        # recorded before the launch, so that under strict_fallbacks nothing but the asked-for kernel runs
        if wanted is not None:
            RECORD.fallback("attention", wanted[0], ran, wanted[1])
        elif backend.is_fallback and q.is_cuda:  # on the CPU the PyTorch paths are the design, not a fallback
            RECORD.fallback("attention", "triton", ran, _why_not("triton", q))
        try:
            res = backend.launch(
                q, k, v, index, block_size=block_size, scale=scale, out=out, config=cfg, return_lse=return_lse
            )
        except BackendUnavailable as e:  # (only the Gluon backend raises it, and it is first: no fallback yet)
            _disabled[backend.name] = str(e)
            wanted = wanted or (ran, str(e))
            continue
        RECORD.note_attention(ran, q, index, block_size)
        return res
    raise RuntimeError("no attention backend takes this call")  # unreachable: the reference takes every call


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention; q, k, v [B, H, N, D] (any strides), block_mask bool [(B,) H, Mq, Mk]."""
    return block_sparse_attention_indexed(
        q, k, v, mask_to_index(block_mask, with_schedule=True), block_size=block_size, scale=scale
    )


# ---- attention in fp8 (precision: fp8, opt-in) ----


def fp8_why_not(
    device: torch.device, head_dim: int, block_size: tuple[int, int], *, return_lse: bool = False
) -> str | None:
    """Why fp8 attention cannot take calls of this shape on `device` (None: it can). On the CPU the PyTorch
    reference of the scheme (quant.py) takes every call without the lse, as the CPU paths of bf16 do."""
    device = torch.device(device)
    if return_lse:
        return "the fp8 kernel returns no row log-sum-exp (joint attention)"
    if device.type == "cpu":
        return None
    if device.type != "cuda" or not triton_usable(device):
        return f"Triton unavailable for {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"sm_{cap[0]}{cap[1]} has no 8-bit tensor cores (the fp8 kernel needs sm_89+)"
    return attn_fp8.shape_why_not(head_dim, block_size)


def _fp8_config(config: KernelConfig | None) -> KernelConfig | None:
    """The config an fp8 call takes: a tl config (one compile measured for the fp8 kernel); another (the bf16
    kernels' Gluon config the plan may carry) means the fp8 kernel's default (None)."""
    return config if config is not None and config.backend == "tl" else None


def fp8_kernel_name(
    device: torch.device, head_dim: int, block_size: tuple[int, int], config: KernelConfig | None = None
) -> str:
    """What an fp8 call that fp8_why_not lets through runs: "fp8_" + the tl kernel's name (fp8_tl_tile, ...),
    or "fp8_reference" (the scheme in PyTorch) on the CPU without the Triton interpreter."""
    device = torch.device(device)
    if not triton_usable(device) or attn_fp8.shape_why_not(head_dim, block_size) is not None:
        return "fp8_reference"
    cfg = _fp8_config(config) or attn_fp8.default_config(device, block_size)
    return f"fp8_{cfg.kernel}"


@_on_tensor_device
def block_sparse_attention_fp8_indexed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`block_sparse_attention_indexed` with INT8 Q.K^T and FP8 P.V (quant.py's scheme): the tl kernel of
    attn_fp8.py where it runs (`config`: a tl config compile measured for it; another is ignored), the
    scheme's PyTorch reference on the CPU without the interpreter (the CPU's design, not a fallback). A call
    fp8 cannot take (fp8_why_not) runs the bf16 kernels instead, with `config`, recorded as a fallback (an
    error under strict_fallbacks)."""
    block_size = tuple(block_size)
    why = fp8_why_not(q.device, q.shape[-1], block_size, return_lse=return_lse)
    if why is not None:
        RECORD.fallback("attention", "fp8", "bf16", why)  # before the launch: under strict nothing else runs
        return block_sparse_attention_indexed(
            q, k, v, index, block_size=block_size, scale=scale, config=config, out=out, return_lse=return_lse
        )
    ran = fp8_kernel_name(q.device, q.shape[-1], block_size, config)
    if ran == "fp8_reference":
        mask = index_to_mask(index, num_blocks(k.shape[2], block_size[1])).to(q.device)
        res = quant.block_sparse_attention_fp8_ref(q, k, v, mask, block_size, scale)
        res = res if out is None else out.copy_(res)
    else:
        res = attn_fp8.block_sparse_attention_fp8_indexed(
            q, k, v, index, block_size=block_size, scale=scale, config=_fp8_config(config), out=out
        )
    RECORD.note_attention(ran, q, index, block_size)
    return res


@_on_tensor_device
def qk_norm_rope_attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    index: BlockIndex,
    *,
    eps: float,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Wan's q/k preparation (`qk_norm_rope`: q, k [B, N, C] projections) and `block_sparse_attention_fp8_indexed`
    on it (v [B, N, heads, D]). Where the fp8 kernel runs, q's codes are made in the norm + RoPE pass
    (attn_fp8.qk_norm_rope_quant, recorded as qk_norm_rope "triton_quant"): the codes `quantize_qkv` makes of
    the normed q, so the same output as the two calls, without a pass over q. Elsewhere (the scheme's
    reference on the CPU, a bf16 fallback) it is the two calls. Returns [B, heads, N, D] in the layout of a
    [B, N, heads, D] tensor (as the two calls do)."""
    block_size = tuple(block_size)
    B, N, heads, D = v.shape
    ran = fp8_kernel_name(q.device, D, block_size, config)
    if fp8_why_not(q.device, D, block_size) is not None or ran == "fp8_reference":
        qn, kn = qk_norm_rope(q, k, weight_q, weight_k, cos, sin, heads=heads, eps=eps)
        qn, kn, vt = (t.transpose(1, 2) for t in (qn, kn, v))
        return block_sparse_attention_fp8_indexed(qn, kn, vt, index, block_size=block_size, scale=scale, config=config)
    codes, kn = attn_fp8.qk_norm_rope_quant(
        q, k, weight_q, weight_k, cos, sin, heads=heads, eps=eps, block_size=block_size
    )
    RECORD.note("qk_norm_rope", "triton_quant")
    qz = attn_fp8.quantize_qkv(codes, kn.transpose(1, 2), v.transpose(1, 2), block_size)
    out = torch.empty_strided((B, heads, N, D), (N * heads * D, D, heads * D, 1), dtype=q.dtype, device=q.device)
    attn_fp8.attention_fp8_quantized(qz, index, out, scale=scale, config=_fp8_config(config))
    RECORD.note_attention(ran, out, index, block_size)
    return out


def fp8_candidate_configs(capability: tuple[int, int], block_size: tuple[int, int]) -> list[KernelConfig]:
    """The fp8 kernel's configs worth measuring on a GPU of this compute capability (its default first)."""
    return attn_fp8.candidate_configs(capability, tuple(block_size))


def default_config(device: torch.device, block_size: tuple[int, int], head_dim: int) -> KernelConfig:
    """The config measured best on an H200 for a model of this block size and head dim (bench/NOTES.md): the
    persistent Gluon kernel on sm_90 where it takes the shape, else the tl kernel's default (a call the Gluon
    kernel cannot take runs that too)."""
    device = torch.device(device)
    if device.type == "cuda" and attn_gluon.takes_shape(torch.cuda.get_device_capability(device), block_size, head_dim):
        return attn_gluon.GLUON_PERSISTENT
    return attn_tl.default_config(device, block_size)


def attention_backend(
    device: torch.device,
    block_size: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype | None = None,
    *,
    return_lse: bool = False,
) -> str:
    """The backend a model's attention calls run on here when they bring no config ("gluon", "tl", "cpu" or
    "reference"): what a cache manifest says will run, decided as `block_sparse_attention_indexed` decides
    (for calls in the layouts models hand over)."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if (
            "gluon" not in _disabled
            and attn_gluon.takes_shape(cap, block_size, head_dim)
            and dtype in (None, torch.bfloat16, torch.float16)
            and not return_lse
        ):
            return "gluon"
    if triton_usable(device) and head_dim in (64, 128):
        return "tl"
    if device.type == "cpu" and not return_lse:
        return "cpu"
    return "reference"


def candidate_configs(
    capability: tuple[int, int],
    block_size: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype | None = None,
    *,
    return_lse: bool = False,
) -> list[KernelConfig]:
    """The configs worth measuring on a GPU of this compute capability, every backend's, most preferred
    backend first (its default first). `dtype`: the model's, when known; `return_lse`: the calls need the row
    log-sum-exp (joint attention)."""
    return [
        c
        for b in BACKENDS.values()
        for c in b.candidates(capability, block_size, head_dim, dtype, return_lse=return_lse)
    ]


def aot_source(
    config: KernelConfig,
    dtype: torch.dtype,
    block_size: tuple[int, int],
    head_dim: int,
    capability: tuple[int, int],
    return_lse: bool = False,
):
    """(compiler source, options) of a config, for `triton.compile(source, target=GPUTarget(...))`."""
    return BACKENDS[config.backend].aot_source(config, dtype, tuple(block_size), head_dim, capability, return_lse)


def attention_kernel_fns() -> list:
    """Every JIT function an attention config can launch."""
    return [fn for b in BACKENDS.values() for fn in b.kernel_fns()]


def kernel_names() -> frozenset[str]:
    """The names of every Triton kernel of this package (what a calibatt cache holds)."""
    fns = (
        attention_kernel_fns()
        + attn_fp8.kernel_fns()
        + [
            _block_mass._row_lse,
            _block_mass._block_mass_fwd,
            _norm_rope.kernel_fn(),
            _split_merge.kernel_fn(),
        ]
    )
    return frozenset(fn.__name__ for fn in fns)


def prewarm_attention(
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    configs: dict,
    index: dict,
    return_lse: bool = False,
    precision: str = "bf16",
) -> None:
    """Launch every config of `configs` ({key: KernelConfig or None}) once on a one-block input of the model's
    heads, head dim and dtype (the same specialisation as the real calls), then let each backend make what its
    launches derive once from the plan's `index` ({key: BlockIndex}): the first step then costs what the
    later ones do. `precision` "fp8": the calls go through block_sparse_attention_fp8_indexed (its
    quantize and attention kernels, or the bf16 ones it falls back to)."""
    dev = torch.device(device)
    bs = (block_size, block_size)
    x = torch.zeros(3, 1, block_size, heads, head_dim, device=dev, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in x)
    one = mask_to_index(torch.ones(heads, 1, 1, dtype=torch.bool, device=dev))
    attention = block_sparse_attention_fp8_indexed if precision == "fp8" else block_sparse_attention_indexed
    for c in set(configs.values()) or {None}:
        attention(q, k, v, one, block_size=bs, config=c, return_lse=return_lse)
    prewarm_backends(configs, index, device=dev, dtype=dtype, head_dim=head_dim, return_lse=return_lse)


def launch_records(index: BlockIndex, config: KernelConfig | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What a launch of `config` on the index's device derives from the index, made now: the Gluon kernel's
    (records, split_rows) (BlockIndex.records) when `config` is Gluon's, or None (the default) on a GPU where
    Gluon is the first backend; else (None, None), as the other backends derive nothing. A call that brings
    them never waits for the GPU (the records' last-wave split is decided on the host)."""
    device = index.counts.device
    gluon = config.backend == "gluon" if config is not None else device.type == "cuda"
    if not gluon or "gluon" in _disabled:
        return None, None
    return attn_gluon.launch_records(index, device, persistent=config is None or config.persistent)


def prewarm_backends(
    configs: dict, index: dict, *, device: torch.device, dtype: torch.dtype, head_dim: int, return_lse: bool = False
) -> None:
    """Each backend's `prewarm` (what its launches derive once: the Gluon kernel's records and its merge
    kernel), without launching the configs themselves."""
    for b in BACKENDS.values():
        b.prewarm(configs, index, device=torch.device(device), dtype=dtype, head_dim=head_dim, return_lse=return_lse)


# ---- the other kernels: a Triton kernel where Triton runs, else the reference ----


@_on_tensor_device
def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
) -> torch.Tensor:
    """float32 [B, H, Mq, Mk]: mean over each query block's queries of the softmax mass per key block."""
    if triton_usable(q.device) and q.shape[-1] in (64, 128):
        RECORD.note("block_mass", "triton")
        return _block_mass.block_mass_triton(q, k, block_size=block_size, scale=scale)
    if q.is_cuda:
        RECORD.fallback("block_mass", "triton", "reference", _why_not("triton", q))
    RECORD.note("block_mass", "reference")
    return reference.block_mass_ref(q, k, block_size, scale)


@_on_tensor_device
def attention_with_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense attention output like q's layout, block_mass) of one call: what calibration records. On the
    GPU, SDPA and the block_mass kernel; where Triton cannot run, one pass of the reference gives both from
    the same probabilities (one softmax instead of SDPA plus block_mass_ref's own)."""
    if triton_usable(q.device) and q.shape[-1] in (64, 128):
        RECORD.note("attention_with_block_mass", "triton")
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out, _block_mass.block_mass_triton(q, k, block_size=block_size)
    if q.is_cuda:
        RECORD.fallback("attention_with_block_mass", "triton", "reference", _why_not("triton", q))
    RECORD.note("attention_with_block_mass", "reference")
    mass, out = reference.block_mass_ref(q, k, block_size, v=v)
    return out, mass


@_on_tensor_device
def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's q/k preparation: RMS norm of q and k [B, N, C] over their C channels, then the interleaved
    rotary embedding (cos, sin: [1, N, 1, D] or [N, D]). Returns contiguous [B, N, heads, D] tensors (or
    writes `out`, two such tensors)."""
    if triton_usable(q.device):
        RECORD.note("qk_norm_rope", "triton")
        return _norm_rope.qk_norm_rope_triton(q, k, weight_q, weight_k, cos, sin, heads=heads, eps=eps, out=out)
    if q.is_cuda:
        RECORD.fallback("qk_norm_rope", "triton", "reference", f"Triton unavailable for {q.device.type}")
    RECORD.note("qk_norm_rope", "reference")
    res = reference.qk_norm_rope_ref(q, k, weight_q, weight_k, cos, sin, heads=heads, eps=eps)
    if out is None:
        return res
    return out[0].copy_(res[0]), out[1].copy_(res[1])


@_on_tensor_device
def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh"): cuBLASLt's fused epilogue on the GPU, else the reference
    (on the CPU the reference is the path by design: torch's CPU epilogue applies the erf GELU). `out`: a
    contiguous [..., M] tensor to write."""
    if _linear_gelu.fusable(x, weight, bias):
        RECORD.note("linear_gelu", "cublaslt")
    else:
        if x.is_cuda:
            RECORD.fallback("linear_gelu", "cublaslt", "reference", "no bias, mixed dtypes or an empty input")
        RECORD.note("linear_gelu", "reference")
    return _linear_gelu.linear_gelu(x, weight, bias, out)


__all__ = [
    "BACKENDS",
    "RECORD",
    "AttentionBackend",
    "KernelFallback",
    "RunRecord",
    "aot_source",
    "attention_backend",
    "attention_kernel_fns",
    "attention_with_block_mass",
    "block_mass",
    "block_sparse_attention",
    "block_sparse_attention_fp8_indexed",
    "block_sparse_attention_indexed",
    "candidate_configs",
    "default_config",
    "disabled_backends",
    "fp8_candidate_configs",
    "fp8_kernel_name",
    "fp8_why_not",
    "kernel_names",
    "launch_records",
    "linear_gelu",
    "prewarm_attention",
    "prewarm_backends",
    "qk_norm_rope",
    "qk_norm_rope_attention_fp8",
    "reset_what_ran",
    "scope",
    "set_scope",
    "strict_fallbacks",
    "what_ran",
]
