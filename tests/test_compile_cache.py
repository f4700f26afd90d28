"""The cache on the CPU: compiled blocks that `generate --strict` loads with zero inductor code generation (and
refuses without), the cache's shared/exclusive lock, a compile killed at every step, and the bundle check."""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli import assert_one_line_error, run_cli

from calibatt_cli.cache import build, load
from calibatt_cli.cache.build import compile_cache
from calibatt_cli.cache.load import cache_lock, lock_file, open_cache
from calibatt_cli.calibrate import calibrate
from calibatt_cli.config import cache_paths, load_config
from calibatt_cli.errors import CacheError
from calibatt_cli.generate import _compiled_blocks
from calibatt_cli.runtime import SparsePlan, plan_index, plan_tensors, record_tensors
from calibatt_kernels import attn_gluon

PROMPT = "a red circle moving left on a black background"


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    env.pop("TRITON_INTERPRET", None)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return env


def _generate_json(config, *sets, strict=True):
    args = [sys.executable, "-m", "calibatt_cli", "generate", PROMPT, "--config", str(config), "--json"]
    args += ["--strict"] if strict else []
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=600)


def _one_bucket(config: Path) -> Path:
    """The small config with one bucket, three steps and one prompt: two graphs (the dense warm-up, the bucket)."""
    text = config.read_text().replace("buckets: 2", "buckets: 1").replace("steps: 4", "steps: 3")
    config.write_text(text)
    (config.parent / "prompts.txt").write_text(PROMPT + "\n")
    return config


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    """One calibration of the one-bucket config, shared: each test gets its own copy (see calibrated)."""
    from conftest import SMALL_YAML

    tmp = tmp_path_factory.mktemp("bundle")
    (tmp / "out").mkdir()
    (tmp / "small.yaml").write_text(SMALL_YAML.format(prompts=tmp / "prompts.txt", out=tmp / "out"))
    return calibrate(load_config(_one_bucket(tmp / "small.yaml"))).path


@pytest.fixture
def calibrated(small_config, small_bundle):
    """The one-bucket config with its bundle in place (calibrated once per module)."""
    _one_bucket(small_config)
    shutil.copy(small_bundle, load_config(small_config).calibration.output)
    return small_config


