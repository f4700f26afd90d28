"""The CLI's contract: bad input -> one line naming the problem and the fix, non-zero exit, no traceback,
no partial file. Most cases run `main()` in-process (fast); the Ctrl-C and demo paths run a subprocess."""

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import click.exceptions as click_exceptions
import pytest

from calibatt_cli.cli import app as cli
from calibatt_cli.cli.app import main
from calibatt_cli.config import load_config
from calibatt_cli.models import model_identity

PROMPT = "a red circle moving left on a black background"


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["calibatt", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code, err, *needles):
    assert code != 0, "must exit non-zero"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("error:"), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*"))


@pytest.fixture
def built(small_config, monkeypatch, capsys):
    """A calibrated and compiled small config."""
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--config", small_config)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "compile", "--config", small_config)
    assert code == 0, err
    return small_config


def test_config_command_prints_resolved_yaml(monkeypatch, capsys, small_config):
    code, out, _ = run_cli(monkeypatch, capsys, "config", "--config", small_config, "--set", "generate.steps=7")
    assert code == 0
    assert "steps: 7" in out and "name: tiny-random" in out


@pytest.mark.parametrize(
    "yaml_extra, needles",
    [
        ("calibration:\n  epsilom: 0.1\n", ["unknown key 'calibration.epsilom'", "bad.yaml"]),
        ("generate:\n  steps: many\n", ["'generate.steps' must be int", "bad.yaml"]),
        ("calibration:\n  epsilon: 1.0\n", ["calibration.epsilon must be in (0, 1)"]),
        ("calibration:\n  epsilon: -0.1\n", ["calibration.epsilon must be in (0, 1)"]),
        ("generate:\n  steps: 0\n", ["generate.steps must be positive"]),
        ("video:\n  frames: 0\n", ["video.frames must be positive"]),
        ("video:\n  frames: 6\n", ["video.frames=6 does not fit", "k+1"]),
        ("calibration:\n  prompts: /nonexistent/prompts.txt\n", ["prompts file", "not found"]),
        ("model:\n  name: sora\n", ["unknown model 'sora'"]),
    ],
)
def test_bad_config_for_calibrate(tmp_path, monkeypatch, capsys, yaml_extra, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  name: tiny-random\n" + yaml_extra if not yaml_extra.startswith("model:") else yaml_extra)
    out = tmp_path / "b.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--config", cfg, "--output", out)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_empty_prompts_file(tmp_path, monkeypatch, capsys, small_config):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--config", small_config, "--prompts", empty)
    assert_one_line_error(code, err, "has no prompts")


def test_bundle_output_in_missing_folder(tmp_path, monkeypatch, capsys, small_config):
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--config", small_config, "-o", tmp_path / "no/b.st")
    assert_one_line_error(code, err, "does not exist")


def test_corrupt_and_truncated_bundles(built, tmp_path, monkeypatch, capsys):
    bundle = tmp_path / "out" / "bundle.safetensors"
    data = bundle.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(
        monkeypatch, capsys, "compile", "--config", built, "--bundle", bad, "--cache-dir", tmp_path / "c2"
    )
    assert_one_line_error(code, err, "corrupt or truncated", "calibatt calibrate")
    assert not (tmp_path / "c2").exists()
    bad.write_bytes(b"\x00" * 100)
    code, _, err = run_cli(monkeypatch, capsys, "compile", "--config", built, "--bundle", bad)
    assert_one_line_error(code, err, "corrupt or truncated")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.seed=5", "calibrated with model="),
        ("video.height=64", "token grid"),
        ("generate.steps=6", "calibrated with generate.steps=4"),
    ],
)
def test_bundle_for_another_model_grid_or_steps(built, monkeypatch, capsys, tmp_path, override, needle):
    code, _, err = run_cli(
        monkeypatch, capsys, "compile", "--config", built, "--set", override, "--cache-dir", tmp_path / "other"
    )
    assert_one_line_error(code, err, needle, "calibatt calibrate")
    assert not (tmp_path / "other").exists()


def test_generate_bad_inputs(built, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "", "--config", built)
    assert_one_line_error(code, err, "empty")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "   ", "--config", built)
    assert_one_line_error(code, err, "empty")
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", built, "-o", tmp_path / "x/y.mp4")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", built, "-o", "/proc/v.mp4")
    assert_one_line_error(code, err, "not writable")
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", built, "-o", tmp_path / "v.gif")
    assert_one_line_error(code, err, "must end in .mp4")
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", built, "--steps", "6")
    assert_one_line_error(code, err, "built with generate.steps=4", "compile")
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "generate",
        PROMPT,
        "--config",
        built,
        "--set",
        "compile.cache_dir=" + str(tmp_path / "nocache"),
    )
    assert_one_line_error(code, err, "no compiled cache", "calibatt compile")
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*mp4"))


