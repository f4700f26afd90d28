"""The Triton kernels on a CUDA GPU at Wan sizes, against fp32 references (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

import calibatt_kernels as ck
from calibatt_kernels import block_mass_ref, block_sparse_attention_ref, mask_to_index, num_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Wan 1.3B 480p: 12 heads of 128, 21 x 30 x 52 latent tokens.
B, H, N, D = 1, 12, 32760, 128
REF_HEADS = 2  # the fp32 reference runs on the first heads only, to bound time and memory


def _wan_qkv(seed, transposed=True, batch=B):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, N, H, D) if transposed else (batch, H, N, D)
    qkv = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
    return [x.transpose(1, 2) for x in qkv] if transposed else qkv


def _random_mask(seed, density, bs, batch=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(batch, H, num_blocks(N, bs[0]), num_blocks(N, bs[1]), device="cuda", generator=gen) < density
    mask[..., -1] = True  # the partial last key block
    mask[..., 3, :] = False  # an empty row
    return mask


def _rel_err(out, q, k, v, mask, bs):
    sl = slice(0, REF_HEADS)
    ref = block_sparse_attention_ref(
        q[:, sl].float(), k[:, sl].float(), v[:, sl].float(), mask[:, sl], bs, rows_per_chunk=4
    )
    o = out[:, sl].float()
    return ((o - ref).norm() / ref.norm()).item(), (o - ref).abs().max().item()


def _run_exactly(config, *args, want=None, **kwargs):
    """block_sparse_attention_indexed with `config`, asserting that the kernel it names (or `want`, for a call
    without a config) ran: under strict_fallbacks a fallback (a disabled Gluon backend, a call it cannot take,
    the reference on the GPU) raises instead of running another kernel, and the record must show this one call
    of this kernel."""
    from calibatt_kernels import block_sparse_attention_indexed, dispatch

    want = want or config.kernel
    ck.reset_what_ran()
    with dispatch.strict_fallbacks():
        res = block_sparse_attention_indexed(*args, config=config, **kwargs)
    ran = ck.what_ran()
    assert ran["calls"] == {f"attention:{want}": 1} and not ran["fallbacks"], ran
    return res


def _gluon_against_tl(q, k, v, index, config):
    """Run a Gluon config into a poisoned output, check that the Gluon kernel ran (not a fallback), that every
    element was written and that every head agrees with the tl kernel (itself checked against the reference
    above; asserted to be the tl kernel too); returns the output."""
    from calibatt_kernels import KernelConfig

    out = torch.full_like(q, float("nan"))  # poison: the very buffer the kernel writes
    _run_exactly(config, q, k, v, index, block_size=(128, 128), out=out)
    torch.cuda.synchronize()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements not written"
    tl_out = _run_exactly(KernelConfig(), q, k, v, index, block_size=(128, 128))
    rel_tl = ((out.float() - tl_out.float()).norm() / tl_out.float().norm()).item()
    assert rel_tl <= 1e-2, f"all heads vs the tl kernel: rel={rel_tl:.2e}"
    return out


@pytest.mark.parametrize(
    "bs,cfg",
    [
        ((128, 128), None),
        ((128, 64), None),
        ((64, 64), None),
        ((128, 128), dict(kernel="tl_tile")),
        ((128, 128), dict(block_n=64)),
        ((128, 128), dict(use_tma=False)),
        ((128, 128), dict(kernel="gluon_tile", num_stages=2, num_warps=4)),
        ((128, 128), dict(kernel="gluon_tile", num_stages=3, num_warps=4)),
        ((128, 128), dict(kernel="gluon_persistent", num_stages=3, num_warps=4)),
    ],
)
def test_block_sparse_wan_size(bs, cfg):
    """Each config at Wan 1.3B's size against the fp32 reference; the kernel it names ran (a Gluon config
    that fell back to the tl kernel would compare tl with the reference and pass). Without a config, the
    default config of this GPU, block size and head dim ran."""
    from calibatt_kernels import KernelConfig, dispatch

    q, k, v = _wan_qkv(seed=0)
    mask = _random_mask(seed=1, density=0.3, bs=bs)
    out = torch.full_like(q, float("nan"))  # poison: unwritten elements stay NaN
    config = KernelConfig(**cfg) if cfg else None
    if (
        config
        and config.backend == "gluon"
        and not dispatch.attn_gluon.takes_shape(torch.cuda.get_device_capability(), bs, D)
    ):
        pytest.skip("the Gluon kernels need sm_90")
    want = config.kernel if config else dispatch.default_config(q.device, bs, D).kernel
    _run_exactly(config, q, k, v, mask_to_index(mask), block_size=bs, out=out, want=want)
    torch.cuda.synchronize()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements not written"
    rel, max_diff = _rel_err(out, q, k, v, mask, bs)
    assert rel <= 1e-2, f"rel={rel:.2e} max_diff={max_diff:.2e}"
    assert (out[:, :, 3 * bs[0] : 4 * bs[0]] == 0).all(), "an empty mask row must give zeros"


def test_block_sparse_per_batch_masks_and_layout():
    q, k, v = _wan_qkv(seed=2, batch=2)
    mask = _random_mask(seed=3, density=0.2, bs=(128, 128), batch=2)
    out = ck.block_sparse_attention(q, k, v, mask, block_size=(128, 128))
    assert out.stride() == q.stride(), f"out strides {out.stride()} != q strides {q.stride()}"
    for b in range(2):
        rel, max_diff = _rel_err(out[b : b + 1], q[b : b + 1], k[b : b + 1], v[b : b + 1], mask[b : b + 1], (128, 128))
        assert rel <= 1e-2, f"batch {b}: rel={rel:.2e} max_diff={max_diff:.2e}"


def test_block_mass_rows_sum_to_one_at_wan_size():
    q, k, _ = _wan_qkv(seed=4)
    mass = ck.block_mass(q, k, block_size=(128, 128))
    row_err = (mass.sum(-1) - 1).abs().max().item()
    assert mass.shape == (B, H, num_blocks(N, 128), num_blocks(N, 128))
    assert row_err <= 1e-3, f"max |row sum - 1| = {row_err:.2e}"


@pytest.mark.parametrize("bs", [(128, 128), (128, 64), (64, 64)])
def test_block_mass_matches_reference(bs):
    gen = torch.Generator(device="cuda").manual_seed(5)
    n = 4000
    q, k = (
        torch.randn(1, n, 4, D, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2) for _ in range(2)
    )
    q = q * 2  # a sharper softmax: mass far from uniform
    mass = ck.block_mass(q, k, block_size=bs)
    ref = block_mass_ref(q.float(), k.float(), bs)
    max_diff = (mass - ref).abs().max().item()
    rel = ((mass - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, f"rel={rel:.2e} max_diff={max_diff:.2e}"


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "tile"])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd", "packed-qkv"])
def test_gluon_kernel_broadcast_index_and_layouts(layout, persistent):
    """The Gluon kernels (persistent, per tile): one index row set broadcast over a batch of 2; q, k, v
    in diffusers' layout, the contiguous one, and as views into one packed [B, N, 3, H, D] buffer. Their
    row-view descriptors read past a head's N into the next head's (or batch's) rows, so rows listing only
    the partial last key block, only block 0, or both, check that keys >= N are masked and no output row
    >= N is written. Every head against the tl kernel, the first heads against the fp32 reference."""
    from calibatt_kernels import KernelConfig, attn_gluon

    if layout == "packed-qkv":
        gen = torch.Generator(device="cuda").manual_seed(5)
        buf = torch.randn(2, N, 3, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = _wan_qkv(seed=5, transposed=layout == "bnhd", batch=2)
    if not attn_gluon.supports(q, k, v, (128, 128)):
        pytest.skip("the Gluon kernel needs sm_90 and triton with Gluon")
    mask = _random_mask(seed=6, density=0.25, bs=(128, 128), batch=1)
    mask[..., 5, :] = False
    mask[..., 5, -1] = True  # only the partial last block
    mask[..., 6, :] = False
    mask[..., 6, 0] = True  # only the first block
    mask[..., 7, :] = False
    mask[..., 7, [0, -1]] = True
    out = _gluon_against_tl(
        q,
        k,
        v,
        mask_to_index(mask),
        KernelConfig(kernel="gluon_persistent" if persistent else "gluon_tile", num_stages=3, num_warps=4),
    )
    for b in range(2):
        rel, max_diff = _rel_err(out[b : b + 1], q[b : b + 1], k[b : b + 1], v[b : b + 1], mask, (128, 128))
        assert rel <= 1e-2, f"batch {b}: rel={rel:.2e} max_diff={max_diff:.2e}"


@pytest.mark.parametrize("heads", [12, 40])  # Wan 1.3B and 14B: C = 1,536 and 5,120 channels
def test_qk_norm_rope_at_wan_size(heads):
    """The fused q/k norm + RoPE against its reference, on the projections' [B, N, C] output as diffusers
    hands it over, with WanRotaryPosEmbed's own cos/sin tables."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    grid = (21, 30, 52) if heads == 12 else (4, 45, 80)
    n, d = grid[0] * grid[1] * grid[2], 128
    gen = torch.Generator(device="cuda").manual_seed(heads)
    q, k = (torch.randn(2, 1, n, heads * d, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    wq, wk = (torch.rand(2, heads * d, device="cuda", generator=gen) + 0.5).to(torch.bfloat16)
    rope = WanRotaryPosEmbed(d, (1, 2, 2), 1024).cuda()
    cos, sin = rope(torch.empty(1, 16, grid[0], 2 * grid[1], 2 * grid[2], device="cuda"))
    # poison the very buffers the kernel writes: unwritten elements stay NaN
    poison = tuple(torch.full((1, n, heads, d), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ck.reset_what_ran()
    got = ck.qk_norm_rope(q, k, wq, wk, cos, sin, heads=heads, eps=1e-6, out=poison)
    assert ck.what_ran()["calls"] == {"qk_norm_rope:triton": 1}, ck.what_ran()
    assert all(g.data_ptr() == p.data_ptr() for g, p in zip(got, poison, strict=True)), "out= not written"
    want = ck.qk_norm_rope_ref(q, k, wq, wk, cos, sin, heads=heads, eps=1e-6)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any(), "unwritten output elements"
        assert g.shape == (1, n, heads, d) and g.dtype == torch.bfloat16
        rel = ((g.float() - w.float()).norm() / w.float().norm()).item()
        assert rel < 5e-3, f"rel={rel:.2e}"


@pytest.mark.parametrize("dim,ffn", [(1536, 8960), (5120, 13824)])  # Wan 1.3B and 14B FFNs
def test_linear_gelu_at_wan_size(dim, ffn):
    """The FFN up-projection with bias + tanh-GELU in cuBLASLt's epilogue, against diffusers' own GELU
    module in fp32, at Wan's widths (a slice of the 480p token count)."""
    from diffusers.models.activations import GELU

    from calibatt_kernels.linear_gelu import fusable

    torch.manual_seed(dim)
    mod = GELU(dim, ffn, approximate="tanh").cuda()
    x = torch.randn(1, 4096 + 37, dim, device="cuda")
    with torch.no_grad():
        want = mod(x)
        mod = mod.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        assert fusable(xb, mod.proj.weight, mod.proj.bias)
        # poison the very buffer the GEMM writes: unwritten elements stay NaN
        poison = torch.full((1, 4096 + 37, ffn), float("nan"), device="cuda", dtype=torch.bfloat16)
        ck.reset_what_ran()
        got = ck.linear_gelu(xb, mod.proj.weight, mod.proj.bias, out=poison)
        assert ck.what_ran()["calls"] == {"linear_gelu:cublaslt": 1}, ck.what_ran()
        assert got.data_ptr() == poison.data_ptr(), "out= not written"
        stock = mod(xb)
    assert got.shape == want.shape and got.dtype == torch.bfloat16 and not got.isnan().any()
    rel = ((got.float() - want).norm() / want.norm()).item()
    rel_stock = ((stock.float() - want).norm() / want.norm()).item()
    assert rel < 1e-2 and rel <= 1.5 * rel_stock, f"rel={rel:.2e}, stock bf16 rel={rel_stock:.2e}"


@pytest.mark.parametrize("with_schedule", [False, True], ids=["natural-order", "lpt"])
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "tile"])
def test_gluon_kernel_tile_sequences(persistent, with_schedule):
    """The persistent kernel carries state from one tile to the next (Q double-buffered, K/V rings and their
    barrier phases that run on across tiles, the next tile's record read during this one), so every kind of
    neighbour in a program's walk must come out right: rows of many blocks, of one block (the first block is
    also the masked last), and empty rows (zeros), in random order (natural order: program i takes rows i,
    i + #SMs, ...) and longest-first. Every head against the tl kernel, the first heads against the fp32 reference."""
    from calibatt_kernels import KernelConfig, attn_gluon

    q, k, v = _wan_qkv(seed=7)
    if not attn_gluon.supports(q, k, v, (128, 128)):
        pytest.skip("the Gluon kernel needs sm_90 and triton with Gluon")
    nb = num_blocks(N, 128)
    gen = torch.Generator(device="cuda").manual_seed(8)
    mask = torch.rand(1, H, nb, nb, device="cuda", generator=gen) < 0.1
    kind = torch.randint(0, 4, (1, H, nb, 1), device="cuda", generator=gen)
    one = torch.zeros_like(mask)
    one[..., 0] = True
    last = torch.zeros_like(mask)
    last[..., -1] = True
    mask = torch.where(kind == 0, False, torch.where(kind == 1, one, torch.where(kind == 2, last, mask)))
    out = _gluon_against_tl(
        q,
        k,
        v,
        mask_to_index(mask, with_schedule=with_schedule),
        KernelConfig(kernel="gluon_persistent" if persistent else "gluon_tile", num_stages=3, num_warps=4),
    )
    empty = (~mask[0]).all(-1)  # [H, nb]
    rows = out[0, :, : (nb - 1) * 128].reshape(H, nb - 1, 128, D)  # the whole query blocks
    assert (rows[empty[:, : nb - 1]] == 0).all(), "an empty mask row must give zeros"
    rel, max_diff = _rel_err(out, q, k, v, mask, (128, 128))
    assert rel <= 1e-2, f"rel={rel:.2e} max_diff={max_diff:.2e}"


def test_gluon_persistent_splits_its_last_wave():
    """The persistent kernel with rows of (nearly) equal length: the last wave's tiles run as pieces on the idle SMs and
    split_merge's kernel merges them. The split rows (the schedule's last) against the fp32 reference, every
    head against the tl kernel, nothing left unwritten."""
    from calibatt_kernels import attn_gluon
    from calibatt_kernels.attn_gluon import GLUON_PERSISTENT
    from calibatt_kernels.index import index_on_device, index_words

    q, k, v = _wan_qkv(seed=9)
    if not attn_gluon.supports(q, k, v, (128, 128)):
        pytest.skip("the Gluon kernel needs sm_90 and triton with Gluon")
    nb = num_blocks(N, 128)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if H * nb % sms == 0 or sms // (H * nb % sms) < 2:
        pytest.skip(f"{H * nb} tiles on {sms} SMs leave no last wave to split")
    gen = torch.Generator(device="cuda").manual_seed(10)
    idx = torch.argsort(torch.rand(1, H, nb, nb, device="cuda", generator=gen), -1)[..., :26]
    mask = torch.zeros(1, H, nb, nb, dtype=torch.bool, device="cuda").scatter_(-1, idx, True)
    mask[..., -1] = True  # the partial last key block: rows of 26 and 27 blocks
    index = mask_to_index(mask)
    counts, offsets, ids, _, schedule = index_on_device(index, q.device)
    _, splits = attn_gluon.persistent_records(counts, offsets, index_words(ids), schedule, 1, q.device)
    assert splits is not None and splits[1] >= 2
    out = _gluon_against_tl(q, k, v, index, GLUON_PERSISTENT)
    heads = sorted({(r // nb) % H for r in splits[0].tolist()})
    ref = block_sparse_attention_ref(
        q[:, heads].float(), k[:, heads].float(), v[:, heads].float(), mask[:, heads], (128, 128), rows_per_chunk=4
    )
    for r in splits[0].tolist():
        h, blk = heads.index((r // nb) % H), r % nb
        got, want = out[:, heads][0, h, blk * 128 : (blk + 1) * 128].float(), ref[0, h, blk * 128 : (blk + 1) * 128]
        rel = ((got - want).norm() / want.norm()).item()
        assert rel <= 1e-2, f"split row {r}: rel={rel:.2e}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_launch_on_their_tensors_gpu():
    """A cuda:1 call with cuda:0 current runs on cuda:1 (Triton launches on the current device's stream)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 64, device="cuda:1", dtype=torch.bfloat16) for _ in range(3))
    masks = torch.rand(1, 2, 4, 4, device="cuda:1") < 0.5
    masks |= torch.eye(4, dtype=torch.bool, device="cuda:1")
    torch.cuda.set_device(0)
    out = ck.block_sparse_attention(q, k, v, masks, block_size=(128, 128))
    ref = ck.block_sparse_attention_ref(q.float(), k.float(), v.float(), masks, block_size=(128, 128))
    assert out.device == q.device
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
