"""The `calibatt` program leaves without the interpreter's teardown (cli.app.run -> leave): tearing down torch,
diffusers and transformers module by module costs about a second per command. What has to happen at exit still
does: atexit handlers run, piped output is flushed, the exit status is the command's."""

import json
import os
import subprocess
import sys
import threading

import pytest

from calibatt_cli.cache.build import compile_cache
from calibatt_cli.calibrate import calibrate
from calibatt_cli.cli import app as cli
from calibatt_cli.config import load_config

# Runs `python -m calibatt_cli ARGS` with two markers: one written by an atexit handler, one by an object that
# only the interpreter's teardown frees (a global of the program's first module).
WRAPPER = """
import atexit, runpy, sys
marker = sys.argv.pop(1)

class Teardown:
    def __init__(self, path, opener):  # held here: at teardown the module's globals may be gone already
        self.path, self.opener = path, opener

    def __del__(self):
        self.opener(self.path, "w").close()

kept = Teardown(marker + ".teardown", open)
atexit.register(lambda: open(marker + ".atexit", "w").close())
atexit.register(lambda: print("printed at exit"))  # buffered: only the flush after the handlers sends it
runpy.run_module("calibatt_cli", run_name="__main__", alter_sys=True)
"""

# Runs `python -m calibatt_cli ARGS` and writes, at exit, how many full collections (generation 2) the run made
# and the collector's thresholds then and at the start.
GC_WRAPPER = """
import atexit, gc, json, runpy, sys
report = sys.argv.pop(1)
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "stop" and info["generation"] == 2 else None)
initial = gc.get_threshold()

def record():
    with open(report, "w") as f:
        json.dump({"full": len(full), "thresholds": gc.get_threshold(), "initial": initial}, f)

atexit.register(record)
runpy.run_module("calibatt_cli", run_name="__main__", alter_sys=True)
"""


def _run(wrapper, tmp_path, marker, *args):
    env = os.environ.copy()
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as a user's program is: unflushed output would be lost
    return subprocess.run(
        [sys.executable, "-c", wrapper, str(marker), *map(str, args)],
        capture_output=True,  # pipes: the streams are block-buffered
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def _program(tmp_path, *args):
    proc = _run(WRAPPER, tmp_path, tmp_path / "marker", *args)
    ran = {kind for kind in ("atexit", "teardown") if (tmp_path / f"marker.{kind}").exists()}
    return proc, ran


def test_program_skips_teardown_and_keeps_exit_duties(small_config, tmp_path):
    proc, ran = _program(tmp_path, "config", "--config", small_config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ran == {"atexit"}, f"expected the atexit handler and no teardown, got {sorted(ran)}"
    # everything printed arrived: the resolved config first and the token grid last
    assert proc.stdout.startswith("# resolved from"), proc.stdout[:200]
    assert "# token grid" in proc.stdout, proc.stdout[-300:]
    assert proc.stdout.rstrip().endswith("printed at exit"), proc.stdout[-300:]


def test_program_keeps_the_error_exit_status(small_config, tmp_path):
    proc, ran = _program(tmp_path, "config", "--config", small_config, "--set", "nosuch.key=1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error:" in proc.stdout + proc.stderr
    assert ran == {"atexit"}, f"expected the atexit handler and no teardown, got {sorted(ran)}"


def test_leave_takes_the_usual_exit_while_a_thread_runs(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # never leave pytest's own process
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        with pytest.raises(SystemExit) as e:
            cli.leave(0)  # the interpreter must join the thread: no os._exit
        assert e.value.code == 0
    finally:
        release.set()
        worker.join()
    with pytest.raises(SystemExit) as e:
        cli.leave("a message")  # printed by the interpreter, exit status 1
    assert e.value.code == "a message"
    assert exits == []


def test_generate_holds_full_collections_while_it_starts(small_config, tmp_path):
    """Importing torch, diffusers and transformers made ~7 full collections, each walking the whole heap: the
    program holds them back until the first denoising step, then restores the interpreter's thresholds."""
    cfg = load_config(small_config)
    calibrate(cfg)
    compile_cache(cfg)
    report = tmp_path / "gc.json"
    proc = _run(GC_WRAPPER, tmp_path, report, "generate", "a red circle", "--config", small_config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(report.read_text())
    assert seen["full"] <= 1, f"{seen['full']} full collections during generate (held: at most the one after)"
    assert seen["thresholds"] == seen["initial"], f"thresholds not restored: {seen}"
