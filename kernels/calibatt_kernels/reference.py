"""Pure-PyTorch references for calibatt's attention kernels.

They define what the Triton kernels compute and are the CPU path of calibatt: a query block attends only
to the key blocks its mask row lists, so the reference gathers those key blocks (never an N x N matrix
for the whole sequence) and runs a plain softmax over them. Everything is computed in fp32.

Layout: q, k, v are [B, H, N, D] (any strides). Block masks are bool [H, Mq, Mk] or [B, H, Mq, Mk] with
Mq = ceil(N / BLOCK_M), Mk = ceil(N / BLOCK_N).
"""

from __future__ import annotations

import math

import torch


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def expand_block_mask(block_mask: torch.Tensor, n_q: int, n_k: int, block_size: tuple[int, int]) -> torch.Tensor:
    """Token-level bool mask [..., n_q, n_k] from a block mask (for tests and the dense comparison)."""
    bm, bn = block_size
    tok = block_mask.repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)
    return tok[..., :n_q, :n_k]


def _batched_mask(block_mask: torch.Tensor, b: int) -> torch.Tensor:
    if block_mask.dim() == 3:
        block_mask = block_mask.unsqueeze(0)
    if block_mask.dim() != 4:
        raise ValueError(f"block_mask must be [H, Mq, Mk] or [B, H, Mq, Mk], got {tuple(block_mask.shape)}")
    return block_mask.expand(b, -1, -1, -1)


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    rows_per_chunk: int = 8,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention by gathering each query block's key blocks. Rows with no block give 0.

    With `return_lse`, returns (out, lse): lse float32 [B, H, N] = log sum_j exp(scale * q.k_j) over each row's
    listed keys (-inf for a row with no block), what merging two partial attentions over disjoint keys needs."""
    B, H, N, D = q.shape
    bm, bn = block_size
    mq, mk = num_blocks(N, bm), num_blocks(N, bn)
    mask = _batched_mask(block_mask.to(torch.bool), B)
    if mask.shape[1:] != (H, mq, mk):
        raise ValueError(f"block_mask shape {tuple(block_mask.shape)} does not match (H, Mq, Mk) = {(H, mq, mk)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf = _pad_to(q.float(), mq * bm).view(B, H, mq, bm, D)
    kf = _pad_to(k.float(), mk * bn).view(B, H, mk, bn, D)
    vf = _pad_to(v.float(), mk * bn).view(B, H, mk, bn, D)
    key_valid = (torch.arange(mk * bn, device=q.device) < N).view(mk, bn)

    # Index form: for each row the listed key blocks first; padding slots point at block 0 and are masked.
    counts = mask.sum(-1)  # [B, H, Mq]
    kmax = max(int(counts.max().item()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :kmax]  # listed blocks first
    slot_ok = torch.arange(kmax, device=q.device) < counts.unsqueeze(-1)  # [B, H, Mq, kmax]

    out = torch.zeros(B, H, mq, bm, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, mq, bm, dtype=torch.float32, device=q.device)
    bidx = torch.arange(B, device=q.device)[:, None, None, None]
    hidx = torch.arange(H, device=q.device)[None, :, None, None]
    for r0 in range(0, mq, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, mq)
        idx = order[:, :, r0:r1]  # [B, H, R, kmax]
        kg = kf[bidx, hidx, idx]  # [B, H, R, kmax, bn, D]
        vg = vf[bidx, hidx, idx]
        valid = slot_ok[:, :, r0:r1, :, None] & key_valid[idx]  # [B, H, R, kmax, bn]
        s = torch.einsum("bhrmd,bhrknd->bhrmkn", qf[:, :, r0:r1], kg) * scale
        s = s.masked_fill(~valid[:, :, :, None], float("-inf")).flatten(-2)
        lse[:, :, r0:r1] = torch.logsumexp(s, dim=-1)  # all -inf -> -inf
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty rows: all -inf -> NaN -> 0
        out[:, :, r0:r1] = torch.einsum("bhrmj,bhrjd->bhrmd", p, vg.flatten(3, 4))
    # Output in q's layout (a [B, N, H, D] view in gives one out), like the Triton launcher.
    out = torch.empty_like(q).copy_(out.view(B, H, mq * bm, D)[:, :, :N])
    return (out, lse.view(B, H, mq * bm)[:, :, :N]) if return_lse else out


def block_mass_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    rows_per_chunk: int | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """mass[b, h, i, j] = mean over the valid queries of block i of the softmax weight on key block j.
    Query blocks are processed in chunks (default: ~1M probabilities, 4 MB, at a time: cache-sized chunks
    make the CPU pass faster than larger ones), never all N x N.
    With `v`, returns (mass, attention output like q's layout) from the same probabilities.

    The chunks' scores and probabilities go to two buffers allocated once per call: a fresh multi-MB tensor
    per chunk comes back from the allocator as new pages (freed ones go back to the system), and faulting
    them in cost about a quarter of the CPU pass. The operations and shapes are the same either way (their
    `out=` forms), so are the results, bit for bit."""
    B, H, N, D = q.shape
    bm, bn = block_size
    mq, mk = num_blocks(N, bm), num_blocks(N, bn)
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (1 << 20) // (B * H * bm * mk * bn))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kt = (k.float() * scale).transpose(-1, -2)  # scale folded into the keys once
    out = torch.empty(B, H, mq, mk, dtype=torch.float32, device=q.device)
    att = None if v is None else torch.empty_like(q)
    vf = None if v is None else v.float()
    n_valid = torch.clamp(N - torch.arange(mq, device=q.device) * bm, max=bm).float()  # queries per block
    chunk = min(rows_per_chunk * bm, N)  # query rows of every chunk but maybe the last
    scores = torch.empty(B, H, chunk, N, dtype=torch.float32, device=q.device)
    probs = torch.empty_like(scores)
    for r0 in range(0, mq, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, mq)
        t0, t1 = r0 * bm, min(r1 * bm, N)
        if t1 - t0 == chunk:
            s = torch.matmul(q[:, :, t0:t1].float(), kt, out=scores)
            p = torch.ops.aten._softmax.out(s, -1, False, out=probs)  # [B, H, rows, N]
        else:  # a shorter last chunk
            p = torch.softmax(q[:, :, t0:t1].float() @ kt, dim=-1)
        if att is not None:
            att[:, :, t0:t1] = p @ vf
        if mk * bn != N:
            p = torch.nn.functional.pad(p, (0, mk * bn - N))  # missing keys hold no weight
        per_block = p.view(B, H, t1 - t0, mk, bn).sum(-1)  # [B, H, rows, Mk]
        per_block = _pad_to(per_block, (r1 - r0) * bm).view(B, H, r1 - r0, bm, mk)
        torch.div(per_block.sum(3), n_valid[r0:r1, None], out=out[:, :, r0:r1])
    return out if att is None else (out, att)


def _pad_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad dim -2 of x to length n."""
    extra = n - x.shape[-2]
    if extra == 0:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, extra))


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's q/k preparation (see norm_rope.py): RMS norm over the C = heads * D channels of q and k
    [B, N, C], rounded to their dtype, then the interleaved rotary embedding with cos, sin ([1, N, 1, D] or
    [N, D]) computed in fp32. Returns [B, N, heads, D] tensors in q's dtype."""

    n, d = q.shape[1], q.shape[-1] // heads
    c, s = _rope_tables(cos, sin, n, d)  # once for q and k

    def one(x, w):
        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), w.float(), eps).to(x.dtype)
        return _rope_apply(y.unflatten(-1, (heads, -1)), c, s)

    return one(q, weight_q), one(k, weight_k)


