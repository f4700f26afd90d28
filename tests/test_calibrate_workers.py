"""calibrate on CPU worker threads (calibration.workers): the same bundle, bit for bit, as one worker."""

from __future__ import annotations

import threading

import pytest
import torch

from calibatt_cli import calibrate as cal
from calibatt_cli.config import load_config
from calibatt_cli.errors import ConfigError

PROMPTS = (
    "a red circle moving left on a black background\n"
    "a blue square moving up\n"
    "a green triangle growing on a gray background\n"
)


@pytest.fixture
def three_prompts(small_config, tmp_path):
    """small_config with three prompts: two workers get unequal shares (prompts 0, 2 and prompt 1)."""
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    return small_config


def _calibrate(config, tmp_path, workers, name, on_step=None):
    cfg = load_config(config, [f"calibration.workers={workers}", f"calibration.output={tmp_path / 'out' / name}"])
    return cal.calibrate(cfg, on_step=on_step)


def _threads_of_a_new_thread() -> int:
    """torch's CPU thread count as a thread started now sees it (the process-wide setting)."""
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_worker_threads_write_the_one_worker_bundle(three_prompts, tmp_path):
    before = _threads_of_a_new_thread()
    one = _calibrate(three_prompts, tmp_path, 1, "one.safetensors")
    steps: list[str] = []
    two = _calibrate(
        three_prompts, tmp_path, 2, "two.safetensors", on_step=lambda: steps.append(threading.current_thread().name)
    )
    # both workers ran, and together every step of every prompt
    assert set(steps) == {"calibrate-worker-0", "calibrate-worker-1"}
    assert len(steps) == 3 * 4
    assert torch.equal(one.mass, two.mass)
    assert two.path.read_bytes() == one.path.read_bytes(), "the workers' bundle differs from one worker's"
    assert _threads_of_a_new_thread() == before  # the workers' thread count is undone


def test_worker_plan_shares_the_cpu_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert cal.worker_plan("auto", "cpu", 8) == (4, 1)
    assert cal.worker_plan("auto", "cpu", 2) == (2, 2)  # no more workers than prompts
    assert cal.worker_plan("auto", "cpu", 1) == (1, 4)
    assert cal.worker_plan(3, "cpu", 8) == (3, 1)
    assert cal.worker_plan(1, "cpu", 8) == (1, 4)
    assert cal.worker_plan("auto", "cuda", 8) == (1, 4)  # a GPU records one prompt at a time
    assert cal.worker_plan(1, "cuda:0", 8) == (1, 4)
    with pytest.raises(ConfigError, match="calibration.workers=2 is for the CPU"):
        cal.worker_plan(2, "cuda", 8)


@pytest.mark.parametrize("value", ["0", "-1", "many", "true"])
def test_bad_workers_value_is_refused(small_config, value):
    with pytest.raises(ConfigError, match="calibration.workers"):
        load_config(small_config, [f"calibration.workers={value}"])


def test_a_failing_worker_fails_the_run_and_writes_nothing(three_prompts, tmp_path, monkeypatch):
    real_load = cal.load_model
    failing = "a blue square moving up"

    def load_model(cfg):
        model = real_load(cfg)
        run = model.run

        def run_or_fail(prompt, **kwargs):
            if prompt == failing:
                raise ValueError("worker failure for the test")
            return run(prompt, **kwargs)

        model.run = run_or_fail
        return model

    monkeypatch.setattr(cal, "load_model", load_model)
    with pytest.raises(ValueError, match="worker failure for the test"):
        _calibrate(three_prompts, tmp_path, 2, "failed.safetensors")
    assert not (tmp_path / "out" / "failed.safetensors").exists()
