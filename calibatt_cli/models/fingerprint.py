"""Content identity of weight files, fast on tens of GB: two fine-tunes of one size and layout differ.

A file up to WHOLE_FILE bytes is hashed whole. A larger safetensors file is hashed by its header (every
tensor's name, dtype, shape and offsets, and the metadata), one CHUNK from the middle of every tensor's data,
and SPREAD chunks evenly spaced over the whole data region; any other large file (.pth, .bin) by its size and
the evenly spaced chunks. Probing every tensor means a fine-tune that changed only some layers still hashes
differently; reading a chunk per tensor rather than the tensors whole keeps a 28 GB checkpoint to a few hundred
MB of reads (bench/bench_fingerprint.py measures it).

The fingerprint depends on the bytes only, never on the path or timestamps, so copies of a model agree.

Every command that names the model (calibrate, compile, generate) needs it, so a file's fingerprint is
remembered across runs: one small file per weights file under the user's cache folder, holding the fingerprint
and what `stat` said of the file when it was hashed (size, modification and change times, inode, device); it
serves only a file whose `stat` still says so. Any write to the file moves its change time
(which no user call can set back) and a file replaced by a rename has another inode, so a changed file is
hashed again. File systems stamp times from a coarse clock, so a file written again within a tick of the
hashing could keep its times: a file changed less than RACY_SECONDS before it is hashed is not remembered (what
git does for its index). A missing, unreadable or unwritable memo only means the file is hashed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path

from ..errors import ModelError
from ..util import sha256_hex, user_cache_dir, write_text_atomic

WHOLE_FILE = 64 << 20  # files up to this size are hashed whole
CHUNK = 64 << 10  # bytes read per probe
SPREAD = 64  # evenly spaced probes over a large file
# safetensors refuses headers over 100 MB itself; refusing first means a corrupt length field never makes us
# allocate or read that much
MAX_HEADER = 100_000_000
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
SCHEME = "fp1"  # recorded in every fingerprint: a change of the method changes every identity
RACY_SECONDS = 2.0  # a file changed this recently is hashed but not remembered (see the module's docstring)


def safetensors_header(f, size: int, path: Path) -> tuple[dict, int]:
    """(the parsed JSON header, the offset where the data starts) of an open safetensors file; a header
    length beyond the file or MAX_HEADER is refused before anything of that size is read."""
    bad = f"weights file '{path}' is not a valid safetensors file"
    fix = "it is truncated or corrupt: copy or download it again"
    head = os.pread(f.fileno(), 8, 0)
    if len(head) < 8:
        raise ModelError(f"{bad} ({size} bytes, shorter than a header); {fix}")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise ModelError(f"{bad} (header length {n} for a file of {size} bytes); {fix}")
    try:
        header = json.loads(os.pread(f.fileno(), n, 8))
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise ModelError(f"{bad} (its header is not a JSON object); {fix}") from None
    return header, 8 + n


def _tensor_probes(header: dict, start: int, size: int, path: Path) -> list[tuple[int, int]]:
    """(offset, length) of one CHUNK from the middle of each tensor's data."""
    probes = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"weights file '{path}': malformed header entry '{name}'; is it complete?") from None
        if not 0 <= begin <= end or start + end > size:
            raise ModelError(
                f"weights file '{path}': tensor '{name}' lies outside the file ({begin}..{end}); it is truncated "
                f"or corrupt: copy or download it again"
            )
        length = min(CHUNK, end - begin)
        probes.append((start + begin + (end - begin - length) // 2, length))
    return probes


def _spread_probes(start: int, size: int) -> list[tuple[int, int]]:
    """SPREAD chunks evenly spaced over [start, size), the first at the start and the last at the end."""
    span = size - start - CHUNK
    if span <= 0:
        return [(start, size - start)]
    return [(start + span * i // (SPREAD - 1), CHUNK) for i in range(SPREAD)]


@functools.lru_cache(maxsize=256)
def _cached(path: str, size: int, mtime_ns: int, inode: int) -> str:
    p = Path(path)
    h = hashlib.sha256(f"{SCHEME}:{size}:".encode())
    with open(p, "rb") as f:
        if size <= WHOLE_FILE:
            while block := f.read(8 << 20):
                h.update(block)
            return h.hexdigest()
        start, probes = 0, []
        if p.suffix == ".safetensors":
            header, start = safetensors_header(f, size, p)
            h.update(os.pread(f.fileno(), start, 0))
            probes = _tensor_probes(header, start, size, p)
        for offset, length in sorted(set(probes + _spread_probes(start, size))):
            h.update(struct.pack("<QQ", offset, length))
            h.update(os.pread(f.fileno(), length, offset))
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """The content fingerprint of one weights file (hex); cached per process, and remembered across runs
    (memo_file), while the file is unchanged."""
    p = Path(path)
    try:
        st = p.stat()
        resolved = str(p.resolve())
        memo, signature = memo_file(resolved), _signature(st)
        if memo is not None and (found := _read_memo(memo, signature)) is not None:
            return found
        digest = _cached(resolved, st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ModelError(f"cannot read weights file '{p}' ({why}); check model.path") from None
    if memo is not None and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_SECONDS * 1e9:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(memo, f"{signature} {digest}")
        except OSError:
            pass  # a read-only home: the next run hashes the file again, with the same result
    return digest


def memo_file(resolved: str) -> Path | None:
    """Where the fingerprint of the weights file at `resolved` is remembered (one memo per file, rewritten when
    the file changes); the name also holds the method's parameters, so a change of them never reads another
    method's fingerprint."""
    folder = user_cache_dir("weight-fingerprints")
    if folder is None:
        return None
    return folder / f"{sha256_hex(f'{SCHEME}:{WHOLE_FILE}:{CHUNK}:{SPREAD}:{resolved}')[:32]}.txt"


def _signature(st: os.stat_result) -> str:
    """What `stat` says of a file that any change of its content changes (see the module's docstring)."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def _read_memo(path: Path, signature: str) -> str | None:
    """The remembered fingerprint if the memo was written for a file with this signature."""
    try:
        text = path.read_text()
    except (OSError, ValueError):
        return None
    was, _, digest = text.partition(" ")
    return digest if was == signature and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def folder_fingerprint(root: str | Path, subdirs: tuple[str, ...] = ()) -> str:
    """The fingerprint of every weights file under `root` (or under its `subdirs`), by relative name: what a
    model folder's bundles are tied to."""
    root = Path(root)
    tops = [root / s for s in subdirs] if subdirs else [root]
    files = sorted(
        f for top in tops if top.is_dir() for f in top.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES
    )
    if not files:
        raise ModelError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under '{root}'; check model.path")
    h = hashlib.sha256(SCHEME.encode())
    for f in files:
        h.update(f"\n{f.relative_to(root).as_posix()}:{file_fingerprint(f)}".encode())
    return f"{SCHEME}:{h.hexdigest()}"
