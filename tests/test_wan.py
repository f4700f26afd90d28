"""Wan 2.1 from local weights: both on-disk formats load, agree, and run calibrate -> compile -> generate."""

import numpy as np
import pytest
import torch
import wan_formats

from calibatt_cli.calibrate import calibrate
from calibatt_cli.compiler import compile_cache
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
    return load_config(None, [
        "model.name=wan2.1", f"model.path={path}", "video.frames=9", "video.height=64", "video.width=64",
        "generate.steps=3", "generate.flow_shift=3.0", "calibration.block_size=16", "calibration.buckets=1",
        f"calibration.prompts={prompts}", f"calibration.output={tmp_path}/b.safetensors",
        f"compile.bundle={tmp_path}/b.safetensors", f"compile.cache_dir={tmp_path}/cache", *extra,
    ])


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
