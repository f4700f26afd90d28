import json
import logging
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

import calibatt_cli.bundle as bundle_mod
from calibatt_cli.bundle import check_bundle_matches, forced_record, load_bundle, save_bundle
from calibatt_cli.calibrate import bundle_meta
from calibatt_cli.config import load_config
from calibatt_cli.errors import BundleError, ModelError
from calibatt_cli.models import fingerprint, model_identity
from calibatt_cli.models import tiny as tiny_family


def _cfg(small_config, *overrides):
    return load_config(small_config, list(overrides))


def _masks(cfg, layers=None):
    ident = model_identity(cfg)
    gen = torch.Generator().manual_seed(0)
    return torch.rand(2, layers or ident.layers, ident.heads, 6, 6, generator=gen) < 0.5


def _full_meta(cfg, masks):
    """What calibrate writes for these masks (bundle_meta plus the measured figures)."""
    density = masks.double().mean(dim=(-1, -2))
    return dict(
        bundle_meta(cfg, ["a red circle"]),
        samples_per_bucket=[4, 2],
        entries={"density": density.tolist(), "retained_mass": torch.ones_like(density).tolist()},
        summary={"density": float(density.mean()), "retained_mass": 1.0},
    )


@pytest.fixture
def saved(small_config, tmp_path):
    """(config, path, bundle) of a bundle made with the small config."""
    cfg = _cfg(small_config)
    masks = _masks(cfg)
    path = tmp_path / "b.safetensors"
    return cfg, path, save_bundle(path, masks, _full_meta(cfg, masks))


def test_round_trip_and_hash(saved, tmp_path):
    cfg, path, b = saved
    loaded = load_bundle(path)
    assert torch.equal(loaded.masks, b.masks)
    assert loaded.meta == b.meta
    assert len(loaded.content_hash) == 64
    # same content -> same hash; different masks -> different hash
    meta = _full_meta(cfg, b.masks)
    assert save_bundle(tmp_path / "c.safetensors", b.masks, meta).content_hash == b.content_hash
    other = b.masks.clone()
    other[0, 0, 0, 0, 0] = ~other[0, 0, 0, 0, 0]
    assert save_bundle(tmp_path / "d.safetensors", other, meta).content_hash != b.content_hash
    assert not list(tmp_path.glob(".*")), "no temp files left behind"


def test_truncated_bundle_is_refused(saved):
    _, p, _ = saved
    data = p.read_bytes()
    for cut in (5, len(data) // 2, len(data) - 3):
        p.write_bytes(data[:cut])
        with pytest.raises(BundleError, match="corrupt or truncated"):
            load_bundle(p)


def test_header_bomb_is_refused_before_parsing(saved, monkeypatch):
    _, p, _ = saved
    data = p.read_bytes()
    p.write_bytes((1 << 62).to_bytes(8, "little") + data[8:])

    def must_not_open(*a, **k):
        raise AssertionError("safetensors was asked to parse a header of 2**62 bytes")

    monkeypatch.setattr(bundle_mod, "safe_open", must_not_open)
    with pytest.raises(BundleError, match=f"header length {1 << 62}"):
        load_bundle(p)


def test_edited_bundle_fails_hash(saved):
    cfg, p, b = saved
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # flip mask bits in the tensor payload
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="content-hash"):
        load_bundle(p)
    # edited metadata (same length, valid JSON) also fails the hash
    save_bundle(p, b.masks, _full_meta(cfg, b.masks))
    data = p.read_bytes().replace(b'guidance\\": 5.0', b'guidance\\": 4.0')
    assert data != p.read_bytes()
    p.write_bytes(data)
    with pytest.raises(BundleError, match="content-hash"):
        load_bundle(p)


def test_well_typed_but_inconsistent_metadata_is_refused(saved):
    """A writer that recomputes the hash (another tool, a bug) still cannot hand over metadata the code
    that reads a bundle would trip on."""
    cfg, p, b = saved
    for edit, needle in (
        (lambda m: m["sampling"].update(guidance="5"), "'sampling.guidance' should be a number"),
        (lambda m: m.update(step_buckets=[-1, 0, 0, 5]), "step_buckets"),
        (lambda m: m["entries"].update(density=[]), "entries.density"),
        (lambda m: m.pop("model"), "'model' is missing"),
    ):
        meta = json.loads(json.dumps(b.meta))
        edit(meta)
        save_bundle(p, b.masks, {k: v for k, v in meta.items() if k != "content_hash"})
        with pytest.raises(BundleError, match="inconsistent metadata") as e:
            load_bundle(p)
        assert needle in str(e.value)


