"""One typed config for every subcommand, loaded from YAML plus `--set section.key=value` overrides.

Unknown keys and wrong types are errors naming the key and the file: a typo must never be silently
ignored (a misspelt `epsilon` would otherwise calibrate with the default).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"
PRECISIONS = ("bf16", "fp8")  # generate.precision / compile.precision


@dataclass
class ModelConfig:
    name: str = "tiny"  # model family/preset: tiny, tiny-random, wan2.1, wan2.1-1.3b, wan2.1-14b, ...
    path: str | None = None  # local weights (diffusers folder or original release layout); None: built in
    dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16
    device: str = "auto"  # auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:1, ...
    seed: int = 0  # seed of the built-in random model's weights
    # Threads that copy the loaded weights to a GPU (models/base.py to_device), each staging pieces through
    # pinned buffers while the GPU reads the last; 1 is diffusers' own pipe.to(device). bench/bench_load.py
    # times the two against each other (the README cites its runs).
    load_threads: int = 8


@dataclass
class VideoConfig:
    height: int = 256
    width: int = 256
    frames: int = 33
    fps: int = 8


@dataclass
class CalibrationConfig:
    prompts: str = "configs/prompts/tiny_calibrate.txt"  # one prompt a line
    epsilon: float = 0.001  # keep the fewest key blocks holding >= 1 - epsilon of each row's mass
    buckets: int = 2  # timestep buckets: steps are split into this many contiguous groups
    warmup_steps: int = 1  # first denoising steps that always run dense
    block_size: int = 64  # token block size of the masks (query and key)
    seed: int = 0
    output: str | None = None  # None: out/<model.name>.bundle.safetensors
    # On the CPU: prompts recorded at once, each worker a thread with its share of torch's CPU threads (one
    # model call on a few cores scales worse than independent prompts do); auto = min(torch's threads, the
    # prompts). The bundle is the same bits for any number. On a GPU: 1 (torchrun shares prompts over GPUs).
    workers: int | str = "auto"


@dataclass
class CompileConfig:
    bundle: str | None = None  # None: calibration.output
    cache_dir: str | None = None  # None: out/<model.name>.cache
    target: str | None = None  # e.g. sm_90: cross-compile kernels without a GPU
    # use a bundle or cache made for other weights or sampling settings (--force): warned and recorded
    force: bool = False
    cost_model: bool = True  # run each (bucket, layer) dense where dense measured faster; false: sparse everywhere
    precision: str = "bf16"  # bf16 | fp8: which attention kernels compile measures and the cache holds


@dataclass
class GenerateConfig:
    steps: int = 10  # denoising steps (calibration uses the same schedule)
    guidance: float = 5.0  # classifier-free guidance scale; 1.0 disables the second forward
    flow_shift: float = 3.0
    negative_prompt: str = ""
    seed: int = 0
    output: str | None = None  # None: out/<model.name>.mp4
    dense: bool = False  # run the stock pipeline (the baseline) instead of sparse attention
    # torch.compile the repeated transformer blocks (fullgraph; our kernel is a custom op inside): auto = on a
    # GPU, eager on the CPU. `calibatt compile` builds the graphs into the cache, so generate compiles nothing.
    compile: bool | str = "auto"
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: checks graphs without codegen)
    strict: bool = False  # fail if generate compiles anything (Triton or inductor), falls back to another kernel or to
    # eager blocks, or runs a sparse layer dense
    # Check the masks live at each bucket's first sparse step and run heads that lose mass dense; auto: on a GPU
    # (where bench/bench_guard.py measures its cost), off on the CPU
    guard: bool | str = "auto"
    guard_factor: float = 2.0  # the guard widens a head keeping < max(1 - guard_factor * bundle epsilon, guard_floor)
    guard_floor: float = 0.99  # the lowest mean kept mass per head the guard accepts, whatever the bundle's epsilon
    # bf16 | fp8: fp8 runs the sparse layers with INT8 Q.K^T and FP8 P.V (calibatt_kernels/quant.py), opt-in;
    # it needs a cache compiled with compile.precision=fp8
    precision: str = "bf16"


@dataclass
class ParallelConfig:
    """How one video is spread over the processes of a torchrun launch (see parallel.py); the processes left
    over form data-parallel groups that share the prompts. Without torchrun: one process."""

    cfg_parallel: bool = False  # the two guidance branches of each step on two processes
    ulysses: int = 1  # sequence parallel degree (diffusers' Ulysses): must divide the model's heads
    ring: int = 1  # ring attention: not supported, any other value is refused
    ulysses_anything: bool = False  # diffusers' padded-heads Ulysses: not supported, refused


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})  # file it came from

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def _type_ok(value, tp) -> tuple[bool, typing.Any]:
    """Check (and gently normalise) one YAML value against a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


