"""What a sparse run's attention calls actually ran, per (bucket, layer): the scope the controller and its
processors set, the report generate prints and writes to --json, and --strict's errors (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import calibatt_kernels as ck
from calibatt_cli.errors import CacheError
from calibatt_cli.generate import _fallbacks_as_errors, dense_error, kernel_report
from calibatt_cli.runtime import SparseController
from calibatt_cli.runtime.plan import SparsePlan
from calibatt_kernels import attn_gluon, dispatch

H, N, BS, LAYERS = 2, 200, 64, 3
MB = -(-N // BS)
STEPS = [-1, 0, 0, 1]  # a warm-up step, then two steps of bucket 0 and one of bucket 1


def _plan(seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(2, LAYERS, H, MB, MB, generator=gen) < 0.5
    masks[..., 0] = True  # no empty row
    index = {(b, layer): ck.mask_to_index(masks[b, layer]) for b in range(2) for layer in range(LAYERS)}
    return SparsePlan(BS, STEPS, index, masks.float().mean((-1, -2))), masks


def _qkv(batch=2):
    return [torch.randn(batch, H, N, 64) for _ in range(3)]


def _run_steps(ctl, fast: bool, skip=()):
    """Each step's forward: every layer once (those in `skip` attend elsewhere: dense SDPA)."""
    q, k, v = _qkv()
    layers = [ctl.sparse_layer(layer) for layer in range(LAYERS)] if fast else None
    ctl.reset()
    for step in range(len(STEPS)):
        if not ctl.dense_now:
            for layer in range(LAYERS):
                if (ctl.bucket, layer) in skip:
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                elif fast:
                    layers[layer](q, k, v)
                else:
                    ctl.attend(layer, q, k, v)
        ctl.on_step_end(None, step, None, {})


@pytest.mark.parametrize("fast", [True, False], ids=["processor-fast-path", "controller-attend"])
def test_report_names_each_groups_kernel_and_its_measured_density(fast):
    plan, masks = _plan()
    ck.reset_what_ran()
    _run_steps(SparseController(plan), fast)
    dispatch.set_scope(None)
    rep = kernel_report(plan, ck.what_ran())
    json.dumps(rep)  # what --json prints
    assert rep["calls"] == {"cpu": 3 * LAYERS} and rep["fallbacks"] == [] and rep["dense"] == [], rep
    groups = {(g["bucket"], g["layer"]): g for g in rep["groups"]}
    assert set(groups) == {(b, layer) for b in range(2) for layer in range(LAYERS)}
    for (b, layer), g in groups.items():
        assert g["ran"] == {"cpu": 2 if b == 0 else 1}, g
        want = masks[b, layer].double().mean().item()  # the mask's share of blocks, from the mask itself
        assert g["density"] == pytest.approx(want, abs=1e-6), (b, layer, g)
    per_bucket = [masks[b].double().mean().item() for b in range(2)]
    steps = [1.0, per_bucket[0], per_bucket[0], per_bucket[1]]
    assert rep["measured_density"] == pytest.approx(sum(steps) / 4, abs=1e-6)
    assert rep["measured_sparse_density"] == pytest.approx(sum(steps[1:]) / 3, abs=1e-6)


def test_a_layer_that_ran_dense_is_reported_and_fails_strict():
    plan, masks = _plan(1)
    ck.reset_what_ran()
    _run_steps(SparseController(plan), True, skip={(0, 1)})
    dispatch.set_scope(None)
    rep = kernel_report(plan, ck.what_ran())
    assert rep["dense"] == [{"bucket": 0, "layer": 1, "missing": 2, "expected": 2}], rep
    # bucket 0's layer 1 counts dense (every block) in the measured density
    b0 = (masks[0, 0].double().mean() + 1.0 + masks[0, 2].double().mean()).item() / 3
    steps = [1.0, b0, b0, masks[1].double().mean().item()]
    assert rep["measured_density"] == pytest.approx(sum(steps) / 4, abs=1e-6)
    msg = dense_error(rep["dense"])
    assert msg == (
        "strict mode: bucket 0, layer 1 ran 2 of 2 attention calls outside calibatt's kernels (dense) where the "
        "plan is sparse; run without --strict to accept it"
    )


def test_a_bucket_without_any_call_is_dense():
    plan, _ = _plan(2)
    ck.reset_what_ran()
    _run_steps(SparseController(plan), True, skip={(1, layer) for layer in range(LAYERS)})
    dispatch.set_scope(None)
    rep = kernel_report(plan, ck.what_ran())
    assert rep["dense"] == [{"bucket": 1, "layer": "*", "missing": None, "expected": None}], rep
    assert "bucket 1 ran no attention call through calibatt's kernels" in dense_error(rep["dense"])


