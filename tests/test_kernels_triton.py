"""The Triton kernels under the Triton interpreter (CPU), against the fp32 references.

TRITON_INTERPRET must be set before triton is imported: triton's own standard-library functions
(`tl.zeros`, `tl.sum`, ...) are `@triton.jit` functions decided at import. In one pytest process some
other module has usually imported triton already, and setting the variable here would leak into the rest
of the suite. So the cases run in one subprocess -- this file run as a script, with the variable set
first -- that prints each case's measured errors as JSON; the tests below assert on them, one per case.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import json  # noqa: E402
import traceback  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreted import run_interpreted  # noqa: E402

import calibatt_kernels as ck  # noqa: E402
from calibatt_kernels import block_mass_ref, block_sparse_attention_ref, mask_to_index, num_blocks  # noqa: E402

SPARSE_CASES = {
    # name: (B, H, N, D, block_size, mask batch, dtype, transposed, config kwargs)
    "fp32-64": (1, 2, 256, 64, (64, 64), 1, torch.float32, False, {}),
    "fp32-odd-n-transposed": (1, 2, 300, 64, (64, 64), 1, torch.float32, True, {}),
    "bf16-d128-per-batch-mask": (2, 2, 333, 128, (128, 64), 2, torch.bfloat16, True, {}),
    "fp32-mask-broadcast-over-batch": (2, 1, 400, 64, (128, 128), 1, torch.float32, False, {}),
    "fp16-tiles-split-blocks": (2, 1, 400, 128, (128, 128), 2, torch.float16, True, dict(block_m=64, block_n=64)),
    "fp32-one-program-per-tile": (2, 2, 390, 64, (128, 64), 1, torch.float32, True, dict(kernel="tl_tile")),
    "bf16-tensor-descriptors": (1, 2, 333, 64, (64, 64), 1, torch.bfloat16, True, dict(use_tma=True)),
    "fp32-long-rows": (1, 1, 2000, 64, (128, 64), 1, torch.float32, True, dict(use_tma=True)),
    "bf16-pipelined-qk-split-tiles": (
        2,
        2,
        333,
        64,
        (128, 64),
        2,
        torch.bfloat16,
        True,
        dict(tl_pipeline_qk=True, block_n=32),
    ),
    "fp32-pipelined-qk-persistent-tma": (
        1,
        2,
        700,
        128,
        (64, 64),
        1,
        torch.float32,
        True,
        dict(tl_pipeline_qk=True, use_tma=True),
    ),
    # the Gluon config where Gluon cannot run (CPU, fp32): the tl kernel with its own default config
    "fp32-gluon-config-falls-back": (
        1,
        2,
        300,
        64,
        (128, 128),
        1,
        torch.float32,
        True,
        dict(kernel="gluon_persistent", num_stages=3, num_warps=4),
    ),
}
MASS_CASES = {
    # name: (B, H, N, D, block_size, dtype, transposed)
    "fp32-64": (1, 2, 256, 64, (64, 64), torch.float32, False),
    "bf16-d128-odd-n-transposed": (2, 1, 333, 128, (128, 64), torch.bfloat16, True),
    "fp32-128-odd-n": (1, 2, 300, 64, (128, 128), torch.float32, True),
}


NORM_ROPE_CASES = {
    # name: (B, N, heads, D, dtype, q/k row stride in units of C (>1: views into a wider buffer))
    "fp32-3x64": (2, 37, 3, 64, torch.float32, 1),
    "bf16-2x128-strided": (1, 50, 2, 128, torch.bfloat16, 3),
}


def _qkv(b, h, n, d, dtype, gen, transposed=False):
    """q, k, v [B, H, N, D]; `transposed` gives views of [B, N, H, D] buffers (the diffusers layout)."""
    if transposed:
        return tuple(torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    return tuple(torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3))


def _dense_masked64(q, k, v, mask, bs):
    """Block-sparse attention written out at token level in float64: the block mask expanded to tokens, a
    masked softmax (rows with no key give zeros); independent of the package's reference."""
    n = q.shape[2]
    tok = ck.expand_block_mask(mask, n, n, bs)
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~tok, float("-inf")), -1).nan_to_num(0.0) @ v.double()


