"""Small helpers shared by the stages: atomic writes, hashing, paths."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import CalibattError

# The one rule for outputs: calibatt never creates a missing parent folder. A file goes into a folder that
# exists; an output that is a folder (a kernel cache, heatmaps, checkpoints, a report) is created if missing,
# that one level only. A typo in a path then fails at once, instead of scattering folders.


def check_output_path(path: Path, what: str) -> Path:
    """Fail early (before any work) if `path`'s folder is missing or not writable."""
    path = Path(path)
    _check_writable_folder(path.parent if str(path.parent) else Path("."), what)
    if path.is_dir():
        raise CalibattError(f"{what} path '{path}' is a folder; give a file name")
    return path


def check_output_dir(path: Path, what: str) -> Path:
    """Fail early if `path` cannot become an output folder: it is a folder (or a file) already, or its parent
    exists and is writable. Create it with `path.mkdir(exist_ok=True)` when writing: one level, no parents."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CalibattError(f"{what} folder '{path}' is a file; choose a folder path")
    _check_writable_folder(path if path.is_dir() else (path.parent if str(path.parent) else Path(".")), what)
    return path


def _check_writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise CalibattError(f"{what} folder '{folder}' does not exist; create it or choose another path")
    # Probe by creating a file: os.access says yes to root even on read-only mounts.
    try:
        fd, probe = tempfile.mkstemp(prefix=".calibatt-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        raise CalibattError(f"{what} folder '{folder}' is not writable; choose a writable path") from None


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block finishes.

    Interrupts (Ctrl-C) and errors remove the temp file, so no partial output is ever left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes private files (0600); the output gets the mode a plain open() would give it
        tmp_path.chmod(0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_hex(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def user_cache_dir(name: str) -> Path | None:
    """calibatt's folder `name` under the user's cache ($XDG_CACHE_HOME or ~/.cache), for memos that only save
    time; None without a home directory."""
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # Path.home() without HOME and without a passwd entry
        return None
    return base / "calibatt" / name
