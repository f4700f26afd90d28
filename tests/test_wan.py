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

    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    import calibatt_kernels as ck
    from calibatt_cli.models.wan import CalibattWanAttnProcessor
    from calibatt_cli.runtime import AttentionController, MassRecorder, SparsePlan
    from calibatt_kernels import mask_to_index

    tr = wan_formats.small_wan_transformer()
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

                def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kw):
                    return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, *args, **kw)

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

    from calibatt_cli.models.base import restore_modules
    from calibatt_cli.models.wan import FusedGELUProjection, fuse_ffn_gelu

    tr = wan_formats.small_wan_transformer(head_dim=32, ffn_dim=96)
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


# --- real-layout weights that do not fit: one line naming the file, the tensor and both shapes ----------------


def _copy(checkpoints, tmp_path, layout="original"):
    import shutil

    dst = tmp_path / f"{layout}-copy"
    shutil.copytree(checkpoints[layout], dst)
    return dst


def _edit_json(path, **changes):
    import json

    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_original_config_without_text_dim_reads_it_from_the_weights(checkpoints):
    import json

    from calibatt_cli.models.wan_weights import transformer_config

    folder = checkpoints["original"]
    assert "text_dim" not in json.loads((folder / "config.json").read_text()), "the writer must omit it, as the release"
    tcfg = transformer_config(str(folder), "original")
    assert (tcfg["text_dim"], tcfg["in_channels"], tcfg["freq_dim"]) == (32, 16, 32)  # wan_formats.TRANSFORMER


@pytest.mark.parametrize(
    "part, edit, needles",
    [
        # config.json's ffn_dim against the weights' FFN
        (
            "transformer",
            lambda f: _edit_json(f / "config.json", ffn_dim=128),
            ["diffusion_pytorch_model.safetensors", "'blocks.0.ffn.net.0.proj.bias' has shape (96,)", "expects (128,)"],
        ),
        # the VAE's config (the folder's own, as calibatt reads it) against Wan2.1_VAE.pth
        (
            "vae",
            lambda f: _edit_json(f / "vae" / "config.json", base_dim=16),
            ["Wan2.1_VAE.pth", "'decoder.conv_in.bias' has shape (32,)", "expects (64,)"],
        ),
        # the text encoder's config against the T5 checkpoint
        (
            "t5",
            lambda f: _edit_json(f / "text_encoder" / "config.json", d_ff=48),
            ["models_t5_umt5-xxl-enc-bf16.pth", "'encoder.block.0.layer.1.DenseReluDense.wi_0.weight'", "(64, 32)"],
        ),
    ],
)
def test_shape_mismatch_is_one_line(checkpoints, tmp_path, part, edit, needles):
    folder = _copy(checkpoints, tmp_path)
    edit(folder)
    with pytest.raises(ModelError) as e:
        load_model(_cfg(tmp_path, folder))
    msg = str(e.value)
    assert "\n" not in msg and "expects" in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_t5_width_must_match_the_transformers_text_dim(checkpoints, tmp_path):
    """A T5 checkpoint that fits its own config but not the transformer (text_dim read from the weights)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from calibatt_cli.tiny.model import build_tokenizer

    folder = _copy(checkpoints, tmp_path)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(build_tokenizer()), **{**wan_formats.TEXT, "d_model": 48}))
    torch.save(wan_formats.t5_to_original(te.state_dict()), str(folder / "models_t5_umt5-xxl-enc-bf16.pth"))
    te.config.to_json_file(str(folder / "text_encoder" / "config.json"))
    with pytest.raises(ModelError, match=r"models_t5_umt5-xxl-enc-bf16.pth' encodes text of width 48.* takes 32"):
        load_model(_cfg(tmp_path, folder))


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_transformer_safetensors(checkpoints, tmp_path, cut):
    folder = _copy(checkpoints, tmp_path)
    f = folder / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * cut)])
    for step in (model_identity, load_model):  # caught from the header, before any weights load
        with pytest.raises(ModelError, match=r"diffusion_pytorch_model.safetensors' is truncated: \d+ bytes"):
            step(_cfg(tmp_path, folder))
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        model_identity(_cfg(tmp_path, folder))


def test_named_size_without_weights_fails_at_once_offline(monkeypatch, capsys, tmp_path):
    """No Hub download behind the user's back: without --weights, loading stops before any network call
    (offline the Hub client would retry for half a minute) and names the fix."""
    import socket
    import sys
    import time

    from calibatt_cli.cli.app import main

    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name in ("wan2.1-1.3b", "wan2.1-14b"):
        t0 = time.perf_counter()
        with pytest.raises(ModelError, match="--weights DIR"):
            load_model(load_config(None, [f"model.name={name}"]))
        assert time.perf_counter() - t0 < 5 and not calls, calls
    # the whole command: one line, with the hint
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(sys, "argv", ["calibatt", "calibrate", "--model", "wan2.1-1.3b"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and "--weights DIR" in err and not calls, err
    assert list((tmp_path / "out").iterdir()) == []
