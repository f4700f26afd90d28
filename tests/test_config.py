import pytest

from calibatt_cli.config import DEFAULT_CONFIG, Config, load_config
from calibatt_cli.errors import ConfigError


def test_default_preset_loads_and_starts_with_its_command():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tiny"
    assert DEFAULT_CONFIG.read_text().startswith("# calibatt ")


def test_every_preset_loads():
    for path in DEFAULT_CONFIG.parent.glob("*.yaml"):
        load_config(path)
        assert path.read_text().startswith("#"), f"{path.name} must start with a comment showing its command"


def test_yaml_values_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("calibration:\n  epsilon: 0.01\n  buckets: 3\ngenerate:\n  steps: 12\n")
    cfg = load_config(p, ["calibration.epsilon=0.05", "model.path=/weights", "generate.dense=true"])
    assert cfg.calibration.epsilon == 0.05
    assert cfg.calibration.buckets == 3
    assert cfg.generate.steps == 12
    assert cfg.model.path == "/weights"
    assert cfg.generate.dense is True
    # an int where a float is expected is fine; it becomes a float
    assert isinstance(load_config(p, ["generate.guidance=4"]).generate.guidance, float)


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("calibration:\n  epsilno: 0.1\n", "unknown key 'calibration.epsilno'"),
        ("calibraton:\n  epsilon: 0.1\n", "unknown section 'calibraton'"),
        ("generate:\n  steps: ten\n", "'generate.steps' must be int"),
        ("generate:\n  steps: 2.5\n", "'generate.steps' must be int"),
        ("generate:\n  dense: 1\n", "'generate.dense' must be bool"),
        ("model:\n  name: 3\n", "'model.name' must be str"),
        ("calibration:\n  epsilon: 0\n", "calibration.epsilon must be in (0, 1)"),
        ("calibration:\n  epsilon: 1.5\n", "calibration.epsilon must be in (0, 1)"),
        ("generate:\n  steps: 0\n", "generate.steps must be positive"),
        ("video:\n  frames: -3\n", "video.frames must be positive"),
        ("calibration:\n  warmup_steps: 10\ngenerate:\n  steps: 10\n", "warmup_steps (10) must be below"),
        ("model:\n  dtype: float8\n", "model.dtype must be"),
        ("model:\n  load_threads: 0\n", "model.load_threads must be a positive integer"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, yaml_text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_bad_override_names_it():
    with pytest.raises(ConfigError, match=r"--set video\.fps=fast: 'video\.fps' must be int"):
        load_config(None, ["video.fps=fast"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["epsilon=0.1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_auto_device_and_dtype_resolve(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["model.device=auto", "model.dtype=auto"])
    assert (cfg.model.device, cfg.model.dtype) == ("cpu", "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(None, ["model.device=auto", "model.dtype=auto"])
    assert (cfg.model.device, cfg.model.dtype) == ("cuda", "bfloat16")
    assert load_config(None, ["model.device=cuda:1", "model.dtype=float16"]).model.dtype == "float16"
    with pytest.raises(ConfigError, match="model.device must be"):
        load_config(None, ["model.device=gpu"])
