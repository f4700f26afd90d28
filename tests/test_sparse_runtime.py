"""The sparse path at run time, on the CPU: a plan's processors make what a launch derives from the index at
load and bring it to every call, a new sparse controller is sparse from its first call, compile's cost model
chooses per (bucket, layer) and generate follows it."""

import pytest
import torch
from wan_formats import small_wan_transformer

import calibatt_kernels as ck
from calibatt_cli.cache import tune
from calibatt_cli.errors import ModelError
from calibatt_cli.models.wan import CalibattWanAttnProcessor
from calibatt_cli.runtime import AttentionController, SparsePlan
from calibatt_kernels import attn_gluon

BLOCK = 16
HEADS = 2


def _transformer():
    return small_wan_transformer(HEADS)


def _args():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 8, 12, generator=g)  # 3 x 4 x 6 = 72 tokens: 5 blocks of 16, the last partial
    return dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 7, 32))


def _masks(buckets=2, layers=2, blocks=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(buckets, layers, HEADS, blocks, blocks, generator=g) < 0.5
    masks |= torch.eye(blocks, dtype=torch.bool)  # no empty row
    return masks


def _plan(masks, configs=None, dense=frozenset()):
    nb, nl = masks.shape[:2]
    index = {(b, layer): ck.mask_to_index(masks[b, layer]) for b in range(nb) for layer in range(nl)}
    density = masks.float().mean(dim=(-1, -2))
    return SparsePlan(BLOCK, list(range(nb)), index, density, configs or {}, dense=dense)


def _attention_calls() -> dict:
    return {k: n for k, n in ck.what_ran()["calls"].items() if k.startswith("attention:")}


def _install(tr, ctl):
    for i, blk in enumerate(tr.blocks):
        blk.attn1.set_processor(CalibattWanAttnProcessor(i, ctl))


def test_calls_bring_the_records_made_at_load(monkeypatch):
    """Each (bucket, layer)'s Gluon launch records are made once, when the processors are built; the calls
    hand them to the kernel and derive nothing (on a GPU, deriving waits for it: split_last_wave decides on
    the host). The Gluon launcher is stood in for by the reference, so the path up to it runs on the CPU."""
    derived, launched = [], []
    real_derive = attn_gluon.derive_records

    def counting_derive(*args, **kwargs):
        derived.append(args[0])
        return real_derive(*args, **kwargs)

    def launcher(q, k, v, out, counts, offsets, words, schedule, *, scale, records, splits, **kwargs):
        launched.append(records)
        mask = ck.index_to_mask(ck.BlockIndex(counts, offsets, words.view(torch.int16)), counts.shape[-1])
        return out.copy_(ck.block_sparse_attention_ref(q, k, v, mask, (BLOCK, BLOCK), scale))

    monkeypatch.setattr(attn_gluon, "derive_records", counting_derive)
    monkeypatch.setattr(attn_gluon, "block_sparse_attention_gluon", launcher)
    monkeypatch.setattr(attn_gluon.GluonBackend, "supports", lambda self, q, k, v, bs, return_lse=False: True)

    masks = _masks()
    configs = {(b, layer): attn_gluon.GLUON_PERSISTENT for b in range(2) for layer in range(2)}
    tr = _transformer()
    ctl = AttentionController("sparse", plan=_plan(masks, configs))
    _install(tr, ctl)
    assert len(derived) == 4, "one derivation per (bucket, layer), at load"
    ck.reset_what_ran()
    with torch.no_grad():
        for step in (0, 1):
            ctl._set_step(step)
            tr(**_args())
    assert len(derived) == 4, f"{len(derived) - 4} derivations during the steps"
    assert len(launched) == 4 and all(r is not None for r in launched)
    assert _attention_calls() == {"attention:gluon_persistent": 4}


@pytest.mark.parametrize("mode", ["dense", "record", "sparse"])
def test_attn1_refuses_an_attention_mask_it_cannot_apply(mode):
    from calibatt_cli.runtime import MassRecorder

    tr = _transformer()
    kwargs = {"plan": _plan(_masks())} if mode == "sparse" else {}
    if mode == "record":
        kwargs = {"recorder": MassRecorder([0, 1], BLOCK)}
    ctl = AttentionController(mode, **kwargs)
    proc = CalibattWanAttnProcessor(0, ctl)
    attn = tr.blocks[0].attn1
    x = torch.randn(1, 72, HEADS * 64)
    mask = torch.ones(1, 1, 72, 72, dtype=torch.bool)
    with torch.no_grad():
        if mode == "dense":  # diffusers' own processor applies it
            assert proc(attn, x, attention_mask=mask).shape == x.shape
        else:
            with pytest.raises(ModelError, match="attention_mask"):
                proc(attn, x, attention_mask=mask)


def test_cost_model_on_the_cpu_picks_what_is_faster():
    """Masks that drop one block a row (as the tiny demo's ~0.97 do) make the row-wise path gather every row: more
    work and more calls than one SDPA call, so dense. A mask keeping one 256-token block of 8,192 tokens makes
    it compute 1/1024 of the scores in one small call: sparse. The times behind each choice are recorded."""
    mq = 18
    near_full = torch.ones(1, mq, mq, dtype=torch.bool)
    near_full[:, torch.arange(mq), (torch.arange(mq) + 7) % mq] = False
    costs = tune.cpu_costs({(0, 0): ck.mask_to_index(near_full)}, heads=1, tokens=1152, head_dim=64, block_size=64)
    one_block = torch.zeros(1, 32, 32, dtype=torch.bool)
    one_block[0, 0, 0] = True
    costs |= tune.cpu_costs({(0, 1): ck.mask_to_index(one_block)}, heads=1, tokens=8192, head_dim=64, block_size=256)
    assert costs[(0, 0)]["attention"] == "dense", costs
    assert costs[(0, 1)]["attention"] == "sparse", costs
    for c in costs.values():
        assert c["attention"] == tune.choose(c["ms"], c["dense_ms"]) and c["ms"] > 0 and c["dense_ms"] > 0


def test_dense_groups_run_dense_and_count_as_density_one():
    """A plan whose cost model chose dense for layer 1 of bucket 0: that layer runs SDPA (the sparse kernel
    runs for the other three groups), its output is the dense one, and the density counts it as 1."""
    masks = _masks()
    tr = _transformer()
    plan = _plan(masks, dense=frozenset({(0, 1)}))
    ctl = AttentionController("sparse", plan=plan)
    _install(tr, ctl)
    ck.reset_what_ran()
    with torch.no_grad():
        ctl._set_step(0)
        tr(**_args())
        ctl._set_step(1)
        tr(**_args())
    assert _attention_calls() == {"attention:cpu": 3}
    density = masks.float().mean(dim=(-1, -2)).mean(-1)  # [buckets, layers]
    density[0, 1] = 1.0
    assert plan.mean_density()[0] == pytest.approx(float(density.mean()))