def test_bundle_of_an_older_schema_asks_to_recalibrate(saved, monkeypatch):
    """Bundles written before the identity covered sampling settings and weights' content are refused."""
    cfg, p, b = saved
    monkeypatch.setattr(bundle_mod, "SCHEMA_VERSION", 1)
    save_bundle(p, b.masks, _full_meta(cfg, b.masks))
    monkeypatch.undo()
    with pytest.raises(BundleError, match="schema version 1, this calibatt reads 2; re-run `calibatt calibrate`"):
        load_bundle(p)


def test_other_files_are_refused(tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(BundleError, match="not a calibatt mask bundle"):
        load_bundle(p)
    p.write_text("hello")
    with pytest.raises(BundleError, match="corrupt or truncated"):
        load_bundle(p)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "missing.safetensors")


# (config override, the field the error names, the bundle's value, the config's, whether --force may override)
FIELDS = [
    ("generate.guidance=4.0", "generate.guidance", "5.0", "4.0", True),
    ("generate.flow_shift=5.0", "generate.flow_shift", "3.0", "5.0", True),
    ('generate.negative_prompt="blurry, static"', "generate.negative_prompt", '""', '"blurry, static"', True),
    ("model.seed=1", "model", "'tiny-random' (hash ", "'tiny-random' (hash ", True),
    ("generate.steps=5", "generate.steps", "4", "5", False),
    ("video.height=64", "token grid", "[3, 8, 8]", "[3, 16, 8]", False),
]


@pytest.mark.parametrize("override, field, was, now, forceable", FIELDS)
def test_each_identity_field_is_checked(saved, override, field, was, now, forceable):
    cfg, _, b = saved
    assert check_bundle_matches(b, cfg, where="bundle 'b'") == []
    with pytest.raises(BundleError) as e:
        check_bundle_matches(b, _cfg(cfg.source, override), where="bundle 'b'")
    msg = str(e.value)
    assert f"was calibrated with {field}={was}" in msg and f"this config gives {now}" in msg, msg
    assert "calibatt calibrate" in msg and "\n" not in msg
    assert ("--force" in msg) == forceable


def test_scheduler_is_checked(saved, monkeypatch):
    cfg, _, b = saved
    monkeypatch.setattr(tiny_family, "SCHEDULER", "UniPCMultistepScheduler")
    with pytest.raises(BundleError, match='with scheduler="FlowMatchEulerDiscreteScheduler", this config gives "UniP'):
        check_bundle_matches(b, cfg, where="bundle 'b'")


def test_shape_mismatches_are_refused(saved, small_config, tmp_path):
    cfg, _, b = saved
    with pytest.raises(BundleError, match="block size 32, but calibration.block_size is 64"):
        check_bundle_matches(b, _cfg(small_config, "calibration.block_size=64"), where="b")
    masks = _masks(cfg, layers=model_identity(cfg).layers + 1)
    other = save_bundle(tmp_path / "l.safetensors", masks, _full_meta(cfg, masks))
    with pytest.raises(BundleError, match="has masks for"):
        check_bundle_matches(other, _cfg(small_config, "compile.force=true"), where="b")


def test_force_overrides_and_records(saved, small_config, caplog):
    _, _, b = saved
    cfg = _cfg(small_config, "generate.guidance=4.0", "generate.flow_shift=5.0", "compile.force=true")
    with caplog.at_level(logging.WARNING):
        forced = check_bundle_matches(b, cfg, where="bundle 'b'")
    assert forced == [
        {"field": "generate.guidance", "was": "5.0", "now": "4.0"},
        {"field": "generate.flow_shift", "was": "3.0", "now": "5.0"},
    ]
    assert forced_record(b.meta, _cfg(small_config, "generate.guidance=4.0")) == []  # recorded under --force only
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all(w.startswith("warning: --force: bundle 'b' was calibrated with") for w in warned)
    # without --force the first difference is named, and the count of the others
    with pytest.raises(BundleError, match=r"generate.guidance=5.0, this config gives 4.0 \(and 1 more\)"):
        check_bundle_matches(b, _cfg(small_config, "generate.guidance=4.0", "generate.flow_shift=5.0"), where="b")
    # a difference that makes the masks inapplicable is refused under --force too
    with pytest.raises(BundleError, match="generate.steps=4"):
        check_bundle_matches(b, _cfg(small_config, "generate.steps=5", "compile.force=true"), where="b")


