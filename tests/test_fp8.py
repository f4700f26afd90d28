"""The quantized attention scheme (quant.py) against float64 attention, and its kernels (attn_fp8.py) under the
Triton interpreter against it.

The scheme's tests run here directly. The kernel cases need TRITON_INTERPRET=1 before triton is imported
(see tests/test_kernels_triton.py), so they run in one subprocess -- this file as a script -- that prints
each case's measured errors as JSON; the tests below assert on them.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import json  # noqa: E402
import math  # noqa: E402
import traceback  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreted import run_interpreted  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fp8_inputs, also when run as a script
from fp8_inputs import int8_tie_q, outlier_qkv, random_qkv  # noqa: E402

from calibatt_kernels import expand_block_mask, mask_to_index, num_blocks  # noqa: E402
from calibatt_kernels.quant import (  # noqa: E402
    block_sparse_attention_fp8_ref,
    naive_fp8_attention_ref,
    quantize_qkv_ref,
)


def _mask(H, N, bs, density, seed, batch=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, H, num_blocks(N, bs[0]), num_blocks(N, bs[1]), generator=gen) < density
    mask[..., 0] = True
    mask[..., -1] = True  # the partial last key block
    mask[..., 2, :] = False  # an empty row
    return mask


def _attention_f64(q, k, v, mask, bs):
    """Block-sparse attention in float64 over the token mask (empty rows give 0)."""
    B, H, N, D = q.shape
    tok = expand_block_mask(mask.expand(B, -1, -1, -1), N, N, bs)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    return torch.softmax(s.masked_fill(~tok, float("-inf")), -1).nan_to_num(0.0) @ v.double()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- the scheme (PyTorch reference) ----

SCHEME_CASES = {
    # name: (B, H, N, D, block_size)
    "d128-b128": (1, 2, 1000, 128, (128, 128)),
    "d64-b64-batch2": (2, 2, 700, 64, (64, 64)),
}


@pytest.mark.parametrize("name", list(SCHEME_CASES))
def test_scheme_error_on_outlier_inputs(name):
    """Outlier inputs (tests/fp8_inputs.py): within 2e-2 of float64 attention, and >= 5x closer than a
    per-tensor FP8 cast."""
    B, H, N, D, bs = SCHEME_CASES[name]
    q, k, v = outlier_qkv(B, H, N, D, seed=1, transposed=True)
    mask = _mask(H, N, bs, 0.4, seed=2)
    exact = _attention_f64(q, k, v, mask, bs)
    out = block_sparse_attention_fp8_ref(q, k, v, mask, bs)
    assert out.dtype == q.dtype and out.stride() == q.stride()
    rel = _rel(out, exact)
    rel_naive = _rel(naive_fp8_attention_ref(q, k, v, mask, bs), exact)
    assert rel <= 2e-2, f"rel={rel:.2e} (naive per-tensor fp8: {rel_naive:.2e})"
    assert rel_naive >= 5 * rel, f"only {rel_naive / rel:.1f}x better than naive: {rel:.2e} vs {rel_naive:.2e}"
    assert (out[:, :, 2 * bs[0] : 3 * bs[0]] == 0).all(), "an empty mask row must give zeros"


def test_k_smoothing_carries_the_outlier_channels():
    """Without the K smoothing the outlier channels take the keys' INT8 codes: several times the error."""
    B, H, N, D, bs = SCHEME_CASES["d128-b128"]
    q, k, v = outlier_qkv(B, H, N, D, seed=3)
    mask = _mask(H, N, bs, 0.4, seed=4)
    exact = _attention_f64(q, k, v, mask, bs)
    rel = _rel(block_sparse_attention_fp8_ref(q, k, v, mask, bs), exact)
    rel_raw = _rel(block_sparse_attention_fp8_ref(q, k, v, mask, bs, smooth_k=False), exact)
    assert rel_raw >= 3 * rel, f"smoothed {rel:.2e} vs not {rel_raw:.2e}"


def test_scheme_error_on_normal_inputs():
    """iid normal inputs: no outliers to remove, so e4m3's rounding of P and V (~2.4 % rms an element) passes
    to the output; the bound documents that floor."""
    q, k, v = random_qkv(1, 2, 600, 64, seed=5)
    mask = _mask(2, 600, (64, 64), 0.5, seed=6)
    rel = _rel(block_sparse_attention_fp8_ref(q, k, v, mask, (64, 64)), _attention_f64(q, k, v, mask, (64, 64)))
    assert rel <= 5e-2, f"rel={rel:.2e}"


