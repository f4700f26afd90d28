"""Commands that never build the model import neither diffusers nor transformers: those imports cost seconds
of every command's start-up. On the CPU `calibatt compile` (generate.compile off) and `calibatt config` only
need the model's identity, which comes from configs and the memo of the transformer class's full config
(models/identity.py) that an earlier command that did import diffusers left behind."""

import json
import os
import subprocess
import sys

import pytest

from calibatt_cli.calibrate import calibrate
from calibatt_cli.config import compile_blocks, load_config
from calibatt_cli.models import identity, model_identity
from calibatt_cli.tiny.model import LATENT, TRANSFORMER

# Runs `python -m calibatt_cli ARGS` and writes which of diffusers and transformers it imported to the first
# argument, at exit (the program leaves through its atexit handlers: cli.app.leave).
WRAPPER = """
import atexit, json, runpy, sys
report = sys.argv.pop(1)

def record():
    with open(report, "w") as f:
        json.dump(sorted({m.split(".")[0] for m in sys.modules} & {"diffusers", "transformers"}), f)

atexit.register(record)
runpy.run_module("calibatt_cli", run_name="__main__", alter_sys=True)
"""


def _forget_in_process():
    """Drop this process's memo of full configs, so the next identity reads the memo file or diffusers."""
    identity._full_config.cache_clear()


@pytest.fixture
def memo_home(tmp_path, monkeypatch):
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    _forget_in_process()
    yield home
    _forget_in_process()


def _run(args, tmp_path):
    report = tmp_path / "imported.json"
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(report), *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, f"calibatt {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(report.read_text()), proc.stdout


def test_compile_and_config_import_no_diffusers(small_config, memo_home, tmp_path):
    cfg = load_config(small_config)
    assert not compile_blocks(cfg)  # the CPU stays eager: compile builds no compiled blocks
    calibrate(cfg)  # builds the model, so it imports diffusers and leaves the memo behind
    assert list(memo_home.rglob("*.json")), "calibrate left no memo of the transformer's full config"
    imported, _ = _run(["compile", "--config", str(small_config)], tmp_path)
    assert imported == [], f"calibatt compile imported {imported}"
    imported, out = _run(["config", "--config", str(small_config)], tmp_path)
    assert imported == [], f"calibatt config imported {imported}"
    assert "token grid" in out


def test_memo_gives_the_identity_diffusers_gives(small_config, memo_home):
    cfg = load_config(small_config)
    computed = model_identity(cfg)  # memo miss: diffusers fills in the defaults, and the memo is written
    (memo,) = memo_home.rglob("*.json")
    _forget_in_process()
    remembered = model_identity(cfg)  # memo hit
    assert remembered == computed
    # The memo is per input config: another config of the same class is not served this one's.
    other = identity.wan_identity("x", "x", {**TRANSFORMER, "num_layers": 2}, LATENT, "w", "S")
    assert (other.layers, other.heads) == (2, computed.heads)
    assert len(list(memo_home.rglob("*.json"))) == 2
    # A memo that no longer parses is recomputed, never trusted.
    memo.write_text("{")
    _forget_in_process()
    assert model_identity(cfg) == computed
    assert json.loads(memo.read_text())["config"]["num_layers"] == computed.layers