def _errors(out, ref):
    out = out.to(ref.dtype)
    return dict(rel=((out - ref).norm() / ref.norm()).item(), max_diff=(out - ref).abs().max().item())


def run_sparse(name):
    B, H, N, D, bs, mb, dtype, transposed, cfg = SPARSE_CASES[name]
    gen = torch.Generator().manual_seed(len(name) * 1000 + N)
    q, k, v = _qkv(B, H, N, D, dtype, gen, transposed)
    mask = torch.rand(mb, H, num_blocks(N, bs[0]), num_blocks(N, bs[1]), generator=gen) < 0.4
    mask[..., 0, :] = False  # an empty row writes zeros
    mask[..., -1, -1] = True  # the partial last key block is used
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    ck.reset_what_ran()
    ck.block_sparse_attention_indexed(
        q, k, v, mask_to_index(mask), block_size=bs, out=out, config=ck.KernelConfig(**cfg)
    )
    ref = _dense_masked64(q, k, v, mask, bs)
    return dict(
        _errors(out.double(), ref),
        nan=bool(out.isnan().any()),
        empty_row_zero=bool((out[:, :, : bs[0]] == 0).all()),
        ran=ck.what_ran(),
    )


LSE_CASES = {
    # name: (B, H, N, D, block_size, dtype, config kwargs): the row LSE that joint attention merges with
    "fp32-odd-n-one-program-per-tile": (2, 2, 300, 64, (64, 64), torch.float32, dict(kernel="tl_tile")),
    "bf16-tiles-split-blocks-tma": (1, 2, 333, 128, (128, 128), torch.bfloat16, dict(block_m=64, use_tma=True)),
}


def run_lse(name):
    B, H, N, D, bs, dtype, cfg = LSE_CASES[name]
    gen = torch.Generator().manual_seed(N + 7)
    q, k, v = _qkv(B, H, N, D, dtype, gen, transposed=True)
    mask = torch.rand(B, H, num_blocks(N, bs[0]), num_blocks(N, bs[1]), generator=gen) < 0.4
    mask[..., 0, :] = False  # an empty row: lse -inf
    mask[..., -1, -1] = True
    out, lse = ck.block_sparse_attention_indexed(
        q, k, v, mask_to_index(mask), block_size=bs, config=ck.KernelConfig(**cfg), return_lse=True
    )
    ref, ref_lse = block_sparse_attention_ref(q.float(), k.float(), v.float(), mask, bs, return_lse=True)
    fin = torch.isfinite(ref_lse)
    return dict(
        _errors(out, ref),
        lse_max_diff=(lse[fin] - ref_lse[fin]).abs().max().item(),
        lse_ok=lse.shape == (B, H, N) and lse.dtype == torch.float32,
        same_inf=bool(torch.equal(torch.isfinite(lse), fin)),
        empty_inf=bool(lse[:, :, : bs[0]].isneginf().all()),
    )


def run_layout():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(1, 2, 200, 64, torch.float32, gen, transposed=True)
    mask = torch.rand(2, 4, 4, generator=gen) < 0.5
    ix = mask_to_index(mask, with_schedule=False)
    out = ck.block_sparse_attention_indexed(q, k, v, ix, block_size=(64, 64))
    ref = block_sparse_attention_ref(q, k, v, mask, (64, 64))
    # the same index with int32 ids (the kernel's ID_WORDS=False path) must give the same output
    ix32 = ck.BlockIndex(ix.counts, ix.offsets, ix.indices.to(torch.int32), None)
    out32 = ck.block_sparse_attention_indexed(q, k, v, ix32, block_size=(64, 64))
    return dict(_errors(out, ref), same_strides=out.stride() == q.stride(), int32_same=bool(torch.equal(out, out32)))


