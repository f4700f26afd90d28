"""The Gluon INT8/FP8 attention kernel (attn_fp8_gluon.py) on a Hopper GPU against the PyTorch reference of the
scheme (quant.py), at Wan sizes, with both ways of accumulating P.V. Skipped without an sm_90 GPU."""

from __future__ import annotations

import pytest
import torch
from fp8_inputs import outlier_qkv, random_qkv

from calibatt_kernels import block_sparse_attention_ref, mask_to_index, num_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
        reason="needs a Hopper GPU (sm_90)",
    ),
]

D = 128
SHAPES = {"wan1.3b-480p": (12, 32760), "wan14b-720p-4heads": (4, 75600)}
REF_HEADS = 2


def _mask(H, N, density, seed, batch=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mb = num_blocks(N, 128)
    mask = torch.rand(batch, H, mb, mb, device="cuda", generator=gen) < density
    mask[..., -1] = True  # the partial last key block
    mask[..., 3, :] = False  # an empty row
    return mask


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("pv_fresh", [True, False], ids=["pv-fresh", "pv-acc"])
@pytest.mark.parametrize("inputs", ["random", "outlier"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gluon_fp8_matches_reference_at_wan_sizes(shape, inputs, pv_fresh):
    from calibatt_kernels.attn_fp8 import quantize_qkv
    from calibatt_kernels.attn_fp8_gluon import attention_fp8_gluon
    from calibatt_kernels.quant import block_sparse_attention_fp8_ref

    H, N = SHAPES[shape]
    make = outlier_qkv if inputs == "outlier" else random_qkv
    q, k, v = make(1, H, N, D, seed=1, device="cuda", transposed=True)  # diffusers' [B, N, H, D] memory
    mask = _mask(H, N, 0.3, seed=2)
    out = torch.full_like(q, float("nan"))
    attention_fp8_gluon(quantize_qkv(q, k, v), mask_to_index(mask), out, pv_fresh=pv_fresh)
    torch.cuda.synchronize()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements not written"
    assert (out[:, :, 3 * 128 : 4 * 128] == 0).all(), "an empty mask row must give zeros"
    sl = slice(0, REF_HEADS)
    ref = block_sparse_attention_fp8_ref(q[:, sl], k[:, sl], v[:, sl], mask[:, sl], rows_per_chunk=32).float()
    rel = _rel(out[:, sl], ref)
    exact = block_sparse_attention_ref(q[:, sl].float(), k[:, sl].float(), v[:, sl].float(), mask[:, sl])
    rel_exact = _rel(out[:, sl], exact)
    print(f"{shape} {inputs} pv_fresh={pv_fresh}: vs fp8 reference {rel:.2e}, vs fp32 attention {rel_exact:.2e}")
    assert rel <= 1e-2, f"vs the fp8 reference: rel={rel:.2e}"
    assert rel_exact <= (2e-2 if inputs == "outlier" else 5e-2), f"vs fp32 attention: rel={rel_exact:.2e}"


@pytest.mark.parametrize("pv_fresh", [True, False], ids=["pv-fresh", "pv-acc"])
def test_gluon_fp8_batches_layouts_and_dense_rows(pv_fresh):
    """Per-batch masks and one index broadcast over the batch; contiguous [B, H, N, D] and a strided output
    (through a temporary); a fully dense mask (every row at its longest); the same codes as the tl kernel's
    input, so both kernels' outputs agree to the rounding order."""
    from calibatt_kernels.attn_fp8 import attention_fp8_quantized, quantize_qkv
    from calibatt_kernels.attn_fp8_gluon import attention_fp8_gluon
    from calibatt_kernels.quant import block_sparse_attention_fp8_ref

    H, N = 2, 20000
    q, k, v = outlier_qkv(2, H, N, D, seed=3, device="cuda", transposed=False)
    qz = quantize_qkv(q, k, v)
    for batch, density in ((2, 0.2), (1, 0.2), (1, 1.0)):
        mask = _mask(H, N, density, seed=4 + batch, batch=batch)
        if density == 1.0:
            mask[:] = True
        index = mask_to_index(mask)
        out = attention_fp8_gluon(qz, index, torch.empty_like(q), pv_fresh=pv_fresh)
        ref = block_sparse_attention_fp8_ref(q, k, v, mask, rows_per_chunk=32)
        assert _rel(out, ref) <= 1e-2, f"index batch {batch}, density {density}: rel={_rel(out, ref):.2e}"
        tl_out = attention_fp8_quantized(qz, index, torch.empty_like(q))
        assert _rel(out, tl_out) <= 5e-3, f"vs the tl kernel: {_rel(out, tl_out):.2e}"
        strided = torch.empty(2, N, D, H, device="cuda", dtype=q.dtype).permute(0, 3, 1, 2)
        attention_fp8_gluon(qz, index, strided, pv_fresh=pv_fresh)
        assert torch.equal(strided, out)
