"""The ahead-of-time kernel cache on a real GPU: a second process compiles nothing, also from a moved
copy, and its first pass over every (bucket, layer) kernel costs what later passes do.

Runs bench/bench_compile.py at a reduced size (2 buckets x 2 layers x 12 heads x N=32760, block 128)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_second_process_compiles_nothing(tmp_path):
    out = tmp_path / "res.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_compile.py"),
            "all",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--layers",
            "2",
            "--tokens",
            "32760",
            "--passes",
            "7",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["build"]["compilations"] > 0 and res["build"]["triton_files"] > 0
    for phase in ("load", "load_moved"):
        got = res[phase]
        assert got["compilations"] == 0, f"{phase}: {got['compilations']} compilations"
        assert got["first_over_later"] <= 1.10, (
            f"{phase}: first pass {got['first_pass_ms']} ms vs later {got['later_pass_ms']} ms"
        )
    assert res["load_cold"]["compilations"] > 0, "an emptied triton/ must compile (else the test proves nothing)"


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "calibatt_cli", *args], capture_output=True, text=True, timeout=540, cwd=cwd
    )


def test_default_generate_runs_compiled_blocks_from_the_cache(tmp_path):
    """On a GPU, generate.compile=auto compiles the blocks: `calibatt compile` builds them (inductor's graphs and
    Triton kernels beside ours) and a fresh `generate --strict` runs them with zero Triton compilations and zero
    inductor code generation. With the cache's compiled blocks emptied, strict fails at the first code
    generation (the count is real). Prints the first compiled step against the later ones."""
    sets = [
        "model.device=cuda",
        "generate.steps=6",
        "compile.cost_model=false",  # (the tiny model runs faster dense; a sparse bucket has a graph of its own)
        f"calibration.output={tmp_path}/b.safetensors",
        f"compile.bundle={tmp_path}/b.safetensors",
        f"compile.cache_dir={tmp_path}/cache",
    ]
    args = [a for s in sets for a in ("--set", s)]
    for cmd in ("calibrate", "compile"):
        r = _cli(cmd, *args)
        assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["compiled_blocks"] == {"enabled": True, "backend": "inductor"}
    blocks = manifest["blocks"]
    # compile ran one step of each kind generate takes through the compiled blocks: the dense warm-up (tiny's
    # warmup_steps: 1) and each of the 2 buckets. `graphs` counts inductor's code generations: one, as the
    # attention op reads the step when it runs (runtime/processor.py) and every kind runs the same graph.
    assert blocks["step_kinds"] == [-1, 0, 1], blocks
    assert blocks["graphs"] == 1, blocks
    gen = ("generate", "a red circle moving left on a black background", "--strict", "--json", *args)
    r = _cli(*gen, "-o", str(tmp_path / "v.mp4"))
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    cb = line["compiled_blocks"]
    assert cb["enabled"] and cb["from_cache"], cb
    assert (line["compilations"], cb["triton_other"], cb["inductor_codegen"], cb["builds"]) == (0, 0, 0, 0), cb
    # and the graphs served from the cache ran the sparse kernel on every sparse call, at the plan's density
    kernels = line["kernels"]
    assert sum(kernels["calls"].values()) > 0 and not kernels["dense"] and not kernels["fallbacks"], kernels
    assert abs(line["measured_sparse_density"] - line["sparse_density"]) < 1e-6, line
    steps = line["step_seconds"][0]
    print(f"compiled from the cache: steps {steps}, ready in {line['ready_seconds']} s")
    folder = (tmp_path / "cache").resolve()
    shutil.rmtree(folder / "blocks" / "inductor")
    (folder / "blocks" / "inductor").mkdir()
    (folder / "blocks" / "artifacts.bin").write_bytes(b"")
    m = json.loads((folder / "manifest.json").read_text())
    m["blocks"]["files"] = 0
    (folder / "manifest.json").write_text(json.dumps(m))
    r = _cli(*gen, "-o", str(tmp_path / "w.mp4"))
    assert r.returncode != 0 and "strict mode: inductor generated code" in r.stderr, r.stderr[-3000:]


def test_joint_attention_model_generates_strict_from_its_cache(tmp_path):
    """Mochi's joint attention asks the kernel for the row log-sum-exp, a kernel variant of its own:
    compile must tune and cache that variant, so `generate --strict` compiles nothing."""
    sets = [
        "model.device=cuda",
        "model.dtype=bfloat16",
        f"calibration.output={tmp_path}/b.safetensors",
        f"compile.bundle={tmp_path}/b.safetensors",
        f"compile.cache_dir={tmp_path}/cache",
    ]
    args = [a for s in sets for a in ("--set", s)]
    cli = [sys.executable, "-m", "calibatt_cli"]
    cfg = ["--config", str(REPO / "configs" / "mochi-tiny.yaml")]
    for cmd in (["calibrate"], ["compile"]):
        r = subprocess.run(cli + cmd + cfg + args, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        cli
        + [
            "generate",
            "a red circle moving left on a black background",
            "-o",
            str(tmp_path / "m.mp4"),
            "--strict",
            "--json",
        ]
        + cfg
        + args,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["compilations"] == 0
