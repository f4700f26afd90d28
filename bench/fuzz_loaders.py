"""Fuzz the bundle and cache loaders: every mutated file must end in calibatt's own one-line error (or load),
never another exception, never a hang.

Builds one real bundle and one real cache (tiny-random, a small video, on the CPU), then for each case
mutates one of them -- truncation, flipped bytes, a huge or wrong header length, other dtypes and shapes in
the safetensors header, broken JSON in the metadata, fields of the wrong type or value with the content hash
recomputed (what a buggy writer or a hand edit produces), a manifest's fields replaced, dropped or
garbled -- and runs what a user's command runs: `load_bundle` then `check_bundle_matches` and the `inspect`
table, or `load_cache`. Case i is reproducible alone: `--only i` with the same --seed.

    python bench/fuzz_loaders.py --count 10000            # writes bench/results/fuzz-loaders-<date>.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from datetime import date
from pathlib import Path

import torch

from calibatt_cli.bundle import META_KEY, _content_hash, check_bundle_matches, load_bundle, save_bundle
from calibatt_cli.cache.build import compile_cache
from calibatt_cli.cache.load import load_cache
from calibatt_cli.calibrate import bundle_meta
from calibatt_cli.cli.render import density_table
from calibatt_cli.config import load_config
from calibatt_cli.errors import CalibattError
from calibatt_cli.models import model_identity

CONFIG = """\
model: {{name: tiny-random, seed: 0}}
video: {{height: 32, width: 32, frames: 5, fps: 8}}
calibration: {{epsilon: 0.001, buckets: 2, warmup_steps: 1, block_size: 32, output: {out}/bundle.safetensors}}
compile: {{bundle: {out}/bundle.safetensors, cache_dir: {out}/cache}}
generate: {{steps: 4, guidance: 5.0, output: {out}/video.mp4}}
"""
CASE_SECONDS = 20  # a case running longer counts as a hang
DTYPES = ["U8", "I8", "BOOL", "F16", "BF16", "U16", "I16", "F32", "I32", "U32", "F64", "I64", "F8_E4M3", "XX", ""]
ODD_VALUES = [
    None,
    True,
    0,
    -1,
    2**63,
    10**40,
    1.5,
    -1e308,
    "",
    "x" * 1000,
    [],
    [1, 2],
    [[]],
    {},
    {"a": 1},
    "NaN",
]


class Base:
    """The unmutated bundle and cache, and the config they were made for."""

    def __init__(self, root: Path):
        self.root = root
        (root / "work").mkdir()
        cfg_path = root / "fuzz.yaml"
        cfg_path.write_text(CONFIG.format(out=root / "work"))
        self.cfg = load_config(cfg_path)
        ident = model_identity(self.cfg)
        gen = torch.Generator().manual_seed(0)
        masks = torch.rand(2, ident.layers, ident.heads, 6, 6, generator=gen) < 0.5
        density = masks.double().mean(dim=(-1, -2))
        meta = dict(
            bundle_meta(self.cfg, ["a red circle"]),
            samples_per_bucket=[4, 2],
            entries={"density": density.tolist(), "retained_mass": torch.ones_like(density).tolist()},
            summary={"density": float(density.mean()), "retained_mass": 1.0},
        )
        self.bundle_path = root / "work" / "bundle.safetensors"
        self.bundle = save_bundle(self.bundle_path, masks, meta)
        compile_cache(self.cfg)
        self.bundle_bytes = self.bundle_path.read_bytes()
        self.manifest_bytes = (root / "work" / "cache" / "manifest.json").read_bytes()
        self.plan_bytes = (root / "work" / "cache" / "plan.safetensors").read_bytes()

    def restore(self) -> None:
        """Put back the files a case may have mutated."""
        cache = self.root / "work" / "cache"
        self.bundle_path.write_bytes(self.bundle_bytes)
        (cache / "manifest.json").write_bytes(self.manifest_bytes)
        (cache / "plan.safetensors").write_bytes(self.plan_bytes)


# --- byte-level mutations ---------------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    return bytes(out)


def flip_header(rng: random.Random, data: bytes) -> bytes:
    """Flip bytes in the safetensors header (names, dtypes, shapes, offsets, the metadata JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    out = bytearray(data)
    for _ in range(rng.choice([1, 2, 3])):
        i = 8 + rng.randrange(n)
        out[i] = rng.randrange(32, 127) if rng.random() < 0.5 else out[i] ^ (1 << rng.randrange(8))
    return bytes(out)


def header_length(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    value = rng.choice([2**64 - 1, 2**63, 2**40, 10**9, 100_000_001, len(data), len(data) - 7, n + 1, n - 1, 0, 1])
    return struct.pack("<Q", value) + data[8:]


def append_garbage(rng: random.Random, data: bytes) -> bytes:
    return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))


