"""precision: fp8 end to end on a GPU: the trained tiny model (a Wan transformer, head dim 64) calibrated,
compiled with compile.precision=fp8 (the fp8 kernel's configs measured and cached), and generated with
generate.precision=fp8 under --strict: the fp8 kernel runs every sparse call, nothing falls back or compiles,
eager and with compiled blocks (the op stays opaque), and the video stays within 30 dB of the bf16 one. Mochi
(joint attention, which needs the lse) falls back to bf16, recorded, and --strict refuses it.

    PYTHONPATH=$PWD:$PWD/kernels python -m pytest -q tests/test_fp8_integration_gpu.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a green circle moving up on a gray background"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA GPU with 8-bit tensor cores (sm_89+)",
    ),
]


def _cli(args: list[str], cwd=REPO) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "calibatt_cli", *args], capture_output=True, text=True, timeout=540, cwd=cwd
    )
    return r


def _sets(tmp: Path, precision: str, extra=()) -> list[str]:
    sets = [
        "model.device=cuda",
        "model.dtype=bfloat16",
        f"calibration.output={tmp}/b.safetensors",
        f"compile.bundle={tmp}/b.safetensors",
        f"compile.cache_dir={tmp}/cache-{precision}",
        f"compile.precision={precision}",
        f"generate.precision={precision}",
        # the sparse kernels wherever the masks are (the cost model runs tiny's dense-ish groups dense on a GPU,
        # which would leave nothing to check) and no guard (it would widen heads in one precision, not the other)
        "compile.cost_model=false",
        "generate.guard=false",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    r = _cli(["calibrate", *_sets(tmp, "bf16")])
    assert r.returncode == 0, r.stderr[-3000:]
    for precision in ("bf16", "fp8"):
        r = _cli(["compile", *_sets(tmp, precision)])
        assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def _generate(tmp: Path, precision: str, extra=(), strict: bool = True) -> tuple[dict, np.ndarray]:
    """generate's summary (with what_ran's calls of the whole run under "calls") and the frames."""
    import calibatt_kernels as ck
    from calibatt_cli.config import load_config
    from calibatt_cli.generate import generate

    sets = _sets(tmp, precision, extra)
    cfg = load_config(None, [s for s in sets if s != "--set"] + [f"generate.strict={str(strict).lower()}"])
    res = generate(cfg, [PROMPT], write=False)
    return dict(res.summary(), calls=ck.what_ran()["calls"]), res.videos[0].frames


def test_compile_measures_the_fp8_configs(tiny_fp8):
    manifest = json.loads((tiny_fp8 / "cache-fp8" / "manifest.json").read_text())
    assert manifest["precision"] == "fp8" and manifest["kernels"]["fp8"]["fp8_runs"], manifest["kernels"]
    assert manifest["kernels"]["tuned"] and manifest["kernels"]["triton_files"] > 0
    from calibatt_kernels import KernelConfig, dispatch

    fp8_cands = set(dispatch.fp8_candidate_configs(torch.cuda.get_device_capability(), (64, 64)))
    for g in manifest["groups"]:
        assert KernelConfig.from_manifest(g["config"]) in fp8_cands, g


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-blocks"])
def test_generate_fp8_strict_runs_the_fp8_kernel(tiny_fp8, compiled):
    extra = ["generate.compile=true"] if compiled else []
    summary, frames = _generate(tiny_fp8, "fp8", extra)
    kernels = summary["kernels"]
    assert kernels["calls"] and all(k.startswith("fp8_tl_") for k in kernels["calls"]), kernels["calls"]
    assert kernels["fallbacks"] == [] and kernels["dense"] == [] and summary["compilations"] == 0, summary
    # the sparse steps quantize q in the norm + RoPE kernel (dispatch.qk_norm_rope_attention_fp8)
    assert summary["calls"].get("qk_norm_rope:triton_quant", 0) > 0, summary["calls"]
    _, bf16 = _generate(tiny_fp8, "bf16", extra)
    mse = float(np.mean((frames.astype(np.float64) - bf16.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    assert 30.0 <= psnr < float("inf"), f"fp8 vs bf16 PSNR {psnr:.2f} dB"


def test_fused_q_quantization_equals_the_unfused_path(tiny_fp8, monkeypatch):
    """Wan's processor quantizing q in the norm + RoPE kernel (SparseLayer.run_qk) gives the video of the
    unfused path (the q/k norm kernel, then quantize_qkv on the normed q) to the bit: the same codes. Eager:
    the cache's compiled blocks hold the fused route's graph only."""
    from calibatt_cli.models.wan import CalibattWanAttnProcessor

    eager = ["generate.compile=false"]  # (compiled blocks are generate's default on a GPU)
    fused, frames = _generate(tiny_fp8, "fp8", eager)
    sparse_calls = sum(n for k, n in fused["calls"].items() if k.startswith("attention:fp8_tl_"))
    assert fused["calls"].get("qk_norm_rope:triton_quant") == sparse_calls > 0, fused["calls"]
    monkeypatch.setattr(CalibattWanAttnProcessor, "_fp8_fast_path", lambda self: False)
    unfused, frames_unfused = _generate(tiny_fp8, "fp8", eager)
    assert "qk_norm_rope:triton_quant" not in unfused["calls"], unfused["calls"]
    assert unfused["kernels"]["calls"] == fused["kernels"]["calls"], (unfused["kernels"], fused["kernels"])
    diff = int(np.abs(frames.astype(np.int16) - frames_unfused.astype(np.int16)).max())
    assert np.array_equal(frames, frames_unfused), f"fused and unfused videos differ (max {diff} levels)"


def test_kernel_matches_the_reference_through_dispatch():
    """dispatch.block_sparse_attention_fp8_indexed on the GPU (the tl kernel) against the scheme's reference,
    q, k, v in diffusers' [B, N, H, D] storage, with outlier keys."""
    import calibatt_kernels as ck
    from calibatt_kernels import dispatch
    from calibatt_kernels.quant import block_sparse_attention_fp8_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, N, H, D, bs = 2, 4000, 4, 128, (128, 128)
    q, k, v = (t.transpose(1, 2) for t in torch.randn(3, B, N, H, D, device="cuda", generator=gen).bfloat16())
    k = k + 4.0 * torch.randn(D, device="cuda", generator=gen).bfloat16()
    mb = -(-N // 128)
    mask = torch.rand(1, H, mb, mb, device="cuda", generator=gen) < 0.3
    mask[..., 0] = True
    ck.reset_what_ran()
    got = dispatch.block_sparse_attention_fp8_indexed(q, k, v, ck.mask_to_index(mask), block_size=bs)
    want = block_sparse_attention_fp8_ref(q, k, v, mask, bs)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err <= 1e-2, f"rel err {err:.2e}"
    assert set(ck.what_ran()["calls"]) == {"attention:fp8_tl_tile"} and not ck.what_ran()["fallbacks"]


def test_mochi_fp8_falls_back_and_strict_refuses(tmp_path):
    cfg = ["--config", str(REPO / "configs" / "mochi-tiny.yaml")]
    args = _sets(tmp_path, "fp8")
    for cmd in (["calibrate"], ["compile"]):
        r = _cli(cmd + cfg + args)
        assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "cache-fp8" / "manifest.json").read_text())
    assert not manifest["kernels"]["fp8"]["fp8_runs"] and "log-sum-exp" in manifest["kernels"]["fp8"]["fallback"]
    gen = ["generate", PROMPT, "-o", str(tmp_path / "m.mp4"), "--json"]
    r = _cli(gen + cfg + args)
    assert r.returncode == 0, r.stderr[-3000:]
    fallbacks = json.loads(r.stdout.strip().splitlines()[-1])["kernels"]["fallbacks"]
    assert {(f["wanted"], f["ran"]) for f in fallbacks} == {("fp8", "bf16")}, fallbacks
    r = _cli(gen + ["--strict"] + cfg + args)
    assert r.returncode != 0 and "wanted fp8 but would run bf16" in r.stderr, r.stderr[-2000:]
