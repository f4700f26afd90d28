"""generate.guard: bit-identical where the masks hold; widening changes the index the kernels read; it
catches faulty bundles on the trained tiny model; it runs in compiled blocks.

The fault tests run the trained `tiny` at its own resolution with 5 frames (768 tokens, 12 blocks of 64) on one
held-out prompt; bench/bench_guard_faults.py runs the same faults at full size on every held-out prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_YAML

from calibatt_cli.bundle import save_bundle
from calibatt_cli.cache.build import compile_cache
from calibatt_cli.calibrate import calibrate
from calibatt_cli.config import load_config
from calibatt_cli.generate import generate
from calibatt_cli.masks import retained_mass, select_blocks

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
HELD_OUT = "a green circle moving up on a gray background"  # configs/prompts/tiny_eval.txt


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red circle moving left on a black background\na blue square moving up\n")
    (tmp / "out").mkdir()
    (tmp / "small.yaml").write_text(SMALL_YAML.format(prompts=prompts, out=tmp / "out"))
    cfg = load_config(tmp / "small.yaml", [])
    calibrate(cfg)
    compile_cache(cfg)
    return tmp


def test_guard_leaves_a_holding_bundle_bit_identical(work):
    tmp = work
    prompts = ["a red circle moving left on a black background"]
    on = generate(load_config(tmp / "small.yaml", ["generate.guard=true"]), prompts, write=False)
    off = generate(load_config(tmp / "small.yaml", ["generate.guard=false"]), prompts, write=False)
    g = on.summary()["guard"]
    assert g["enabled"] and g["checks"] > 0 and g["widened"] == [], g["widened"]
    assert g["min_mass"] >= g["threshold"], (g["min_mass"], g["threshold"])
    assert off.summary()["guard"] == {"enabled": False, "reason": "generate.guard=false"}
    assert np.array_equal(on.videos[0].frames, off.videos[0].frames), "the guard changed a video whose masks hold"


def test_widening_changes_the_kernels_index():
    """A widened head lists every key block in the tensors the processors read; other heads keep theirs."""
    from calibatt_cli.runtime import SparseController, SparsePlan
    from calibatt_kernels import index_to_mask, mask_to_index

    masks = torch.eye(4, dtype=torch.bool).expand(2, 4, 4).clone()  # 2 heads, 4 blocks: diagonal only
    plan = SparsePlan(8, [-1, 0, 0], {(0, 0): mask_to_index(masks)}, torch.ones(1, 1, 1), epsilon=0.01)
    from calibatt_cli.runtime.guard import Guard

    ctl = SparseController(plan, guard=Guard(plan, factor=2.0))
    ctl.sparse_layer(0)
    ctl.reset()
    ctl._set_step(1)
    assert ctl.guard_due()
    q = torch.randn(1, 2, 32, 16)
    k = q.clone()
    k[:, 0] = torch.randn(1, 32, 16)  # head 0 attends anywhere (the diagonal loses mass); head 1 to itself x 4
    k[:, 1] *= 4
    ctl.guard_check(0, q, k)
    heads = {w.head for w in ctl.guard.widened}
    assert 0 in heads
    got = index_to_mask(ctl.plan.index[(0, 0)], 4)[0]
    assert got[0].all()
    for h in range(2):
        if h not in heads:
            assert torch.equal(got[h], masks[h])
    read = ctl.plan.index[(0, 0)]  # what the layer's next call reads, with what its launch derives made anew
    assert read.counts[0, 0].tolist() == [4, 4, 4, 4] and int(read.derived["kept_blocks"]) == int(read.counts.sum())
    ctl.reset()  # a new video: back to the compiled plan
    assert torch.equal(index_to_mask(ctl.plan.index[(0, 0)], 4)[0], masks)
    assert ctl.plan.index[(0, 0)].counts[0, 0].tolist() == [1, 1, 1, 1]


def test_sampled_mass_equals_the_full_block_mass_on_the_sampled_rows():
    """The guard's cheap measurement against the reference block mass of the whole sequence (keys longer
    than the sampled queries, a partial last block among the sampled rows)."""
    import calibatt_kernels as ck
    from calibatt_cli.runtime.guard import sample_rows, sampled_mass

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 300, 64), torch.randn(2, 3, 300, 64)
    mq = 5  # 300 tokens in blocks of 64: the last block holds 44
    mask = torch.rand(1, 3, mq, mq) < 0.5
    mask |= torch.eye(mq, dtype=torch.bool)
    rows = sample_rows(mq, 3)
    assert rows.tolist() == [0, 2, 4]
    full = ck.block_mass_ref(q, k, (64, 64))
    expected = (full[:, :, rows] * mask[:, :, rows]).sum(-1).double().mean(dim=(0, 2))
    got = sampled_mass(q, k, ck.mask_to_index(mask), 64, rows)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_sampled_mass_in_bf16_moves_the_dropped_mass_by_under_one_percent():
    """On a GPU the guard scores in bf16. Against the fp64 reference on the same (rounded) inputs, with a
    dominant key per query (bf16 rounds its probability by more than the masks drop) and masks that drop
    ~1e-3 of the mass, the dropped share is off by < 1 % of itself."""
    import calibatt_kernels as ck
    from calibatt_cli.runtime.guard import sample_rows, sampled_mass

    torch.manual_seed(1)
    q = torch.randn(1, 4, 1000, 64)
    k = q + 0.3 * torch.randn(1, 4, 1000, 64)  # each query's own key dominates
    q, k = (q * 1.6).bfloat16(), (k * 1.6).bfloat16()
    mq = 16
    full = ck.block_mass_ref(q.double(), k.double(), (64, 64))
    mask = torch.eye(mq, dtype=torch.bool).expand(1, 4, mq, mq)  # the diagonal holds all but ~1e-3
    rows = sample_rows(mq, 5)
    dropped = 1 - (full[:, :, rows] * mask[:, :, rows]).sum(-1).mean(dim=(0, 2))
    assert (dropped > 1e-4).all() and (dropped < 1e-2).all(), dropped
    got = 1 - sampled_mass(q, k, ck.mask_to_index(mask), 64, rows).double()
    err = ((got - dropped).abs() / dropped).max().item()
    assert err < 0.01, f"bf16 error {err:.2e} of the dropped mass ({dropped.tolist()})"


def _faulty_cache(tmp, name: str, masks: torch.Tensor) -> list[str]:
    """A bundle of `masks` with the calibrated bundle's meta, compiled; the --set overrides that use it."""
    from calibatt_cli.bundle import load_bundle, save_bundle

    meta = load_bundle(tmp / "out" / "bundle.safetensors").meta
    save_bundle(tmp / f"{name}.safetensors", masks, {k: v for k, v in meta.items() if k != "content_hash"})
    sets = [f"compile.bundle={tmp / name}.safetensors", f"compile.cache_dir={tmp / name}.cache"]
    compile_cache(load_config(tmp / "small.yaml", sets))
    return sets