def test_strict_fails_on_a_fallback_naming_the_group():
    """A config the call cannot run (the Gluon kernel on the CPU): without strict a recorded fallback (the CPU
    rows path runs), with strict one CacheError naming the group, the kernels and why."""
    plan, _ = _plan(3)
    plan.configs[(0, 1)] = attn_gluon.GLUON_PERSISTENT
    ck.reset_what_ran()
    _run_steps(SparseController(plan), True)
    rep = kernel_report(plan, ck.what_ran())
    assert [(f["wanted"], f["ran"], f["calls"]) for f in rep["fallbacks"]] == [("gluon_persistent", "cpu", 2)]
    with pytest.raises(CacheError) as e, _fallbacks_as_errors(True):
        _run_steps(SparseController(plan), True)
    dispatch.set_scope(None)
    msg = str(e.value)
    assert msg.startswith("strict mode: attention at bucket 0, layer 1 wanted gluon_persistent but would run cpu")
    assert "Gluon runs on CUDA GPUs, not cpu" in msg and "\n" not in msg


def test_scope_under_torch_compile():
    """Compiled (fullgraph), the layer's call is one opaque op that runs at run time and sets its own scope,
    (bucket, layer), as eager does: the report groups per (bucket, layer) here too."""
    plan, masks = _plan(4)
    ctl = SparseController(plan)
    layers = [ctl.sparse_layer(layer) for layer in range(LAYERS)]
    q, k, v = _qkv()
    torch._dynamo.reset()
    fns = [torch.compile(lambda q, k, v, s=s: s(q, k, v) * 1.0, backend="eager", fullgraph=True) for s in layers]
    ck.reset_what_ran()
    ctl.reset()
    for step in range(len(STEPS)):
        if not ctl.dense_now:
            for fn in fns:
                fn(q, k, v)
        ctl.on_step_end(None, step, None, {})
    dispatch.set_scope(None)
    scopes = {tuple(s["scope"]): s["ran"] for s in ck.what_ran()["scopes"]}
    want = {(b, layer): {"cpu": 2 if b == 0 else 1} for b in range(2) for layer in range(LAYERS)}
    assert scopes == want, scopes
    rep = kernel_report(plan, ck.what_ran())
    assert [(g["bucket"], g["layer"]) for g in rep["groups"]] == sorted(want) and rep["dense"] == []
    for g in rep["groups"]:
        want_density = masks[g["bucket"], g["layer"]].double().mean().item()
        assert g["density"] == pytest.approx(want_density, abs=1e-6), g


@pytest.mark.parametrize("head_dim, lse", [(64, False), (96, False), (64, True)])
def test_attention_backend_names_what_runs_on_the_cpu(head_dim, lse):
    """What a cache manifest says will run is what the calls run."""
    q, k, v = (torch.randn(1, 2, 100, head_dim) for _ in range(3))
    ix = ck.mask_to_index(torch.rand(2, 2, 2) < 0.7)
    ck.reset_what_ran()
    ck.block_sparse_attention_indexed(q, k, v, ix, block_size=(64, 64), return_lse=lse)
    (ran,) = ck.what_ran()["calls"]
    assert ran == "attention:" + dispatch.attention_backend(torch.device("cpu"), (64, 64), head_dim, return_lse=lse)


def test_attention_backend_on_gpus(monkeypatch):
    """On a GPU (faked: capability and Triton), a head dim the kernels do not take runs the fp32 reference, and
    the manifest must say so rather than "triton"."""
    cap = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap[0])
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    cuda = torch.device("cuda")
    bf16 = torch.bfloat16
    assert dispatch.attention_backend(cuda, (128, 128), 128, bf16) == "gluon"
    assert dispatch.attention_backend(cuda, (128, 128), 128, bf16, return_lse=True) == "tl"
    assert dispatch.attention_backend(cuda, (64, 64), 64, bf16) == "tl"
    assert dispatch.attention_backend(cuda, (128, 128), 96, bf16) == "reference"
    cap[0] = (8, 0)
    assert dispatch.attention_backend(cuda, (128, 128), 128, bf16) == "tl"


def test_record_spans_inference_mode():
    """A run under torch.inference_mode (generate's), then calls outside it: the record keeps counting."""
    q, k, v = _qkv()
    ix = ck.mask_to_index(torch.rand(2, MB, MB) < 0.5)
    ck.reset_what_ran()
    with torch.inference_mode():
        ck.block_sparse_attention_indexed(q, k, v, ck.mask_to_index(torch.rand(2, MB, MB) < 0.5), block_size=(BS, BS))
    ck.block_sparse_attention_indexed(q, k, v, ix, block_size=(BS, BS))
    ck.block_sparse_attention_indexed(q, k, v, ix, block_size=(BS, BS))
    (s,) = ck.what_ran()["scopes"]
    assert sum(s["ran"].values()) == 3 and s["total_blocks"] == 3 * 2 * H * MB * MB
