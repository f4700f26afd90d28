"""Running a test file's own `__main__` under Triton's CPU interpreter, in a subprocess: TRITON_INTERPRET
is read when triton is imported, so the kernels run interpreted only in a process that sets it first."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(path: str, timeout: int) -> dict:
    """`python path` with TRITON_INTERPRET=1: its last stdout line, as JSON (the file prints its results so)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
