"""The CPU reference kernels against plain dense attention (independent, token-level)."""

import pytest
import torch

import calibatt_kernels as ck


def dense_masked(q, k, v, block_mask, block_size):
    n = q.shape[2]
    tok = ck.expand_block_mask(block_mask, n, n, block_size)
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~tok, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v.double()


@pytest.mark.parametrize("n, block_size", [(256, (64, 64)), (300, (64, 32)), (77, (32, 64)), (128, (128, 128))])
@pytest.mark.parametrize("per_batch", [False, True])
def test_block_sparse_ref_matches_dense_with_expanded_mask(n, block_size, per_batch):
    g = torch.Generator().manual_seed(n)
    b, h, d = 2, 3, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    mq, mk = ck.num_blocks(n, block_size[0]), ck.num_blocks(n, block_size[1])
    shape = (b, h, mq, mk) if per_batch else (h, mq, mk)
    mask = torch.rand(shape, generator=g) < 0.4
    mask[..., 0, :] = False  # an empty row gives zeros
    out = ck.block_sparse_attention_ref(q, k, v, mask, block_size)
    ref = dense_masked(q, k, v, mask, block_size)
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-5, f"max_diff={err}"
    assert out[..., : block_size[0], :].abs().max() == 0


def test_block_sparse_ref_takes_transposed_views():
    x = torch.randn(3, 1, 200, 2, 16)  # q/k/v stacked in diffusers' [B, N, H, D] layout
    q, k, v = (t.transpose(1, 2) for t in x)  # [1, 2, 200, 16] views, not contiguous
    mask = torch.rand(2, 4, 4) < 0.6
    got = ck.block_sparse_attention_ref(q, k, v, mask, (64, 64))
    want = ck.block_sparse_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), mask, (64, 64))
    assert torch.equal(got, want)


@pytest.mark.parametrize("n, block_size", [(256, (64, 64)), (300, (64, 32)), (45, (32, 32))])
def test_block_mass_ref_against_token_softmax(n, block_size):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, n, 32, generator=g) * 2 for _ in range(2))
    mass = ck.block_mass_ref(q, k, block_size)
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 32**0.5, -1)
    bm, bn = block_size
    mq, mk = ck.num_blocks(n, bm), ck.num_blocks(n, bn)
    want = torch.zeros(2, 2, mq, mk, dtype=torch.float64)
    for i in range(mq):
        for j in range(mk):
            want[:, :, i, j] = p[:, :, i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].sum(-1).mean(-1)
    err = (mass.double() - want).abs().max().item()
    assert err < 1e-5, f"max_diff={err}"
    assert (mass.sum(-1) - 1).abs().max() < 1e-5
    # the one-pass form calibration uses on the CPU: the same mass, and SDPA's output (in q's layout)
    v = torch.randn(2, n, 2, 32, generator=g).transpose(1, 2)
    out, mass2 = ck.attention_with_block_mass(q, k, v, block_size=block_size)
    assert torch.equal(mass2, mass)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - sdpa).abs().max() < 1e-5


