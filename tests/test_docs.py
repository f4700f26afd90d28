"""Every figure in the README and docs/ is traceable: the results files they cite exist, every GPU figure of the
README names its file, and the README's measured numbers are the ones in the files it cites."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "NOTES.md", RESULTS / "README.md"]

# A results file as the benchmarks name them; an abbreviated "…-tag.json" is not a name (its line names the file).
RESULT_NAME = re.compile(
    r"(?<![\w…-])((?:kernel|e2e|cli-wan|eval-report|eval|guard|parallel|train|judge|fp8|profile|ready|demo|gpu-session)"
    r"-[\w.-]*?\.(?:json|log))"
)
GPU_FIGURE = re.compile(r"TFLOP/s|\d ms\b|x stock|stock eager|peak GPU memory")


def blocks(text: str) -> list[str]:
    """Paragraphs (joined lines) and table rows (one each): the unit a citation covers."""
    out, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|") or not line.strip():
            if cur:
                out.append(" ".join(cur))
                cur = []
            if line.startswith("|"):
                out.append(line)
        else:
            cur.append(line)
    return out


def _values(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


# Numbers that describe the setting rather than measure it: a shape after "x"/"×", versions, architectures.
_SETTING = re.compile(r"(?:[x×]\s*|torch |[Tt]riton |Python (?:[≥>]=? ?)?|sm_)$")
# A unit that makes a number a ratio (not stored in the files) or a name (1.3B, 480p, 17 frames...).
_NOT_MEASURED = re.compile(
    r"\s*(?:x\b|×|[BpK]\b|GB\b|-byte\b|frames?\b|layers?\b|blocks?\b|prompts?\b|steps?\b|heads?\b|clips?\b|configs?\b"
    r"|of\b|held\b)"
)
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?")


def measured_numbers(block: str) -> list[str]:
    """The numbers of a README block that a results file must hold (ranges give both ends)."""
    text = re.sub(r"`[^`]*`", " ", block)  # file names, commands, config keys
    if text.startswith("|"):
        text = " | ".join(text.strip("|").split("|")[1:])  # the first cell names the row
    found = []
    for m in _NUMBER.finditer(text):
        if _SETTING.search(text[: m.start()]) or _NOT_MEASURED.match(text, m.end()):
            continue
        for num in filter(None, m.groups()):
            if "." in num or int(num) >= 10:  # small integers are counts and settings
                found.append(num)
    return found


def held_by(num: str, values: list[float]) -> bool:
    """`num` is one of `values` rounded to its printed decimals (or a share as a percentage, or ms as s)."""
    decimals = len(num.split(".")[1]) if "." in num else 0
    want = float(num)
    return any(abs(round(v * scale, decimals) - want) < 1e-9 for v in values for scale in (1.0, 100.0, 0.001))


def _cited(block: str) -> list[Path]:
    return [RESULTS / name for name in RESULT_NAME.findall(block)]


def test_every_cited_results_file_exists():
    missing = []
    for doc in DOCS:
        for block in blocks(doc.read_text()):
            block = re.sub(r"git history:[^)]*\)", "", block)  # named as history: `git log --all -- <path>`
            missing += [f"{doc.name}: {p.name}" for p in _cited(block) if not p.is_file()]
    assert not missing, f"cited but not in bench/results/: {missing}"


def test_every_readme_gpu_figure_cites_a_results_file():
    uncited = [
        b[:90]
        for b in blocks((ROOT / "README.md").read_text())
        if GPU_FIGURE.search(b) and not b.startswith(("| |", "|---")) and not any(p.is_file() for p in _cited(b))
    ]
    assert not uncited, f"GPU figures without a results file beside them: {uncited}"


@pytest.mark.parametrize("block", [b for b in blocks((ROOT / "README.md").read_text()) if RESULT_NAME.search(b)])
def test_readme_numbers_are_the_cited_files(block):
    files = [p for p in _cited(block) if p.is_file()]
    values = [v for p in files for v in _file_values(p)]
    wrong = [n for n in measured_numbers(block) if not held_by(n, values)]
    assert not wrong, f"{wrong} not in {[p.name for p in files]}: {block[:120]!r}"


def _file_values(path: Path) -> list[float]:
    """A results file's numbers: a JSON file's values, a device call's log's numbers as printed."""
    if path.suffix == ".json":
        return _values(json.loads(path.read_text()))
    return [float(m) for m in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", path.read_text())]


def test_the_checker_catches_a_drifted_number():
    """The check above can fail: a number one unit off in the last printed digit is not held by the file."""
    values = [591.358, 645.083, 0.976318, 0.0699]
    assert held_by("591", values) and held_by("645", values) and held_by("0.976", values) and held_by("7.0", values)
    assert not held_by("592", values) and not held_by("0.977", values) and not held_by("7.1", values)
    assert measured_numbers("| row 1.3B | 591-645 TFLOP/s at 2.30x, `x-1.json` 480p x 81, torch 2.11 |") == [
        "591",
        "645",
    ]
