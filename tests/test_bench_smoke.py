"""The end-to-end benchmark runs its whole path (eager and compiled, all densities) on toy shapes on the
CPU, so a GPU session never spends device time finding a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_e2e_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_e2e.py"),
            "--smoke",
            "--reps",
            "1",
            "--ffn-ab",
            "0.2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())["results"][0]
    names = set(res["variants"])
    for d in (0.5, 0.3, 0.2, 0.1):
        assert f"calibatt eager d={d}" in names and f"calibatt compiled d={d}" in names
    assert "stock+fused compiled" in names and "calibatt compiled d=0.2 unfused-ffn" in names
    for tag in ("eager", "compiled"):
        err = res["variants"][f"calibatt {tag} all-true"]["rel_err_vs_stock"]
        assert err < 1e-5, f"all-true masks must reproduce stock attention ({tag}): rel err {err}"
    # each density's row computed its masks' blocks (the processors re-derive what a launch reads per index)
    for name, v in res["variants"].items():
        if name.startswith("calibatt"):
            assert v["density"] < 1 or "all-true" in name, (name, v)
            assert v["computed_density"] == pytest.approx(v["density"], abs=1e-6) and "mismatch" not in v, (name, v)
    assert "x stock eager" in r.stdout


def test_trace_analysis_reads_known_intervals():
    """bench/trace_gluon.py's analysis on a synthetic trace with known intervals (cycle counters that wrap
    past 2^32 included): 2 SMs, 3 programs each, 1 cycle per ns."""
    import torch
    import trace_gluon

    from calibatt_kernels.attn_gluon import TRACE_SLOTS

    slot = {n: i for i, n in enumerate(TRACE_SLOTS)}
    rows = []
    for sm in range(2):
        t = (1 << 32) - 5000 if sm == 0 else 1000  # SM 0's counter wraps during its second program
        for _ in range(3):
            r = [0] * len(TRACE_SLOTS)
            cnt, per_block = 10, 1500
            r[slot["smid"]], r[slot["count"]] = sm, cnt
            r[slot["start"]] = t
            r[slot["index_read"]] = t + 500
            r[slot["descriptors_made"]] = t + 1100
            r[slot["loader_start"]] = t + 1300
            r[slot["loader_issued"]] = t + 1900
            r[slot["first_kv_ready"]] = t + 2600
            r[slot["loop_done"]] = t + 2600 + (cnt - 1) * per_block
            r[slot["stored_wg0"]] = r[slot["loop_done"]] + 1300
            r[slot["stored_wg1"]] = r[slot["stored_wg0"]] + 200
            r[slot["start_ns"]], r[slot["stored_wg0_ns"]] = r[slot["start"]], r[slot["stored_wg0"]]
            rows.append(r)
            t = r[slot["stored_wg1"]] + 800  # the next program starts 800 cycles after this one ends
    raw = torch.tensor([[x % (1 << 32) for x in r] for r in rows], dtype=torch.int64)
    a = trace_gluon.analyse(((raw + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32))  # as the kernel's int32
    assert abs(a["ghz"] - 1.0) < 1e-9
    us = {
        k: round(a[k] * 1e3)
        for k in (
            "per_block_us",
            "launch_gap_us",
            "index_read_us",
            "descriptors_made_us",
            "loader_start_us",
            "loader_issued_us",
            "to_first_kv_us",
            "tail_us",
            "wg1_after_wg0_us",
        )
    }
    assert us == dict(
        per_block_us=1500,
        launch_gap_us=800,
        index_read_us=500,
        descriptors_made_us=1100,
        loader_start_us=1300,
        loader_issued_us=1900,
        to_first_kv_us=2600,
        tail_us=1300,
        wg1_after_wg0_us=200,
    ), us
    # fixed cost: span (2600 + 9 x 1500 + 1500) + gap 800 - 10 x 1500, in blocks of 1500
    assert abs(a["fixed_blocks"] - (2600 + 1500 + 800 - 1500) / 1500) < 1e-9
    assert a["sms"] == 2


def test_traced_gluon_kernel_compiles_for_sm90():
    """The profiling build (TRACE=True) that bench/trace_gluon.py runs compiles for sm_90 on this CPU, on the
    installed triton, so a device session does not find it broken."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from calibatt_kernels import attn_gluon as g

    sig, consts, attrs, opts = g.aot_source_args(torch.bfloat16, 128, persistent=False)
    consts["TRACE"] = True
    kernel = triton.compile(
        GluonASTSource(g.kernel_fn(persistent=False), sig, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=opts,
    )
    assert "globaltimer" in kernel.asm["ptx"] and "%clock" in kernel.asm["ptx"]


def test_clock_log_parses_and_summarises(monkeypatch):
    """bench/gpu_clock.py: nvidia-smi's lines (N/A power, headers and errors skipped), a window's medians and
    power-capped share, and no sampler (window None) where nvidia-smi is missing."""
    import gpu_clock

    assert gpu_clock.parse_line("1605, 690.41, 0x0000000000000004\n") == (1605.0, 690.41, 4)
    assert gpu_clock.parse_line("1980, [N/A], 0x0000000000000000") == (1980.0, None, 0)
    assert gpu_clock.parse_line("clocks.current.sm [MHz], power.draw [W], clocks_event_reasons.active") is None
    assert gpu_clock.parse_line("No devices were found") is None
    monkeypatch.setattr(gpu_clock.shutil, "which", lambda _: None)
    log = gpu_clock.ClockLog()
    assert log.proc is None and log.window(0, 1e12) is None
    log.samples = [
        (1.0, 1980.0, 120.0, 0),
        (2.0, 1600.0, 690.0, 4),
        (3.0, 1650.0, 692.0, 5),
        (4.0, 1700.0, None, 4),
        (9.0, 345.0, 80.0, 1),
    ]
    w = log.window(1.5, 4.5)
    assert w == dict(mhz=1650.0, watts=691.0, power_capped=1.0, samples=3), w
    assert log.window(5.0, 8.0) is None
    assert log.measure(lambda: 7) == (7, {})  # (no sample in the call's own window)
    log.close()


def test_kernel_table_shows_the_clock():
    """bench_kernel's table: rows with the clock fields show MHz, W and the capped share; rows without leave
    them blank (results of earlier sessions, or no nvidia-smi)."""
    import bench_kernel

    res = dict(
        env=dict(card="X", torch="t", triton="tr"),
        rows=[
            dict(
                shape="wan1.3b",
                N=1,
                kernel="cudnn-dense",
                ms=11.8,
                tflops=558.5,
                mhz=1605.0,
                watts=690.4,
                power_capped=0.75,
                samples=4,
            ),
            dict(
                shape="wan1.3b",
                N=1,
                mask="random",
                density=0.1,
                kernel="gluon-ws-s3",
                ms=1.12,
                tflops=596.2,
                vs_cudnn_dense=10.5,
                vs_flex=1.52,
            ),
        ],
    )
    lines = bench_kernel.table(res).splitlines()
    assert lines[2].split()[-3:] == ["1605", "690", "75%"], lines[2]
    assert lines[3].split()[-2:] == ["1.52", "10.50"], lines[3]


def test_bench_parallel_smoke(tmp_path):
    """bench_parallel.py's driver and worker (torchrun, the stock and calibatt variants, the result file) on CPU
    processes; the one-process layout only, to keep CI short (the layouts themselves: test_parallel.py)."""
    out = tmp_path / "parallel.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_parallel.py"), "--smoke", "--gpus", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO / "bench",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(row["variant"], row["layout"]) for row in res["rows"]} == {("stock", "one GPU"), ("calibatt", "one GPU")}
    assert all(row["ms"] > 0 for row in res["rows"]) and res["weights"] == "random"


