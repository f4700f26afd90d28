import itertools

import pytest
import torch

from calibatt_cli.masks import pack_bits, retained_mass, select_blocks, unpack_bits


def brute_force_select(row: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Smallest subset reaching (1 - eps) of the row's mass; among those, the one with most mass."""
    n = row.numel()
    total = float(row.sum())
    for size in range(1, n + 1):
        best, best_mass = None, -1.0
        for subset in itertools.combinations(range(n), size):
            m = float(row[list(subset)].sum())
            if m >= (1 - epsilon) * total and m > best_mass:
                best, best_mass = subset, m
        if best is not None:
            out = torch.zeros(n, dtype=torch.bool)
            out[list(best)] = True
            return out
    raise AssertionError("unreachable")


@pytest.mark.parametrize("epsilon", [0.001, 0.05, 0.2, 0.5])
def test_select_blocks_equals_brute_force(epsilon):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 1 + trial % 9
        # peaked rows (like real attention) and flat ones
        logits = torch.randn(3, n, generator=g, dtype=torch.float64) * (4.0 if trial % 2 else 0.5)
        mass = torch.softmax(logits, -1)
        got = select_blocks(mass, epsilon)
        for r in range(mass.shape[0]):
            want = brute_force_select(mass[r], epsilon)
            assert torch.equal(got[r], want), f"row {mass[r].tolist()} eps {epsilon}: {got[r]} != {want}"


def test_select_blocks_batched_shape_and_retained_mass():
    mass = torch.softmax(torch.randn(2, 3, 5, 7, dtype=torch.float64) * 3, -1)
    mask = select_blocks(mass, 0.01)
    assert mask.shape == mass.shape and mask.dtype == torch.bool
    assert mask.any(-1).all(), "every row keeps at least one block"
    kept = retained_mass(mass, mask)
    assert kept.shape == (2, 3)
    assert (kept >= 0.99 - 1e-12).all(), f"min kept {kept.min()}"


def test_unnormalised_rows_use_relative_threshold():
    mass = torch.tensor([[2.0, 1.0, 1.0]])  # total 4
    assert select_blocks(mass, 0.2).tolist() == [[True, True, True]]  # needs 3.2
    assert select_blocks(mass, 0.3).tolist() == [[True, True, False]]  # needs 2.8; ties keep the lower index
    assert select_blocks(mass, 0.5).tolist() == [[True, False, False]]  # needs 2.0


@pytest.mark.parametrize("mk", [1, 7, 8, 9, 36, 257])
def test_pack_round_trip(mk):
    mask = torch.rand(2, 3, 5, mk) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (mk + 7) // 8
    assert torch.equal(unpack_bits(packed, mk), mask)


def _nearest_blocks_brute_force(grid, density, block):
    """For each query block, the Chebyshev distance (normalised frame, row, col) from its token centroid to
    every key block's, in plain Python floats: the reference `local_block_mask` must agree with."""
    f, r, c = grid
    coords = [((t // (r * c)) / f, ((t // c) % r) / r, (t % c) / c) for t in range(f * r * c)]
    blocks = [coords[i : i + block] for i in range(0, len(coords), block)]  # the last one may be partial
    cent = [tuple(sum(p[d] for p in b) / len(b) for d in range(3)) for b in blocks]
    dist = [[max(abs(a[d] - b[d]) for d in range(3)) for b in cent] for a in cent]
    return dist, max(1, round(density * len(blocks)))


@pytest.mark.parametrize(
    "grid, density, block",
    [((5, 6, 8), 0.25, 16), ((3, 5, 7), 0.4, 16), ((2, 9, 11), 0.2, 32), ((1, 3, 3), 0.01, 4)],
)
def test_local_block_mask_keeps_the_nearest_blocks(grid, density, block):
    from calibatt_cli.masks import local_block_mask

    heads = 3
    m = local_block_mask(heads, grid, density, block)
    dist, keep = _nearest_blocks_brute_force(grid, density, block)
    mb = len(dist)
    assert m.shape == (heads, mb, mb) and m.dtype == torch.bool
    for h in range(heads):
        for i in range(mb):
            kept = [j for j in range(mb) if m[h, i, j]]
            dropped = [j for j in range(mb) if not m[h, i, j]]
            assert len(kept) == keep, f"head {h} row {i}: kept {len(kept)} blocks, want {keep}"
            assert i in kept, f"head {h}: block {i} is nearest to itself"
            # every kept block is at least as near as every dropped one (ties may go either way)
            far = max(dist[i][j] for j in kept)
            near = min((dist[i][j] for j in dropped), default=float("inf"))
            assert far <= near + 1e-6, f"head {h} row {i}: kept one at {far:.4f}, dropped one at {near:.4f}"
