"""The end-to-end benchmark runs its whole path (eager and compiled, all densities) on toy shapes on the
CPU, so a GPU session never spends device time finding a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_e2e_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_e2e.py"), "--smoke", "--reps", "1",
                        "--ffn-ab", "0.2", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())["results"][0]
    names = set(res["variants"])
    for d in (0.5, 0.3, 0.2, 0.1):
        assert f"calibatt eager d={d}" in names and f"calibatt compiled d={d}" in names
    assert "stock+fused compiled" in names and "calibatt compiled d=0.2 unfused-ffn" in names
    for tag in ("eager", "compiled"):
        err = res["variants"][f"calibatt {tag} all-true"]["rel_err_vs_stock"]
        assert err < 1e-5, f"all-true masks must reproduce stock attention ({tag}): rel err {err}"
    assert "x stock eager" in r.stdout