def random_bytes(rng: random.Random, data: bytes) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 8, 9, 100, 4096])))


def tensor_entry(rng: random.Random, data: bytes) -> bytes:
    """Another dtype, shape or offsets for one tensor, the bytes left as they are."""
    header, body = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    entry = header[rng.choice(names)]
    what = rng.randrange(4)
    if what == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif what == 1:
        shape = list(entry["shape"])
        if shape and rng.random() < 0.5:
            shape.reverse()
        elif shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, 2**31, 2**62, -1])
        else:
            shape = [1]
        entry["shape"] = shape
    elif what == 2:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 1], [begin + 1, end], [0, 2**62], [-1, end]])
    else:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(ODD_VALUES)
    return join_safetensors(header, body)


def _odd_value(rng: random.Random, value):
    if rng.random() < 0.15:  # deep nesting: a recursion bomb for naive JSON readers
        depth = rng.choice([100, 10_000, 100_000])
        return json.loads("[" * min(depth, 900) + "]" * min(depth, 900)) if depth < 1000 else "DEEP"
    if isinstance(value, int | float) and not isinstance(value, bool) and rng.random() < 0.5:
        return rng.choice([value + 1, -value, value * 1000, 0, float("nan"), float("inf")])
    return rng.choice(ODD_VALUES)


def _paths(obj, prefix=()):
    """Every path to a value in a JSON object (keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, (*prefix, i))


def mutate_json(rng: random.Random, obj) -> str:
    """The JSON text of obj with one value replaced, dropped, or an odd key added; "DEEP" becomes nesting
    too deep for Python's json module."""
    obj = json.loads(json.dumps(obj))
    path = rng.choice([p for p in _paths(obj) if p])
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    r = rng.random()
    if r < 0.2 and isinstance(parent, dict):
        del parent[key]
    elif r < 0.25 and isinstance(parent, list):
        parent.append(_odd_value(rng, None))
    else:
        parent[key] = _odd_value(rng, parent[key])
    text = json.dumps(obj)
    return text.replace('"DEEP"', "[" * 100_000 + "]" * 100_000)


def bundle_meta_fields(rng: random.Random, data: bytes) -> bytes:
    """A metadata field of the wrong type or value, the content hash recomputed to match."""
    header, body = split_safetensors(data)
    meta = json.loads(header["__metadata__"][META_KEY])
    text = mutate_json(rng, meta)
    if rng.random() < 0.8:
        try:
            edited = json.loads(text)
            offsets = header["masks_packed"]["data_offsets"]
            shape = header["masks_packed"]["shape"]
            packed = torch.frombuffer(bytearray(body[offsets[0] : offsets[1]]), dtype=torch.uint8).reshape(shape)
            if isinstance(edited, dict):
                edited["content_hash"] = _content_hash(edited, packed)
                text = json.dumps(edited)
        except (ValueError, TypeError, RecursionError):
            pass
    header["__metadata__"][META_KEY] = text
    return join_safetensors(header, body)


def bundle_meta_json(rng: random.Random, data: bytes) -> bytes:
    """Broken JSON in the metadata string (cut, or a character replaced)."""
    header, body = split_safetensors(data)
    text = header["__metadata__"][META_KEY]
    if rng.random() < 0.5:
        text = text[: rng.randrange(len(text))]
    else:
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(['"', "{", "]", ",", "\\", "\x00", "NaN"]) + text[i + 1 :]
    header["__metadata__"][META_KEY] = text
    if rng.random() < 0.2:
        header["__metadata__"] = rng.choice(ODD_VALUES)
    return join_safetensors(header, body)


def huge_header(rng: random.Random, data: bytes) -> bytes:
    """A header that really is large (padding, or a long metadata string), length field consistent."""
    header, body = split_safetensors(data)
    size = 101_000_000 if rng.random() < 0.02 else rng.choice([1 << 16, 1 << 20, 8 << 20])
    if rng.random() < 0.5:
        return join_safetensors(json.dumps(header) + " " * size, body)
    header.setdefault("__metadata__", {})["padding"] = "x" * size
    return join_safetensors(header, body)


BYTES_MUTATIONS = [truncate, flip, flip_header, header_length, append_garbage, random_bytes, tensor_entry]
BUNDLE_MUTATIONS = [*BYTES_MUTATIONS, bundle_meta_fields, bundle_meta_json, huge_header]