def test_quantized_form():
    """Codes, scales and padding as quant.py defines them: Q per token and K per block (after subtracting
    its mean) in INT8 within half a step, V per channel in e4m3 within e4m3's rounding, zeros past N."""
    B, H, N, D, bs = 1, 2, 300, 64, (64, 128)
    q, k, v = outlier_qkv(B, H, N, D, seed=7)
    z = quantize_qkv_ref(q, k, v, bs)
    mq, mk = num_blocks(N, bs[0]), num_blocks(N, bs[1])
    assert z.q8.shape == (B, H, mq * bs[0], D) and z.k8.shape == (B, H, mk * bs[1], D)
    assert z.v8t.shape == (B, H, D, mk * bs[1]) and z.k_scale.shape == (B, H, mk)
    qf, kf, vf = q.float(), k.float(), v.float()
    # Q: the largest |q| of each token maps to +-127, every element within half a step
    assert torch.equal(z.q8[:, :, :N].abs().amax(-1), torch.full((B, H, N), 127, dtype=torch.int8))
    q_err = (z.q8[:, :, :N].float() * z.q_scale[:, :, :N, None] - qf).abs() / z.q_scale[:, :, :N, None]
    assert q_err.max() <= 0.5 + 1e-4, f"q: {q_err.max():.3f} steps"
    # K: mean over the tokens removed, one scale per key block
    torch.testing.assert_close(z.k_mean, kf.mean(2))
    ks = z.k_scale.repeat_interleave(bs[1], -1)[:, :, :N, None]
    k_err = (z.k8[:, :, :N].float() * ks + z.k_mean[:, :, None] - kf).abs() / ks
    assert k_err.max() <= 0.5 + 1e-3, f"k: {k_err.max():.3f} steps"
    # V: per channel, e4m3 (3 mantissa bits: within 2^-4 of each value, or half the subnormal step)
    v_deq = z.v8t.float().transpose(-1, -2)[:, :, :N] * z.v_scale[:, :, None]
    bound = 2.0**-4 * vf.abs() + 2.0**-10 * z.v_scale[:, :, None]
    assert ((v_deq - vf).abs() <= bound * (1 + 1e-5)).all()
    # padding: codes zero past N
    assert not z.q8[:, :, N:].any() and not z.k8[:, :, N:].any() and not z.v8t[..., N:].float().any()


def test_rows_attend_only_to_listed_blocks():
    """A query-block row that lists one key block equals the scheme on that block alone."""
    N, D, bs = 256, 64, (64, 64)
    q, k, v = outlier_qkv(1, 1, N, D, seed=8, dtype=torch.float32)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = True
    out = block_sparse_attention_fp8_ref(q, k, v, mask, bs)
    exact = _attention_f64(q, k, v, mask, bs)
    assert (out[:, :, :64] == 0).all() and (out[:, :, 128:] == 0).all()
    assert _rel(out[:, :, 64:128], exact[:, :, 64:128]) <= 2e-2