def _apply(cfg: Config, data: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (model, video, ...)")
    hints = typing.get_type_hints(Config)
    sections = {f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    for sec, values in data.items():
        if sec not in sections:
            raise ConfigError(f"{where}: unknown section '{sec}'; valid sections: {', '.join(sorted(sections))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{sec}' must be a mapping of keys")
        obj = getattr(cfg, sec)
        sec_hints = typing.get_type_hints(hints[sec])
        for key, value in values.items():
            if key not in sec_hints:
                raise ConfigError(f"{where}: unknown key '{sec}.{key}'; valid keys: {', '.join(sorted(sec_hints))}")
            ok, v = _type_ok(value, sec_hints[key])
            if not ok:
                raise ConfigError(f"{where}: '{sec}.{key}' must be {_type_name(sec_hints[key])}, got {value!r}")
            setattr(obj, key, v)


def _parse_override(item: str) -> tuple[str, str, object]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set '{item}': expected section.key=value, e.g. --set calibration.epsilon=0.01")
    path, raw = item.split("=", 1)
    sec, key = path.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return sec.strip(), key.strip(), value


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    w = cfg.source
    c = cfg.calibration
    if not 0.0 < c.epsilon < 1.0:
        raise ConfigError(f"{w}: calibration.epsilon must be in (0, 1), got {c.epsilon}; 0.001 is typical")
    for name, value in (
        ("generate.steps", cfg.generate.steps),
        ("video.frames", cfg.video.frames),
        ("video.height", cfg.video.height),
        ("video.width", cfg.video.width),
        ("video.fps", cfg.video.fps),
        ("calibration.buckets", c.buckets),
        ("calibration.block_size", c.block_size),
    ):
        if value <= 0:
            raise ConfigError(f"{w}: {name} must be positive, got {value}")
    if c.workers != "auto" and (isinstance(c.workers, str) or c.workers < 1):
        raise ConfigError(f"{w}: calibration.workers must be auto or a positive integer, got {c.workers!r}")
    if c.warmup_steps < 0:
        raise ConfigError(f"{w}: calibration.warmup_steps must be >= 0, got {c.warmup_steps}")
    if c.warmup_steps >= cfg.generate.steps:
        raise ConfigError(
            f"{w}: calibration.warmup_steps ({c.warmup_steps}) must be below generate.steps "
            f"({cfg.generate.steps}), or no step would be sparse"
        )
    if cfg.model.load_threads < 1:  # (the loader has checked it is an int)
        raise ConfigError(
            f"{w}: model.load_threads must be a positive integer, got {cfg.model.load_threads!r}; 8 is the default"
        )
    if cfg.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"{w}: model.dtype must be auto, float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.model.device):
        raise ConfigError(f"{w}: model.device must be auto, cpu, cuda or cuda:N, got {cfg.model.device!r}")
    if cfg.generate.guard_factor <= 0.0:
        raise ConfigError(f"{w}: generate.guard_factor must be > 0, got {cfg.generate.guard_factor}; 2.0 is typical")
    if isinstance(cfg.generate.compile, str) and cfg.generate.compile != "auto":
        raise ConfigError(f"{w}: generate.compile must be auto, true or false, got {cfg.generate.compile!r}")
    if not 0.0 <= cfg.generate.guard_floor < 1.0:
        raise ConfigError(f"{w}: generate.guard_floor must be in [0, 1), got {cfg.generate.guard_floor}; 0.99 is usual")
    if cfg.generate.guard not in (True, False, "auto"):
        raise ConfigError(f"{w}: generate.guard must be true, false or auto, got {cfg.generate.guard!r}")
    for name, value in (("compile.precision", cfg.compile.precision), ("generate.precision", cfg.generate.precision)):
        if value not in PRECISIONS:
            raise ConfigError(f"{w}: {name} must be bf16 or fp8, got {value!r}; bf16 is the default")
    if cfg.generate.guidance < 1.0:
        raise ConfigError(f"{w}: generate.guidance must be >= 1.0 (1.0 disables CFG), got {cfg.generate.guidance}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (default: configs/tiny.yaml) <- --set overrides, then validated."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    cfg = Config(source=str(path))
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing --config (presets are in configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}; fix the syntax") from None
    _apply(cfg, data, str(path))
    for item in overrides or []:
        sec, key, value = _parse_override(item)
        _apply(cfg, {sec: {key: value}}, f"--set {item}")
    validate(cfg)
    _resolve_auto(cfg)
    _default_outputs(cfg)
    return cfg


def _default_outputs(cfg: Config) -> None:
    """Output names left unset follow the model, so `--model wan2.1` never writes over out/tiny.*."""
    stem = f"out/{cfg.model.name}"
    cfg.calibration.output = cfg.calibration.output or f"{stem}.bundle.safetensors"
    cfg.compile.bundle = cfg.compile.bundle or cfg.calibration.output
    cfg.compile.cache_dir = cfg.compile.cache_dir or f"{stem}.cache"
    cfg.generate.output = cfg.generate.output or f"{stem}.mp4"


def _resolve_auto(cfg: Config) -> None:
    """`auto` device and dtype become concrete here, so every stage (and `calibatt config`) sees the same."""
    if cfg.model.device == "auto":
        import torch

        cfg.model.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.model.dtype == "auto":
        cfg.model.dtype = "bfloat16" if cfg.model.device.startswith("cuda") else "float32"
    if cfg.generate.guard == "auto":  # on a GPU, whose cost bench/bench_guard.py measures; off on the CPU
        cfg.generate.guard = cfg.model.device.startswith("cuda")


def compile_blocks(cfg: Config, repeated_blocks: bool = True) -> bool:
    """Whether the transformer blocks run compiled: generate.compile, with auto meaning on a GPU, for a model
    whose transformer declares repeated blocks (`ModelIdentity.repeated_blocks`). The CPU stays eager unless
    asked: inductor's C++ build costs more there than it saves."""
    c = cfg.generate.compile
    return cfg.model.device.startswith("cuda") and repeated_blocks if c == "auto" else bool(c)


def input_base(path: str | Path, cfg: Config) -> Path | None:
    """The folder a relative input path is found in (see resolve_input); None when it is absolute or found
    nowhere (then it stands for itself, relative to the working directory)."""
    p = Path(path)
    if p.is_absolute():
        return None
    src = Path(cfg.source)
    for base in (Path("."), src.parent, src.parent.parent):
        if (base / p).exists():
            return base
    return None


def cache_paths(
    cfg: Config, bundle: str | Path | None = None, cache_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """compile.bundle and compile.cache_dir resolved against one base: the folder the bundle is found in
    (resolve_input), so that a preset's bundle and its cache never end up in two different places."""
    bundle = bundle if bundle is not None else cfg.compile.bundle
    cache = Path(cache_dir if cache_dir is not None else cfg.compile.cache_dir)
    bundle_path = resolve_input(bundle, cfg)
    if not cache.is_absolute() and not Path(bundle).is_absolute():
        base = input_base(bundle, cfg)
        if base is not None and base != Path("."):
            cache = base / cache
    return bundle_path, cache


def resolve_input(path: str | Path, cfg: Config) -> Path:
    """A relative input path is looked up in the working directory, then beside the config's folder
    (so the built-in presets work from any directory)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    src = Path(cfg.source)
    for base in (src.parent, src.parent.parent):
        if (base / p).exists():
            return base / p
    return p


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
