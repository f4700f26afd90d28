"""Wan 2.1 from local weights: both on-disk formats load, agree, and run calibrate -> compile -> generate."""

import numpy as np
import pytest
import torch
import wan_formats

from calibatt_cli.cache.build import compile_cache
from calibatt_cli.calibrate import calibrate
from calibatt_cli.config import load_config
from calibatt_cli.errors import ModelError
from calibatt_cli.generate import generate
from calibatt_cli.models import load_model, model_identity

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    pipe = wan_formats.tiny_wan_pipeline(seed=0)
    return {
        "diffusers": wan_formats.write_diffusers(pipe, root / "diffusers"),
        "original": wan_formats.write_original(pipe, root / "original"),
    }


def _cfg(tmp_path, path, *extra):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    return load_config(
        None,
        [
            "model.name=wan2.1",
            f"model.path={path}",
            "video.frames=9",
            "video.height=64",
            "video.width=64",
            "generate.steps=3",
            "generate.flow_shift=3.0",
            "calibration.block_size=16",
            "calibration.buckets=1",
            f"calibration.prompts={prompts}",
            f"calibration.output={tmp_path}/b.safetensors",
            f"compile.bundle={tmp_path}/b.safetensors",
            f"compile.cache_dir={tmp_path}/cache",
            *extra,
        ],
    )


def test_key_maps_invert_the_converters():
    wan_formats.check_inverse()


def test_both_formats_give_identical_outputs(checkpoints, tmp_path):
    frames = {}
    for layout, path in checkpoints.items():
        cfg = _cfg(tmp_path, path, "generate.dense=true")
        ident = model_identity(cfg)
        assert (ident.layers, ident.heads, ident.head_dim) == (2, 2, 64)
        assert ident.token_grid(9, 64, 64) == [3, 4, 4]
        frames[layout] = generate(cfg, [PROMPT], write=False).videos[0].frames
    # The weights are bit-identical (below); the outputs may differ by float noise only: safetensors mmaps
    # give 8-byte-aligned tensors, torch.load 64-byte-aligned ones, and the CPU BLAS picks other code paths.
    diff = np.abs(frames["diffusers"].astype(int) - frames["original"].astype(int)).max()
    assert diff <= 1, f"max pixel diff {diff}"
    # the transformers agree tensor for tensor
    a = load_model(_cfg(tmp_path, checkpoints["diffusers"])).pipe.transformer.state_dict()
    b = load_model(_cfg(tmp_path, checkpoints["original"])).pipe.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_calibrate_compile_generate_from_local_weights(checkpoints, tmp_path, layout):
    cfg = _cfg(tmp_path, checkpoints[layout])
    res = calibrate(cfg)
    assert res.bundle.masks.shape == (1, 2, 2, 3, 3)  # 48 tokens in blocks of 16
    compile_cache(cfg)
    out = generate(cfg, [PROMPT], output=str(tmp_path / "v.mp4"))
    assert out.videos[0].output.stat().st_size > 0


def test_size_names_check_the_weights(checkpoints, tmp_path):
    with pytest.raises(ModelError, match="not wan2.1-1.3b"):
        model_identity(_cfg(tmp_path, checkpoints["diffusers"], "model.name=wan2.1-1.3b"))
    # without weights the named sizes still give their shape (presets, grids)
    cfg = load_config(None, ["model.name=wan2.1-14b", "video.height=720", "video.width=1280", "video.frames=81"])
    ident = model_identity(cfg)
    assert (ident.layers, ident.heads) == (40, 40)
    assert ident.token_grid(81, 720, 1280) == [21, 45, 80]


