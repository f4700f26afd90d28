"""The custom ops: correct, consistent with their fakes, and kept whole by torch.compile."""

import torch

import calibatt_kernels as ck
from calibatt_cli.bundle import save_bundle
from calibatt_cli.cache.build import compile_cache
from calibatt_cli.cache.load import load_cache
from calibatt_cli.calibrate import calibrate
from calibatt_cli.config import load_config
from calibatt_cli.models import load_model
from calibatt_cli.runtime import AttentionController, SparseController, SparsePlan
from calibatt_cli.runtime.processor import layer_attention_op


def _inputs(n=200, bs=64):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g).transpose(1, 2) for _ in range(3))  # [B,H,N,D] views
    m = ck.num_blocks(n, bs)
    mask = torch.rand(2, m, m, generator=g) < 0.5
    return q, k, v, mask


def test_layer_op_matches_reference_and_its_fake():
    """A sparse step's call of a layer's op (`calibatt::layer_attention`) computes the block-sparse attention
    of the plan's masks, in the layout its fake declares."""
    q, k, v, mask = _inputs()
    plan = SparsePlan(64, [0], {(0, 0): ck.mask_to_index(mask)}, mask.float().mean((-1, -2))[None, None])
    ctl = SparseController(plan)
    layer = ctl.sparse_layer(0)
    out = layer(q, k, v)
    ref = ck.block_sparse_attention_ref(q, k, v, mask, (64, 64))
    assert (out - ref).abs().max() < 1e-5
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = layer_attention_op(*(mode.from_tensor(t) for t in (q, k, v, layer.handle)))
        assert fake.shape == out.shape and fake.stride() == out.stride()


def test_transformer_compiles_fullgraph_with_the_op(small_config):
    cfg = load_config(small_config)
    res = calibrate(cfg)
    masks = torch.rand(res.bundle.masks.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    masks[..., 0] = True
    save_bundle(res.path, masks, {k: v for k, v in res.bundle.meta.items() if k != "content_hash"})
    compile_cache(cfg, recompile=True)
    plan, _ = load_cache(cfg)
    model = load_model(cfg)
    ctl = AttentionController("sparse", plan=plan)
    model.install(ctl)
    ctl.reset()
    ctl._set_step(1)  # a sparse step
    tr = model.pipe.transformer
    x = torch.randn(1, tr.config.in_channels, 3, 16, 16)
    t = torch.tensor([500.0])
    text = torch.randn(1, 8, tr.config.text_dim)
    with torch.no_grad():
        eager = tr(hidden_states=x, timestep=t, encoder_hidden_states=text).sample
        compiled = torch.compile(tr, fullgraph=True, backend="aot_eager")
        got = compiled(hidden_states=x, timestep=t, encoder_hidden_states=text).sample
        ctl._set_step(3)  # another bucket: the same graph, the bucket is data
        eager2 = tr(hidden_states=x, timestep=t, encoder_hidden_states=text).sample
        got2 = compiled(hidden_states=x, timestep=t, encoder_hidden_states=text).sample
    assert (got - eager).abs().max() < 1e-5
    assert (got2 - eager2).abs().max() < 1e-5
    assert (eager2 - eager).abs().max() > 1e-4, "the buckets' masks differ, so must the outputs"


def test_linear_gelu_op_matches_diffusers_gelu_module_and_its_fake():
    from diffusers.models.activations import GELU

    from calibatt_kernels.linear_gelu import fusable
    from calibatt_kernels.ops import linear_gelu_op

    torch.manual_seed(0)
    mod = GELU(48, 80, approximate="tanh")
    x = torch.randn(2, 7, 48) * 3  # wide enough that tanh-GELU and erf-GELU differ visibly
    with torch.no_grad():
        want = mod(x)
        got = linear_gelu_op(x, mod.proj.weight, mod.proj.bias)
        erf = torch.nn.functional.gelu(mod.proj(x))
        # the tanh GELU written out, in float64 (torch's gelu is not asked, so a shared mistake cannot hide)
        y = x.double() @ mod.proj.weight.double().T + mod.proj.bias.double()
        formula = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3)))
        out = torch.full((2, 7, 80), float("nan"))
        ck.linear_gelu(x, mod.proj.weight, mod.proj.bias, out=out)
    assert got.shape == (2, 7, 80)
    assert (got.double() - formula).abs().max() < 1e-5, f"max_diff={(got.double() - formula).abs().max():.2e}"
    assert (got - want).abs().max() < 1e-6  # diffusers' own module
    assert (erf.double() - formula).abs().max() > 1e-4, "the reference must be the tanh GELU"
    assert torch.equal(out, got), "out= must hold the result, every element written"
    assert not fusable(x, mod.proj.weight, mod.proj.bias)  # the CPU takes the reference
    torch.library.opcheck(
        linear_gelu_op,
        (x, mod.proj.weight.detach(), mod.proj.bias.detach()),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
