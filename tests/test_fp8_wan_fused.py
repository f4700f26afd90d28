"""Wan's processor with precision fp8 under the Triton interpreter: on sparse steps q's codes come from the norm +
RoPE kernel (SparseLayer.run_qk -> dispatch.qk_norm_rope_attention_fp8), and the output is the unfused path's
(the q/k norm op, then the layer's op quantizing the normed q) bit for bit, on every step kind: dense warm-up,
the guard's check step, a fused sparse step, a planned-dense group; eager and in fullgraph-compiled blocks.

The interpreter needs TRITON_INTERPRET=1 before triton is imported: the cases run in one subprocess (this file
as a script), which prints what they measured as JSON; the tests below assert on it. The model runs in fp32
(the interpreter's bf16 dot is wrong; the fp8 kernel's dots run on the decoded codes there).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import json  # noqa: E402
import traceback  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreted import run_interpreted  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # wan_formats, also when run as a script

STEPS = [-1, 0, 0, 1, 1]  # step -> bucket: a dense warm-up, then two steps per bucket (the first one checked)
KINDS = ["dense", "guard", "fused", "guard", "fused+planned-dense"]  # what step i is
BLOCK, LAYERS, HEADS, BLOCKS = 16, 2, 2, 3  # 40 tokens: 3 blocks of 16, the last one partial
PLANNED_DENSE = (1, 1)  # (bucket, layer) that runs dense as planned


def _model_and_inputs():
    import wan_formats

    tr = wan_formats.small_wan_transformer(heads=HEADS, head_dim=64)
    gen = torch.Generator().manual_seed(0)
    for blk in tr.blocks:  # norm weights other than ones: a skipped or swapped norm must show
        blk.attn1.norm_q.weight.data = torch.rand(HEADS * 64, generator=gen) + 0.5
        blk.attn1.norm_k.weight.data = torch.rand(HEADS * 64, generator=gen) + 0.5
    x = torch.randn(1, 4, 2, 8, 10, generator=gen)  # 2 x 4 x 5 = 40 tokens
    args = dict(
        hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 7, 32, generator=gen)
    )
    return tr, args


def _plan():
    import calibatt_kernels as ck
    from calibatt_cli.runtime import SparsePlan

    masks = torch.rand(2, LAYERS, HEADS, BLOCKS, BLOCKS, generator=torch.Generator().manual_seed(3)) < 0.5
    masks |= torch.eye(BLOCKS, dtype=torch.bool)
    index = {(b, layer): ck.mask_to_index(masks[b, layer]) for b in range(2) for layer in range(LAYERS)}
    density = masks.float().mean((-1, -2))
    return SparsePlan(BLOCK, STEPS, index, density, epsilon=1e-3, dense=frozenset({PLANNED_DENSE}))


def _run(fused: bool, compiled: bool = False, steps: int = len(STEPS)) -> tuple[list[torch.Tensor], list[dict]]:
    """The transformer's output and what ran at each step, through our processors with precision fp8 and the
    guard on; `fused=False` takes the processors' unfused route (the q/k norm op, then the layer's op)."""
    import calibatt_kernels as ck
    from calibatt_cli.models.wan import CalibattWanAttnProcessor
    from calibatt_cli.runtime import SparseController
    from calibatt_cli.runtime.guard import Guard

    tr, args = _model_and_inputs()
    plan = _plan()
    ctl = SparseController(plan, guard=Guard(plan), precision="fp8")
    for i, blk in enumerate(tr.blocks):
        proc = CalibattWanAttnProcessor(i, ctl)
        if not fused:
            proc._fp8_fast_path = lambda: False
        blk.attn1.set_processor(proc)
    if compiled:
        torch._dynamo.reset()
        for blk in tr.blocks:
            blk.compile(backend="aot_eager", fullgraph=True)
    ctl.reset()
    outs, ran = [], []
    with torch.no_grad():
        for step in range(steps):
            ck.reset_what_ran()
            outs.append(tr(**args).sample)
            ck.dispatch.set_scope(None)
            ran.append(ck.what_ran()["calls"])
            ctl.on_step_end(None, step, None, {})
    return outs, ran


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[bool]:
    return [torch.equal(x, y) for x, y in zip(a, b, strict=True)]


def run_cases() -> dict:
    from calibatt_kernels import attn_fp8

    res = {}
    unfused, res["ran_unfused"] = _run(fused=False)
    fused, res["ran_fused"] = _run(fused=True)
    res["fused_equals_unfused"] = _same(fused, unfused)
    res["steps_differ"] = not torch.equal(unfused[2], unfused[4])  # the steps' masks differ: a real comparison
    compiled, res["ran_compiled"] = _run(fused=True, compiled=True)
    res["compiled_equals_unfused"] = _same(compiled, unfused)

    # the comparison sees a wrong code: one of q's codes moved by one step in the fused kernel's output
    real = attn_fp8.qk_norm_rope_quant

    def off_by_one(*args, **kwargs):
        (q8, q_scale), k = real(*args, **kwargs)
        q8[0, 0, 5, 7] += 1 if q8[0, 0, 5, 7] < 127 else -1
        return (q8, q_scale), k

    attn_fp8.qk_norm_rope_quant = off_by_one
    try:
        broken, _ = _run(fused=True, steps=3)
    finally:
        attn_fp8.qk_norm_rope_quant = real
    res["broken_equals_unfused"] = _same(broken, unfused[:3])
    return res


@pytest.fixture(scope="module")
def results():
    res = run_interpreted(__file__, timeout=600)
    assert "error" not in res, res["error"]
    return res


def _qk(calls: dict) -> dict:
    return {k: n for k, n in calls.items() if k.startswith("qk_norm_rope:")}


def _attention(calls: dict) -> dict:
    return {k: n for k, n in calls.items() if k.startswith("attention:")}


def test_fused_path_equals_unfused_on_every_step_kind(results):
    for kind, same in zip(KINDS, results["fused_equals_unfused"], strict=True):
        assert same, f"{kind} step: the fused path's output differs from the unfused path's"
    assert results["steps_differ"], "the buckets' masks must give different outputs"


def test_fused_path_quantizes_q_in_the_norm_kernel_on_sparse_steps_only(results):
    """What ran, per step: the norm + RoPE + quantize kernel on the fused sparse calls, one per layer (not
    the planned-dense one); the plain norm kernel where q is needed in bf16 (dense, the guard's step)."""
    want_qk = [
        {"qk_norm_rope:triton": 2},  # dense warm-up
        {"qk_norm_rope:triton": 2},  # the guard measures the normed q and k
        {"qk_norm_rope:triton_quant": 2},
        {"qk_norm_rope:triton": 2},
        {"qk_norm_rope:triton_quant": 1, "qk_norm_rope:triton": 1},  # layer 1 runs dense there, as planned
    ]
    # the sparse calls: one per layer but the planned-dense one (layer 1 in bucket 1)
    want_attention = [{}] + [{"attention:fp8_tl_tile": n} for n in (2, 2, 1, 1)]
    for kind, ran, qk, attention in zip(KINDS, results["ran_fused"], want_qk, want_attention, strict=True):
        assert _qk(ran) == qk and _attention(ran) == attention, (kind, ran)
    for kind, ran in zip(KINDS, results["ran_unfused"], strict=True):
        assert "qk_norm_rope:triton_quant" not in ran, (kind, ran)


def test_fused_path_in_compiled_blocks(results):
    """Blocks compiled fullgraph (aot_eager): the op stays one opaque call that decides per step, as in eager."""
    for kind, same in zip(KINDS, results["compiled_equals_unfused"], strict=True):
        assert same, f"{kind} step: compiled blocks differ from the unfused path"
    assert results["ran_compiled"] == results["ran_fused"]


def test_a_wrong_code_from_the_fused_kernel_shows(results):
    """The comparison is sharp: one of q's codes one step off in the fused kernel's output changes the fused
    sparse step's output (and nothing else)."""
    assert results["broken_equals_unfused"] == [True, True, False], results["broken_equals_unfused"]


if __name__ == "__main__":
    try:
        out = run_cases()
    except Exception:
        out = dict(error=traceback.format_exc(limit=-4))
    print(json.dumps(out))
