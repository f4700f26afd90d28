"""The Gluon INT8/FP8 attention kernel (attn_fp8_gluon.py) without a GPU: Gluon has no interpreter, so CI
compiles it for sm_90 here (ptxas ships in the Triton wheel) and checks what the binary is made of: the two
8-bit wgmma forms of the scheme, shared memory within Hopper's, and no register spills (a spill in the key
loop costs a local-memory round trip per tile). tests/test_fp8_gluon_gpu.py runs it against the reference."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget

from calibatt_kernels import attn_fp8_gluon


def _compile(head_dim: int, **kw):
    from triton.experimental.gluon._runtime import GluonASTSource

    sig, consts, attrs, opts = attn_fp8_gluon.aot_source_args(torch.bfloat16, head_dim, **kw)
    src = GluonASTSource(attn_fp8_gluon._gl_attn_fp8_tile, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def _stack_bytes(cubin: bytes, tmp_path) -> int:
    """The kernel's stack frame in the binary (cuobjdump's resource usage): registers spilled to local memory
    live there; a kernel without spills (and without calls) has none."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    stacks = [int(n) for n in re.findall(r"STACK:(\d+)", out)]
    assert stacks, out
    return max(stacks)


@pytest.mark.parametrize("head_dim", [128, 64])
def test_default_build_compiles_for_sm90_without_spills(head_dim, tmp_path):
    kernel = _compile(head_dim)
    ptx = kernel.asm["ptx"]
    mmas = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k32\.\S+?)\s", ptx))
    # Q.K^T in INT8 (int32 accumulation), P.V in e4m3 (fp32), 64 rows per warpgroup
    assert mmas == {"m64n128k32.s32.s8.s8", f"m64n{head_dim}k32.f32.e4m3.e4m3"}, mmas
    assert "setmaxnreg" in ptx  # warp-specialized: the consumers take the registers the loader gives up
    assert kernel.metadata.shared <= 227 * 1024
    assert _stack_bytes(kernel.asm["cubin"], tmp_path) == 0
