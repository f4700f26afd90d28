"""Mochi 1 support: joint attention (sparse visual x visual, dense text), the row LSE that merges it, the
tiny random Mochi through calibrate -> compile -> generate, and loading a diffusers folder as `mochi-1`."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibatt_cli.bundle import load_bundle, save_bundle
from calibatt_cli.cache.build import compile_cache
from calibatt_cli.calibrate import calibrate
from calibatt_cli.config import CONFIG_DIR, load_config
from calibatt_cli.errors import ConfigError, ModelError
from calibatt_cli.generate import generate
from calibatt_cli.models import load_model, model_identity
from calibatt_cli.runtime import AttentionController, MassRecorder, SparsePlan
from calibatt_kernels import block_sparse_attention_ref, expand_block_mask, mask_to_index, num_blocks

PROMPT = "a red circle moving left on a black background"
MOCHI_TINY = CONFIG_DIR / "mochi-tiny.yaml"


# --- the row LSE of the reference ----------------------------------------------------------------------


@pytest.mark.parametrize("n, bs", [(200, (64, 64)), (333, (128, 64))])
def test_reference_lse_matches_brute_force(n, bs):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 2, n, 64, generator=gen) for _ in range(3))
    mask = torch.rand(2, num_blocks(n, bs[0]), num_blocks(n, bs[1]), generator=gen) < 0.4
    mask[:, 0, :] = False  # empty rows: lse -inf, out 0
    mask[:, -1, -1] = True  # the partial last key block
    out, lse = block_sparse_attention_ref(q, k, v, mask, bs, return_lse=True)
    assert lse.shape == (2, 2, n) and lse.dtype == torch.float32
    assert torch.equal(out, block_sparse_attention_ref(q, k, v, mask, bs)), "return_lse must not change out"
    tok = expand_block_mask(mask, n, n, bs)
    s = (q @ k.transpose(-1, -2) / math.sqrt(64)).masked_fill(~tok, float("-inf"))
    want = torch.logsumexp(s, -1)
    assert torch.isneginf(lse[:, :, : bs[0]]).all(), "an empty row's lse is -inf"
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse), fin)
    diff = (lse[fin] - want[fin]).abs().max().item()
    assert diff < 1e-5, f"max_diff={diff:.2e}"


# --- joint attention -----------------------------------------------------------------------------------

N_VIS, N_TXT, HEADS, DIM, BLOCK = 72, 5, 2, 64, 16  # 72 = 4.5 blocks of 16: a partial last block


def _joint_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    vis = tuple(torch.randn(1, N_VIS, HEADS, DIM, generator=gen).transpose(1, 2) * 2 for _ in range(3))
    txt = tuple(torch.randn(1, HEADS, N_TXT, DIM, generator=gen) * 2 for _ in range(3))
    return vis, txt


def _sparse_controller(mask):
    plan = SparsePlan(
        BLOCK, [0], {(0, 0): mask_to_index(mask, with_schedule=True)}, mask.double().mean(dim=(-1, -2))[None, None]
    )
    return AttentionController("sparse", plan=plan)


def _dense_joint(vis, txt, token_mask=None):
    q, k, v = (torch.cat([a, b], 2) for a, b in zip(vis, txt, strict=True))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
    return out[:, :, :N_VIS], out[:, :, N_VIS:]


def test_joint_all_true_mask_equals_dense():
    vis, txt = _joint_inputs(0)
    m = num_blocks(N_VIS, BLOCK)
    ov, ot = _sparse_controller(torch.ones(HEADS, m, m, dtype=torch.bool)).attend_joint(0, *vis, *txt)
    rv, rt = _dense_joint(vis, txt)
    dv, dt = (ov - rv).abs().max().item(), (ot - rt).abs().max().item()
    assert dv < 1e-5 and dt < 1e-5, f"visual max_diff={dv:.2e} text max_diff={dt:.2e}"


def test_joint_sparse_mask_equals_dense_with_expanded_mask():
    vis, txt = _joint_inputs(1)
    m = num_blocks(N_VIS, BLOCK)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(HEADS, m, m, generator=gen) < 0.4
    mask[0, 1, :] = False  # a visual row with no visual block still sees the text
    mask[:, -1, -1] = True
    ov, ot = _sparse_controller(mask).attend_joint(0, *vis, *txt)
    tok = torch.ones(HEADS, N_VIS + N_TXT, N_VIS + N_TXT, dtype=torch.bool)
    tok[:, :N_VIS, :N_VIS] = expand_block_mask(mask, N_VIS, N_VIS, (BLOCK, BLOCK))  # text rows/cols stay true
    rv, rt = _dense_joint(vis, txt, tok[None])
    dv, dt = (ov - rv).abs().max().item(), (ot - rt).abs().max().item()
    assert dv < 1e-5 and dt < 1e-5, f"visual max_diff={dv:.2e} text max_diff={dt:.2e}"
    full, _ = _dense_joint(vis, txt)
    assert (ov - full).abs().max() > 1e-2, "the mask must matter"


def test_joint_record_mode_records_visual_mass_and_stays_dense():
    vis, txt = _joint_inputs(3)
    rec = MassRecorder([0], BLOCK)
    ov, ot = AttentionController("record", recorder=rec).attend_joint(4, *vis, *txt)
    rv, rt = _dense_joint(vis, txt)
    assert torch.equal(ov, rv) and torch.equal(ot, rt)
    mass = rec.mean(0, 4)
    # normalised over the visual keys: rows sum to 1 (the epsilon rule's premise), text keys excluded. The
    # expected mass written out in float64: each visual row's softmax over the visual keys, summed over each
    # key block, averaged over each query block's rows (the partial last block: over its 8 rows)
    q, k = vis[0][0].double(), vis[1][0].double()  # [H, N, D]
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM), -1)
    m = num_blocks(N_VIS, BLOCK)
    want = torch.zeros(HEADS, m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            want[:, i, j] = p[:, rows, cols].sum(-1).mean(-1)
    assert (mass - want).abs().max() < 1e-6, f"max_diff={(mass - want).abs().max():.2e}"
    assert torch.allclose(mass.sum(-1), torch.ones(()).double(), atol=1e-6)


def test_processor_matches_diffusers_on_a_cfg_batch():
    """Our processor (dense controller) against MochiAttnProcessor2_0, with two text lengths in one batch."""
    model = load_model(load_config(MOCHI_TINY))
    net = model.pipe.transformer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, 8, 12, generator=gen)
    text = torch.randn(2, 16, 32, generator=gen)
    text_mask = torch.zeros(2, 16, dtype=torch.bool)
    text_mask[0, :1] = True  # uncond: "" -> </s>
    text_mask[1, :7] = True
    args = dict(
        hidden_states=x,
        encoder_hidden_states=text,
        timestep=torch.tensor([500.0, 500.0]),
        encoder_attention_mask=text_mask,
        return_dict=False,
    )
    with torch.inference_mode():
        ref = net(**args)[0]
        model.install(AttentionController("dense"))
        ours = net(**args)[0]
        model.uninstall()
        again = net(**args)[0]
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-5, f"max_diff={diff:.2e}"
    assert torch.equal(again, ref), "uninstall restores the stock processors"


# --- identity and token grid ---------------------------------------------------------------------------


def test_real_mochi_token_grid():
    from calibatt_cli.models.identity import mochi_identity

    ident = mochi_identity("mochi-1", "x", {}, "w")  # diffusers' defaults are Mochi 1's sizes
    assert (ident.layers, ident.heads, ident.head_dim) == (48, 24, 128)
    assert ident.token_grid(163, 480, 848) == [28, 30, 53]  # 44,520 tokens
    assert ident.token_grid(19, 480, 848) == [4, 30, 53]
    ident.check_video(163, 480, 848)
    with pytest.raises(ConfigError, match="6k\\+1"):
        ident.check_video(160, 480, 848)
    with pytest.raises(ConfigError, match="multiple of 16"):
        ident.check_video(163, 480, 840)
    # joint attention: compile must tune and cache the kernel variant that returns the row log-sum-exp,
    # which only the tl kernel has (the Gluon kernel is no candidate for it)
    assert ident.joint_attention
    assert not model_identity(load_config(None)).joint_attention  # tiny (Wan)
    from calibatt_kernels import dispatch

    assert not any(c.backend == "gluon" for c in dispatch.candidate_configs((9, 0), (128, 128), 128, return_lse=True))


def test_presets_load():
    real = load_config(CONFIG_DIR / "mochi-1-480p.yaml", ["model.path=/nonexistent"])
    assert (real.video.height, real.video.width, real.video.frames, real.generate.steps) == (480, 848, 163, 64)
    assert real.generate.guidance == 4.5
    assert (CONFIG_DIR / "mochi-1-480p.yaml").read_text().startswith("# calibatt calibrate --config")
    tiny = load_config(MOCHI_TINY)
    assert model_identity(tiny).token_grid(13, 64, 96) == [3, 4, 6]


# --- end to end on mochi-tiny-random ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("mochi")
    prompts = out / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na blue square moving up\n")
    cfg = load_config(
        MOCHI_TINY,
        [
            f"calibration.prompts={prompts}",
            f"calibration.output={out}/b.safetensors",
            f"compile.bundle={out}/b.safetensors",
            f"compile.cache_dir={out}/cache",
            "compile.cost_model=false",  # sparse wherever the masks are: the tests compare it with dense
            f"generate.output={out}/v.mp4",
        ],
    )
    return cfg, calibrate(cfg)


def test_calibrate_mochi_bundle(calibrated):
    cfg, res = calibrated
    b = load_bundle(res.path)
    ident = model_identity(cfg)
    m = num_blocks(72, 16)
    assert b.masks.shape == (2, ident.layers, ident.heads, m, m)
    assert b.meta["grid"]["tokens"] == [3, 4, 6] and b.meta["step_buckets"] == [-1, 0, 0, 1]
    assert b.meta["samples_per_bucket"] == [2 * 2 * 2, 2 * 2 * 1]  # prompts x CFG branches x steps
    assert torch.allclose(res.mass.sum(-1), torch.ones(()).double(), atol=1e-6)


def _with_masks(cfg, res, masks):
    save_bundle(res.path, masks, {k: v for k, v in res.bundle.meta.items() if k != "content_hash"})
    compile_cache(cfg, recompile=True)


def test_mochi_all_true_masks_give_the_dense_video_and_diagonal_changes_it(calibrated):
    cfg, res = calibrated
    _with_masks(cfg, res, torch.ones_like(res.bundle.masks))
    sparse = generate(cfg, [PROMPT], write=False).videos[0].frames.astype(int)
    cfg.generate.dense = True
    dense = generate(cfg, [PROMPT], write=False).videos[0].frames.astype(int)
    cfg.generate.dense = False
    assert sparse.shape == (13, 64, 96, 3)
    diff = np.abs(sparse - dense).max()
    assert diff <= 1, f"max pixel diff {diff}"

    masks = torch.zeros_like(res.bundle.masks)
    idx = torch.arange(masks.shape[-1])
    masks[..., idx, idx] = True
    _with_masks(cfg, res, masks)
    diag = generate(cfg, [PROMPT], write=False, measure_mass=True)
    assert np.abs(diag.videos[0].frames.astype(int) - dense).max() > 1, "a diagonal-only mask must matter"
    assert diag.retained_mass is not None and 0.0 < diag.retained_mass < 0.6, diag.retained_mass


# --- mochi-1 from a diffusers folder -------------------------------------------------------------------


def test_saved_checkpoint_loads_as_mochi_1(tmp_path):
    cfg = load_config(MOCHI_TINY, ["generate.steps=2"])
    tiny = load_model(cfg)
    tiny.pipe.save_pretrained(tmp_path, safe_serialization=True)
    real_cfg = load_config(MOCHI_TINY, ["generate.steps=2", "model.name=mochi-1", f"model.path={tmp_path}"])
    real = load_model(real_cfg)
    assert real.ident.name == "mochi-1" and real.ident.model_hash != tiny.ident.model_hash
    assert real.call_defaults == tiny.call_defaults
    with torch.inference_mode():
        a = tiny.run(PROMPT, cfg=cfg, controller=None, seed=0, output_type="latent")
        b = real.run(PROMPT, cfg=real_cfg, controller=None, seed=0, output_type="latent")
    assert torch.equal(a, b), f"max_diff={(a - b).abs().max().item():.2e}"


def test_mochi_1_needs_a_complete_folder(tmp_path):
    # without weights the shape is still known (presets, grids), but loading asks for model.path
    ident = model_identity(load_config(MOCHI_TINY, ["model.name=mochi-1"]))
    assert (ident.layers, ident.heads, ident.head_dim) == (48, 24, 128)
    with pytest.raises(ModelError, match="model.path"):
        load_model(load_config(MOCHI_TINY, ["model.name=mochi-1"]))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(ModelError) as e:
        model_identity(load_config(MOCHI_TINY, ["model.name=mochi-1", f"model.path={tmp_path}"]))
    msg = str(e.value)
    for part in (
        "model_index.json",
        "transformer/*.safetensors",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/",
        "scheduler/scheduler_config.json",
    ):
        assert part in msg, f"{part!r} not in: {msg}"
    assert "transformer/config.json" not in msg.split("Expected:")[0], "present files are not reported missing"
