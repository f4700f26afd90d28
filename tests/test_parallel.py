"""Multi-process layouts (parallel.py, models/parallel.py): every layout against the one-process result, on
CPUs with torchrun and gloo, and the refusals of what cannot work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run_cli

import calibatt_kernels as ck
from calibatt_cli import parallel
from calibatt_cli.config import load_config
from calibatt_cli.runtime.controllers import fixed_mass, mass_from_fixed
from calibatt_cli.runtime.plan import SparsePlan

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "parallel_worker.py"


def torchrun(n: int, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd or REPO, env=env)


# --- layout arithmetic -------------------------------------------------------------------------------------


def test_layout_coordinates_follow_the_mesh_order():
    """Rank order of the mesh (dp, cfg, ring, ulysses): ulysses varies fastest."""
    coords = [
        (lay.dp_rank, lay.cfg_rank, lay.ulysses_rank)
        for lay in (parallel.Layout(world=12, rank=r, dp=3, cfg=2, ulysses=2) for r in range(12))
    ]
    expected = [(d, c, u) for d in range(3) for c in range(2) for u in range(2)]
    assert coords == expected
    leaders = [r for r in range(12) if parallel.Layout(world=12, rank=r, dp=3, cfg=2, ulysses=2).group_leader]
    assert leaders == [0, 4, 8]


def test_prompt_shards_cover_every_prompt_once():
    for dp in (1, 2, 3, 5):
        got = sorted(i for d in range(dp) for i in parallel.Layout(world=dp, rank=d, dp=dp).shard(7))
        assert got == list(range(7)), dp


def test_plan_heads_equals_the_heads_of_the_masks():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(1, 6, 5, 5, generator=g) < 0.4
    masks |= torch.eye(5, dtype=torch.bool)
    plan = SparsePlan(32, [0], {(0, 0): ck.mask_to_index(masks)}, torch.zeros(1, 1, 6))
    part = plan.heads(2, 4)
    assert torch.equal(ck.index_to_mask(part.index[(0, 0)], 5), masks[:, 2:4])
    assert part.density.shape == (1, 1, 2)


def test_fixed_point_mass_sums_do_not_depend_on_order():
    """Why calibrate sums in fixed point: float sums of the same terms in another order differ in the last bits,
    which would make a sharded bundle differ from a one-process one."""
    g = torch.Generator().manual_seed(0)
    terms = [
        torch.rand(64, generator=g, dtype=torch.float64) * 10 ** float(torch.randint(-6, 1, (1,), generator=g))
        for _ in range(50)
    ]
    forward = sum(fixed_mass(t) for t in terms)
    backward = sum(fixed_mass(t) for t in reversed(terms))
    interleaved = sum(fixed_mass(t) for t in terms[::2]) + sum(fixed_mass(t) for t in terms[1::2])
    assert torch.equal(forward, backward) and torch.equal(forward, interleaved)
    float_sums = (sum(terms), sum(reversed(terms)))
    assert not torch.equal(*float_sums)  # the property fixed point buys
    assert torch.allclose(mass_from_fixed(forward), float_sums[0], rtol=0, atol=1e-9)


# --- refusals, in-process (each fails before any process group is joined) ----------------------------------


@pytest.mark.parametrize(
    "args,env,needles",
    [
        (["--cfg-parallel"], {}, ["needs 2 processes", "torchrun --nproc-per-node 2"]),
        (["--ulysses", "3"], {}, ["needs 3 processes"]),
        (["--cfg-parallel"], {"WORLD_SIZE": "3"}, ["3 processes do not fit", "multiple of 2"]),
        (["--ulysses", "2"], {"WORLD_SIZE": "2"}, ["3 heads, not divisible by parallel.ulysses=2"]),
        (["--set", "parallel.ring=2"], {"WORLD_SIZE": "2"}, ["ring attention is not supported"]),
        (["--set", "parallel.ulysses_anything=true"], {"WORLD_SIZE": "2"}, ["ulysses_anything is not supported"]),
        (["--cfg-parallel", "--set", "generate.guidance=1.0"], {"WORLD_SIZE": "2"}, ["needs classifier-free guidance"]),
        (["--set", "parallel.ulysses=0"], {}, ["parallel.ulysses must be >= 1"]),
    ],
    ids=["cfg-no-torchrun", "ulysses-no-torchrun", "world-mismatch", "heads", "ring", "anything", "no-cfg", "zero"],
)
def test_bad_layouts_end_in_one_line(small_config, monkeypatch, capsys, args, env, needles):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, _, err = run_cli(monkeypatch, capsys, "generate", "x", "--config", small_config, "--dense", *args)
    assert_one_line_error(code, err, *needles)


def test_mochi_refuses_ulysses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(
        monkeypatch, capsys, "generate", "x", "--config", REPO / "configs/mochi-tiny.yaml", "--dense", "--ulysses", "2"
    )
    assert_one_line_error(code, err, "no sequence-parallel plan", "--cfg-parallel")


def test_calibrate_refuses_video_layouts(small_config, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--config", small_config, "--set", "parallel.ulysses=3")
    assert_one_line_error(code, err, "data parallel", "unset them")


def test_install_carries_the_models_parallel_config():
    """diffusers sets `_parallel_config` only on the processors present when parallelism is enabled; ours are
    installed later in some orders and must take the model's, or each rank would attend over its own shard."""
    from calibatt_cli.models import load_model
    from calibatt_cli.runtime import DenseController

    cfg = load_config(None, ["model.name=tiny-random", "video.height=32", "video.width=32", "video.frames=5"])
    model = load_model(cfg)
    marker = object()
    model.pipe.transformer._parallel_config = marker
    model.install(DenseController())
    assert all(b.attn1.processor._parallel_config is marker for b in model.pipe.transformer.blocks)


