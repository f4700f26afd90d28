"""generate.guard: bit-identical where the masks hold; widening changes the index the kernels read.

The fault tests the issue asks for (a bundle permuted across heads, one calibrated at epsilon 0.2, PSNR vs
dense on the trained `tiny`'s held-out prompts) are not here yet: on tiny-random at conftest's small size the
masks keep every block, so a permuted bundle renders the dense video, and the trained `tiny` did not
calibrate within minutes on the shared CPU this was written on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL_YAML

from calibatt_cli.cache.build import compile_cache
from calibatt_cli.calibrate import calibrate
from calibatt_cli.config import load_config
from calibatt_cli.generate import generate


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red circle moving left on a black background\na blue square moving up\n")
    (tmp / "out").mkdir()
    (tmp / "small.yaml").write_text(SMALL_YAML.format(prompts=prompts, out=tmp / "out"))
    cfg = load_config(tmp / "small.yaml", [])
    calibrate(cfg)
    compile_cache(cfg)
    return tmp


def test_guard_leaves_a_holding_bundle_bit_identical(work):
    tmp = work
    prompts = ["a red circle moving left on a black background"]
    on = generate(load_config(tmp / "small.yaml", ["generate.guard=true"]), prompts, write=False)
    off = generate(load_config(tmp / "small.yaml", ["generate.guard=false"]), prompts, write=False)
    g = on.summary()["guard"]
    assert g["enabled"] and g["checks"] > 0 and g["widened"] == [], g["widened"]
    assert g["min_mass"] >= g["threshold"], (g["min_mass"], g["threshold"])
    assert off.summary()["guard"] == {"enabled": False, "reason": "generate.guard=false"}
    assert np.array_equal(on.videos[0].frames, off.videos[0].frames), "the guard changed a video whose masks hold"


def test_widening_changes_the_kernels_index():
    """A widened head lists every key block in the tensors the processors read; other heads keep theirs."""
    from calibatt_cli.runtime import SparseController, SparsePlan
    from calibatt_kernels import index_to_mask, mask_to_index

    masks = torch.eye(4, dtype=torch.bool).expand(2, 4, 4).clone()  # 2 heads, 4 blocks: diagonal only
    plan = SparsePlan(8, [-1, 0, 0], {(0, 0): mask_to_index(masks)}, torch.ones(1, 1, 1), epsilon=0.01)
    from calibatt_cli.runtime.guard import Guard

    ctl = SparseController(plan, guard=Guard(plan, factor=2.0))
    sparse = ctl.sparse_layer(0)
    ctl.reset()
    ctl._set_step(1)
    assert ctl.guard_due()
    q = torch.randn(1, 2, 32, 16)
    k = q.clone()
    k[:, 0] = torch.randn(1, 32, 16)  # head 0 attends anywhere (the diagonal loses mass); head 1 to itself x 4
    k[:, 1] *= 4
    ctl.guard_check(0, q, k)
    heads = {w.head for w in ctl.guard.widened}
    assert 0 in heads
    got = index_to_mask(ctl.plan.index[(0, 0)], 4)[0]
    assert got[0].all()
    for h in range(2):
        if h not in heads:
            assert torch.equal(got[h], masks[h])
    assert sparse.counts[0, 0, 0].tolist() == [4, 4, 4, 4], "the processor's tensors were not refreshed"
    ctl.reset()  # a new video: back to the compiled plan
    assert torch.equal(index_to_mask(ctl.plan.index[(0, 0)], 4)[0], masks)
    assert sparse.counts[0, 0, 0].tolist() == [1, 1, 1, 1]


def test_sampled_mass_equals_the_full_block_mass_on_the_sampled_rows():
    """The guard's cheap measurement against the reference block mass of the whole sequence (keys longer
    than the sampled queries, a partial last block among the sampled rows)."""
    import calibatt_kernels as ck
    from calibatt_cli.runtime.guard import sample_rows, sampled_mass

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 300, 64), torch.randn(2, 3, 300, 64)
    mq = 5  # 300 tokens in blocks of 64: the last block holds 44
    mask = torch.rand(1, 3, mq, mq) < 0.5
    mask |= torch.eye(mq, dtype=torch.bool)
    rows = sample_rows(mq, 3)
    assert rows.tolist() == [0, 2, 4]
    full = ck.block_mass_ref(q, k, (64, 64))
    expected = (full[:, :, rows] * mask[:, :, rows]).sum(-1).double().mean(dim=(0, 2))
    got = sampled_mass(q, k, ck.mask_to_index(mask), 64, rows)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
