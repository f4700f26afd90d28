"""precision: fp8 wired through calibatt (CPU): the config keys, the dispatch (the scheme's PyTorch reference on
the CPU, a recorded bf16 fallback where fp8 cannot run, an error under strict), the custom op, the processors,
compile's manifest and generate's refusal of a cache of another precision, and the tiny model's quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cli import PROMPT, assert_one_line_error, run_cli

import calibatt_kernels as ck
from calibatt_cli.config import load_config
from calibatt_cli.errors import CacheError, ConfigError
from calibatt_cli.generate import _fallbacks_as_errors, kernel_report
from calibatt_cli.runtime import SparseController
from calibatt_cli.runtime.plan import SparsePlan
from calibatt_cli.runtime.processor import layer_attention_qk_op
from calibatt_kernels import dispatch
from calibatt_kernels.quant import block_sparse_attention_fp8_ref

H, N, BS, LAYERS = 2, 200, 64, 3  # N: a partial last block
MB = -(-N // BS)
STEPS = [-1, 0, 1]


def _mask(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, H, MB, MB, generator=gen) < 0.5
    mask[..., 0] = True
    return mask


def _qkv(seed=0, d=64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, H, N, d, generator=gen) for _ in range(3))
    return q, k + 3.0 * torch.randn(d, generator=gen), v  # k: a common offset per channel, as DiT keys have


def test_config_keys_are_validated():
    cfg = load_config(None, ["generate.precision=fp8", "compile.precision=fp8"])
    assert (cfg.generate.precision, cfg.compile.precision) == ("fp8", "fp8")
    assert load_config(None).generate.precision == "bf16" == load_config(None).compile.precision
    for key in ("generate.precision", "compile.precision"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}=fp16"])
        assert f"{key} must be bf16 or fp8, got 'fp16'" in str(e.value) and "\n" not in str(e.value)


def test_dispatch_on_the_cpu_runs_the_schemes_reference():
    """On the CPU fp8 is the PyTorch emulation of the scheme (quant.py), bit for bit, recorded as
    fp8_reference and no fallback; its output is not the bf16 path's (the quantization is really applied)."""
    q, k, v = _qkv()
    mask = _mask()
    ix = ck.mask_to_index(mask)
    ck.reset_what_ran()
    got = dispatch.block_sparse_attention_fp8_indexed(q, k, v, ix, block_size=(BS, BS))
    want = block_sparse_attention_fp8_ref(q, k, v, mask, (BS, BS))
    assert torch.equal(got, want), (got - want).abs().max()
    ran = ck.what_ran()
    assert ran["calls"] == {"attention:fp8_reference": 1} and ran["fallbacks"] == [], ran
    exact = ck.block_sparse_attention_indexed(q, k, v, ix, block_size=(BS, BS))
    err = ((got - exact).norm() / exact.norm()).item()
    assert 1e-3 < err < 5e-2, f"fp8 vs fp32 relative error {err:.2e}"  # (its accuracy: test_fp8.py)
    out = torch.empty_like(q)
    assert dispatch.block_sparse_attention_fp8_indexed(q, k, v, ix, block_size=(BS, BS), out=out) is out
    assert torch.equal(out, want)


