"""`calibatt compile` without a GPU: cross-compiling every kernel config, a cache that survives being
moved, refusal of caches made for another GPU, Triton or bundle, and concurrent compiles."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from test_cli import assert_one_line_error, run_cli
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from calibatt_cli.bundle import load_bundle, save_bundle
from calibatt_cli.cache import aot
from calibatt_cli.cache.build import compile_cache
from calibatt_cli.cache.load import load_cache
from calibatt_cli.calibrate import calibrate
from calibatt_cli.config import load_config
from calibatt_cli.errors import CacheError
from calibatt_cli.runtime import AttentionController
from calibatt_kernels import KernelConfig, attn_gluon, attn_tl, dispatch

PROMPT = "a red circle moving left on a black background"


def test_cross_compile_every_config_for_sm90(small_config, monkeypatch, capsys):
    # Wan's kernel class but head dim 64 (the tiny model's): block 128, bf16.
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "compile",
        "--config",
        small_config,
        "--target",
        "sm_90",
        "--set",
        "calibration.block_size=128",
        "--set",
        "model.dtype=bfloat16",
    )
    assert code == 0, err
    # every attention config, and the tiny Wan model's fused q/k norm + RoPE kernel
    n = len(dispatch.candidate_configs((9, 0), (128, 128), 64, torch.bfloat16)) + 1
    assert f"{n} of {n} kernels compile and fit sm_90, 0 failed" in err, err
    assert "128x64 w8 s3 persistent" in err  # the table lists each variant
    assert "qk_norm_rope (" in err
    # both Gluon kernels compile for sm_90 on this CPU too
    assert "gluon 128x128 s3 ws persistent" in err and "gluon 128x128 s3 ws grid" in err


def test_wan_kernel_class_fits_hopper_shared_memory():
    """Head dim 128 (Wan's) at block 128: every candidate must fit sm_90's 227 KiB of shared memory. An int16
    load of the block ids once made triton add a K/V stage (256 KiB), and only a GPU run noticed."""
    reports = aot.cross_compile("sm_90", dtype=torch.bfloat16, block_size=(128, 128), head_dim=128)
    assert len(reports) == len(dispatch.candidate_configs((9, 0), (128, 128), 128, torch.bfloat16))
    bad = [(r.config, r.status, r.shared_kib, r.error) for r in reports if r.status != "ok"]
    assert not bad, bad
    default = next(
        r for r in reports if KernelConfig.from_manifest(r.config) == KernelConfig(num_warps=8, num_stages=3)
    )
    assert default.shared_kib <= 200  # Q + two K/V stages in flight: 192 KiB
    gluon = [r for r in reports if r.config["gluon"]]
    # persistent: two Q buffers + K/V rings of 3 and 2 stages; per tile: Q + a 3-stage K/V ring (224 KiB each)
    assert sorted(r.config["persistent"] for r in gluon) == [False, True]
    assert all(r.config["warp_specialize"] and r.shared_kib <= 227 for r in gluon)


def test_gluon_row_views_take_model_layouts():
    """The Gluon kernel's host-side descriptors view q, k, v as [rows, stride_n] and find each head at
    divmod(b stride_b + h stride_h, stride_n): true of the contiguous layout, diffusers' [B, N, H, D] and
    views into a packed [B, N, 3, H, D] projection; a layout whose heads do not start on rows falls back.
    The kernel gets each origin as int32 terms the host divided out (`_row_terms`): they must agree with
    the division for every (b, h)."""
    from calibatt_kernels.attn_gluon import _row_terms, _row_view_ok

    B, H, N, D = 2, 3, 40, 64
    bhnd = torch.empty(B, H, N, D)
    bnhd = torch.empty(B, N, H, D).transpose(1, 2)
    packed = torch.empty(B, N, 3, H, D)[:, :, 1].transpose(1, 2)
    assert all(_row_view_ok(t) for t in (bhnd, bnhd, packed))
    for t in (bhnd, bnhd, packed):
        zr, hr, hc = _row_terms(t)
        for b in range(B):
            for h in range(H):
                assert (b * zr + h * hr, h * hc) == divmod(b * t.stride(0) + h * t.stride(1), t.stride(2))
    # heads 40.5 rows apart (a [B, H, N + 0.5, D] slab): head 1 would start half-way along a row
    odd = torch.empty(B * H * N * D + B * H * D // 2).as_strided(
        (B, H, N, D), (H * (N * D + D // 2), N * D + D // 2, D, 1)
    )
    assert not _row_view_ok(odd)


def test_gluon_tile_records_against_the_mask():
    """Each Gluon program reads one record (row, block count, list offset, first block id) in launch order:
    checked against the mask itself, for the LPT schedule, no schedule, empty rows and a batch of masks."""
    import calibatt_kernels as ck
    from calibatt_kernels.attn_gluon import tile_records
    from calibatt_kernels.index import index_words

    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 3, 5, 7, generator=gen) < 0.4
    mask[0, 1, 2] = False  # an empty row
    mask[1, 2, 4] = True  # a full one
    for with_schedule in (True, False):
        ix = ck.mask_to_index(mask, with_schedule=with_schedule)
        rec = tile_records(ix.counts, ix.offsets, index_words(ix.indices), ix.schedule)
        order = ix.schedule.tolist() if with_schedule else list(range(mask[..., 0].numel()))
        assert rec.dtype == torch.int32 and rec.shape == (len(order), 4) and rec[:, 0].tolist() == order
        rows = mask.reshape(-1, mask.shape[-1])
        for (_row, cnt, e0, first), r in zip(rec.tolist(), order, strict=True):
            cols = rows[r].nonzero().flatten().tolist()
            assert cnt == len(cols) and first == (cols[0] if cols else 0)
            assert ix.indices[e0 : e0 + cnt].tolist() == cols


def test_split_last_wave_pieces_cover_the_rows():
    """The persistent kernel's last wave: the last T mod P tiles each become s = P // (T mod P) pieces of
    consecutive blocks whose records cover the row's list exactly, in consecutive workspace slots; the tiles
    before are untouched; nothing is split when the wave is full, when s < 2, or when the rows differ much in length."""
    import calibatt_kernels as ck
    from calibatt_kernels.attn_gluon import tile_records
    from calibatt_kernels.index import index_words
    from calibatt_kernels.split_merge import split_last_wave

    gen = torch.Generator().manual_seed(5)
    idx = torch.argsort(torch.rand(1, 4, 10, 40, generator=gen), -1)[..., :9]  # 40 rows of 9 blocks
    mask = torch.zeros(1, 4, 10, 40, dtype=torch.bool).scatter_(-1, idx, True)
    ix = ck.mask_to_index(mask)
    words = index_words(ix.indices)
    base = tile_records(ix.counts, ix.offsets, words, ix.schedule)
    rec, rows, s = split_last_wave(base, words, 12)  # 40 = 3 x 12 + 4: 4 rows in 3 pieces
    assert s == 3 and rows.tolist() == base[-4:, 0].tolist() and rec.shape == (36 + 12, 4)
    assert torch.equal(rec[:36], base[:36])
    for j, row in enumerate(rows.tolist()):
        pieces = rec[36 + 3 * j : 39 + 3 * j].tolist()
        assert [p[0] for p in pieces] == [row] * 3
        assert [(p[3] >> 16) - 1 for p in pieces] == [3 * j, 3 * j + 1, 3 * j + 2]  # workspace slots
        got = [b for _, cnt, e0, _ in pieces for b in ix.indices[e0 : e0 + cnt].tolist()]
        assert got == mask.reshape(-1, 40)[row].nonzero().flatten().tolist()
        assert [p[3] & 0xFFFF for p in pieces] == [ix.indices[p[2]].item() for p in pieces]
        assert all(p[1] >= 3 for p in pieces)
    assert split_last_wave(base, words, 40)[1] is None  # one full wave
    assert split_last_wave(base, words, 8)[1] is None  # 40 = 5 x 8: no partial wave
    assert split_last_wave(base, words, 30)[2] == 3  # 10 left on 30 programs
    assert split_last_wave(base, words, 22)[1] is None  # 18 left on 22: s = 1
    from calibatt_kernels import split_merge

    waves, split_merge.MAX_WAVES = split_merge.MAX_WAVES, 2
    try:  # 3 whole waves: the last is too small a share of the call to be worth a merge
        assert split_last_wave(base, words, 12)[1] is None
    finally:
        split_merge.MAX_WAVES = waves
    for short in (6, 0):  # the last row (longest-first) 6 blocks of the others' 9, or empty: left whole
        uneven = mask.clone()
        uneven[0, 3, 9, :] = False
        uneven[0, 3, 9, :short] = True
        ix2 = ck.mask_to_index(uneven)
        w2 = index_words(ix2.indices)
        assert split_last_wave(tile_records(ix2.counts, ix2.offsets, w2, ix2.schedule), w2, 12)[1] is None


def test_every_block_sparse_kernel_is_counted_as_ours():
    """Strict generate and bench_compile count compilations of calibatt's kernels by name: a kernel missing
    from aot.OUR_KERNELS would compile during generate unnoticed."""
    from calibatt_cli.cache import aot

    names = {fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__ for fn in dispatch.attention_kernel_fns()}
    assert names <= aot.OUR_KERNELS, names - aot.OUR_KERNELS
    assert len(names) == (3 if any("_gl_" in n for n in names) else 1)
    from calibatt_kernels import split_merge

    assert split_merge.kernel_fn().fn.__name__ in aot.OUR_KERNELS  # the persistent kernel's last-wave merge


def test_candidates_per_architecture():
    hopper = dispatch.candidate_configs((9, 0), (128, 128), 128)
    ampere = dispatch.candidate_configs((8, 0), (128, 128), 128)
    # the measured best first: the Gluon kernels (persistent, then per tile), then the tl default
    assert hopper[:2] == [attn_gluon.GLUON_PERSISTENT, attn_gluon.GLUON_TILE]
    assert hopper[0].persistent and not hopper[1].persistent
    assert hopper[2] == KernelConfig(num_warps=8, num_stages=3)
    assert not any(c.backend == "gluon" for c in ampere)
    assert not any(c.backend == "gluon" for c in dispatch.candidate_configs((9, 0), (128, 128), 128, torch.float32))
    assert not any(c.backend == "gluon" for c in dispatch.candidate_configs((9, 0), (64, 64), 64))
    assert all(c.use_tma is None for c in hopper) and all(c.use_tma is False for c in ampere)
    hopper = hopper[2:]
    assert all(c.block_m in (None, 64) and c.block_n in (None, 64) for c in hopper)
    assert all(c.block_m is None and c.block_n is None for c in dispatch.candidate_configs((9, 0), (64, 64), 64))


def test_bad_target(small_config, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "compile", "--config", small_config, "--target", "gfx90a")
    assert_one_line_error(code, err, "not an architecture", "sm_90")


def _compile_one(counter_dir=None, strict=False):
    cfg = KernelConfig(kernel="tl_tile", num_warps=4, num_stages=2)
    sig, consts, attrs, opts = attn_tl.aot_source_args(cfg, torch.float16, (64, 64), 64, (9, 0))
    with aot.CompileCounter(strict=strict) as counter:
        triton.compile(
            ASTSource(attn_tl.kernel_fn(), sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts
        )
    return counter


@triton.jit
def _someone_elses_kernel(X):
    tl.store(X, tl.load(X) + 1)


def test_strict_counts_kernels_that_are_not_ours(tmp_path):
    """torch.compile's inductor kernels come from the cache's compiled blocks: one compiled at generate time is
    counted apart from ours, and strict mode refuses it too."""
    src = ASTSource(_someone_elses_kernel, {"X": "*fp32"}, {})
    with aot.kernel_cache(tmp_path / "triton"), aot.CompileCounter() as counter:
        triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert (counter.count, counter.others) == (0, 1)
    with aot.kernel_cache(tmp_path / "other"), pytest.raises(CacheError, match="compiled kernel _someone_elses_kernel"):
        with aot.CompileCounter(strict=True):
            triton.compile(src, target=GPUTarget("cuda", 90, 32))


def test_moved_cache_still_hits_and_strict_fails_on_a_miss(tmp_path):
    first = tmp_path / "a" / "triton"
    with aot.kernel_cache(first):
        with pytest.raises(CacheError, match="strict mode: Triton compiled kernel _block_sparse_fwd"):
            _compile_one(strict=True)  # an empty cache: the compile happens (and is stored), strict objects
        assert _compile_one().count == 0  # same folder: a hit
    grp = next(first.glob("*/__grp__*.json"))
    assert all("/" not in p for p in json.loads(grp.read_text())["child_paths"].values()), "paths stay relative"
    moved = tmp_path / "b" / "triton"
    shutil.copytree(first, moved)
    shutil.rmtree(tmp_path / "a")
    with aot.kernel_cache(moved):
        c = _compile_one()
    assert (c.count, c.hits) == (0, 1), c.compiled
    assert os.environ.get("TRITON_CACHE_DIR") != str(moved), "the setting ends with the block"


def test_relink_groups_stores_names(tmp_path):
    """Triton's stock manager (inductor's compile workers use it) writes absolute paths into group files: the
    cache stores names, which the relocatable manager looks up in the entry's own folder."""
    entry = tmp_path / "KEY"
    entry.mkdir()
    (entry / "k.cubin").write_bytes(b"x")
    grp = entry / "__grp__k.json"
    grp.write_text(json.dumps({"child_paths": {"k.cubin": "/old/place/KEY/k.cubin"}}))
    assert aot.relink_groups(tmp_path) == 1
    assert json.loads(grp.read_text())["child_paths"]["k.cubin"] == "k.cubin"
    assert aot.relink_groups(tmp_path) == 0