def test_corrupt_cache(built, tmp_path, monkeypatch, capsys):
    plan = tmp_path / "out" / "cache" / "plan.safetensors"
    plan.write_bytes(plan.read_bytes()[:100])
    code, _, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", built)
    assert_one_line_error(code, err, "corrupt", "--recompile")
    code, _, err = run_cli(monkeypatch, capsys, "compile", "--config", built, "--recompile")
    assert code == 0, err
    (tmp_path / "notcache").mkdir()
    (tmp_path / "notcache" / "mine.txt").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "compile", "--config", built, "--cache-dir", tmp_path / "notcache")
    assert_one_line_error(code, err, "not a calibatt cache")
    assert files_in(tmp_path / "notcache") == ["mine.txt"]


def test_generate_json_and_inspect(built, tmp_path, monkeypatch, capsys):
    out = tmp_path / "v.mp4"
    code, stdout, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--config", built, "-o", out, "--json")
    assert code == 0, err
    line = json.loads(stdout.strip().splitlines()[-1])
    assert line["outputs"] == [str(out)] and line["steps"] == 4 and 0 < line["mean_density"] <= 1
    (steps,) = line["step_seconds"]  # one video: one time per denoising step, each a real duration
    assert len(steps) == 4 and all(0 < t < line["seconds"] for t in steps)
    assert out.stat().st_size > 0
    code, stdout, err = run_cli(
        monkeypatch, capsys, "inspect", tmp_path / "out" / "bundle.safetensors", "--png", tmp_path / "png"
    )
    assert code == 0, err
    assert "retained mass" in stdout
    assert len(list((tmp_path / "png").glob("*.png"))) == 2 * model_identity(load_config(built)).layers


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_ctrl_c_during_generate_leaves_nothing(built, tmp_path):
    out = tmp_path / "slow.mp4"
    # Enough steps that sampling is surely under way when the interrupt lands.
    cmd = [
        sys.executable,
        "-m",
        "calibatt_cli",
        "generate",
        PROMPT,
        "--config",
        str(built),
        "-o",
        str(out),
        "--dense",
        "--steps",
        "8000",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    time.sleep(10)
    assert proc.poll() is None, "generate ended before the interrupt"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slow")], "temp file left behind"


def test_interrupt_while_writing_removes_temp_file(tmp_path, monkeypatch):
    """Ctrl-C lands inside write_mp4, after the encoder has taken some frames: the user's file is untouched
    and no temp file stays behind."""
    import imageio_ffmpeg
    import numpy as np

    from calibatt_cli import video

    real_write_frames = imageio_ffmpeg.write_frames
    seen = {"frames": 0, "temp": None}
    encoders = []

    def interrupting_write_frames(path, *args, **kwargs):
        seen["temp"] = path
        gen = real_write_frames(path, *args, **kwargs)
        encoders.append(gen)

        class Encoder:
            def send(self, frame):
                if frame is not None:
                    if seen["frames"] == 3:
                        raise KeyboardInterrupt  # mid-write: three frames are in the encoder
                    seen["frames"] += 1
                gen.send(frame)

            def throw(self, exc):
                return gen.throw(exc)

            def close(self):
                gen.close()

        return Encoder()

    out = tmp_path / "v.mp4"
    out.write_bytes(b"the user's earlier video")
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", interrupting_write_frames)
    frames = np.full((8, 32, 32, 3), 128, np.uint8)
    try:
        with pytest.raises(KeyboardInterrupt):
            video.write_mp4(out, frames, 8)
    finally:
        for gen in encoders:
            gen.close()  # stop the ffmpeg process the interrupted writer left running
    assert seen["frames"] == 3 and seen["temp"] != str(out), "the encoder must write to a temp file"
    assert out.read_bytes() == b"the user's earlier video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"], "temp file left behind"
    monkeypatch.undo()
    video.write_mp4(out, frames, 8)
    assert video.read_mp4(out).shape == (8, 32, 32, 3)