# --- every layout against one process, torchrun on CPUs ------------------------------------------------------

LAYOUTS = [
    ("tiny", 2, ["--cfg-parallel"]),
    ("tiny", 3, ["--ulysses", "3"]),
    ("tiny", 6, ["--cfg-parallel", "--ulysses", "3"]),
    ("tiny4", 2, ["--ulysses", "2"]),
    ("tiny4", 4, ["--cfg-parallel", "--ulysses", "2"]),
    ("mochi", 2, ["--cfg-parallel"]),
    ("tiny", 3, ["--ulysses", "3", "--parallel-first"]),  # made parallel before our processors went in
]


@pytest.mark.slow
@pytest.mark.parametrize("model,n,flags", LAYOUTS, ids=[f"{m}-{n}{''.join(f)}" for m, n, f in LAYOUTS])
def test_layout_matches_one_process(tmp_path, model, n, flags):
    out = tmp_path / "result.json"
    res = torchrun(n, WORKER, "--model", model, *flags, "--out", out)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(out.read_text())
    for mode in ("dense", "sparse"):
        assert got["errors"][mode] <= 1e-5, f"{mode}: rel. error {got['errors'][mode]} vs one process ({got})"
    # the sparse run really ran the block-sparse path (not dense attention) on this rank
    sparse_calls = {k: v for k, v in got["calls"]["sparse"].items() if k.startswith("attention:")}
    assert sum(sparse_calls.values()) > 0, got["calls"]
    assert not any(k.startswith("attention:") for k in got["calls"]["dense"]), got["calls"]


# --- the CLI under torchrun: data parallel, sharded calibration ---------------------------------------------