class _CudaScalarDivision(torch.overrides.TorchFunctionMode):
    """Tensor / Python number as PyTorch's CUDA kernels compute it: times the number's reciprocal, rounded to
    the tensor's dtype (a step off the quotient in the last bit for many values)."""

    DIV = {torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.DIV and not kwargs and isinstance(args[1], (int, float)) and args[0].is_floating_point():
            x = args[0]
            return x * (torch.ones((), dtype=x.dtype) / torch.tensor(args[1], dtype=x.dtype))
        return func(*args, **(kwargs or {}))


def test_reference_quantizes_alike_on_every_device():
    """quantize_qkv_ref's codes and scales, as a CUDA tensor's Python-scalar division would compute them: the
    same bits (the kernels divide as IEEE does on every device, so must the reference)."""
    q, k, v = outlier_qkv(1, 2, 300, 64, seed=14)
    want = quantize_qkv_ref(q, k, v, (64, 64))
    x = torch.rand(1000) + 0.5
    with _CudaScalarDivision():
        assert not torch.equal(x / 127.0, (x.double() / 127.0).float()), "the emulation must round differently"
        got = quantize_qkv_ref(q, k, v, (64, 64))
    for f in ("q8", "q_scale", "k8", "k_scale", "k_mean", "v8t", "v_scale"):
        a, b = getattr(got, f), getattr(want, f)
        assert torch.equal(
            a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
            b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b,
        ), f


# ---- the kernels, under the interpreter (one subprocess) ----

KERNEL_CASES = {
    # name: (B, H, N, D, block_size, mask batch, dtype, transposed, config kwargs)
    "fp32-d64-tile": (
        1,
        2,
        300,
        64,
        (64, 64),
        1,
        torch.float32,
        True,
        dict(kernel="tl_tile"),
    ),
    "fp32-d128-persistent-split-rows-broadcast-index": (
        2,
        1,
        200,
        128,
        (64, 32),
        1,
        torch.float32,
        False,
        dict(kernel="tl_persistent", block_m=32),
    ),
    "bf16-d64-per-batch-mask": (2, 2, 190, 64, (32, 32), 2, torch.bfloat16, True, {}),
}


def run_kernel_case(name):
    from calibatt_kernels import KernelConfig
    from calibatt_kernels.attn_fp8 import block_sparse_attention_fp8_indexed, quantize_qkv

    B, H, N, D, bs, mb, dtype, transposed, cfg = KERNEL_CASES[name]
    q, k, v = outlier_qkv(B, H, N, D, seed=11, dtype=dtype, transposed=transposed)
    mask = _mask(H, N, bs, 0.5, seed=12, batch=mb)
    got, want = quantize_qkv(q, k, v, bs), quantize_qkv_ref(q, k, v, bs)
    codes_equal = all(_same(getattr(got, f), getattr(want, f)) for f in ("q8", "k8", "v8t"))
    scales_equal = all(_same(getattr(got, f), getattr(want, f)) for f in ("q_scale", "k_scale", "k_mean", "v_scale"))
    out = torch.full_like(q, float("nan"))
    block_sparse_attention_fp8_indexed(
        q, k, v, mask_to_index(mask), block_size=bs, out=out, config=KernelConfig(**cfg) if cfg else None
    )
    ref = block_sparse_attention_fp8_ref(q, k, v, mask, bs)
    return dict(
        rel=_rel(out, ref),
        nan=bool(out.isnan().any()),
        empty_row_zero=bool((out[:, :, 2 * bs[0] : 3 * bs[0]] == 0).all()),
        layout=out.stride() == q.stride(),
        codes_equal=codes_equal,
        scales_equal=scales_equal,
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits (e4m3 codes compared as bytes)."""
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and torch.equal(a, b)


def _sweep_cases():
    """SWEEP_CONFIGS (bench_fp8.py --sweep) by what the interpreter runs differently: one case per grid and
    query tile, and one with warp_specialize (which the interpreter's range takes and ignores, as it ignores
    warps and stages)."""
    from calibatt_kernels.attn_fp8 import SWEEP_CONFIGS

    cases = {}
    for name, cfg in SWEEP_CONFIGS.items():
        cases.setdefault("ws" if cfg.tl_warp_specialize else (cfg.kernel, cfg.block_m), (name, cfg))
    return dict(cases.values())


def run_sweep_case(cfg):
    """A sweep config on 128 x 128 blocks at small N, in fp32: the kernel matches the reference to rounding."""
    from calibatt_kernels.attn_fp8 import block_sparse_attention_fp8_indexed

    N, bs = 200, (128, 128)
    q, k, v = outlier_qkv(1, 1, N, 64, seed=15, dtype=torch.float32, transposed=True)
    mask = torch.tensor([[[[True, False], [True, True]]]])  # the second row and key block are partial (N < 256)
    out = torch.full_like(q, float("nan"))
    block_sparse_attention_fp8_indexed(q, k, v, mask_to_index(mask), block_size=bs, out=out, config=cfg)
    return dict(rel=_rel(out, block_sparse_attention_fp8_ref(q, k, v, mask, bs)), nan=bool(out.isnan().any()))


def run_tie_case():
    """quantize_qkv on q whose codes sit on rounding ties (fp8_inputs.int8_tie_q): the kernel's codes are the
    reference's, and `splits` counts the codes that rounding the fp32 product would have put a step off."""
    from calibatt_kernels.attn_fp8 import quantize_qkv

    q = int8_tie_q(1, 2, 200, 64, seed=17)
    _, k, v = random_qkv(1, 2, 200, 64, seed=18)
    got, want = quantize_qkv(q, k, v, (64, 64)), quantize_qkv_ref(q, k, v, (64, 64))
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, want.q8.shape[2] - 200))
    twice = torch.round(qf * (1.0 / want.q_scale)[..., None]).to(torch.int8)
    return dict(
        q8_equal=torch.equal(got.q8, want.q8),
        q_scale_equal=torch.equal(got.q_scale, want.q_scale),
        splits=int((twice != want.q8).sum()),
    )