@pytest.mark.parametrize(
    "args",
    [
        ["calibrate"],
        ["calibrate", "--shard", "0/2", "-o", "{tmp}/part-0.safetensors"],
        ["compile"],
        ["generate", PROMPT],
        ["generate", PROMPT, "--dense"],
        ["evaluate", "--prompts", "{prompts}", "--out", "{tmp}/report"],
    ],
    ids=lambda a: " ".join(a[:3]),
)
def test_cuda_without_a_gpu_is_one_line_for_every_command(small_config, tmp_path, monkeypatch, capsys, args):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine too is tested as one without
    args = [a.format(tmp=tmp_path, prompts=small_config.parent / "prompts.txt") for a in args]
    before = files_in(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--config", small_config, "--set", "model.device=cuda")
    assert_one_line_error(code, err, "model.device is 'cuda' but no CUDA GPU is visible", "model.device=cpu")
    assert files_in(tmp_path) == before


def test_outputs_never_create_parent_folders(tmp_path, monkeypatch, capsys):
    """One rule: a file's folder must exist; a folder output is created, one level only."""
    deep = tmp_path / "nowhere" / "deep"
    code, _, err = run_cli(monkeypatch, capsys, "inspect", tmp_path / "b.safetensors", "--png", deep / "masks")
    assert_one_line_error(code, err, "heatmap folder", "nowhere/deep' does not exist")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", deep / "ckpt", "--steps", "1", "--batch", "1")
    assert_one_line_error(code, err, "checkpoint folder", "nowhere/deep' does not exist")
    code, _, err = run_cli(
        monkeypatch, capsys, "train", "--out", tmp_path / "ckpt", "--export", deep / "w.safetensors", "--steps", "1"
    )
    assert_one_line_error(code, err, "weights folder", "nowhere/deep' does not exist")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", tmp_path / "file", "--steps", "1")
    assert_one_line_error(code, err, "checkpoint folder", "is a file")
    assert files_in(tmp_path) == ["file"], "nothing may be created before the error"


def test_default_output_names_follow_the_model(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "config", "--set", "model.name=wan2.1-1.3b")
    assert code == 0, err
    for want in (
        "output: out/wan2.1-1.3b.bundle.safetensors",
        "bundle: out/wan2.1-1.3b.bundle.safetensors",
        "cache_dir: out/wan2.1-1.3b.cache",
        "output: out/wan2.1-1.3b.mp4",
    ):
        assert want in out, f"{want!r} not in the resolved config"
    assert "out/tiny" not in out
    tiny = load_config(None)
    assert (tiny.calibration.output, tiny.compile.cache_dir, tiny.generate.output) == (
        "out/tiny.bundle.safetensors",
        "out/tiny.cache",
        "out/tiny.mp4",
    )
    mine = load_config(None, ["calibration.output=runs/b.safetensors", "model.name=tiny-random"])
    assert mine.compile.bundle == "runs/b.safetensors", "compile reads the bundle calibrate wrote"
    assert mine.compile.cache_dir == "out/tiny-random.cache"


def test_python_m_entry_point_and_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "calibatt_cli", "--help"], capture_output=True, text=True, env=_env())
    assert r.returncode == 0 and "calibrate" in r.stdout and "generate" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "calibatt_cli", "config", "--set", "nope.x=1"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 2 and "unknown section 'nope'" in r.stderr and "Traceback" not in r.stderr


# Usage errors: one line naming the bad option or command, click's exit code (2), never a traceback.
CASES = [
    (("generate", "--bogus"), "--bogus"),
    (("generate", "x", "--steps", "abc"), "--steps"),
    (("nosuchcommand",), "nosuchcommand"),
    (("inspect",), "bundle"),
    (("config", "--model", "tiny"), "--model"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_usage_error_is_one_line(monkeypatch, capsys, args, needle):
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err + out


def test_bare_calibatt_prints_help(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys)
    assert code == 2
    assert "Traceback" not in err + out and "NoArgsIsHelpError" not in err + out
    assert "calibrate" in err + out and "generate" in err + out


# Newer typer raises its bundled click's classes (usage errors from typer._click, Exit from typer.exceptions);
# older typer raises the click package's. main() must handle both families, whichever is installed.
FAMILIES = [(click_exceptions, click_exceptions)]
if importlib.util.find_spec("typer._click") is not None:
    FAMILIES.append((importlib.import_module("typer._click.exceptions"), importlib.import_module("typer.exceptions")))


@pytest.mark.parametrize("usage_mod,exit_mod", FAMILIES, ids=lambda m: m.__name__)
def test_usage_error_from_either_click(monkeypatch, capsys, usage_mod, exit_mod):
    def raise_usage(*a, **k):
        raise usage_mod.UsageError("No such option: --frobnicate")

    monkeypatch.setattr(cli, "app", raise_usage)
    code, _, err = run_cli(monkeypatch, capsys, "generate")
    assert code == 2
    assert err.strip().splitlines() == ["error: No such option: --frobnicate"], err

    def raise_exit(*a, **k):
        raise exit_mod.Exit(3)

    monkeypatch.setattr(cli, "app", raise_exit)
    with pytest.raises(SystemExit) as e:
        monkeypatch.setattr(sys, "argv", ["calibatt"])
        main()
    assert e.value.code == 3


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_get_the_users_umask(tmp_path, umask, mode):
    """Atomic writes go through a private temp file (mkstemp: 0600); the output must get the mode a plain
    open() gives under the user's umask, for MP4s, bundles and reports alike."""
    import numpy as np

    from calibatt_cli.util import write_text_atomic
    from calibatt_cli.video import write_mp4

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "report.json", "{}")
        write_mp4(tmp_path / "v.mp4", np.zeros((3, 16, 16, 3), dtype=np.uint8), 8)
    finally:
        os.umask(old)
    for name in ("report.json", "v.mp4"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_generate_json_is_printed_verbatim(monkeypatch, capsys):
    """`--json` prints the summary as JSON whatever it holds: a list such as [null, 1] or [false] looks like
    console markup to rich and must not be eaten (it was: the guard's JSON came out unparsable)."""

    class Result:
        guard = None

        def summary(self):
            return {"masses": [None, 0.5], "flags": [False, True], "tag": "[bold]x[/bold]"}

    import calibatt_cli.generate

    monkeypatch.setattr(calibatt_cli.generate, "generate", lambda *a, **kw: Result())
    code, out, err = run_cli(monkeypatch, capsys, "generate", PROMPT, "--json")
    assert code in (0, None), err
    assert json.loads(out) == Result().summary()