def manifest_text(rng: random.Random, data: bytes) -> bytes:
    text = data.decode()
    r = rng.random()
    if r < 0.4:
        return text[: rng.randrange(len(text))].encode()
    if r < 0.7:
        return flip(rng, data)
    i = rng.randrange(len(text))
    return (text[:i] + rng.choice(['"', "{", "}", "]", ",", ":", "null", "NaN", "-", "1e999"]) + text[i:]).encode()


def manifest_fields(rng: random.Random, data: bytes) -> bytes:
    return mutate_json(rng, json.loads(data)).encode()


MANIFEST_MUTATIONS = [manifest_text, manifest_fields, manifest_fields]  # fields: the larger space


# --- running a case -------------------------------------------------------------------------------------


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def _bundle_consumers(base: Base) -> None:
    b = load_bundle(base.bundle_path)
    with contextlib.suppress(CalibattError):  # a refusal is fine; what matters is how it fails
        check_bundle_matches(b, base.cfg, where="bundle")
    density_table(b)


def run_case(base: Base, seed: int, i: int) -> tuple[str, str, str]:
    """(target/mutation, outcome, detail): outcome 'loaded', 'error' (calibatt's, one line) or 'FAIL'."""
    rng = random.Random(seed * 1_000_003 + i)
    target = rng.choice(["bundle", "manifest", "plan"])
    base.restore()
    cache = base.bundle_path.parent / "cache"
    if target == "bundle":
        mutation = rng.choice(BUNDLE_MUTATIONS)
        base.bundle_path.write_bytes(mutation(rng, base.bundle_bytes))
        call = lambda: _bundle_consumers(base)  # noqa: E731
    elif target == "manifest":
        mutation = rng.choice(MANIFEST_MUTATIONS)
        (cache / "manifest.json").write_bytes(mutation(rng, base.manifest_bytes))
        call = lambda: load_cache(base.cfg)  # noqa: E731
    else:
        mutation = rng.choice(BYTES_MUTATIONS + [huge_header])
        (cache / "plan.safetensors").write_bytes(mutation(rng, base.plan_bytes))
        call = lambda: load_cache(base.cfg)  # noqa: E731
    name = f"{target}/{mutation.__name__}"
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        call()
        return name, "loaded", ""
    except CalibattError as e:
        if "\n" in str(e) or not str(e):
            return name, "FAIL", f"multi-line or empty error: {str(e)[:200]!r}"
        return name, "error", ""
    except Hang:
        return name, "FAIL", f"hang (> {CASE_SECONDS} s)"
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        return name, "FAIL", f"{type(e).__name__}: {str(e)[:200]} at {Path(where.filename).name}:{where.lineno}"
    finally:
        signal.alarm(0)


def fuzz(count: int, seed: int = 0, only: int | None = None, progress: bool = False) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calibatt-fuzz-") as tmp:
        base = Base(Path(tmp))
        outcomes: Counter = Counter()
        failures = []
        cases = [only] if only is not None else range(count)
        for n, i in enumerate(cases):
            name, outcome, detail = run_case(base, seed, i)
            outcomes[(name, outcome)] += 1
            if outcome == "FAIL":
                failures.append({"case": i, "mutation": name, "detail": detail})
            if progress and n and n % 500 == 0:
                print(f"{n} cases, {len(failures)} failures, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    by_mutation: dict = {}
    for (name, outcome), k in sorted(outcomes.items()):
        by_mutation.setdefault(name, {})[outcome] = k
    total = Counter()
    for (_, outcome), k in outcomes.items():
        total[outcome] += k
    return {
        "cases": len(cases),
        "seed": seed,
        "outcomes": dict(total),
        "by_mutation": by_mutation,
        "failures": failures,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, default=None, help="run case i alone (reproduce a failure)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = fuzz(args.count, args.seed, args.only, progress=True)
    res.update(bench="fuzz_loaders", date=date.today().isoformat(), command=" ".join(sys.argv))
    if args.only is None:
        out = Path(args.out or f"bench/results/fuzz-loaders-{date.today().isoformat()}.json")
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
    print(f"{'mutation':32s}{'loaded':>8s}{'error':>8s}{'FAIL':>6s}")
    for name, o in res["by_mutation"].items():
        print(f"{name:32s}{o.get('loaded', 0):>8d}{o.get('error', 0):>8d}{o.get('FAIL', 0):>6d}")
    print(f"{res['cases']} cases in {res['seconds']} s: {res['outcomes']}")
    for f in res["failures"][:20]:
        print(f"FAIL case {f['case']} {f['mutation']}: {f['detail']}")
    sys.exit(1 if res["failures"] else 0)


if __name__ == "__main__":
    main()
