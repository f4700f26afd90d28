"""The CPU paths calibration and the CPU demo run (reference.py) give the same bits as their plain forms: their
buffers and shortcuts only save time. A bundle is only reproducible if they do."""

from __future__ import annotations

import math

import pytest
import torch

from calibatt_kernels import reference as ref


def plain_block_mass(q, k, block_size, v=None, rows_per_chunk=None):
    """block_mass_ref as its plain chunked loop: a fresh score and probability tensor per chunk."""
    B, H, N, D = q.shape
    bm, bn = block_size
    mq, mk = -(-N // bm), -(-N // bn)
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (1 << 20) // (B * H * bm * mk * bn))
    kt = (k.float() * (1.0 / math.sqrt(D))).transpose(-1, -2)
    out = torch.empty(B, H, mq, mk)
    att = None if v is None else torch.empty_like(q)
    for r0 in range(0, mq, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, mq)
        p = torch.softmax(q[:, :, r0 * bm : min(r1 * bm, N)].float() @ kt, dim=-1)
        if att is not None:
            att[:, :, r0 * bm : min(r1 * bm, N)] = p @ v.float()
        p = torch.nn.functional.pad(p, (0, mk * bn - N))
        per_block = p.view(B, H, p.shape[2], mk, bn).sum(-1)
        per_block = torch.nn.functional.pad(per_block, (0, 0, 0, (r1 - r0) * bm - per_block.shape[2]))
        per_block = per_block.view(B, H, r1 - r0, bm, mk)
        n_valid = torch.clamp(N - torch.arange(r0, r1) * bm, max=bm).float()
        out[:, :, r0:r1] = per_block.sum(3) / n_valid[:, None]
    return out if att is None else (out, att)


@pytest.mark.parametrize(
    "b, h, n, d, block, rows",
    [
        (1, 3, 2304, 64, 64, None),  # the tiny model's calibration call: 18 equal chunks
        (2, 2, 200, 32, 32, None),  # partial last query and key block
        (1, 2, 1000, 16, 64, 3),  # a shorter last chunk (16 blocks in chunks of 3)
        (1, 1, 70, 8, 64, None),
    ],
)
def test_block_mass_ref_is_its_plain_loop_bit_for_bit(b, h, n, d, block, rows):
    g = torch.Generator().manual_seed(n)
    q, k, v = (3 * torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(3))  # [B, N, H, D] views
    mass, att = ref.block_mass_ref(q, k, (block, block), rows_per_chunk=rows, v=v)
    want_mass, want_att = plain_block_mass(q, k, (block, block), v=v, rows_per_chunk=rows)
    assert torch.equal(mass, want_mass)
    assert torch.equal(att, want_att) and att.stride() == q.stride()
    assert torch.equal(ref.block_mass_ref(q, k, (block, block), rows_per_chunk=rows), want_mass)


def plain_qk_norm_rope(q, k, weight_q, weight_k, cos, sin, heads, eps):
    """Wan's q/k preparation in its pairwise form (diffusers' WanAttnProcessor): RMS norm, then each pair
    (x[2i], x[2i+1]) rotated by the angle of cos[2i], sin[2i+1]."""
    n, d = q.shape[1], q.shape[-1] // heads
    c = cos.reshape(1, n, 1, d).float()[..., 0::2]
    s = sin.reshape(1, n, 1, d).float()[..., 1::2]

    def one(x, w):
        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), w.float(), eps).to(x.dtype)
        y = y.unflatten(-1, (heads, -1)).float()
        x0, x1 = y[..., 0::2], y[..., 1::2]
        out = torch.empty_like(y)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x1 * c + x0 * s
        return out.to(x.dtype)

    return one(q, weight_q), one(k, weight_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_ref_is_the_pairwise_rotation_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    heads, d, n = 3, 64, 2304  # the tiny model's self-attention
    q, k = (torch.randn(1, n, heads * d, generator=g).to(dtype) for _ in range(2))
    wq, wk = (1 + 0.1 * torch.randn(heads * d, generator=g)).to(dtype), torch.rand(heads * d, generator=g).to(dtype)
    angles = torch.rand(n, d // 2, generator=g) * 6.3
    cos = angles.cos().repeat_interleave(2, -1).reshape(1, n, 1, d)
    sin = angles.sin().repeat_interleave(2, -1).reshape(1, n, 1, d)
    got = ref.qk_norm_rope_ref(q, k, wq, wk, cos, sin, heads=heads, eps=1e-6)
    want = plain_qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype and a.shape == (1, n, heads, d)
        assert torch.equal(a, b)