def test_lse_calls_fall_back_to_bf16_recorded_and_strict_refuses():
    """Joint attention (Mochi) needs the row lse, which the fp8 kernel lacks: bf16 runs, recorded as a fallback
    with the reason; under strict_fallbacks nothing runs and KernelFallback names it."""
    q, k, v = _qkv(1)
    ix = ck.mask_to_index(_mask(1))
    ck.reset_what_ran()
    out, lse = dispatch.block_sparse_attention_fp8_indexed(q, k, v, ix, block_size=(BS, BS), return_lse=True)
    want, want_lse = ck.block_sparse_attention_indexed(q, k, v, ix, block_size=(BS, BS), return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    (fb,) = ck.what_ran()["fallbacks"]
    assert (fb["wanted"], fb["ran"], fb["calls"]) == ("fp8", "bf16", 1) and "log-sum-exp" in fb["reason"], fb
    with pytest.raises(ck.dispatch.KernelFallback, match="wanted fp8 but would run bf16"), dispatch.strict_fallbacks():
        dispatch.block_sparse_attention_fp8_indexed(q, k, v, ix, block_size=(BS, BS), return_lse=True)


def test_why_fp8_cannot_run_on_a_gpu(monkeypatch):
    """The GPU cases fp8_why_not refuses (decided from the device's capability, faked here)."""
    cap = {"value": (8, 0)}
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    cuda = torch.device("cuda")
    assert "sm_80 has no 8-bit tensor cores" in dispatch.fp8_why_not(cuda, 128, (128, 128))
    cap["value"] = (9, 0)
    assert dispatch.fp8_why_not(cuda, 128, (128, 128)) is None
    assert dispatch.fp8_why_not(cuda, 64, (64, 64)) is None
    assert "head dim 96" in dispatch.fp8_why_not(cuda, 96, (128, 128))
    assert "block size (256, 256)" in dispatch.fp8_why_not(cuda, 128, (256, 256))
    assert "log-sum-exp" in dispatch.fp8_why_not(cuda, 128, (128, 128), return_lse=True)
    assert dispatch.fp8_kernel_name(cuda, 128, (128, 128)) == "fp8_tl_tile"


def test_kernel_names_and_op_registration():
    names = dispatch.kernel_names()
    assert {
        "_attn_fp8_fwd",
        "_kv_stats",
        "_kv_finalize",
        "_quantize_q",
        "_quantize_k",
        "_quantize_v",
        "_norm_rope_quant",
    } <= names
    # the layer op Wan's fp8 processors call: its fake gives [B, H, N, D] laid out as [B, N, H, D], as run_qk does
    q, k, v = _qkv(2)
    qp, kp = (t.transpose(1, 2).flatten(2) for t in (q, k))  # the projections [B, N, C]
    vp = v.transpose(1, 2).contiguous()  # [B, N, H, D]
    w = torch.ones(qp.shape[-1])
    table = torch.ones(N, q.shape[-1])
    want = vp.transpose(1, 2).stride()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:  # the fake impl: shape and layout, no kernel
        args = [mode.from_tensor(t) for t in (qp, kp, vp, w, w, table, table)]
        res = layer_attention_qk_op(*args, 1e-6, mode.from_tensor(torch.zeros(1, dtype=torch.uint8)))
        assert res.shape == q.shape and res.stride() == want


def _plan(seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(2, LAYERS, H, MB, MB, generator=gen) < 0.5
    masks[..., 0] = True
    index = {(b, layer): ck.mask_to_index(masks[b, layer]) for b in range(2) for layer in range(LAYERS)}
    return SparsePlan(BS, STEPS, index, masks.float().mean((-1, -2))), masks


@pytest.mark.parametrize("path", ["processor-fast-path", "controller-attend", "compiled-processor"])
def test_processors_run_fp8_with_precision_fp8(path):
    """A SparseController with precision fp8: the processors' op (also inside a fullgraph torch.compile, where
    it stays one opaque call) and the controller's attend run fp8, every sparse call, with the plan's masks."""
    plan, masks = _plan()
    ctl = SparseController(plan, precision="fp8")
    layers = [ctl.sparse_layer(layer) for layer in range(LAYERS)]
    if path == "compiled-processor":
        torch._dynamo.reset()
        layers = [torch.compile(lambda q, k, v, s=s: s(q, k, v), backend="eager", fullgraph=True) for s in layers]
    q, k, v = _qkv(3)
    ck.reset_what_ran()
    ctl.reset()
    for step in range(len(STEPS)):
        if not ctl.dense_now:
            for layer in range(LAYERS):
                out = ctl.attend(layer, q, k, v) if path == "controller-attend" else layers[layer](q, k, v)
                want = block_sparse_attention_fp8_ref(q, k, v, masks[ctl.bucket, layer], (BS, BS))
                assert torch.equal(out, want), (step, layer)
        ctl.on_step_end(None, step, None, {})
    dispatch.set_scope(None)
    rep = kernel_report(plan, ck.what_ran())
    assert rep["calls"] == {"fp8_reference": 2 * LAYERS} and rep["fallbacks"] == [] and rep["dense"] == [], rep


def test_joint_attention_with_fp8_falls_back_recorded():
    """Mochi's joint attention asks for the lse: with precision fp8 the controller's calls run bf16, each one a
    recorded fallback; --strict's error names the group."""
    plan, _ = _plan(1)
    ctl = SparseController(plan, precision="fp8")
    q, k, v = _qkv(4)
    txt = [t[:, :, :7] for t in _qkv(5)]
    ck.reset_what_ran()
    ctl.reset()
    ctl.on_step_end(None, 0, None, {})  # step 1: bucket 0
    ctl.attend_joint(1, q, k, v, *txt)
    (fb,) = ck.what_ran()["fallbacks"]
    assert (fb["op"], fb["wanted"], fb["ran"], fb["calls"]) == ("attention", "fp8", "bf16", 1), fb
    with pytest.raises(CacheError) as e, _fallbacks_as_errors(True):
        ctl.attend_joint(1, q, k, v, *txt)
    dispatch.set_scope(None)
    assert "attention at bucket 0, layer 1 wanted fp8 but would run bf16" in str(e.value)


def test_compile_and_generate_with_precision(small_config, tmp_path, monkeypatch, capsys):
    """compile.precision lands in the manifest (and its kernel class: a change rebuilds); generate refuses a
    cache of the other precision in one line naming both; generate --json with fp8 reports the fp8 calls."""
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--config", small_config)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "compile", "--config", small_config)
    assert code == 0, err
    fp8 = ["--set", "generate.precision=fp8"]
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", small_config, *fp8)
    assert_one_line_error(
        code, err, "compiled for precision bf16", "generate.precision is fp8", "compile.precision=fp8"
    )
    code, _, err = run_cli(monkeypatch, capsys, "compile", "--config", small_config, "--set", "compile.precision=fp8")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "cache" / "manifest.json").read_text())
    assert manifest["precision"] == "fp8" == manifest["kernel_class"]["precision"]
    assert manifest["kernels"]["fp8"] == {"fp8_runs": True, "ran": "fp8_reference", "fallback": None}
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", small_config)
    assert_one_line_error(code, err, "compiled for precision fp8", "generate.precision is bf16")
    out = tmp_path / "v.mp4"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "generate", PROMPT, "--config", small_config, *fp8, "-o", out, "--json", "--strict"
    )
    assert code == 0, err
    kernels = json.loads(stdout.strip().splitlines()[-1])["kernels"]
    assert set(kernels["calls"]) == {"fp8_reference"} and kernels["fallbacks"] == [], kernels


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_tiny_model_fp8_holds_quality(tmp_path):
    """The trained tiny model, one held-out prompt (the full table: bench/eval_fp8_tiny.py): sparse fp8 (the
    scheme's emulation) vs sparse bf16-path video PSNR >= 30 dB, and the judge's verdict unchanged."""
    from eval_fp8_tiny import quality_runs

    prompt = "a green circle moving up on a gray background"
    (tmp_path / "p.txt").write_text(prompt + "\n")  # calibrated on the prompt itself: one dense run, not six
    # 3 x 16 x 16 tokens (12 blocks), 4 steps: the CPU emulation of fp8 casts every P element (slow in torch)
    sets = [f"calibration.prompts={tmp_path / 'p.txt'}", "video.frames=5"]
    rows = quality_runs([prompt], tmp_path, sets=sets, steps=4)
    (row,) = rows["clips"]
    assert row["psnr_fp8_vs_bf16_db"] >= 30.0, row
    assert row["judge_fp8"] == row["judge_bf16"], row
    assert rows["kernels_fp8"] == {"fp8_reference"} and rows["kernels_bf16"] == {"cpu"}, rows


