"""The kernels folder is installed as `calibatt_kernels`, and nothing at the repo root is importable as
`kernels`: PyPI's `kernels` (a dependency of transformers, imported by diffusers) must be the one found even
when the repo root is first on sys.path, as under `python -m pytest` and `python -m calibatt_cli`."""

import subprocess
import sys
from pathlib import Path

import calibatt_kernels

REPO = Path(__file__).resolve().parent.parent

# Run from the repo root with `python -c`, which puts the current directory first on sys.path.
PROBE = """
import importlib.util, pathlib, sys
root = pathlib.Path.cwd().resolve()
assert sys.path[0] in ("", str(root)), sys.path[:2]
spec = importlib.util.find_spec("kernels")
if spec is not None:
    origin = pathlib.Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
    assert not origin.is_relative_to(root / "kernels"), f"`kernels` resolves to the repo's folder: {origin}"
import diffusers.loaders.peft  # imports PyPI's kernels when that distribution is installed
import calibatt_kernels
assert pathlib.Path(calibatt_kernels.__file__).resolve().parent == root / "kernels" / "calibatt_kernels"
print("ok", spec is not None)
"""


def test_import_name():
    assert calibatt_kernels.__name__ == "calibatt_kernels"
    assert callable(calibatt_kernels.block_sparse_attention)


def test_repo_root_first_on_sys_path_does_not_shadow_pypi_kernels():
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok"), res.stdout


def test_python_m_cli_help_from_repo_root():
    res = subprocess.run(
        [sys.executable, "-m", "calibatt_cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "calibrate" in res.stdout and "generate" in res.stdout


def test_no_kernels_package_at_repo_root():
    """A regular package beats a namespace portion, so `kernels/` must stay a plain folder."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "kernels" / "calibatt_kernels" / "__init__.py").exists()


def test_lock_pins_every_dependency_inside_pyproject_ranges():
    """constraints.txt (`make lock`) pins every dependency, and pyproject.toml's ranges admit each pin: a
    library user's install and CI's locked install can only differ by newer releases, not by conflicts."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = Version(version)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt: run `make lock`"
        pin = Version(pins[name].base_version)  # torch's local tag (+cpu) is not part of the range
        assert req.specifier.contains(pin, prereleases=True), f"{name}=={pins[name]} is outside {req}"