def test_guard_runs_in_compiled_blocks(work):
    """generate.compile with the guard: the attention op runs it from inside the fullgraph-compiled blocks
    (aot_eager: the graphs without code generation), measures each (bucket, layer) once per video and widens
    the heads below the threshold at the same call as eager does (the same heads, the same video), and leaves a
    holding bundle's video bit-identical."""
    from calibatt_cli.bundle import load_bundle

    tmp = work
    prompts = ["a red circle moving left on a black background"]
    shape = load_bundle(tmp / "out" / "bundle.safetensors").masks.shape
    masks = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.4
    masks |= torch.eye(shape[-1], dtype=torch.bool)  # the diagonal only keeps little of tiny-random's mass
    faulty = _faulty_cache(tmp, "random", masks)
    compiled = ["generate.compile=true", "generate.compile_backend=aot_eager", "generate.guard=true"]

    comp = generate(load_config(tmp / "small.yaml", [*faulty, *compiled]), prompts, write=False)
    c = comp.summary()["guard"]
    keys = shape[0] * shape[1]  # (bucket, layer) pairs, each measured once
    assert c["checks"] == keys, (c["checks"], keys)
    assert c["widened"], "the faulty bundle was not widened in compiled blocks"
    assert all(w["mass"] < c["threshold"] for w in c["widened"]), c["widened"]
    eager = generate(load_config(tmp / "small.yaml", [*faulty, "generate.guard=true"]), prompts, write=False)
    heads = [(w["bucket"], w["layer"], w["head"]) for w in c["widened"]]
    assert heads == [(w["bucket"], w["layer"], w["head"]) for w in eager.summary()["guard"]["widened"]]
    assert np.array_equal(comp.videos[0].frames, eager.videos[0].frames), "compiled and eager guards differ"

    on = generate(load_config(tmp / "small.yaml", compiled), prompts, write=False)
    off = generate(load_config(tmp / "small.yaml", [*compiled[:2], "generate.guard=false"]), prompts, write=False)
    assert on.summary()["guard"]["checks"] == keys and on.summary()["guard"]["widened"] == []
    assert np.array_equal(on.videos[0].frames, off.videos[0].frames), "the compiled guard changed a holding video"