def _edit_manifest(cfg, fn):
    path = cache_paths(cfg)[1] / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_strict_generate_runs_compiled_blocks_from_the_cache(calibrated):
    """`calibatt compile` with generate.compile=true builds the blocks (inductor generates code for one graph,
    which serves the dense warm-up and the bucket: the attention op reads the step when it runs); a fresh
    `generate --strict` process runs them compiled with zero code generation and zero C++ builds.
    The same cache with its compiled blocks emptied: strict fails at the first code generation."""
    one_bucket = calibrated
    cfg = load_config(one_bucket, ["generate.compile=true"])
    res = compile_cache(cfg)
    blocks = res.manifest["blocks"]
    assert blocks["step_kinds"] == [-1, 0] and blocks["graphs"] == 1, blocks
    assert blocks["builds"] > 0 and blocks["files"] > 0 and blocks["artifacts_bytes"] > 0, blocks
    assert res.manifest["compiled_blocks"] == {"enabled": True, "backend": "inductor"}

    t0 = time.perf_counter()
    r = _generate_json(one_bucket, "generate.compile=true")
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    cb = line["compiled_blocks"]
    assert cb["enabled"] and cb["from_cache"] and cb["fallback"] is None, cb
    assert (cb["inductor_codegen"], cb["builds"], cb["triton_other"], line["compilations"]) == (0, 0, 0, 0), cb
    assert line["cache_lock"] == "shared"
    print(f"compiled from the cache: {time.perf_counter() - t0:.1f} s, steps {line['step_seconds'][0]}")

    # the blocks emptied (as if compiled with nothing to keep): the same run must now generate code
    folder = cache_paths(cfg)[1].resolve()
    for p in sorted((folder / "blocks" / "inductor").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (folder / "blocks" / "artifacts.bin").write_bytes(b"")
    _edit_manifest(cfg, lambda m: m["blocks"].update(files=0))
    r = _generate_json(one_bucket, "generate.compile=true")
    assert r.returncode != 0
    assert "strict mode: inductor generated code for a compiled block" in r.stderr, r.stderr[-2000:]
    assert "calibatt compile --recompile" in r.stderr and "Traceback" not in r.stderr


def test_blocks_missing_from_the_cache(calibrated):
    """A cache built with the blocks eager: generate.compile=auto on a GPU falls back to eager and says so in
    the result; under --strict that fallback, and a JIT of generate.compile=true, are one-line errors."""
    cfg = load_config(calibrated)
    res = compile_cache(cfg)
    assert res.manifest["blocks"] is None and res.manifest["compiled_blocks"]["enabled"] is False
    gpu = replace(cfg, model=replace(cfg.model, device="cuda"))  # only what `auto` means is looked at
    with open_cache(cfg) as cache, contextlib.ExitStack() as stack:
        info, counter = _compiled_blocks(gpu, cache, stack)
        assert info["enabled"] is False and "holds no compiled blocks" in info["fallback"] and counter is None
        info, _ = _compiled_blocks(cfg, cache, stack)  # the CPU: auto is eager, no fallback
        assert info == {"enabled": False, "from_cache": False, "backend": "inductor", "fallback": None}
        strict_auto = replace(gpu, generate=replace(gpu.generate, strict=True))
        strict_true = replace(cfg, generate=replace(cfg.generate, strict=True, compile=True))
        for c in (strict_auto, strict_true):
            with pytest.raises(CacheError, match=r"strict mode: generate.compile=.* holds no compiled blocks"):
                _compiled_blocks(c, cache, stack)
    cache_dir = cache_paths(cfg)[1]
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert build._up_to_date(cache_dir, m)
    asked = dict(m, compiled_blocks={"enabled": True, "backend": "inductor"})
    assert not build._up_to_date(cache_dir, asked), "asking for compiled blocks rebuilds a cache without them"


def test_generate_json_reports_eager_blocks(calibrated, monkeypatch, capsys):
    cfg = load_config(calibrated)
    compile_cache(cfg)
    code, out, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", calibrated, "--json", "--strict")
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["compiled_blocks"]["enabled"] is False and line["compiled_blocks"]["fallback"] is None
    assert line["cache_lock"] == "shared"
    assert not lock_file(cache_paths(cfg)[1]).exists(), "the last holder removes the lock file"


def test_lock_is_shared_for_readers_and_exclusive_for_compile(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with cache_lock(cache, shared=True) as how:
        assert how == "shared"
        with cache_lock(cache, shared=True, timeout=0.2) as how2:  # a second generate reads alongside
            assert how2 == "shared"
        with pytest.raises(CacheError, match=r"locked by a running generate or compile \(waited 0 s"):
            with cache_lock(cache, shared=False, timeout=0.2):
                pass
        assert lock_file(cache).exists()
    assert not lock_file(cache).exists(), "lock files are cleaned up"
    with cache_lock(cache, shared=False) as how:
        assert how == "exclusive"
        with pytest.raises(CacheError, match=r"cache '.*' is locked by a running compile"):
            with cache_lock(cache, shared=True, timeout=0.2):
                pass
    assert not lock_file(cache).exists()

    def refuse(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(load.os, "open", refuse)
    with cache_lock(cache, shared=True) as how:  # a read-only location is read without a lock, and says so
        assert how == "none (read-only location)"
    with pytest.raises(CacheError, match="cannot create the cache lock"), cache_lock(cache, shared=False):
        pass


def test_waiting_lock_follows_the_file(tmp_path):
    """The last holder removes the lock file: a process that opened it before, and waits, must lock the file
    that is there once it gets its turn, or it and a newcomer would each hold a lock on a different file."""
    cache = tmp_path / "cache"
    path = lock_file(cache)
    inside, leave = threading.Event(), threading.Event()

    def waiter():
        with cache_lock(cache, shared=False, timeout=20):
            inside.set()
            leave.wait(20)

    t = threading.Thread(target=waiter)
    with cache_lock(cache, shared=False):
        t.start()
        time.sleep(0.5)  # the waiter has opened the file and polls for its lock
        assert not inside.is_set()
    assert inside.wait(20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)  # a newcomer: the file at the path must be the waiter's
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        leave.set()
        t.join()
    assert not path.exists()


STEPS = ("locked", "planned", "written", "linked", "swapped")


def test_compile_killed_at_each_step_leaves_a_cache(calibrated):
    """A compile killed (os._exit: no cleanup runs) at each of its steps leaves the old cache or the new one
    at the cache path, never none; the next compile removes the leftovers."""
    from calibatt_cli.bundle import load_bundle, save_bundle

    cfg = load_config(calibrated)
    compile_cache(cfg)
    bundle_path, cache_dir = cache_paths(cfg)
    old = json.loads((cache_dir / "manifest.json").read_text())["bundle"]["content_hash"]
    bundle = load_bundle(bundle_path)
    masks = bundle.masks.clone()
    masks[..., 0, 1:] = False  # another bundle: a real rebuild
    save_bundle(bundle_path, masks, {k: v for k, v in bundle.meta.items() if k != "content_hash"})
    for step in STEPS:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child dies at the hook
            os.environ[build.KILL_AT] = step
            try:
                compile_cache(cfg, recompile=True)
            finally:
                os._exit(3)  # the hook was not reached
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 9, f"{step}: the hook did not fire"
        manifest = json.loads((cache_dir / "manifest.json").read_text())  # through the link, whole
        load.read_plan(cache_dir, manifest)
        have = manifest["bundle"]["content_hash"]
        if step in ("locked", "planned", "written", "linked"):
            assert have == old, f"killed at {step}: the old cache stays"
        else:
            assert have != old, f"killed at {step}: the new cache is in place"
    compile_cache(cfg, recompile=True)
    parent = cache_dir.parent
    left = sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
    assert left == [os.readlink(cache_dir)], f"leftovers removed: {left}"


def load_cache_any(cfg):
    with open_cache(cfg) as c:
        return c.plan, c.manifest


def test_unreadable_bundle_is_an_error_a_missing_one_is_not(calibrated, monkeypatch, capsys):
    cfg = load_config(calibrated)
    compile_cache(cfg)
    path = cache_paths(cfg)[0]
    path.write_bytes(path.read_bytes()[:40])
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", calibrated)
    assert_one_line_error(code, err, "cannot be read", "compile.bundle")
    path.unlink()  # the cache alone serves: moved to another machine without its bundle
    load_cache_any(cfg)


def test_bundle_and_cache_resolve_against_one_base(calibrated, tmp_path, monkeypatch):
    """A relative compile.bundle found beside the config puts a relative compile.cache_dir there too."""
    small_config = calibrated
    text = small_config.read_text()
    text = text.replace(f"bundle: {tmp_path}/out/", "bundle: out/").replace(
        f"cache_dir: {tmp_path}/out/", "cache_dir: out/"
    )
    small_config.write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(small_config)
    bundle, cache = cache_paths(cfg)
    assert bundle.resolve() == (tmp_path / "out" / "bundle.safetensors").resolve()
    assert cache.resolve().parent == (tmp_path / "out").resolve() and cache.name == "cache"
    res = compile_cache(cfg)
    assert res.cache_dir == cache and not Path("out").exists()
    load_cache_any(cfg)


def test_launch_records_stored_with_the_plan_come_back_with_its_index(tmp_path):
    """What `record_tensors` makes is saved with the plan's tensors, and `plan_index` and `SparsePlan.to` hand
    it to each (bucket, layer)'s index; a plan without them has none (its calls derive their own). The records
    are the Gluon kernel's, derived on the CPU for its config (the same ops as on a GPU, without the last-wave
    split, which needs a GPU's SM count: one group's split rows are a stand-in here)."""
    masks = torch.rand(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    tensors, groups = plan_tensors(masks)
    keys = [(g["bucket"], g["layer"]) for g in groups]
    cpu = torch.device("cpu")
    stored = record_tensors(plan_index(tensors, keys), {key: attn_gluon.GLUON_PERSISTENT for key in keys}, cpu)
    assert sorted(stored) == sorted(f"b{b}.l{layer}.records" for b, layer in keys)
    stored["b1.l0.split_rows"] = torch.tensor([0, 2], dtype=torch.int32)
    save_file({**tensors, **stored}, str(tmp_path / "plan.safetensors"))
    with safe_open(str(tmp_path / "plan.safetensors"), framework="pt") as f:
        back = {name: f.get_tensor(name) for name in f.keys()}
    plan = SparsePlan(4, [0, 1], plan_index(back, keys), torch.ones(2, 2, 1)).to(cpu)
    fresh = plan_index(tensors, keys)
    for key in keys:
        ix = plan.index[key]
        assert torch.equal(ix.records, attn_gluon.derive_records(fresh[key], cpu, True)[0]), key
        assert (ix.split_rows is not None) == (key == (1, 0)), key
    assert torch.equal(plan.index[(1, 0)].split_rows, stored["b1.l0.split_rows"])
    assert all(ix.records is None and ix.split_rows is None for ix in fresh.values())
