"""`bench/bench_fp8.py --sweep` runs its whole path on the CPU (--smoke: the Triton interpreter, a toy size), so
that the one short GPU call it is written for does not find a broken script: the compile workers, a config
that fails (recorded with its error, not a crash), the timed rows against bf16 and the results file."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_sweep_smoke(tmp_path):
    out = tmp_path / "sweep.json"
    # at the smoke's 64-token blocks a 128-row query tile cannot run: that config must fail alone
    configs = ["tile-m64-w4-s2", "tile-m128-w8-s2", "tile-m64-w4-s2-ws"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(REPO / "bench" / "bench_fp8.py"), "--sweep", "--smoke", "--densities", "0.5"]
    r = subprocess.run(
        cmd + ["--configs", *configs, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["env"]["card"] == "cpu" and list(res["sweep"]["configs"]) == configs

    workers = res["workers"]
    assert workers["tile-m64-w4-s2"]["ok"] and workers["tile-m64-w4-s2-ws"]["ok"], workers
    bad = workers["tile-m128-w8-s2"]
    assert not bad["ok"] and bad["error"].startswith("ValueError: ") and "query tile dividing 64" in bad["error"]

    rows = {(r["kernel"], r.get("config"), r.get("when")): r for r in res["rows"]}
    before, after = rows[("bf16", "tl_tile", "before")], rows[("bf16", "tl_tile", "after")]
    for name in ("tile-m64-w4-s2", "tile-m64-w4-s2-ws"):
        row = rows[("fp8-attn", name, None)]
        assert row["ms"] > 0 and row["density"] == 0.5
        assert abs(row["x_bf16"] - (before["ms"] + after["ms"]) / 2 / row["ms"]) < 1e-9
        assert row["rel_vs_default"] == 0.0, "the interpreter runs both configs alike"
        assert 0 < row["rel_vs_bf16"] < 0.1, f"fp8 vs bf16 output: {row['rel_vs_bf16']:.2e}"
    assert "query tile dividing 64" in rows[("fp8-attn", "tile-m128-w8-s2", None)]["error"]
    assert "tile-m128-w8-s2            FAILED: ValueError" in r.stdout
    assert not res["skipped"]
