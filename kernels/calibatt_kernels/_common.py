"""What the attention backends share: the kernel configuration, the ahead-of-time signature helper, and small
device helpers. It imports nothing of the package, so every backend module can import it without importing
another backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2, with scale * log2(e) folded into one multiply

# Which kernel, and how its programs cover the tiles:
# - "tl_persistent": the `tl` kernel (attn_tl.py), one program per SM striding through the longest-first order
# - "tl_tile": the `tl` kernel, one program per tile
# - "gluon_persistent": the Gluon kernel (attn_gluon.py), one program per SM; Q double-buffered, K and V rings
#   of their own, the last wave split over idle SMs (split_merge.py)
# - "gluon_tile": the Gluon kernel, one program per 128-row query tile, one joint K/V ring
KERNELS = ("tl_persistent", "tl_tile", "gluon_persistent", "gluon_tile")


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of a block-sparse attention kernel. `kernel` names the kernel and its grid
    (`KERNELS`); the `tl` kernel reads every other field, the Gluon kernels only `num_stages` (the depth of
    their K ring: the per-tile kernel's joint K/V ring, the persistent kernel's K ring, its V ring one less).
    A Gluon config takes sm_90, 128 x 128 blocks, bf16/fp16, 16-byte aligned rows and no lse; `dispatch` runs
    the `tl` kernel for any other call (and records and logs that)."""

    kernel: str = "tl_persistent"
    block_m: int | None = None  # query rows per program tile; None: the mask block BM
    block_n: int | None = None  # keys per inner step; None: the mask block BN
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool | None = None  # None: on Hopper+ when strides allow it
    # tl only: tl.range(..., warp_specialize=True) on the key loop
    tl_warp_specialize: bool = False
    # tl only: FA3-style software pipelining inside one program: the scores of key tile j+1 are issued (an
    # async wgmma on Hopper) before the softmax and PV of tile j, so tensor cores and MUFU/ALU could overlap.
    # Measured no faster on an H200 with triton 3.6 (bench/NOTES.md), so it is no tuning candidate; kept for
    # bench_kernel --configs.
    tl_pipeline_qk: bool = False

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"KernelConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.backend == "gluon" and (self.tl_warp_specialize or self.tl_pipeline_qk):
            raise ValueError(f"tl_warp_specialize and tl_pipeline_qk are options of the tl kernel, not {self.kernel}")

    @property
    def backend(self) -> str:
        """The dispatch backend that launches this config: "tl" or "gluon"."""
        return self.kernel.split("_", 1)[0]

    @property
    def persistent(self) -> bool:
        """One program per SM (else one per tile)."""
        return self.kernel.endswith("_persistent")

    def to_manifest(self) -> dict:
        """The config as a cache manifest stores it. The record keeps the field names caches have always been
        written with (a `gluon` and a `persistent` flag, `warp_specialize`, `pipeline_qk`), so existing caches
        and their reports read as before."""
        gluon = self.backend == "gluon"
        return {
            "block_m": self.block_m,
            "block_n": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "persistent": self.persistent,
            "use_tma": self.use_tma,
            # the Gluon kernels are warp-specialized by construction: the record says so, as it always has
            "warp_specialize": gluon or self.tl_warp_specialize,
            "pipeline_qk": self.tl_pipeline_qk,
            "gluon": gluon,
        }

    @classmethod
    def from_manifest(cls, record: dict) -> KernelConfig:
        """Inverse of `to_manifest`; also takes the dataclass's own fields (`dataclasses.asdict`)."""
        if "kernel" in record:
            return cls(**record)
        r = dict(record)
        gluon = bool(r.pop("gluon", False))
        kernel = ("gluon_" if gluon else "tl_") + ("persistent" if r.pop("persistent", True) else "tile")
        ws = bool(r.pop("warp_specialize", False))
        pipe = bool(r.pop("pipeline_qk", False))
        unknown = set(r) - {"block_m", "block_n", "num_warps", "num_stages", "use_tma"}
        if unknown:
            raise ValueError(f"unknown kernel config fields {sorted(unknown)}")
        return cls(kernel=kernel, tl_warp_specialize=ws and not gluon, tl_pipeline_qk=pipe, **r)