def rope_interleaved_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding of x [B, N, H, D] (diffusers' WanAttnProcessor): channel pairs
    (2i, 2i+1) rotated by the angle whose cos is cos[n, 2i] and sin is sin[n, 2i+1] (cos, sin: [1, N, 1, D]
    or [N, D], each angle repeated over its pair). Computed in fp32, returned in x's dtype."""
    return _rope_apply(x, *_rope_tables(cos, sin, x.shape[1], x.shape[-1]))


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [1, N, 1, D] tables for _rope_apply: (cos[2i], cos[2i]) and (-sin[2i+1], sin[2i+1]) on each pair."""
    c = cos.reshape(1, n, 1, d).float()[..., 0::2]
    s = sin.reshape(1, n, 1, d).float()[..., 1::2]
    return torch.stack([c, c], -1).flatten(-2), torch.stack([-s, s], -1).flatten(-2)


def _rope_apply(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """out[2i] = x[2i] c - x[2i+1] s and out[2i+1] = x[2i+1] c + x[2i] s, computed as x * c + swap(x) * s on
    contiguous tensors (the strided even/odd views cost several times more on the CPU). Same roundings as the
    pairwise form: each product rounded, then one addition (negating s is exact)."""
    xf = x.float()
    # (x[2i+1], x[2i]) per pair, a fresh tensor: one copy from the two strided halves (flip's generic
    # kernel takes about twice as long on the CPU)
    swapped = torch.stack((xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    return (xf * c).add_(swapped.mul_(s)).to(x.dtype)


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' GELU(approximate="tanh") module: the projection, then the tanh-approximate GELU."""
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")


class ReferenceBackend:
    """The reference as the last `dispatch` backend: it takes every call (the kernel config does not apply)."""

    name = "reference"
    is_fallback = True

    def supports(self, q, k, v, block_size, *, return_lse=False) -> bool:
        return True

    def default_config(self, device, block_size):
        return None

    def candidates(self, capability, block_size, head_dim, dtype=None, *, return_lse=False) -> list:
        return []

    def launch(self, q, k, v, index, *, block_size, scale, out, config, return_lse):
        from .index import index_to_mask

        mask = index_to_mask(index, num_blocks(k.shape[2], block_size[1]))
        res = block_sparse_attention_ref(q, k, v, mask, block_size, scale, return_lse=return_lse)
        if out is None:
            return res
        out.copy_(res[0] if return_lse else res)
        return (out, res[1]) if return_lse else out

    def kernel_fns(self) -> list:
        return []

    def aot_source(self, config, dtype, block_size, head_dim, capability, return_lse=False):
        raise ValueError("the reference has no ahead-of-time source")

    def prewarm(self, configs, index, *, device, dtype, head_dim, return_lse=False) -> None:
        pass


BACKEND = ReferenceBackend()
