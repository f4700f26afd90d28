"""`calibatt evaluate` on the tiny-random model at 32x32: both gate exits, the report page checked against
report.json (it parses, every image decodes, the numbers agree), and bad input refused with one line."""

import base64
import io
import json
import math
import sys
from html.parser import HTMLParser

import pytest
from PIL import Image

from calibatt_cli.cli.app import main

PROMPTS = "a red circle moving left on a black background\na blue square moving up\n"


def args(built, out, *extra):
    return ["evaluate", "--config", built, "--prompts", built.parent / "prompts.txt", "--out", out, *extra]


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["calibatt", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The small config, calibrated at epsilon 0.3 (masks not all-true) and compiled once for the module."""
    from conftest import SMALL_YAML

    from calibatt_cli.cache.build import compile_cache
    from calibatt_cli.calibrate import calibrate
    from calibatt_cli.config import load_config

    tmp = tmp_path_factory.mktemp("evaluate")
    (tmp / "prompts.txt").write_text(PROMPTS)
    (tmp / "out").mkdir()
    cfg_path = tmp / "small.yaml"
    cfg_path.write_text(
        SMALL_YAML.format(prompts=tmp / "prompts.txt", out=tmp / "out").replace("epsilon: 0.001", "epsilon: 0.3")
    )
    cfg = load_config(cfg_path)
    calibrate(cfg)
    compile_cache(cfg)
    return cfg_path


@pytest.fixture(scope="module")
def passing(built, tmp_path_factory):
    """One evaluate run with a gate every clip passes: (exit code, stdout, stderr, report folder)."""
    out = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    cap = _Capture()
    with mp.context() as m:
        m.setattr(sys, "stdout", cap.out)
        m.setattr(sys, "stderr", cap.err)
        m.setattr(
            sys, "argv", ["calibatt", *map(str, args(built, out, "--seeds", "0,1", "--min-psnr", 0, "--min-mass", 0))]
        )
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    return code, cap.out.getvalue(), cap.err.getvalue(), out


class _Capture:
    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()


def test_gate_passes(passing):
    code, out, _, folder = passing
    assert code == 0
    assert out.strip().endswith("index.html")
    data = json.loads((folder / "report.json").read_text())
    assert data["gate"]["passed"] and data["summary"]["clips"] == 4  # 2 prompts x 2 seeds
    assert 0.0 < data["summary"]["mean_density"] < 1.0, "epsilon 0.3 must drop blocks"
    for key in ("content_hash",):
        assert data["bundle"][key]
    assert data["model"]["hash"] and data["config_hash"] and data["versions"]["torch"] and data["device"]["name"]
    nb, nl = len(data["density"]), len(data["density"][0])
    assert (len(data["retained_mass"]), len(data["retained_mass"][0])) == (nb, nl)
    assert all(c["retained_mass"] is not None and 0 < c["retained_mass"] <= 1 + 1e-9 for c in data["clips"])
    assert len(data["step_seconds"]["dense"]) == len(data["step_seconds"]["sparse"]) == 4
    assert data["guard"] == [{"enabled": False, "reason": "generate.guard=false"}] * 2  # one per seed, off by default
    assert len(data["clips"][0]["psnr_db_frames"]) == len(data["clips"][0]["ssim_frames"]) == 5
    assert (folder / "index.html").stat().st_mode & 0o044, "the report keeps the umask's read bits"


def test_gate_fails_naming_the_worst_prompt(built, tmp_path, monkeypatch, capsys, passing):
    seed0 = [c for c in json.loads((passing[3] / "report.json").read_text())["clips"] if c["seed"] == 0]
    worst = min(seed0, key=lambda c: math.inf if c["psnr_db"] is None else c["psnr_db"])
    code, out, err = run_cli(monkeypatch, capsys, *args(built, tmp_path, "--seeds", "0", "--min-psnr", 1000, "--json"))
    assert code == 1
    line = json.loads(out)
    assert not line["gate"]["passed"] and line["gate"]["summary"] == err.strip().splitlines()[-1]
    last = err.strip().splitlines()[-1]
    assert "2 of 2 clip(s) below --min-psnr 1000.0" in last and f"'{worst['prompt']}'" in last, last
    assert (tmp_path / "report.json").is_file(), "a failing gate still writes its report"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.values, self.rows = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "tr" and ("data-key" in a or "data-clip" in a):
            self.rows.append(a)
            self.values.append([])
        if tag == "td" and "data-value" in a:
            self.values[-1].append(json.loads(a["data-value"]))


def test_page_parses_images_decode_and_numbers_match(passing):
    folder = passing[3]
    data = json.loads((folder / "report.json").read_text())
    page = _Page()
    page.feed((folder / "index.html").read_text())
    page.close()
    assert len(page.imgs) >= 5  # quality, 2 heatmaps, steps, thumbnails
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.verify()
        assert img.format == "PNG"
    summary = {r["data-key"]: v[0] for r, v in zip(page.rows, page.values, strict=True) if "data-key" in r}
    assert summary == data["summary"]
    clips = [v for r, v in zip(page.rows, page.values, strict=True) if "data-clip" in r]
    expect = [[c["seed"], c["psnr_db"], c["ssim"], c["retained_mass"]] for c in data["clips"]]
    assert clips == expect


def test_bad_input(built, tmp_path, monkeypatch, capsys):
    prompts = built.parent / "prompts.txt"
    cases = [
        (("--prompts", tmp_path / "missing.txt", "--out", tmp_path), "not found"),
        (("--prompts", prompts, "--seeds", "0,x", "--out", tmp_path), "--seeds"),
        (("--prompts", prompts, "--out", tmp_path / "nope" / "deeper"), "does not exist"),
        (("--prompts", prompts, "--out", tmp_path, "--set", f"compile.cache_dir={tmp_path}/none"), "no compiled cache"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--config", built, *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code not in (0, 1) and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.html")) and not list(tmp_path.glob(".*"))