def aot_signature(
    names: list[str], consts: dict, dtype: torch.dtype, *, i32_pointers: tuple[str, ...]
) -> tuple[dict, dict]:
    """The (signature, attrs) of a block-sparse kernel (tl or Gluon) for the ahead-of-time compiler: q, k, v
    and the output in `dtype`, the index pointers int32, Lse float32, qk_scale fp32, other scalars i32.
    q, k, v and out are 16-byte aligned (`tt.divisibility` 16); the index pointers carry no alignment."""
    elem = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("Q", "K", "V", "Out"):
            sig[n] = f"*{elem}"
        elif n in ("Lse", "WsO", "WsML"):
            sig[n] = "*fp32"
        elif n in i32_pointers:
            sig[n] = "*i32"
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i32"
    # q, k, v and out are 16-byte aligned as torch allocations are; the index pointers are not specialised
    # on alignment (attn_tl.INDEX_POINTERS), so they get no divisibility attribute here either.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("Q", "K", "V", "Out") if n in names}
    return sig, attrs


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of this device (a Hopper/Ampere GPU, or the CPU
    under TRITON_INTERPRET=1). Otherwise `dispatch` runs the PyTorch paths (and records and logs that)."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return False


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """The GPU's SM count (cached per device: the launchers ask on every call)."""
    device = torch.device(device)
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor with x's shape whose dims are laid out in x's stride order (a [B, N, H, D] buffer
    viewed as [B, H, N, D] stays that), dense even when x is a slice of a larger buffer."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -d))
    buf = torch.empty([x.shape[d] for d in order], dtype=x.dtype, device=x.device)
    return buf.permute([order.index(d) for d in range(x.dim())])


def check_attention_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index, block_size: tuple[int, int], out: torch.Tensor | None
) -> torch.Tensor:
    """Validate a kernel call (q, k, v [B, H, N, D], index rows [B or 1, H, Mq], `out`) and return the output
    buffer: `out`, or a new one in q's memory layout."""
    B, H, N, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {D}")
    Mq = -(-N // block_size[0])
    Bi = index.counts.shape[0]
    if index.counts.shape != (Bi, H, Mq) or Bi not in (1, B) or index.offsets.shape != index.counts.shape:
        raise ValueError(
            f"index counts {tuple(index.counts.shape)} / offsets {tuple(index.offsets.shape)} do not "
            f"match (B or 1, H, Mq) = ({B}, {H}, {Mq}) for N={N}, block {block_size}"
        )
    if index.indices.dim() != 1:
        raise ValueError(f"index indices must be 1-d (compressed rows), got {tuple(index.indices.shape)}")
    # Block ids < Mk (= ceil(N / BN)) are not checked here: that would wait for the GPU on every call.
    # mask_to_index builds them from a mask of width Mk.
    if out is None:
        return empty_like_layout(q)
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


class BackendUnavailable(RuntimeError):
    """Raised by a backend's launch when it cannot run in this process at all: the installed triton fails to
    compile its kernel (a Gluon API the kernel does not know) or the binary does not fit the GPU. Both happen
    before anything runs on the GPU and hold for every later call, so `dispatch` disables the backend for the
    rest of the process and runs the call on the next one (a recorded fallback). Errors of the launch itself
    (out of memory, a CUDA error) are not this: they propagate."""


class KernelFallback(RuntimeError):
    """Raised inside `dispatch.strict_fallbacks()` where a call would run another kernel than the one it asked
    for, or a PyTorch path on a GPU: the message names the operation, where (the scope), what it wanted, what
    would run and why."""
