"""calibrate -> compile -> generate through the library, on the random tiny model at a small size."""

import threading

import numpy as np
import pytest
import torch

from calibatt_cli import generate as generate_module
from calibatt_cli.bundle import load_bundle, save_bundle
from calibatt_cli.cache.build import compile_cache
from calibatt_cli.cache.load import load_cache
from calibatt_cli.calibrate import calibrate, step_buckets
from calibatt_cli.config import load_config
from calibatt_cli.errors import CacheError, ConfigError, ModelError
from calibatt_cli.generate import generate
from calibatt_cli.models import model_identity
from calibatt_cli.video import read_mp4

PROMPT = "a red circle moving left on a black background"


def test_step_buckets():
    assert step_buckets(10, 1, 2) == [-1, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert step_buckets(4, 0, 4) == [0, 1, 2, 3]
    assert step_buckets(5, 2, 1) == [-1, -1, 0, 0, 0]
    with pytest.raises(ConfigError, match="exceeds the 2 sparse steps"):
        step_buckets(3, 1, 3)


@pytest.fixture
def calibrated(small_config):
    cfg = load_config(small_config)
    res = calibrate(cfg)
    return cfg, res


def test_calibrate_writes_a_consistent_bundle(calibrated):
    cfg, res = calibrated
    b = load_bundle(res.path)
    m = b.meta
    ident = model_identity(cfg)
    assert b.masks.shape == (2, ident.layers, ident.heads, 6, 6)  # buckets, layers, heads, Mq, Mk (192 / 32)
    assert m["grid"]["tokens"] == [3, 8, 8] and m["steps"] == 4 and m["step_buckets"] == [-1, 0, 0, 1]
    # both CFG branches count: 2 prompts x 2 branches x steps in the bucket
    assert m["samples_per_bucket"] == [2 * 2 * 2, 2 * 2 * 1]
    assert m["prompts"] == [PROMPT, "a blue square moving up"]
    # the averaged mass rows sum to one, and the masks keep >= 1 - eps of it
    assert torch.allclose(res.mass.sum(-1), torch.ones(()).double(), atol=1e-6)
    kept = np.asarray(m["entries"]["retained_mass"])
    assert kept.shape == (2, ident.layers, ident.heads) and (kept >= 1 - cfg.calibration.epsilon - 1e-6).all()
    dens = np.asarray(m["entries"]["density"])
    # each head's share of kept blocks, counted block by block (not calibrate's tensor expression)
    counted = [
        [[sum(sum(row) for row in head) / (len(head) * len(head[0])) for head in layer] for layer in bucket]
        for bucket in b.masks.tolist()
    ]
    assert np.allclose(dens, counted, atol=1e-6)


def _with_masks(cfg, res, masks):
    save_bundle(res.path, masks, {k: v for k, v in res.bundle.meta.items() if k not in ("content_hash",)})
    compile_cache(cfg, recompile=True)


def test_all_true_masks_give_the_dense_video(calibrated):
    cfg, res = calibrated
    _with_masks(cfg, res, torch.ones_like(res.bundle.masks))
    sparse = generate(cfg, [PROMPT], write=False)
    cfg.generate.dense = True
    dense = generate(cfg, [PROMPT], write=False)
    diff = np.abs(sparse.videos[0].frames.astype(int) - dense.videos[0].frames.astype(int)).max()
    assert diff <= 1, f"max pixel diff {diff}"
    assert sparse.mean_density == 1.0 and not sparse.dense and dense.dense


def test_sparse_masks_change_the_video_and_are_measured_live(calibrated):
    cfg, res = calibrated
    masks = torch.zeros_like(res.bundle.masks)
    idx = torch.arange(masks.shape[-1])
    masks[..., idx, idx] = True  # each query block sees only its own key block
    _with_masks(cfg, res, masks)
    cfg.generate.guard = False  # the guard would run these starved heads dense (tests/test_guard.py)
    sparse = generate(cfg, [PROMPT], write=False, measure_mass=True)
    cfg.generate.dense = True
    dense = generate(cfg, [PROMPT], write=False)
    diff = np.abs(sparse.videos[0].frames.astype(int) - dense.videos[0].frames.astype(int)).max()
    assert diff > 1, "a diagonal-only mask must change a random model's video"
    # 1 of 6 blocks per row: the random model's attention is near uniform, so ~1/6 of the mass is kept
    assert sparse.retained_mass is not None and 0.1 < sparse.retained_mass < 0.4, sparse.retained_mass
    assert abs(sparse.sparse_density - 1 / 6) < 1e-6
    assert abs(sparse.mean_density - (1 + 3 / 6) / 4) < 1e-6  # step 0 is a dense warm-up step


def test_generate_writes_mp4_with_configured_frames(calibrated, tmp_path):
    cfg, res = calibrated
    compile_cache(cfg)
    out = tmp_path / "v.mp4"
    r = generate(cfg, [PROMPT, "a blue square"], output=str(out))
    paths = [v.output for v in r.videos]
    assert [p.name for p in paths] == ["v-000.mp4", "v-001.mp4"]
    frames = read_mp4(paths[0])
    assert frames.shape == (cfg.video.frames, cfg.video.height, cfg.video.width, 3)
    assert not list(tmp_path.glob(".*")), "no temp files left behind"


def test_a_sparse_run_loads_the_weights_on_a_thread_and_raises_its_errors(calibrated, monkeypatch):
    """On a GPU the sparse path loads the model on a thread while it prewarms (here on the CPU, where it loads in
    line unless told, as the stock --dense path always does); what the load raises comes out of generate, and
    the video is the one an in-line load gives."""
    cfg, _ = calibrated
    compile_cache(cfg)
    threads, load = [], generate_module.load_model

    def spy(c):
        threads.append(threading.current_thread().name)
        return load(c)

    monkeypatch.setattr(generate_module, "load_model", spy)
    in_line = generate(cfg, [PROMPT], write=False)
    assert threads == [threading.main_thread().name]
    assert not generate_module.load_on_thread(cfg.model.device) and generate_module.load_on_thread("cuda:1")
    monkeypatch.setattr(generate_module, "load_on_thread", lambda device: True)
    sparse = generate(cfg, [PROMPT], write=False)
    assert threads[1].startswith("calibatt-load"), threads
    assert 0 <= sparse.ready_parts["model"] <= sparse.load_seconds
    np.testing.assert_array_equal(in_line.videos[0].frames, sparse.videos[0].frames)
    cfg.generate.dense = True
    generate(cfg, [PROMPT], write=False)
    assert threads[2] == threading.main_thread().name
    cfg.generate.dense = False

    def broken(c):
        raise ModelError("could not load Wan weights from 'x' (no file); check model.path")

    monkeypatch.setattr(generate_module, "load_model", broken)
    with pytest.raises(ModelError, match="check model.path"):
        generate(cfg, [PROMPT], write=False)

    # the thread starts with the pipeline's imports; a stale cache fails before it loads anything
    monkeypatch.setattr(generate_module, "load_model", spy)
    cfg.generate.steps = 5
    with pytest.raises(CacheError, match="built with generate.steps=4"):
        generate(cfg, [PROMPT], write=False)
    assert len(threads) == 3, threads
    cfg.generate.steps = 4


def test_cache_is_validated_against_the_config(calibrated):
    cfg, res = calibrated
    compile_cache(cfg)
    plan, manifest = load_cache(cfg)
    assert manifest["bundle"]["content_hash"] == res.bundle.content_hash
    assert plan.step_buckets == [-1, 0, 0, 1]
    assert compile_cache(cfg).reused, "an up-to-date cache is reused"
    cfg.generate.steps = 5
    with pytest.raises(CacheError, match="built with generate.steps=4"):
        load_cache(cfg)
    cfg.generate.steps = 4
    cfg.video.frames = 9
    with pytest.raises(CacheError, match="token grid"):
        load_cache(cfg)
    cfg.video.frames = 5
    cfg.model.seed = 1
    with pytest.raises(CacheError, match="hash"):
        load_cache(cfg)


def test_compiled_blocks_match_eager(calibrated):
    """generate.compile compiles the repeated blocks fullgraph (the sparse kernel is a custom op inside);
    the aot_eager backend checks the graphs without code generation, fast enough for CI."""
    cfg, res = calibrated
    masks = torch.rand(res.bundle.masks.shape, generator=torch.Generator().manual_seed(2)) < 0.6
    masks[..., 0] = True
    _with_masks(cfg, res, masks)
    cfg.generate.guard = False  # compiled runs are unguarded: compare like with like
    eager = generate(cfg, [PROMPT], write=False)
    cfg.generate.compile, cfg.generate.compile_backend = True, "aot_eager"
    compiled = generate(cfg, [PROMPT], write=False)
    diff = np.abs(eager.videos[0].frames.astype(int) - compiled.videos[0].frames.astype(int)).max()
    assert diff <= 1, f"max pixel diff {diff}"
    cfg.generate.dense = True
    assert generate(cfg, [PROMPT], write=False).videos[0].frames.shape == eager.videos[0].frames.shape