@pytest.fixture
def compiled(small_config):
    cfg = load_config(small_config)
    res = calibrate(cfg)
    compile_cache(cfg)
    return cfg, res


def _edit_manifest(cfg, fn):
    path = Path(cfg.compile.cache_dir) / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_cache_for_another_gpu_triton_or_bundle_is_refused(compiled):
    cfg, res = compiled
    load_cache(cfg)
    _edit_manifest(cfg, lambda m: m["versions"].update(triton="3.0.0"))
    with pytest.raises(CacheError, match=r"triton 3\.0\.0, this run has triton .*calibatt compile --recompile"):
        load_cache(cfg)
    compile_cache(cfg, recompile=True)
    _edit_manifest(cfg, lambda m: m["device"].update(type="cuda", name="NVIDIA H100", capability="sm_90", sm_count=132))
    with pytest.raises(
        CacheError, match=r"compiled for NVIDIA H100 \(sm_90, 132 SMs\).*device type differs.*--recompile"
    ):
        load_cache(cfg)
    # the card's SM count alone (tuned configs and persistent grids depend on it), calibatt's version, the
    # kernels' sources: each named
    for edit, named in (
        (lambda m: m["device"].update(sm_count=1), "device sm_count differs"),
        (lambda m: m["device"].update(name="cpu2"), "device name differs"),
        (lambda m: m["versions"].update(calibatt="0.0.1"), "calibatt 0.0.1, this run has calibatt"),
        (lambda m: m["versions"].update(kernels_source="0" * 16), "the kernels' source hash 0000000000000000"),
        (lambda m: m["versions"].update(torch="2.0.0"), "torch 2.0.0, this run has torch"),
    ):
        compile_cache(cfg, recompile=True)
        _edit_manifest(cfg, edit)
        with pytest.raises(CacheError, match=named):
            load_cache(cfg)
        assert not compile_cache(cfg).reused, "compile rebuilds a cache made for another card or software"
        load_cache(cfg)
    compile_cache(cfg, recompile=True)
    masks = res.bundle.masks.clone()
    masks[..., 0, :] = ~masks[..., 0, :]
    save_bundle(res.path, masks, {k: v for k, v in res.bundle.meta.items() if k != "content_hash"})
    with pytest.raises(CacheError, match=r"compiled from bundle .*calibatt compile --recompile"):
        load_cache(cfg)
    compile_cache(cfg, recompile=True)
    _edit_manifest(cfg, lambda m: m["kernels"].update(triton_files=3))
    with pytest.raises(CacheError, match=r"should hold 3 compiled kernels in triton/, it holds 0"):
        load_cache(cfg)


