"""How long the weights' content fingerprint (calibatt_cli/models/fingerprint.py) takes on a large checkpoint.

Writes a synthetic safetensors file of --gb GB with Wan 2.1 14B's density of tensors (about 38 a GB: ~1,100
tensors in its 28.6 GB transformer), times the fingerprint with the file's pages dropped from the page cache
(cold, as after a reboot or a fresh download) and cached (warm), and, for scale, a full sha256 of the file.
The fingerprint's reads are per tensor and per spread probe, not per byte, so its time for 28 GB is the
measured time scaled by the tensor count; the full hash scales with the bytes. Deletes the file at the end.

    python bench/bench_fingerprint.py --gb 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import struct
import time
from datetime import date
from pathlib import Path

from calibatt_cli.models import fingerprint

WAN14B_GB = 28.6
WAN14B_TENSORS = 1100


def write_synthetic(path: Path, gb: float, tensors_per_gb: float) -> int:
    """A valid safetensors file of random-looking bytes; returns its tensor count."""
    n = max(1, round(gb * tensors_per_gb))
    each = int(gb * 1e9 / n) // 2 * 2  # bf16 elements: even bytes
    header, offset = {}, 0
    for i in range(n):
        header[f"blocks.{i // 27}.t{i % 27}.weight"] = {
            "dtype": "BF16",
            "shape": [each // 2],
            "data_offsets": [offset, offset + each],
        }
        offset += each
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = os.urandom(8 << 20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            k = min(left, len(block))
            f.write(block[:k])
            left -= k
        f.flush()
        os.fsync(f.fileno())
    return n


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fingerprint_once(path: Path) -> float:
    fingerprint._cached.cache_clear()
    t0 = time.perf_counter()
    fingerprint.file_fingerprint(path)
    return time.perf_counter() - t0


def full_sha256(path: Path) -> float:
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = Path(args.dir) / f"calibatt-fingerprint-bench-{os.getpid()}.safetensors"
    try:
        tensors = write_synthetic(path, args.gb, WAN14B_TENSORS / WAN14B_GB)
        size = path.stat().st_size
        cold, warm = [], []
        for _ in range(args.repeats):
            drop_cache(path)
            cold.append(fingerprint_once(path))
            warm.append(fingerprint_once(path))
        drop_cache(path)
        full = full_sha256(path)
    finally:
        path.unlink(missing_ok=True)
    probes = tensors + fingerprint.SPREAD
    scale = (WAN14B_TENSORS + fingerprint.SPREAD) / probes
    res = {
        "bench": "fingerprint",
        "date": date.today().isoformat(),
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "file": {"bytes": size, "tensors": tensors, "probes": probes, "chunk_bytes": fingerprint.CHUNK},
        "fingerprint_cold_s": cold,
        "fingerprint_warm_s": warm,
        "full_sha256_cold_s": full,
        "extrapolated_28gb": {
            "tensors": WAN14B_TENSORS,
            "fingerprint_cold_s": round(min(cold) * scale, 3),
            "full_sha256_cold_s": round(full * WAN14B_GB * 1e9 / size, 1),
            "bytes_read": (WAN14B_TENSORS + fingerprint.SPREAD) * fingerprint.CHUNK,
        },
        "note": "shared 2-core machine: absolute times are rough; the cold fingerprint is a few hundred "
        "seeks of 64 KiB and scales with the tensor count, the full hash with the bytes",
    }
    out = Path(args.out or f"bench/results/fingerprint-{date.today().isoformat()}.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"file: {size / 1e9:.2f} GB, {tensors} tensors -> {out}")
    print(f"{'':28s}{'this file':>12s}{'28.6 GB (Wan 14B)':>20s}")
    e = res["extrapolated_28gb"]
    print(f"{'fingerprint, cold cache':28s}{min(cold):>11.3f}s{e['fingerprint_cold_s']:>19.3f}s")
    print(f"{'fingerprint, warm cache':28s}{min(warm):>11.3f}s{'':>20s}")
    print(f"{'full sha256, cold cache':28s}{full:>11.3f}s{e['full_sha256_cold_s']:>19.1f}s")


if __name__ == "__main__":
    main()