def test_bench_guard_smoke(tmp_path):
    out = tmp_path / "guard.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "bench" / "bench_guard.py"), "--smoke", "--reps", "1", "--rounds", "1"]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())["results"][0]
    assert res["ms"]["sparse step"] > 0 and "amortised_share" in res


def test_busy_time_is_the_union_of_kernel_intervals():
    """profile_generate.busy_us: overlapping and nested intervals count once, gaps not at all."""
    from profile_generate import busy_us

    assert busy_us([]) == 0
    assert busy_us([(0, 10), (20, 25)]) == 15  # a gap
    assert busy_us([(0, 10), (5, 15)]) == 15  # overlap
    assert busy_us([(5, 15), (0, 10), (2, 3)]) == 15  # unsorted, nested
    assert busy_us([(0, 10), (10, 12)]) == 12  # touching


def test_importtime_lines_give_the_top_level_imports():
    """bench_ready.top_imports reads `-X importtime`'s lines: the top level only (two more spaces per level)."""
    from bench_ready import top_imports

    stderr = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       100 |        100 |     torch._C",
            "import time:       200 |       2000 |   torch",
            "import time:       300 |     500000 | calibatt_cli.generate",
            "import time:        10 |       1500 | diffusers",
            "some other line",
        ]
    )
    assert top_imports(stderr) == {"calibatt_cli.generate": 0.5, "diffusers": 0.002}


def test_profile_generate_smoke(small_config, tmp_path):
    """bench/profile_generate.py on the tiny model (CPU operators in place of kernels): a table and its JSON."""
    from calibatt_cli.cache.build import compile_cache
    from calibatt_cli.calibrate import calibrate
    from calibatt_cli.config import load_config

    cfg = load_config(small_config, ["model.device=cpu"])
    calibrate(cfg)
    compile_cache(cfg)
    out = tmp_path / "profile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels")])
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "profile_generate.py"), "--config", str(small_config)]
        + ["--set", "model.device=cpu", "--step", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["step"] == 2 and len(res["step_seconds"]) == 4
    assert 0 < res["busy_ms"] <= res["span_ms"] and res["kernel_ms"] >= res["busy_ms"]
    assert res["kernels"] and all(k["ms_per_layer_call"] >= 0 for k in res["kernels"])
    assert "ms/layer call" in r.stdout