def run_gluon_compile_failure():
    """The Gluon launcher's errors: one of the launch (a CUDA error) propagates and leaves Gluon enabled; a
    compile error under strict_fallbacks raises KernelFallback naming what fell back and why, without running
    the tl kernel; without strict, the compile error switches to the tl kernel for good (same results,
    recorded as a fallback) and the Gluon kernel is not tried again."""
    from triton.compiler.errors import CompilationError

    from calibatt_kernels import attn_gluon, dispatch

    tries = []
    error = [RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")]

    def failing(*a, **kw):
        tries.append(1)
        raise error[0]

    attn_gluon.supports, attn_gluon.block_sparse_attention_gluon = (lambda *a, **kw: True), failing
    gen = torch.Generator().manual_seed(4)
    q, k, v = _qkv(1, 2, 300, 64, torch.float32, gen, transposed=True)
    mask = torch.rand(2, 3, 3, generator=gen) < 0.6
    cfg = attn_gluon.GLUON_PERSISTENT

    def call():
        return ck.block_sparse_attention_indexed(q, k, v, mask_to_index(mask), block_size=(128, 128), config=cfg)

    res = {}
    try:
        call()
        res["launch_error"] = None
    except RuntimeError as e:
        res["launch_error"] = type(e).__name__ + ": " + str(e)
    res["disabled_after_launch_error"] = "gluon" in dispatch.disabled_backends()
    error[0] = CompilationError(None, None, "unknown Gluon API")
    ck.reset_what_ran()
    dispatch.set_scope((1, 2))
    try:
        with dispatch.strict_fallbacks():
            call()
        res["strict_error"] = None
    except dispatch.KernelFallback as e:
        res["strict_error"] = str(e)
    res["strict_calls"] = ck.what_ran()["calls"]
    dispatch.set_scope(None)
    outs = [call() for _ in range(2)]
    ref = block_sparse_attention_ref(q, k, v, mask, (128, 128))
    return dict(
        res,
        **_errors(outs[1], ref),
        tries=len(tries),
        broken="gluon" in dispatch.disabled_backends(),
        same=bool(torch.equal(outs[0], outs[1])),
        ran=ck.what_ran(),
    )


def run_scopes():
    """what_ran per scope: the kernel each (bucket, layer) ran and the blocks its index lists."""
    from calibatt_kernels import dispatch

    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(2, 2, 200, 64, torch.float32, gen, transposed=True)
    masks = [torch.rand(1, 2, 4, 4, generator=gen) < p for p in (0.3, 0.7)]
    ck.reset_what_ran()
    for key, mask in zip([(0, 0), (0, 1)], masks, strict=True):
        dispatch.set_scope(key)
        ck.block_sparse_attention_indexed(q, k, v, mask_to_index(mask), block_size=(64, 64))
        ck.block_sparse_attention_indexed(q, k, v, mask_to_index(mask), block_size=(64, 64))
    dispatch.set_scope(None)
    # per call: the mask's blocks for each of the batch's 2 entries, of B x H x Mq x Mk = 2 x 2 x 4 x 4
    return dict(ran=ck.what_ran(), kept=[int(m.sum()) * 2 for m in masks], total=2 * 2 * 4 * 4)


def run_dense():
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(1, 2, 190, 128, torch.float32, gen)
    out = ck.block_sparse_attention(q, k, v, torch.ones(2, 3, 3, dtype=torch.bool), block_size=(64, 64))
    return _errors(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def run_mass(name):
    B, H, N, D, bs, dtype, transposed = MASS_CASES[name]
    gen = torch.Generator().manual_seed(N + D)
    q, k, _ = _qkv(B, H, N, D, dtype, gen, transposed)
    q = q * 3  # a sharper softmax: mass far from uniform
    mass = ck.block_mass(q, k, block_size=bs)
    ref = block_mass_ref(q.float(), k.float(), bs)
    return dict(
        shape_ok=mass.shape == ref.shape and mass.dtype == torch.float32,
        row_err=(mass.sum(-1) - 1).abs().max().item(),
        max_diff=(mass - ref).abs().max().item(),
    )


def rope_tables(n, d, gen):
    """diffusers' layout: [1, N, 1, D] float64 cos/sin, each angle repeated for its pair's two channels."""
    ang = torch.rand(n, d // 2, generator=gen, dtype=torch.float64) * 6.3
    return (ang.cos().repeat_interleave(2, -1).view(1, n, 1, d), ang.sin().repeat_interleave(2, -1).view(1, n, 1, d))


def run_qk_norm_rope(name):
    B, N, H, D, dtype, wide = NORM_ROPE_CASES[name]
    gen = torch.Generator().manual_seed(N)
    C = H * D
    buf = (torch.randn(2, B, N, wide * C, generator=gen) * 3).to(dtype)
    q, k = buf[0, ..., :C], buf[1, ..., :C]  # unit channel stride, row stride wide * C
    wq, wk = (torch.rand(C, generator=gen) + 0.5).to(dtype), (torch.rand(C, generator=gen) + 0.5).to(dtype)
    cos, sin = rope_tables(N, D, gen)
    got = ck.qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6)
    want = ck.qk_norm_rope_ref(q, k, wq, wk, cos, sin, heads=H, eps=1e-6)
    errs = [_errors(g, w.float()) for g, w in zip(got, want, strict=True)]
    return dict(
        rel=max(e["rel"] for e in errs),
        max_diff=max(e["max_diff"] for e in errs),
        nan=any(bool(g.isnan().any()) for g in got),
        shape_ok=all(g.shape == (B, N, H, D) and g.dtype == dtype and g.is_contiguous() for g in got),
    )


def run_split_merge():
    """The persistent Gluon kernel's last wave split (split_merge): each piece's partial output and statistics
    made here in PyTorch from the pieces' records (what the Gluon kernel leaves in its workspace), merged by
    `_merge_splits` under the interpreter: the split rows against the fp32 reference, every other row left
    alone (still the poison)."""
    from calibatt_kernels._common import LOG2E
    from calibatt_kernels.attn_gluon import tile_records
    from calibatt_kernels.index import index_words
    from calibatt_kernels.split_merge import SPLIT_ROWS, merge_splits, merge_splits_ref, split_last_wave

    gen = torch.Generator().manual_seed(11)
    B, H, N, D = 1, 2, 300, 64
    q, k, v = _qkv(B, H, N, D, torch.float32, gen, transposed=True)
    mb = num_blocks(N, SPLIT_ROWS)
    mask = torch.ones(1, H, mb, mb, dtype=torch.bool)
    ix = mask_to_index(mask)
    words = index_words(ix.indices)
    ref = block_sparse_attention_ref(q, k, v, mask, (SPLIT_ROWS, SPLIT_ROWS))
    res = {}
    for programs in (4, 5):  # 6 tiles of 3 blocks: the last 2 in 2 pieces each (1 and 2 blocks), or the last in 3
        rec, split_rows, s = split_last_wave(tile_records(ix.counts, ix.offsets, words, ix.schedule), words, programs)
        pieces = rec[rec[:, 3] >> 16 > 0]
        ws_o = torch.zeros(pieces.shape[0] * SPLIT_ROWS, D)
        ws_ml = torch.zeros(pieces.shape[0], 2, SPLIT_ROWS)
        ids = ix.indices.long()
        for row, cnt, e0, w3 in pieces.tolist():
            slot = (w3 >> 16) - 1
            h, blk = (row // mb) % H, row % mb
            qr = torch.zeros(SPLIT_ROWS, D)
            n = min(SPLIT_ROWS, N - blk * SPLIT_ROWS)
            qr[:n] = q[0, h, blk * SPLIT_ROWS : blk * SPLIT_ROWS + n]
            keys = torch.cat([torch.arange(j * SPLIT_ROWS, min(N, (j + 1) * SPLIT_ROWS)) for j in ids[e0 : e0 + cnt]])
            sc = qr @ k[0, h, keys].T * (D**-0.5 * LOG2E)
            m = sc.max(-1).values
            p = torch.exp2(sc - m[:, None])
            ws_o[slot * SPLIT_ROWS : (slot + 1) * SPLIT_ROWS] = p @ v[0, h, keys]
            ws_ml[slot, 0], ws_ml[slot, 1] = m, p.sum(-1)
        out = torch.full_like(q, float("nan"))
        merge_splits(ws_o, ws_ml, split_rows, s, out, H, mb)
        want = merge_splits_ref(ws_o, ws_ml, split_rows, s, torch.full_like(q, float("nan")), H, mb)
        done = torch.zeros(H, N, dtype=torch.bool)
        for row in split_rows.tolist():
            h, blk = (row // mb) % H, row % mb
            done[h, blk * SPLIT_ROWS : (blk + 1) * SPLIT_ROWS] = True
        res[f"p{programs}"] = dict(
            _errors(out[0][done], ref[0][done]),
            s=s,
            split=len(split_rows),
            pieces=pieces.shape[0],
            same_as_ref_merge=bool(torch.allclose(out[0][done], want[0][done], atol=1e-5)),
            rest_untouched=bool(out[0][~done].isnan().all()) and bool(want[0][~done].isnan().all()),
        )
    return res


def _all_cases():
    jobs = {f"sparse/{n}": (run_sparse, n) for n in SPARSE_CASES}
    jobs.update({f"mass/{n}": (run_mass, n) for n in MASS_CASES})
    jobs.update({f"lse/{n}": (run_lse, n) for n in LSE_CASES})
    jobs.update({f"norm-rope/{n}": (run_qk_norm_rope, n) for n in NORM_ROPE_CASES})
    jobs["layout"] = (run_layout,)
    jobs["dense"] = (run_dense,)
    jobs["split-merge"] = (run_split_merge,)
    jobs["scopes"] = (run_scopes,)
    jobs["gluon-compile-failure"] = (run_gluon_compile_failure,)  # last: it patches the Gluon module
    res = {}
    for key, (fn, *args) in jobs.items():
        try:
            res[key] = fn(*args)
        except Exception:
            res[key] = dict(error=traceback.format_exc(limit=-3))
    return res


@pytest.fixture(scope="module")
def results():
    return run_interpreted(__file__, timeout=900)


def _get(results, key):
    r = results[key]
    assert "error" not in r, r.get("error")
    return r


@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_block_sparse_matches_reference(results, name):
    r = _get(results, f"sparse/{name}")
    tol = 1e-5 if SPARSE_CASES[name][6] == torch.float32 else 1e-2
    assert not r["nan"], "unwritten (NaN) output elements"
    assert r["rel"] < tol, f"rel={r['rel']:.2e} max_diff={r['max_diff']:.2e}"
    assert r["empty_row_zero"], "an empty mask row must give zeros"


@pytest.mark.parametrize("name", list(LSE_CASES))
def test_block_sparse_lse_matches_reference(results, name):
    r = _get(results, f"lse/{name}")
    fp32 = LSE_CASES[name][5] == torch.float32
    assert r["lse_ok"], "lse must be float32 [B, H, N]"
    assert r["same_inf"] and r["empty_inf"], "lse is -inf exactly for rows with no block"
    assert r["rel"] < (1e-5 if fp32 else 1e-2), f"rel={r['rel']:.2e} max_diff={r['max_diff']:.2e}"
    assert r["lse_max_diff"] < (1e-4 if fp32 else 2e-2), f"lse max_diff={r['lse_max_diff']:.2e}"


def test_output_keeps_q_layout_without_schedule(results):
    r = _get(results, "layout")
    assert r["same_strides"], "output must have q's memory layout"
    assert r["int32_same"], "int32 block ids must give the output that int16 ids give"
    assert r["rel"] < 1e-5, f"rel={r['rel']:.2e} max_diff={r['max_diff']:.2e}"


def test_public_api_dense_matches_sdpa(results):
    r = _get(results, "dense")
    assert r["rel"] < 1e-5, f"rel={r['rel']:.2e} max_diff={r['max_diff']:.2e}"


@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_block_sparse_records_what_ran(results, name):
    """dispatch records the kernel each call ran; a config the backend cannot take is a recorded fallback."""
    r = _get(results, f"sparse/{name}")["ran"]
    want = SPARSE_CASES[name][8].get("kernel", "tl_persistent")
    if want.startswith("gluon"):  # the CPU interpreter: the tl kernel's default takes the call
        assert r["last"] == {"attention": "tl_tile"}, r
        assert [(f["wanted"], f["ran"]) for f in r["fallbacks"]] == [(want, "tl_tile")], r
    else:
        assert r["calls"] == {f"attention:{want}": 1} and not r["fallbacks"], r


def test_gluon_compile_failure_falls_back_to_tl(results):
    r = _get(results, "gluon-compile-failure")
    assert r["launch_error"] and "illegal memory access" in r["launch_error"], r  # propagated, not swallowed
    assert not r["disabled_after_launch_error"], r
    assert r["strict_error"] is not None, r
    for part in ("attention at bucket 1, layer 2", "wanted gluon_persistent", "would run tl_tile", "unknown Gluon API"):
        assert part in r["strict_error"], (part, r["strict_error"])
    assert r["strict_calls"] == {}, r  # under strict nothing ran in its place
    assert r["broken"] and r["tries"] == 2, r  # the launch error's try and the compile error's: none after
    assert r["same"] and r["rel"] < 1e-5, r
    assert r["ran"]["calls"] == {"attention:tl_tile": 2}, r
    assert [(f["wanted"], f["ran"], f["calls"]) for f in r["ran"]["fallbacks"]] == [
        ("gluon_persistent", "tl_tile", 2)
    ], r


def test_what_ran_per_scope(results):
    """Each scope's calls and blocks as the index lists them (independently: the masks' true entries)."""
    r = _get(results, "scopes")
    scopes = {tuple(s["scope"]): s for s in r["ran"]["scopes"]}
    assert set(scopes) == {(0, 0), (0, 1)}, scopes
    for key, kept in zip([(0, 0), (0, 1)], r["kept"], strict=True):
        assert scopes[key]["ran"] == {"tl_tile": 2}, scopes[key]
        assert (scopes[key]["blocks"], scopes[key]["total_blocks"]) == (2 * kept, 2 * r["total"]), scopes[key]


@pytest.mark.parametrize("name", list(MASS_CASES))
def test_block_mass_matches_reference(results, name):
    r = _get(results, f"mass/{name}")
    tol = 1e-5 if MASS_CASES[name][5] == torch.float32 else 2e-3
    assert r["shape_ok"], "mass must be float32 [B, H, Mq, Mk]"
    assert r["row_err"] < 1e-4, f"rows must sum to 1: max |sum - 1| = {r['row_err']:.2e}"
    assert r["max_diff"] < tol, f"max_diff={r['max_diff']:.2e}"


@pytest.mark.parametrize("name", list(NORM_ROPE_CASES))
def test_qk_norm_rope_matches_reference(results, name):
    r = _get(results, f"norm-rope/{name}")
    assert r["shape_ok"], "outputs must be contiguous [B, N, heads, D] in the input dtype"
    assert not r["nan"], "unwritten (NaN) output elements"
    tol = 1e-6 if NORM_ROPE_CASES[name][4] == torch.float32 else 1e-2
    assert r["rel"] < tol, f"rel={r['rel']:.2e} max_diff={r['max_diff']:.2e}"


if __name__ == "__main__":
    print(json.dumps(_all_cases()))


def test_split_last_wave_merges_to_the_reference(results):
    r = _get(results, "split-merge")
    assert (r["p4"]["split"], r["p4"]["s"], r["p4"]["pieces"]) == (2, 2, 4)
    assert (r["p5"]["split"], r["p5"]["s"], r["p5"]["pieces"]) == (1, 3, 3)
    for case in r.values():
        assert case["rel"] <= 1e-5, case
        assert case["same_as_ref_merge"] and case["rest_untouched"], case
