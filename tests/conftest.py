import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


# A small video for fast end-to-end tests: 5 frames of 32x32 -> 3 x 8 x 8 = 192 tokens, 6 blocks of 32.
SMALL_YAML = """\
model:
  name: tiny-random
  seed: 0
video:
  height: 32
  width: 32
  frames: 5
  fps: 8
calibration:
  prompts: {prompts}
  epsilon: 0.001
  buckets: 2
  warmup_steps: 1
  block_size: 32
  output: {out}/bundle.safetensors
compile:
  bundle: {out}/bundle.safetensors
  cache_dir: {out}/cache
  cost_model: false  # sparse wherever the masks are: these tests exercise the sparse path
generate:
  steps: 4
  guidance: 5.0
  output: {out}/video.mp4
"""


@pytest.fixture
def small_config(tmp_path) -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a black background\na blue square moving up\n")
    out = tmp_path / "out"
    out.mkdir()
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL_YAML.format(prompts=prompts, out=out))
    return cfg
