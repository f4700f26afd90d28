"""The INT8/FP8 attention kernels (attn_fp8.py) on a GPU with 8-bit tensor cores, at Wan sizes, against the
PyTorch reference of the scheme (quant.py). Skipped without CUDA sm_89+."""

from __future__ import annotations

import pytest
import torch
from fp8_inputs import int8_tie_q, outlier_qkv, random_qkv

from calibatt_kernels import KernelConfig, block_sparse_attention_ref, mask_to_index, num_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA GPU with 8-bit tensor cores (sm_89+)",
    ),
]

D = 128
# Wan 1.3B 480p: 12 heads, 21 x 30 x 52 tokens; Wan 14B 720p: 40 heads (4 of them here), 21 x 45 x 80 tokens.
SHAPES = {"wan1.3b-480p": (12, 32760), "wan14b-720p-4heads": (4, 75600)}
REF_HEADS = 2  # the references run on the first heads only


def _mask(H, N, density, seed, bs=(128, 128), batch=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(batch, H, num_blocks(N, bs[0]), num_blocks(N, bs[1]), device="cuda", generator=gen) < density
    mask[..., -1] = True  # the partial last key block
    mask[..., 3, :] = False  # an empty row
    return mask


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("inputs", ["outlier", "ties"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_quantize_matches_reference(shape, inputs):
    """The kernels' codes and scales are the reference's, bit for bit: both divide as IEEE does, round the
    exact product x * (1 / scale) once (quant._int8) and sum K in float64 (exact for bf16 keys, in any order).
    "ties": q's codes on rounding ties (int8_tie_q), where rounding an fp32 product instead puts about half of
    them a step off."""
    from calibatt_kernels.attn_fp8 import quantize_qkv
    from calibatt_kernels.quant import quantize_qkv_ref

    H, N = SHAPES[shape]
    q, k, v = outlier_qkv(1, H, N, D, seed=0, device="cuda", transposed=True)
    if inputs == "ties":
        q = int8_tie_q(1, H, N, D, seed=0, device="cuda")
    got = quantize_qkv(q, k, v)
    ref = quantize_qkv_ref(q, k, v)
    for name in ("q_scale", "k_scale", "k_mean", "v_scale", "q8", "k8", "v8t"):
        a, b = getattr(got, name), getattr(ref, name)
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.equal(a, b), f"{name}: {(a != b).float().mean().item():.2e} of the values differ"


@pytest.mark.parametrize("inputs", ["random", "outlier"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    "cfg", [None, dict(kernel="tl_persistent"), dict(use_tma=False), dict(block_m=64, num_warps=4)], ids=str
)
def test_kernel_matches_reference_at_wan_sizes(shape, inputs, cfg):
    from calibatt_kernels.attn_fp8 import block_sparse_attention_fp8_indexed
    from calibatt_kernels.quant import block_sparse_attention_fp8_ref

    if cfg is not None and shape != "wan1.3b-480p":
        pytest.skip("configs other than the default at one shape")
    H, N = SHAPES[shape]
    make = outlier_qkv if inputs == "outlier" else random_qkv
    q, k, v = make(1, H, N, D, seed=1, device="cuda", transposed=True)
    mask = _mask(H, N, 0.3, seed=2)
    out = torch.full_like(q, float("nan"))
    block_sparse_attention_fp8_indexed(
        q, k, v, mask_to_index(mask), out=out, config=KernelConfig(**cfg) if cfg else None
    )
    torch.cuda.synchronize()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements not written"
    assert (out[:, :, 3 * 128 : 4 * 128] == 0).all(), "an empty mask row must give zeros"
    sl = slice(0, REF_HEADS)
    ref = block_sparse_attention_fp8_ref(q[:, sl], k[:, sl], v[:, sl], mask[:, sl], rows_per_chunk=32).float()
    rel = _rel(out[:, sl], ref)
    exact = block_sparse_attention_ref(q[:, sl].float(), k[:, sl].float(), v[:, sl].float(), mask[:, sl])
    rel_exact = _rel(out[:, sl], exact)
    print(f"{shape} {inputs} {cfg}: vs fp8 reference {rel:.2e}, vs fp32 attention {rel_exact:.2e}")
    assert rel <= 1e-2, f"vs the fp8 reference: rel={rel:.2e}"
    # the scheme's own error at scale: outliers as in tests/test_fp8.py (2e-2 there); iid normal inputs carry
    # e4m3's ~2.4 % per-element rounding of P and V straight to the output (no structure to average it out)
    assert rel_exact <= (2e-2 if inputs == "outlier" else 5e-2), f"vs fp32 attention: rel={rel_exact:.2e}"


def test_per_batch_masks_and_broadcast_index():
    from calibatt_kernels.attn_fp8 import block_sparse_attention_fp8_indexed
    from calibatt_kernels.quant import block_sparse_attention_fp8_ref

    H, N = 2, 20000
    q, k, v = outlier_qkv(2, H, N, D, seed=3, device="cuda", transposed=False)
    for batch in (2, 1):
        mask = _mask(H, N, 0.2, seed=4 + batch, batch=batch)
        out = block_sparse_attention_fp8_indexed(q, k, v, mask_to_index(mask))
        assert out.stride() == q.stride()
        ref = block_sparse_attention_fp8_ref(q, k, v, mask, rows_per_chunk=32)
        rel = _rel(out, ref)
        assert rel <= 1e-2, f"index batch {batch}: rel={rel:.2e}"


@pytest.mark.parametrize("heads", [12, 40], ids=["wan1.3b", "wan14b"])
def test_fused_norm_rope_quantize_matches_unfused_path(heads):
    """qk_norm_rope_quant: the same k as ck.qk_norm_rope, and q's codes as quantize_qkv_ref makes of its q."""
    import calibatt_kernels as ck
    from calibatt_kernels.attn_fp8 import qk_norm_rope_quant
    from calibatt_kernels.quant import quantize_qkv_ref

    N, C = 32760 if heads == 12 else 8000, heads * D
    gen = torch.Generator(device="cuda").manual_seed(9)
    xq, xk = (torch.randn(1, N, C, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    w = torch.rand(C, device="cuda", generator=gen) + 0.5
    ang = (torch.rand(N, D // 2, device="cuda", generator=gen) * 6).repeat_interleave(2, -1).view(1, N, 1, D)
    (q8, q_scale), k = qk_norm_rope_quant(xq, xk, w, w, ang.cos(), ang.sin(), heads=heads, eps=1e-6)
    q_ref, k_ref = ck.qk_norm_rope(xq, xk, w, w, ang.cos(), ang.sin(), heads=heads, eps=1e-6)
    assert torch.equal(k, k_ref)
    want = quantize_qkv_ref(q_ref.transpose(1, 2), k_ref.transpose(1, 2), k_ref.transpose(1, 2))
    assert torch.equal(q8, want.q8), f"{(q8 != want.q8).float().mean().item():.2e} of q's codes differ"
    assert torch.equal(q_scale, want.q_scale), "q's scales differ"


@pytest.mark.parametrize("heads", [12, 40], ids=["wan1.3b", "wan14b"])
def test_fused_dispatch_equals_the_unfused_calls(heads):
    """dispatch.qk_norm_rope_attention_fp8 (q's codes made in the norm + RoPE pass) against the two calls it
    replaces, qk_norm_rope then block_sparse_attention_fp8_indexed: the same output, bit for bit and in the
    same layout, with the fused kernel recorded."""
    import calibatt_kernels as ck
    from calibatt_kernels import dispatch

    N, C = 32760 if heads == 12 else 8000, heads * D
    gen = torch.Generator(device="cuda").manual_seed(10)
    xq, xk, xv = (torch.randn(1, N, C, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    xk = xk + 4.0 * torch.randn(C, device="cuda", generator=gen).bfloat16()  # outlier channels
    w = torch.rand(C, device="cuda", generator=gen) + 0.5
    ang = (torch.rand(N, D // 2, device="cuda", generator=gen) * 6).repeat_interleave(2, -1).view(1, N, 1, D)
    v = xv.view(1, N, heads, D)
    index = mask_to_index(_mask(heads, N, 0.3, seed=11))
    ck.reset_what_ran()
    got = dispatch.qk_norm_rope_attention_fp8(xq, xk, v, w, w, ang.cos(), ang.sin(), index, eps=1e-6)
    assert ck.what_ran()["calls"] == {"qk_norm_rope:triton_quant": 1, "attention:fp8_tl_tile": 1}
    qn, kn = ck.qk_norm_rope(xq, xk, w, w, ang.cos(), ang.sin(), heads=heads, eps=1e-6)
    want = dispatch.block_sparse_attention_fp8_indexed(qn.transpose(1, 2), kn.transpose(1, 2), v.transpose(1, 2), index)
    assert got.stride() == want.stride(), (got.stride(), want.stride())
    assert torch.equal(got, want), f"{(got != want).float().mean().item():.2e} of the outputs differ"
