"""The ahead-of-time kernel cache on a real GPU: a second process compiles nothing, also from a moved
copy, and its first pass over every (bucket, layer) kernel costs what later passes do.

Runs bench/bench_compile.py at a reduced size (2 buckets x 2 layers x 12 heads x N=32760, block 128)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_second_process_compiles_nothing(tmp_path):
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_compile.py"), "all", "--cache-dir",
                        str(tmp_path / "cache"), "--layers", "2", "--tokens", "32760", "--passes", "7",
                        "--json", str(out)], capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["build"]["compilations"] > 0 and res["build"]["triton_files"] > 0
    for phase in ("load", "load_moved"):
        got = res[phase]
        assert got["listener"], "triton.knobs.compilation.listener is missing: counts are folder-based"
        assert got["compilations"] == 0, f"{phase}: {got['compilations']} compilations"
        assert got["first_over_later"] <= 1.10, f"{phase}: first pass {got['first_pass_ms']} ms vs later " \
                                                f"{got['later_pass_ms']} ms"
    assert res["load_cold"]["compilations"] > 0, "an emptied triton/ must compile (else the test proves nothing)"
