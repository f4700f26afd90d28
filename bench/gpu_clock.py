"""The card's SM clock, power draw and clock-event reasons while a benchmark times something.

Under sustained attention load an H200 sits at its 700 W cap: `nvidia-smi` reports the software power cap
active and the SM clock at 1.4-1.7 GHz of its 1.98 GHz (docs/kernel-history.md). TFLOP/s then follow
the clock the power controller allows, which moves by a few per cent between runs; recording it beside
each timing says which rows ran at which clock. Sampled by `nvidia-smi --query-gpu ... -lms` in a
background process (no Python NVML binding on the device image); when nvidia-smi is missing, `window`
returns None and the benchmarks leave the columns empty.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time

SW_POWER_CAP = 0x4  # nvidia-smi's clocks_event_reasons bit for the software power cap


def _gpu_id(device) -> str:
    """nvidia-smi's -i for a torch device: its PCI bus id (CUDA and nvidia-smi may number cards differently)."""
    import torch

    p = torch.cuda.get_device_properties(device)
    if all(hasattr(p, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        return f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    return str(torch.device(device).index or 0)


class ClockLog:
    """Samples every `period_ms` until `close`; `window(t0, t1)` summarises the samples between two
    `time.monotonic()` readings."""

    def __init__(self, device="cuda", period_ms: int = 100):
        self.samples: list[tuple[float, float, float | None, int]] = []  # (time, MHz, W, reasons)
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        gpu = _gpu_id(device)
        # the instant reading where the driver has it: on Ampere and newer, power.draw averages over a second,
        # so a 300 ms timing right after an idle gap would read low
        try:
            probe = subprocess.run(
                [exe, "-i", gpu, "--query-gpu=power.draw.instant", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):  # a sampler that cannot start leaves the columns empty
            return
        power = "power.draw.instant" if probe.returncode == 0 else "power.draw"
        self.proc = subprocess.Popen(
            [
                exe,
                "-i",
                gpu,
                f"--query-gpu=clocks.sm,{power},clocks_throttle_reasons.active",
                "--format=csv,noheader,nounits",
                "-lms",
                str(period_ms),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parsed = parse_line(line)
            if parsed is not None:
                self.samples.append((time.monotonic(), *parsed))

    def measure(self, fn):
        """(fn(), the clock while it ran as `window` gives it, or {} without samples)."""
        t0 = time.monotonic()
        result = fn()
        return result, self.window(t0, time.monotonic()) or {}

    def window(self, t0: float, t1: float) -> dict | None:
        got = [s for s in self.samples if t0 <= s[0] <= t1]
        if not got:
            return None
        watts = [s[2] for s in got if s[2] is not None]
        return dict(
            mhz=statistics.median(s[1] for s in got),
            watts=statistics.median(watts) if watts else None,
            power_capped=sum(1 for s in got if s[3] & SW_POWER_CAP) / len(got),
            samples=len(got),
        )

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)


def parse_line(line: str) -> tuple[float, float | None, int] | None:
    """One `clocks.sm, power.draw[.instant], clocks_throttle_reasons.active` line (noheader, nounits): (MHz,
    W or None, reason bits), or None for a line that is not one (a header, an error message)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        mhz = float(parts[0])
        reasons = int(parts[2], 16)
    except ValueError:
        return None
    try:
        watts = float(parts[1])
    except ValueError:  # "[N/A]" on parts that do not report power
        watts = None
    return mhz, watts, reasons