def test_compiled_blocks_from_the_cache_compile_nothing_with_fp8(small_config, tmp_path, monkeypatch, capsys):
    """precision fp8 with compiled blocks from the cache, under --strict in fresh processes (cache/blocks.py):
    the graph holds the op that takes Wan's q/k projections (processor.layer_attention_qk_op) and generate
    generates no code for it, the guard on (its check step runs inside the op)."""
    import subprocess
    import sys

    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--config", small_config)
    assert code == 0, err
    sets = ["compile.precision=fp8", "generate.precision=fp8", "generate.compile=true", "generate.guard=true"]
    sets = [a for s in sets for a in ("--set", s)]
    cli = [sys.executable, "-m", "calibatt_cli"]
    r = subprocess.run([*cli, "compile", "--config", small_config, *sets], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    gen = ["generate", PROMPT, "--config", small_config, *sets, "--strict", "--json", "-o", str(tmp_path / "v.mp4")]
    r = subprocess.run([*cli, *gen], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    cb = line["compiled_blocks"]
    assert cb["enabled"] and cb["from_cache"] and (cb["inductor_codegen"], cb["builds"]) == (0, 0), cb
    assert set(line["kernels"]["calls"]) == {"fp8_reference"} and line["kernels"]["fallbacks"] == [], line["kernels"]
