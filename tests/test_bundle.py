import json

import pytest
import torch
from safetensors.torch import save_file

from calibatt_cli.bundle import check_bundle_matches, load_bundle, save_bundle
from calibatt_cli.errors import BundleError


def _meta():
    return {
        "model": {"name": "tiny", "id": "builtin:tiny", "hash": "abc"},
        "grid": {"tokens": [3, 8, 8]},
        "block_size": 32,
        "steps": 4,
        "step_buckets": [-1, 0, 1, 1],
        "epsilon": 0.001,
        "prompts": ["a red circle"],
        "entries": {"density": [], "retained_mass": []},
    }


def _masks():
    return torch.rand(2, 3, 2, 6, 6) < 0.5


def test_round_trip_and_hash(tmp_path):
    masks = _masks()
    saved = save_bundle(tmp_path / "b.safetensors", masks, _meta())
    loaded = load_bundle(tmp_path / "b.safetensors")
    assert torch.equal(loaded.masks, masks)
    assert loaded.meta == saved.meta
    assert len(loaded.content_hash) == 64
    # same content -> same hash; different masks -> different hash
    again = save_bundle(tmp_path / "c.safetensors", masks, _meta())
    assert again.content_hash == saved.content_hash
    other = masks.clone()
    other[0, 0, 0, 0, 0] = ~other[0, 0, 0, 0, 0]
    assert save_bundle(tmp_path / "d.safetensors", other, _meta()).content_hash != saved.content_hash
    assert not list(tmp_path.glob(".*")), "no temp files left behind"


def test_truncated_bundle_is_refused(tmp_path):
    p = tmp_path / "b.safetensors"
    save_bundle(p, _masks(), _meta())
    data = p.read_bytes()
    for cut in (5, len(data) // 2, len(data) - 3):
        p.write_bytes(data[:cut])
        with pytest.raises(BundleError, match="corrupt or truncated"):
            load_bundle(p)


def test_edited_bundle_fails_hash(tmp_path):
    p = tmp_path / "b.safetensors"
    save_bundle(p, _masks(), _meta())
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # flip mask bits in the tensor payload
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="content-hash"):
        load_bundle(p)
    # edited metadata (same length, valid JSON) also fails the hash
    save_bundle(p, _masks(), _meta())
    data = p.read_bytes().replace(b"0.001", b"0.002")
    assert data != p.read_bytes()
    p.write_bytes(data)
    with pytest.raises(BundleError, match="content-hash"):
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


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_hash": "xyz"}, "calibrated for model 'tiny' (hash abc)"),
        ({"grid": [3, 8, 16]}, "token grid [3, 8, 8]"),
        ({"steps": 10}, "calibrated for 4 steps, but generate.steps is 10"),
        ({"block_size": 64}, "block size 32"),
        ({"layers": 5}, "3 layers x 2 heads"),
    ],
)
def test_mismatch_names_the_difference(tmp_path, change, needle):
    b = save_bundle(tmp_path / "b.safetensors", _masks(), _meta())
    args = dict(
        where="bundle 'b'",
        model_name="tiny",
        model_hash="abc",
        grid=[3, 8, 8],
        steps=4,
        block_size=32,
        layers=3,
        heads=2,
    )
    check_bundle_matches(b, **args)
    args.update(change)
    with pytest.raises(BundleError) as e:
        check_bundle_matches(b, **args)
    assert needle in str(e.value) and "calibatt calibrate" in str(e.value)


def test_bundle_is_not_pickle(tmp_path):
    p = tmp_path / "b.safetensors"
    save_bundle(p, _masks(), _meta())
    header_len = int.from_bytes(p.read_bytes()[:8], "little")
    header = json.loads(p.read_bytes()[8 : 8 + header_len])
    assert set(header) == {"__metadata__", "masks_packed"}
    assert header["masks_packed"]["dtype"] == "U8"