@pytest.fixture
def calibrated(small_config, tmp_path):
    """The small config with three prompts, masks that are not all-true (epsilon 0.3), calibrated and compiled
    by one process."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\na green triangle moving right\n")
    text = small_config.read_text().replace("epsilon: 0.001", "epsilon: 0.3")
    text = text.replace(str(tmp_path / "prompts.txt"), str(prompts))
    small_config.write_text(text)
    cli = [sys.executable, "-m", "calibatt_cli"]
    for cmd in ("calibrate", "compile"):
        res = subprocess.run([*cli, cmd, "--config", small_config], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    return small_config, prompts, tmp_path / "out"


@pytest.mark.slow
def test_data_parallel_writes_each_video_once_as_one_process_would(calibrated):
    cfg, prompts, out = calibrated
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "calibatt_cli",
            "generate",
            "--prompts",
            prompts,
            "--config",
            cfg,
            "-o",
            out / "one.mp4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = torchrun(
        2, "-m", "calibatt_cli", "generate", "--prompts", prompts, "--config", cfg, "-o", out / "two.mp4", "--json"
    )
    assert two.returncode == 0, two.stderr[-4000:]
    summary = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1, two.stdout  # rank 0 reports for the launch
    assert summary[0]["outputs"] == [str(out / f"two-{i:03d}.mp4") for i in range(3)]
    assert summary[0]["layout"] == "2 processes, data parallel 2"
    for i in range(3):
        a, b = (out / f"one-{i:03d}.mp4").read_bytes(), (out / f"two-{i:03d}.mp4").read_bytes()
        assert a == b, f"prompt {i}: the data-parallel video differs from the one-process video"
    assert not list(out.glob(".two*"))  # no temp files left by a second writer


@pytest.mark.slow
@pytest.mark.parametrize("n,flags", [(2, ["--cfg-parallel"]), (3, ["--ulysses", "3"])], ids=["cfg2", "ulysses3"])
def test_parallel_cli_writes_the_one_process_video(calibrated, n, flags):
    cfg, _, out = calibrated
    one = subprocess.run(
        [sys.executable, "-m", "calibatt_cli", "generate", "a red circle", "--config", cfg, "-o", out / "one.mp4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    res = torchrun(n, "-m", "calibatt_cli", "generate", "a red circle", "--config", cfg, "-o", out / "par.mp4", *flags)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stderr.count(f"wrote {out / 'par.mp4'}") == 1, res.stderr
    assert (out / "one.mp4").read_bytes() == (out / "par.mp4").read_bytes()


@pytest.mark.slow
def test_sharded_calibration_writes_the_one_process_bundle(calibrated):
    cfg, _, out = calibrated
    cli = [sys.executable, "-m", "calibatt_cli"]
    one = (out / "bundle.safetensors").read_bytes()  # the fixture's one-process calibration
    res = torchrun(2, "-m", "calibatt_cli", "calibrate", "--config", cfg, "-o", out / "ranks.safetensors")
    assert res.returncode == 0, res.stderr[-4000:]
    assert (out / "ranks.safetensors").read_bytes() == one, "torchrun calibration differs from one process"
    for i in (1, 0):  # any order
        r = subprocess.run(
            [*cli, "calibrate", "--config", cfg, "--shard", f"{i}/2", "-o", out / f"s{i}.safetensors"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*cli, "merge-shards", out / "s1.safetensors", out / "s0.safetensors", "-o", out / "merged.safetensors"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "merged.safetensors").read_bytes() == one, "merged shards differ from one process"


def test_merge_shards_refuses_incomplete_or_repeated_sets(calibrated, monkeypatch, capsys):
    cfg, _, out = calibrated
    code, _, err = run_cli(
        monkeypatch, capsys, "calibrate", "--config", cfg, "--shard", "1/2", "-o", out / "s1.safetensors"
    )
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "merge-shards", out / "s1.safetensors", "-o", out / "m.safetensors")
    assert_one_line_error(code, err, "0/2 missing")
    code, _, err = run_cli(
        monkeypatch, capsys, "merge-shards", out / "s1.safetensors", out / "s1.safetensors", "-o", out / "m.safetensors"
    )
    assert_one_line_error(code, err, "both shard 1/2")
    broken = out / "broken.safetensors"
    shutil.copy(out / "s1.safetensors", broken)
    data = bytearray(broken.read_bytes())
    data[-3] ^= 0xFF
    broken.write_bytes(bytes(data))
    code, _, err = run_cli(monkeypatch, capsys, "merge-shards", broken, "-o", out / "m.safetensors")
    assert_one_line_error(code, err, "broken.safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--config", cfg, "--shard", "3/2", "-o", out / "x.st")
    assert_one_line_error(code, err, "--shard '3/2'")
    assert not (out / "m.safetensors").exists()