def test_manifest_counts_the_index_bytes(compiled):
    cfg, res = compiled
    m = json.loads((Path(cfg.compile.cache_dir) / "manifest.json").read_text())
    masks = res.bundle.masks
    nb, nl, h, mq, _ = masks.shape
    # per (bucket, layer): int32 counts, offsets and schedule per row, an int16 id per kept block, the ids
    # padded to a multiple of 8 (16 bytes; at least 8, as the kernel argument is never empty)
    kept = masks.flatten(2).sum(-1).flatten().tolist()
    want = nb * nl * 3 * h * mq * 4 + sum(max(-(-k // 8) * 8, 8) for k in kept) * 2
    assert m["index_bytes"] == want


def test_plan_carries_the_chosen_config(compiled, monkeypatch):
    cfg, _ = compiled
    chosen = KernelConfig(kernel="tl_tile", block_n=16, num_warps=4, num_stages=2)

    def put(m):
        for g in m["groups"]:
            if (g["bucket"], g["layer"]) == (0, 1):
                g["config"] = chosen.__dict__

    _edit_manifest(cfg, put)
    plan, _ = load_cache(cfg)
    assert plan.configs == {(0, 1): chosen}
    seen = []
    import calibatt_kernels as ck

    real = ck.block_sparse_attention_indexed
    monkeypatch.setattr(
        ck.dispatch, "block_sparse_attention_indexed", lambda *a, **kw: seen.append(kw["config"]) or real(*a, **kw)
    )
    ctl = AttentionController("sparse", plan=plan)
    ctl.step = 1  # a sparse step (step 0 is the dense warm-up)
    q = torch.randn(1, plan.index[(0, 1)].counts.shape[1], 192, 64)
    ctl.attend(1, q, q, q)
    ctl.attend(0, q, q, q)
    assert seen == [chosen, None]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_two_compiles_at_once_then_generate(small_config, tmp_path):
    cli = [sys.executable, "-m", "calibatt_cli"]
    r = subprocess.run([*cli, "calibrate", "--config", str(small_config)], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    procs = [
        subprocess.Popen(
            [*cli, "compile", "--config", str(small_config), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for flags in ([], ["--recompile"])
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    out = tmp_path / "out"
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert left == [os.readlink(out / "cache")], (
        f"one versioned folder, the cache's; no temp, old or lock files: {left}"
    )
    assert not (out / "cache.lock").exists(), "the lock file is removed by its last holder"
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["manifest.json", "plan.safetensors", "triton"]
    r = subprocess.run(
        [*cli, "generate", PROMPT, "--config", str(small_config), "--strict", "--json"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["compilations"] == 0 and 0 < line["mean_density"] <= 1
    assert (
        load_bundle(out / "bundle.safetensors").content_hash
        == json.loads((out / "cache" / "manifest.json").read_text())["bundle"]["content_hash"]
    )
