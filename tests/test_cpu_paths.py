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