def test_guard_with_compiled_blocks_from_the_cache_compiles_nothing(work):
    """The GPU default (compiled blocks from the cache, guard on) under --strict, in a fresh process with
    inductor: a bundle the guard widens runs with zero code generation, the cache built without the guard."""
    import subprocess

    from calibatt_cli.bundle import load_bundle

    tmp = work
    shape = load_bundle(tmp / "out" / "bundle.safetensors").masks.shape
    masks = torch.rand(shape, generator=torch.Generator().manual_seed(4)) < 0.4
    masks |= torch.eye(shape[-1], dtype=torch.bool)
    meta = load_bundle(tmp / "out" / "bundle.safetensors").meta
    save_bundle(tmp / "strict.safetensors", masks, {k: v for k, v in meta.items() if k != "content_hash"})
    faulty = [f"compile.bundle={tmp}/strict.safetensors", f"compile.cache_dir={tmp}/strict.cache"]
    # compiled by the CLI, in its own process, as a user does (see cache/blocks.py)
    sets = [a for s in [*faulty, "generate.compile=true", "generate.guard=false"] for a in ("--set", s)]
    r = subprocess.run(
        [sys.executable, "-m", "calibatt_cli", "compile", "--config", str(tmp / "small.yaml"), *sets],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    args = [sys.executable, "-m", "calibatt_cli", "generate", "a red circle moving left on a black background"]
    args += ["--config", str(tmp / "small.yaml"), "--strict", "--json", "-o", str(tmp / "strict.mp4")]
    for s in [*faulty, "generate.compile=true", "generate.guard=true"]:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    cb = line["compiled_blocks"]
    assert cb["enabled"] and cb["from_cache"] and (cb["inductor_codegen"], cb["builds"]) == (0, 0), cb
    assert line["guard"]["widened"], "the faulty bundle was not widened"


def _figures(mass: torch.Tensor, masks: torch.Tensor) -> dict:
    """A bundle's per-entry density and retained mass for these masks (what calibrate records)."""
    density, retained = masks.double().mean(dim=(-1, -2)), retained_mass(mass, masks)
    return {
        "entries": {"density": density.tolist(), "retained_mass": retained.tolist()},
        "summary": {"density": float(density.mean()), "retained_mass": float(retained.mean())},
    }


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The trained tiny, 5 frames, calibrated on two training prompts at the config's epsilon (0.001); the
    loose bundle (epsilon 0.2) from the same recorded mass; the permuted one: the correct masks with each
    layer's heads rotated by one. Returns (folder, base overrides, dense frames of HELD_OUT)."""
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "cal.txt").write_text(
        "a red circle moving left on a black background\na green triangle growing on a gray background\n"
    )
    base = ["video.frames=5", f"calibration.prompts={tmp / 'cal.txt'}", "compile.cost_model=false"]
    sets = [*base, f"calibration.output={tmp / 'correct.safetensors'}"]
    res = calibrate(load_config(TINY, sets))
    meta = {k: v for k, v in res.bundle.meta.items() if k != "content_hash"}
    loose = select_blocks(res.mass, 0.2)
    save_bundle(tmp / "loose.safetensors", loose, dict(meta, epsilon=0.2, **_figures(res.mass, loose)))
    permuted = res.bundle.masks.roll(1, dims=2).contiguous()
    save_bundle(tmp / "permuted.safetensors", permuted, dict(meta, **_figures(res.mass, permuted)))
    for name in ("correct", "loose", "permuted"):
        compile_cache(load_config(TINY, [*base, *_bundle(tmp, name)]))
    dense = generate(load_config(TINY, [*base, "generate.dense=true"]), [HELD_OUT], write=False)
    return tmp, base, dense.videos[0].frames


def _bundle(tmp, name: str) -> list[str]:
    return [f"compile.bundle={tmp / name}.safetensors", f"compile.cache_dir={tmp / name}.cache"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 clips (torchmetrics, as `calibatt evaluate`)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(torch.from_numpy(a).float(), torch.from_numpy(b).float(), data_range=255.0))


@pytest.mark.parametrize("name", ["loose", "permuted"])
def test_guard_catches_a_faulty_bundle(faults, name, monkeypatch, capsys):
    """Unguarded, the faulty bundle costs the held-out prompt PSNR below 35 dB; `calibatt generate --json`
    with the guard widens heads, says so in its JSON and in one stderr line, and renders >= 35 dB."""
    import calibatt_cli.generate as gen
    from calibatt_cli.cli.app import main

    tmp, base, dense = faults
    results = []
    monkeypatch.setattr(gen, "generate", lambda *a, **kw: results.append(generate(*a, **kw)) or results[-1])
    sets = [*base, *_bundle(tmp, name)]
    plain = generate(load_config(TINY, [*sets, "generate.guard=false"]), [HELD_OUT], write=False).videos[0].frames
    out = tmp / f"{name}.mp4"
    argv = ["calibatt", "generate", HELD_OUT, "--json", "-o", str(out), "--config", str(TINY)]
    argv += [x for item in [*sets, "generate.guard=true"] for x in ("--set", item)]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    cap = capsys.readouterr()
    g = json.loads(cap.out)["guard"]
    assert g["enabled"] and g["widened"], g
    assert cap.err.count("guard: widened") == 1 and f"widened {len(g['widened'])} head(s)" in cap.err, cap.err
    guarded = results[0].videos[0].frames  # the frames the CLI wrote (the MP4 is lossy)
    p0, p1 = _psnr(plain, dense), _psnr(guarded, dense)
    print(f"{name}: PSNR vs dense {p0:.2f} dB unguarded, {p1:.2f} dB guarded, {len(g['widened'])} head(s) widened")
    assert p0 < 35.0, f"{name}: unguarded PSNR {p0:.2f} dB: not a fault at this size"
    assert p1 >= 35.0, f"{name}: guarded PSNR {p1:.2f} dB (unguarded {p0:.2f}), widened {len(g['widened'])}"