def test_cli_force_through_compile_and_generate(small_config, tmp_path, monkeypatch, capsys, caplog):
    """The warning line goes through logging (the CLI prints WARNING records as they are; under pytest they
    land in caplog)."""
    from test_cli import PROMPT, assert_one_line_error, run_cli

    def warned(prefix):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
        caplog.clear()
        return lines

    cfg = _cfg(small_config)
    masks = _masks(cfg)
    save_bundle(cfg.compile.bundle, masks, _full_meta(cfg, masks))  # what `calibrate` writes, without the run
    other = ("--config", small_config, "--set", "generate.guidance=4.0")
    code, _, err = run_cli(monkeypatch, capsys, "compile", *other)
    assert_one_line_error(code, err, "generate.guidance=5.0", "4.0", "--force")
    caplog.clear()
    code, _, err = run_cli(monkeypatch, capsys, "compile", *other, "--force")
    assert code == 0, err
    assert len(warned("warning: --force: bundle")) == 1
    manifest = json.loads((tmp_path / "out" / "cache" / "manifest.json").read_text())
    assert manifest["forced"] == [{"field": "generate.guidance", "was": "5.0", "now": "4.0"}]
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, *other, "--json")
    assert_one_line_error(code, err, "cache", "built with generate.guidance=5.0", "--force")
    caplog.clear()
    code, out, err = run_cli(monkeypatch, capsys, "generate", PROMPT, *other, "--json", "--force")
    assert code == 0, err
    assert len(warned("warning: --force: cache")) == 1
    line = json.loads(out.strip().splitlines()[-1])
    assert line["forced"] == [{"field": "generate.guidance", "was": "5.0", "now": "4.0"}]


def test_bundle_is_not_pickle(saved):
    _, p, _ = saved
    header_len = int.from_bytes(p.read_bytes()[:8], "little")
    header = json.loads(p.read_bytes()[8 : 8 + header_len])
    assert set(header) == {"__metadata__", "masks_packed"}
    assert header["masks_packed"]["dtype"] == "U8"


# --- the weights' content identity (models/fingerprint.py) -------------------------------------------------


def _weights(path, seed, tensors=4, numel=4096):
    gen = torch.Generator().manual_seed(seed)
    save_file({f"blocks.{i}.weight": torch.randn(numel, generator=gen) for i in range(tensors)}, str(path))
    return path


@pytest.fixture(params=["whole", "sampled"])
def probing(request, monkeypatch):
    """Both ways of fingerprinting: small files whole, and large ones by header and probes (made to apply to
    a small file by lowering the thresholds)."""
    if request.param == "sampled":
        monkeypatch.setattr(fingerprint, "WHOLE_FILE", 1024)
        monkeypatch.setattr(fingerprint, "CHUNK", 256)
        monkeypatch.setattr(fingerprint, "SPREAD", 4)
    fingerprint._cached.cache_clear()
    yield request.param
    fingerprint._cached.cache_clear()


def test_same_size_and_names_but_other_content_differ(tmp_path, probing):
    a, b = _weights(tmp_path / "a.safetensors", 0), _weights(tmp_path / "b.safetensors", 1)
    assert a.stat().st_size == b.stat().st_size
    assert a.read_bytes()[:100] == b.read_bytes()[:100]  # same header start: names, dtypes, shapes
    assert fingerprint.file_fingerprint(a) != fingerprint.file_fingerprint(b)
    copy = shutil.copy(a, tmp_path / "copy.safetensors")
    assert fingerprint.file_fingerprint(copy) == fingerprint.file_fingerprint(a)


def test_a_fine_tune_of_one_tensor_is_seen(tmp_path, probing):
    """Every tensor is probed: a fine-tune that changed only one layer still changes the fingerprint."""
    a = _weights(tmp_path / "a.safetensors", 0, tensors=16)
    from safetensors.torch import load_file

    state = load_file(str(a))
    state["blocks.11.weight"] = state["blocks.11.weight"] + 1e-3
    b = tmp_path / "b.safetensors"
    save_file(state, str(b))
    assert fingerprint.file_fingerprint(a) != fingerprint.file_fingerprint(b)


def test_fingerprint_refuses_a_header_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "WHOLE_FILE", 16)
    fingerprint._cached.cache_clear()
    p = _weights(tmp_path / "a.safetensors", 0)
    p.write_bytes((1 << 60).to_bytes(8, "little") + p.read_bytes()[8:])
    with pytest.raises(ModelError, match=f"header length {1 << 60}"):
        fingerprint.file_fingerprint(p)
    fingerprint._cached.cache_clear()