def test_missing_and_incomplete_weights(checkpoints, tmp_path):
    with pytest.raises(ModelError, match="needs local weights"):
        model_identity(load_config(None, ["model.name=wan2.1"]))
    with pytest.raises(ModelError, match="does not exist"):
        model_identity(_cfg(tmp_path, tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="model_index.json.*Wan2.1_VAE.pth"):
        model_identity(_cfg(tmp_path, empty))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["original"], broken)
    (broken / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(ModelError, match="incomplete original-format .* missing Wan2.1_VAE.pth"):
        model_identity(_cfg(tmp_path, broken))


@pytest.mark.parametrize("mode", ["dense", "record", "sparse"])
def test_processor_matches_diffusers_stock_processor(mode):
    """Our attn1 processor (q/k norms and RoPE fused in one op) against diffusers' own WanAttnProcessor on a
    small WanTransformer3DModel. Sparse: a mask that drops blocks, through the sparse kernel (its calls
    counted), against diffusers' processor in float64 with the block mask as its token-level attention mask."""
    import copy

    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    import calibatt_kernels as ck
    from calibatt_cli.models.wan import CalibattWanAttnProcessor
    from calibatt_cli.runtime import AttentionController, MassRecorder, SparsePlan
    from calibatt_kernels import mask_to_index

    torch.manual_seed(0)
    tr = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    ).eval()
    for blk in tr.blocks:  # non-trivial norm weights: a swapped or skipped norm must show
        blk.attn1.norm_q.weight.data.uniform_(0.5, 1.5)
        blk.attn1.norm_k.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 4, 3, 8, 12)  # 3 x 4 x 6 = 72 tokens
    args = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 7, 32))
    blocks = 5  # ceil(72 / 16)
    masks = torch.rand(2, 2, blocks, blocks, generator=torch.Generator().manual_seed(3)) < 0.5  # [layer, head]
    masks |= torch.eye(blocks, dtype=torch.bool)
    with torch.no_grad():
        if mode == "sparse":

            class Masked(WanAttnProcessor):  # diffusers' processor, given each layer's block mask per token
                def __init__(self, mask):
                    super().__init__()
                    self.mask = mask

                def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
                    return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, **kw)

            ref = copy.deepcopy(tr).double()
            for i, blk in enumerate(ref.blocks):
                token_mask = masks[i].repeat_interleave(16, -1).repeat_interleave(16, -2)[:, :72, :72]
                blk.attn1.set_processor(Masked(token_mask[None]))
            want = ref(**{k: v.double() for k, v in args.items()}).sample.float()
        else:
            want = tr(**args).sample
        if mode == "sparse":
            index = {(0, i): mask_to_index(masks[i]) for i in range(2)}
            plan = SparsePlan(16, [0], index, masks.float().mean(dim=(-1, -2))[None])
            ctl = AttentionController("sparse", plan=plan)  # no reset(): sparse from the first call
        elif mode == "record":
            ctl = AttentionController("record", recorder=MassRecorder([0], 16))
        else:
            ctl = AttentionController("dense")
        for i, blk in enumerate(tr.blocks):
            blk.attn1.set_processor(CalibattWanAttnProcessor(i, ctl))
        ck.reset_what_ran()
        got = tr(**args).sample
        for blk in tr.blocks:
            blk.attn1.set_processor(WanAttnProcessor())
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, f"rel={rel:.2e}"
    if mode == "record":
        assert ctl.recorder.counts == {(0, 0): 1, (0, 1): 1}
    if mode == "sparse":
        calls = {k: n for k, n in ck.what_ran()["calls"].items() if k.startswith("attention:")}
        assert calls == {"attention:cpu": 2}, calls  # the sparse kernel, once per layer
        with torch.no_grad():
            dense = tr(**args).sample
        assert ((dense - want).norm() / want.norm()).item() > 1e-3, "the masks must change the output"


def test_ffn_fusion_swaps_keeps_outputs_and_restores():
    """fuse_ffn_gelu puts the fused up-projection + GELU in every block's FFN without changing the
    transformer's output or its state_dict keys; restore_modules puts diffusers' own modules back."""
    from diffusers import WanTransformer3DModel

    from calibatt_cli.models.base import restore_modules
    from calibatt_cli.models.wan import FusedGELUProjection, fuse_ffn_gelu

    torch.manual_seed(0)
    tr = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=96,
        num_layers=2,
    ).eval()
    originals = [blk.ffn.net[0] for blk in tr.blocks]
    keys = list(tr.state_dict())
    args = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8),
        timestep=torch.tensor([300.0]),
        encoder_hidden_states=torch.randn(1, 5, 32),
    )
    with torch.no_grad():
        want = tr(**args).sample
        swapped = fuse_ffn_gelu(tr)
        assert len(swapped) == 2 and all(isinstance(b.ffn.net[0], FusedGELUProjection) for b in tr.blocks)
        assert list(tr.state_dict()) == keys
        got = tr(**args).sample
        restore_modules(swapped)
    assert [blk.ffn.net[0] for blk in tr.blocks] == originals and not swapped
    assert ((got - want).norm() / want.norm()).item() < 1e-6
