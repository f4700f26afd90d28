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
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_sampled_mass_in_bf16_moves_the_dropped_mass_by_under_one_percent():
    """On a GPU the guard scores in bf16: against the fp32 reference on the same (rounded) inputs, with
    peaked attention, the kept mass is off by < 1 % of the mass the masks drop."""
    import calibatt_kernels as ck
    from calibatt_cli.runtime.guard import sample_rows, sampled_mass

    torch.manual_seed(1)
    q = (torch.randn(1, 4, 1000, 64) * 2.5).bfloat16()
    k = (torch.randn(1, 4, 1000, 64) * 2.5).bfloat16()
    mq = 16
    mask = torch.rand(1, 4, mq, mq) < 0.7
    mask |= torch.eye(mq, dtype=torch.bool)
    rows = sample_rows(mq, 5)
    full = ck.block_mass_ref(q.double(), k.double(), (64, 64))
    expected = (full[:, :, rows] * mask[:, :, rows]).sum(-1).mean(dim=(0, 2))
    got = sampled_mass(q, k, ck.mask_to_index(mask), 64, rows).double()
    err = ((got - expected).abs() / (1 - expected)).max().item()
    assert err < 0.01, f"bf16 error {err:.2e} of the dropped mass (kept {expected.tolist()})"


def _faulty_cache(tmp, name: str, masks: torch.Tensor) -> list[str]:
    """A bundle of `masks` with the calibrated bundle's meta, compiled; the --set overrides that use it."""
    from calibatt_cli.bundle import load_bundle, save_bundle

    meta = load_bundle(tmp / "out" / "bundle.safetensors").meta
    save_bundle(tmp / f"{name}.safetensors", masks, {k: v for k, v in meta.items() if k != "content_hash"})
    sets = [f"compile.bundle={tmp / name}.safetensors", f"compile.cache_dir={tmp / name}.cache"]
    compile_cache(load_config(tmp / "small.yaml", sets))
    return sets


def test_guard_runs_in_compiled_blocks(work):
    """generate.compile with the guard: the probe op stays in the fullgraph-compiled blocks (aot_eager: the
    graphs without code generation), measures each (bucket, layer) once per video as eager does, widens the
    same heads, and leaves a holding bundle's video bit-identical."""
    from calibatt_cli.bundle import load_bundle

    tmp = work
    prompts = ["a red circle moving left on a black background"]
    shape = load_bundle(tmp / "out" / "bundle.safetensors").masks.shape
    masks = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.4
    masks |= torch.eye(shape[-1], dtype=torch.bool)  # the diagonal only keeps little of tiny-random's mass
    faulty = _faulty_cache(tmp, "random", masks)
    compiled = ["generate.compile=true", "generate.compile_backend=aot_eager", "generate.guard=true"]

    eager = generate(load_config(tmp / "small.yaml", [*faulty, "generate.guard=true"]), prompts, write=False)
    comp = generate(load_config(tmp / "small.yaml", [*faulty, *compiled]), prompts, write=False)
    e, c = eager.summary()["guard"], comp.summary()["guard"]
    keys = shape[0] * shape[1]  # (bucket, layer) pairs, each measured once
    assert e["checks"] == c["checks"] == keys, (e["checks"], c["checks"], keys)
    assert c["widened"], "the faulty bundle was not widened in compiled blocks"
    heads = [(w["bucket"], w["layer"], w["head"]) for w in c["widened"]]
    assert heads == [(w["bucket"], w["layer"], w["head"]) for w in e["widened"]], (heads, e["widened"])

    on = generate(load_config(tmp / "small.yaml", compiled), prompts, write=False)
    off = generate(load_config(tmp / "small.yaml", [*compiled[:2], "generate.guard=false"]), prompts, write=False)
    assert on.summary()["guard"]["checks"] == keys and on.summary()["guard"]["widened"] == []
    assert np.array_equal(on.videos[0].frames, off.videos[0].frames), "the compiled guard changed a holding video"