def run_fused_norm_rope_case():
    """qk_norm_rope_quant against the unfused kernels (norm_rope's kernel, then quantize_qkv_ref): the
    interpreter rounds fp32 -> bf16 by truncation in both, so the codes can be compared exactly."""
    from calibatt_kernels.attn_fp8 import qk_norm_rope_quant, quantize_qkv
    from calibatt_kernels.norm_rope import qk_norm_rope_triton

    B, N, heads, D, bs = 2, 70, 3, 64, (32, 32)
    gen = torch.Generator().manual_seed(13)
    xq, xk, v = (torch.randn(B, N, heads * D, generator=gen).to(torch.bfloat16) for _ in range(3))
    xk[..., 5] += 30  # an outlier channel
    wq, wk = (torch.rand(heads * D, generator=gen) + 0.5 for _ in range(2))
    ang = (torch.rand(N, D // 2, generator=gen) * 6).repeat_interleave(2, -1).view(1, N, 1, D).double()
    (q8, q_scale), k = qk_norm_rope_quant(xq, xk, wq, wk, ang.cos(), ang.sin(), heads=heads, eps=1e-6, block_size=bs)
    q_ref, k_ref = qk_norm_rope_triton(xq, xk, wq, wk, ang.cos(), ang.sin(), heads=heads, eps=1e-6)
    v = v.view(B, N, heads, D).transpose(1, 2)
    want = quantize_qkv_ref(q_ref.transpose(1, 2), k_ref.transpose(1, 2), v, bs)
    got = quantize_qkv((q8, q_scale), k.transpose(1, 2), v, bs)
    same = {
        f: _same(getattr(got, f), getattr(want, f))
        for f in ("q8", "q_scale", "k8", "k_scale", "k_mean", "v8t", "v_scale")
    }
    return dict(k_equal=torch.equal(k, k_ref), same=same)


def _run_all():
    res = {}
    for name in KERNEL_CASES:
        try:
            res[name] = run_kernel_case(name)
        except Exception:
            res[name] = dict(error=traceback.format_exc(limit=-3))
    for key, run in [("fused-norm-rope", run_fused_norm_rope_case), ("ties", run_tie_case)] + [
        (f"sweep/{name}", lambda cfg=cfg: run_sweep_case(cfg)) for name, cfg in _sweep_cases().items()
    ]:
        try:
            res[key] = run()
        except Exception:
            res[key] = dict(error=traceback.format_exc(limit=-3))
    return res


@pytest.fixture(scope="module")
def results():
    return run_interpreted(__file__, timeout=600)


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_reference_under_interpreter(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    # all of them to the bit, K's mean too (summed in float64 by both: quant.quantize_qkv_ref)
    assert r["codes_equal"] and r["scales_equal"], "quantize kernel codes or scales differ from quantize_qkv_ref"
    # fp32 outputs: the same codes, the same online softmax; bf16 outputs: the interpreter's bf16 store
    # truncates where the GPU rounds (~2^-8 relative)
    tol = 1e-5 if KERNEL_CASES[name][6] == torch.float32 else 1e-2
    assert not r["nan"], "unwritten (NaN) output elements"
    assert r["rel"] <= tol, f"rel={r['rel']:.2e}"
    assert r["empty_row_zero"], "an empty mask row must give zeros"
    assert r["layout"], "the output must keep q's memory layout"


def test_fused_norm_rope_quantize_matches_unfused_path(results):
    r = results["fused-norm-rope"]
    assert "error" not in r, r.get("error")
    assert r["k_equal"], "k differs from norm_rope's kernel"
    assert all(r["same"].values()), f"differs from the unfused path: {r['same']}"


def test_quantize_kernel_rounds_ties_as_the_reference(results):
    """At rounding ties the kernels' codes are the reference's: both round the exact product x * (1 / scale)
    once (on the GPU an FMA; the interpreter's fp32 multiply then add would round twice)."""
    r = results["ties"]
    assert "error" not in r, r.get("error")
    assert r["splits"] >= 1000, f"the input must hold ties that two roundings split: {r['splits']}"
    assert r["q8_equal"] and r["q_scale_equal"], "q codes or scales differ from quantize_qkv_ref at ties"


@pytest.mark.parametrize("name", list(_sweep_cases()))
def test_sweep_config_matches_reference_under_interpreter(results, name):
    r = results[f"sweep/{name}"]
    assert "error" not in r, r.get("error")
    assert not r["nan"], "unwritten (NaN) output elements"
    assert r["rel"] <= 1e-5, f"rel={r['rel']:.2e}"


if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps(_run_all()))