def test_index_round_trip_and_schedule():
    mask = torch.rand(2, 3, 5, 9) < 0.3
    mask[0, 0, 0] = False
    mask[1, 2, 4] = True
    ix = ck.mask_to_index(mask)
    assert torch.equal(ck.index_to_mask(ix, 9), mask)
    assert torch.equal(ix.counts, mask.sum(-1).int())
    counts = ix.counts.flatten()[ix.schedule.long()]
    assert (counts[:-1] >= counts[1:]).all(), "schedule must be longest-first"
    assert sorted(ix.schedule.tolist()) == list(range(mask[..., 0].numel()))
    for b in range(2):
        for h in range(3):
            for i in range(5):
                c, o = int(ix.counts[b, h, i]), int(ix.offsets[b, h, i])
                assert ix.indices[o : o + c].tolist() == mask[b, h, i].nonzero().flatten().tolist()
    # compressed rows: the index holds the listed blocks (padded to 16 bytes), however wide the widest row
    assert ix.indices.numel() == -(-int(mask.sum()) // 8) * 8 and ix.max_blocks_per_row == int(mask.sum(-1).max())


def test_index_size_follows_the_kept_blocks_not_the_widest_row():
    """One dense head among sparse ones: a padded table would cost the full width for every row."""
    mask = torch.zeros(8, 64, 64, dtype=torch.bool)
    mask[0] = True  # a dense head
    mask[1:, torch.arange(64), torch.arange(64)] = True  # the others: the diagonal only
    ix = ck.mask_to_index(mask)
    assert ix.indices.numel() == 64 * 64 + 7 * 64  # a multiple of 8: no padding
    assert torch.equal(ck.index_to_mask(ix, 64), mask.unsqueeze(0))


def test_empty_mask_index():
    ix = ck.mask_to_index(torch.zeros(2, 3, 4, dtype=torch.bool))
    assert ix.indices.numel() == 8 and int(ix.counts.sum()) == 0  # one padded slot: a kernel argument is never empty
    assert not ck.index_to_mask(ix, 4).any()


def test_dropped_mass_predicts_the_change():
    """Dropping blocks of mass delta changes a row's output by exactly delta * (o_kept - o_dropped),
    and the dropped mass per query block equals 1 - the kept block mass from block_mass."""
    g = torch.Generator().manual_seed(3)
    n, bs = 256, (64, 64)
    q = torch.randn(1, 2, n, 16, generator=g) * 2.5
    k = q + 0.5 * torch.randn(1, 2, n, 16, generator=g)  # tokens favour themselves: diagonal blocks dominate
    v = torch.randn(1, 2, n, 16, generator=g)
    mass = ck.block_mass_ref(q, k, bs)
    from calibatt_cli.masks import select_blocks

    mask = select_blocks(mass[0], 0.1)  # drop up to 10 % of each row
    assert not mask.all(), "the test needs a mask that drops something"
    sparse = ck.block_sparse_attention_ref(q, k, v, mask, bs).double()
    dense = dense_masked(q, k, v, torch.ones_like(mask), bs)
    tok = ck.expand_block_mask(mask, n, n, bs)
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 4, -1)
    delta = (p * ~tok).sum(-1, keepdim=True)  # dropped mass per query
    o_drop = ((p * ~tok) @ v.double()) / delta.clamp_min(1e-300)
    predicted = delta * (sparse - o_drop)
    err = (sparse - dense - predicted).abs().max().item()
    assert err < 1e-5, f"max_diff={err}"
    # the bound a user can read off the bundle: |change| <= 2 * delta * max|v|
    assert ((sparse - dense).abs() <= 2 * delta * v.abs().max() + 1e-6).all()
    per_block = delta.view(1, 2, n // 64, 64).mean(-1)
    kept = (mass.double() * mask).sum(-1)
    assert (per_block - (1 - kept)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "n,offset,dtype", [(16, 0, torch.int16), (13, 0, torch.int16), (12, 1, torch.int16), (9, 0, torch.int64)]
)
def test_index_words_hold_the_ids_two_to_a_word(n, offset, dtype):
    """The kernel reads id e as (word[e >> 1] >> 16 * (e & 1)) & 0xFFFF; odd lengths, 2-byte-aligned views
    and wider ids must read back the same ids."""
    from calibatt_kernels.index import index_words

    base = torch.randint(0, 32767, (n + offset,), dtype=torch.int16)
    ids = base[offset:].to(dtype)
    words = index_words(ids)
    assert words.dtype == torch.int32 and words.numel() * 2 >= n
    e = torch.arange(n)
    got = (words[e >> 1] >> ((e & 1) * 16)) & 0xFFFF
    assert torch.equal(got, ids.long().int())
    if dtype == torch.int16 and n % 2 == 0 and offset == 0:
        assert words.data_ptr() == ids.data_ptr()  # a view, no copy per call


def test_index_refuses_block_ids_beyond_int16():
    import pytest

    ck.mask_to_index(torch.ones(1, 1, 32767, dtype=torch.bool))
    with pytest.raises(ValueError, match="int16"):
        ck.mask_to_index(torch.ones(1, 1, 32768, dtype=torch.bool))


def test_grouped_schedule_orders_levels_then_rows():
    """levels=L: rows sorted by count level (ceil(count * L / widest)), natural row order inside a level."""
    counts = torch.tensor([[[10, 3, 9, 0], [5, 10, 1, 6]]], dtype=torch.int32)  # [1, 2, 4]
    sched = ck.lpt_schedule(counts, levels=2).tolist()
    # levels: 10,9,6 -> 2 ; 3,5,1 -> 1 ; 0 -> 0
    assert sched == [0, 2, 5, 7, 1, 4, 6, 3]
    assert ck.lpt_schedule(counts).tolist() == [0, 5, 2, 7, 4, 1, 6, 3]  # exact LPT
    big = torch.randint(0, 50, (2, 3, 40), dtype=torch.int32)
    for levels in (1, 4, 8):
        s = ck.lpt_schedule(big, levels=levels)
        assert sorted(s.tolist()) == list(range(big.numel()))
        c = big.flatten()[s.long()]
        # never more than one level out of order: a later row is at most widest / levels longer
        later_max = torch.flip(torch.cummax(torch.flip(c, [0]), 0).values, [0])
        assert (later_max - c).max() <= -(-int(big.max()) // levels)


@pytest.mark.parametrize(
    "n, block_size, batch_mask", [(200, (64, 64), False), (301, (64, 32), True), (96, (32, 32), False)]
)
def test_cpu_rows_path_matches_the_reference(n, block_size, batch_mask):
    """The CPU path (kernels/cpu.py) against the reference: random masks with empty rows and rows that keep
    every key block (alone and in runs), N not a multiple of either block size, B > 1 with per-batch or
    shared index rows, [B, N, H, D] views as input."""
    from calibatt_kernels.cpu import block_sparse_attention_rows

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, n, 3, 32, generator=g).transpose(1, 2) for _ in range(3))
    mq, mk = ck.num_blocks(n, block_size[0]), ck.num_blocks(n, block_size[1])
    mask = torch.rand((2 if batch_mask else 1), 3, mq, mk, generator=g) < 0.5
    mask[..., 0, :] = False  # an empty row
    mask[..., 1:3, :] = True  # a run of full rows
    mask[..., -1, :] = True  # a full last row
    got = block_sparse_attention_rows(q, k, v, ck.mask_to_index(mask), block_size=block_size)
    want = dense_masked(q, k, v, mask, block_size)  # float64, token level
    assert got.shape == q.shape and got.stride() == q.stride()
    assert (got.double() - want).abs().max() < 1e-5, f"max_diff={(got.double() - want).abs().max():.2e}"
    assert not got[:, :, : block_size[0]].any()
    # through the public entry, as the CPU processors call it
    ck.reset_what_ran()
    via = ck.block_sparse_attention_indexed(q, k, v, ck.mask_to_index(mask), block_size=block_size)
    assert ck.what_ran()["calls"] == {"attention:cpu": 1}, ck.what_ran()
    assert (via.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("n, block_size", [(200, (64, 64)), (301, (64, 32)), (77, (32, 16))])
def test_cpu_rows_gather_every_row(n, block_size):
    """Every row keeps some key blocks but never all (so no row takes the whole-sequence SDPA shortcut and each
    goes through the gather of its listed keys), the partial last key block among them: against float64
    token-level attention, and visibly different from dense attention."""
    g = torch.Generator().manual_seed(n + 1)
    q, k, v = (torch.randn(2, n, 3, 32, generator=g).transpose(1, 2) * 2 for _ in range(3))
    mq, mk = ck.num_blocks(n, block_size[0]), ck.num_blocks(n, block_size[1])
    mask = torch.rand(2, 3, mq, mk, generator=g) < 0.5
    mask[..., 0] = True  # never empty
    mask[..., -1] = False  # never full: every row is gathered
    mask[..., 1, -1] = True  # but row 1 keeps the partial last key block (and drops block 0)
    mask[..., 1, 0] = False
    assert not mask.all(-1).any() and mask.any(-1).all()
    ck.reset_what_ran()
    got = ck.block_sparse_attention_indexed(q, k, v, ck.mask_to_index(mask), block_size=block_size)
    assert ck.what_ran()["calls"] == {"attention:cpu": 1}, ck.what_ran()
    want = dense_masked(q, k, v, mask, block_size)
    err = (got.double() - want).abs().max().item()
    assert err < 1e-5, f"max_diff={err:.2e}"
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (got - dense).abs().max() > 1e-2, "the mask must matter"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_ref_against_float64_pairwise(dtype):
    """The RMS norm and the interleaved rotation, written out pair by pair in float64 (diffusers' Wan form),
    with a cos/sin table whose odd cos and even sin entries differ from their pair's (the reference reads
    cos[2i] and sin[2i+1])."""
    g = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 40, 3, 16
    q, k = (torch.randn(b, n, h * d, generator=g).to(dtype) for _ in range(2))
    wq, wk = (torch.rand(h * d, generator=g) + 0.5 for _ in range(2))
    cos, sin = torch.randn(1, n, 1, d, generator=g), torch.randn(1, n, 1, d, generator=g)
    got_q, got_k = ck.qk_norm_rope_ref(q, k, wq.to(dtype), wk.to(dtype), cos, sin, heads=h, eps=1e-6)

    def want(x, w):
        x = x.double()
        y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.to(dtype).double()).to(dtype).double()
        y = y.unflatten(-1, (h, d))
        c, s = cos.double()[..., 0::2], sin.double()[..., 1::2]
        out = torch.empty_like(y)
        out[..., 0::2] = y[..., 0::2] * c - y[..., 1::2] * s
        out[..., 1::2] = y[..., 0::2] * s + y[..., 1::2] * c
        return out

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, x, w in ((got_q, q, wq), (got_k, k, wk)):
        assert got.shape == (b, n, h, d) and got.dtype == dtype
        err = (got.double() - want(x, w)).abs().max().item()
        assert err < tol, f"max_diff={err}"
    x = torch.randn(b, n, h, d, generator=g)
    rot = ck.rope_interleaved_ref(x, cos, sin).double()
    x, c, s = x.double(), cos.double()[..., 0::2], sin.double()[..., 1::2]
    assert (rot[..., 0::2] - (x[..., 0::2] * c - x[..., 1::2] * s)).abs().max() < 1e-5
    assert (rot[..., 1::2] - (x[..., 0::2] * s + x[..., 1::2] * c)).abs().max() < 1e-5