@pytest.fixture
def fingerprint_memo(tmp_path, monkeypatch):
    """Fingerprints remembered under a private cache folder (yields it); a file counts as settled 50 ms after
    its last change rather than 2 s, so that the tests need not wait."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0.05)
    fingerprint._cached.cache_clear()
    yield tmp_path / "xdg" / "calibatt" / "weight-fingerprints"
    fingerprint._cached.cache_clear()


def _settled_weights(path, seed):
    _weights(path, seed)
    time.sleep(0.1)  # past RACY_SECONDS: this file's fingerprint may be remembered
    return path


def _new_process(monkeypatch=None):
    """Forget this process's fingerprints; with monkeypatch, also make any hashing an error."""
    fingerprint._cached.cache_clear()
    if monkeypatch is not None:

        def hashed(*args):
            raise AssertionError(f"the file was hashed again: {args}")

        hashed.cache_clear = lambda: None  # (the fixture's teardown clears the cache first)
        monkeypatch.setattr(fingerprint, "_cached", hashed)


def test_a_settled_files_fingerprint_is_remembered_across_runs(tmp_path, fingerprint_memo, monkeypatch):
    a = _settled_weights(tmp_path / "a.safetensors", 0)
    first = fingerprint.file_fingerprint(a)
    assert len(list(fingerprint_memo.iterdir())) == 1
    _new_process(monkeypatch)
    assert fingerprint.file_fingerprint(a) == first


def test_a_file_changed_in_place_is_hashed_again(tmp_path, fingerprint_memo):
    """Same size, same inode, the modification time put back: the change time still tells."""
    a = _settled_weights(tmp_path / "a.safetensors", 0)
    first = fingerprint.file_fingerprint(a)
    st = a.stat()
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(a, "r+b") as f:
        f.write(data)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a.stat().st_size, a.stat().st_mtime_ns, a.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    _new_process()
    assert fingerprint.file_fingerprint(a) != first


def test_a_file_changed_just_before_hashing_is_not_remembered(tmp_path, fingerprint_memo, monkeypatch):
    """Its times may not move if it is written again within the file system's clock tick."""
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 3600.0)
    a = _settled_weights(tmp_path / "a.safetensors", 0)
    fingerprint.file_fingerprint(a)
    assert not fingerprint_memo.exists() or not list(fingerprint_memo.iterdir())


def test_a_remembered_fingerprint_serves_its_method_alone(tmp_path, fingerprint_memo, monkeypatch):
    """Another WHOLE_FILE (CHUNK, SPREAD) is another method: the memo of one never answers for the other."""
    a = _settled_weights(tmp_path / "a.safetensors", 0)
    whole = fingerprint.file_fingerprint(a)
    for name, value in (("WHOLE_FILE", 1024), ("CHUNK", 256), ("SPREAD", 4)):
        monkeypatch.setattr(fingerprint, name, value)
    _new_process()
    sampled = fingerprint.file_fingerprint(a)
    assert sampled != whole
    _new_process(monkeypatch)
    assert fingerprint.file_fingerprint(a) == sampled  # remembered too, under its own name


def test_tiny_model_identity_follows_its_weights_content(tmp_path, monkeypatch, small_config):
    cfg = _cfg(small_config, "model.name=tiny")
    shipped = model_identity(cfg).model_hash
    data = bytearray(tiny_family.WEIGHTS.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    edited = tmp_path / "tiny.safetensors"
    edited.write_bytes(bytes(data))
    monkeypatch.setattr(tiny_family, "WEIGHTS", edited)
    assert model_identity(cfg).model_hash != shipped


def test_wan_folder_identity_follows_the_weights_content(tmp_path):
    """Two Wan checkpoints of one architecture and one file layout (a base and a 'fine-tune') get different
    identities; a copy of one in another folder gets the same."""
    import wan_formats

    base = wan_formats.write_diffusers(wan_formats.tiny_wan_pipeline(seed=0), tmp_path / "base")
    tuned = wan_formats.write_diffusers(wan_formats.tiny_wan_pipeline(seed=1), tmp_path / "tuned")
    copy = shutil.copytree(base, tmp_path / "copy")
    files = sorted(p.relative_to(base) for p in base.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(tuned) for p in tuned.rglob("*.safetensors"))
    assert all((base / f).stat().st_size == (tuned / f).stat().st_size for f in files)

    def model_hash(path):
        return model_identity(
            load_config(None, ["model.name=wan2.1", f"model.path={path}", "video.frames=9"])
        ).model_hash

    assert model_hash(base) != model_hash(tuned)
    assert model_hash(copy) == model_hash(base)
