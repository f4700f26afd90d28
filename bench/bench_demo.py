"""`make demo`'s three commands on the CPU, timed as the user runs them: each a fresh process.

    calibatt calibrate
    calibatt compile
    calibatt generate "a red circle moving left on a black background" -o out/demo.mp4

Each run works in a fresh temporary folder with a copy of the checkout's configs/tiny.yaml whose prompts path is
absolute and whose outputs point into that folder (nothing under out/ is touched; compile never finds a cache
to reuse). Several checkouts can be timed side by side (--variant NAME=ROOT, each run with PYTHONPATH=ROOT and
ROOT/kernels), alternating within every repeat so that a shared machine's load falls on all alike; the
medians are compared, and the bundle and video of every run must be the same bytes across runs and
variants (`same_results`). Writes bench/results/demo-cpu-<date>[-<tag>].json with the machine (CPU count,
processor, load average before and after, and at each run's start). With --dense every run also times
`calibatt generate --dense` (the stock pipeline), alternately before and after the sparse generate, and the
file holds the ratio of the medians (dense over sparse: at least 0.98 is "the sparse generate is no slower").

    python bench/bench_demo.py                                   # this checkout, 3 repeats
    python bench/bench_demo.py --dense --repeats 5 --tag dense   # the sparse generate against --dense
    python bench/bench_demo.py --variant main=/work/main --variant new=. --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red circle moving left on a black background"
STAGES = ("calibrate", "compile", "generate")


def stage_args(stage: str, config: Path) -> list[str]:
    if stage == "generate":
        return ["generate", PROMPT, "-o", "out/demo.mp4", "--config", str(config)]
    if stage == "generate_dense":  # the stock pipeline on the same prompt: what the sparse generate is held to
        return ["generate", PROMPT, "-o", "out/dense.mp4", "--dense", "--config", str(config)]
    return [stage, "--config", str(config)]


def work_config(root: Path, work: Path) -> Path:
    """The checkout's tiny.yaml with its prompts file made absolute and its outputs in `work`."""
    data = yaml.safe_load((root / "configs" / "tiny.yaml").read_text())
    cal = data.setdefault("calibration", {})
    prompts = Path(cal.get("prompts", "configs/prompts/tiny_calibrate.txt"))
    cal["prompts"] = str(prompts if prompts.is_absolute() else (root / prompts).resolve())
    cal["output"] = str(work / "out" / "tiny.bundle.safetensors")
    comp = data.setdefault("compile", {})
    comp["bundle"] = cal["output"]
    comp["cache_dir"] = str(work / "out" / "tiny.cache")
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cpu_model() -> str:
    """The CPU's model name (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def one_run(
    name: str, root: Path, python: str, keep: Path | None, dense: bool = False, dense_first: bool = False
) -> dict:
    """One run of the demo's commands in a fresh folder; with `dense`, also `generate --dense` (before or after
    the sparse generate, as `dense_first` says: repeats alternate, so that neither always runs on a warmer
    machine)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")  # as the Makefile exports
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "kernels")])
    work = Path(tempfile.mkdtemp(prefix=f"bench-demo-{name}-"))
    try:
        (work / "out").mkdir()
        config = work_config(root, work)
        run = {"load1_at_start": round(os.getloadavg()[0], 2)}
        log = []
        stages = list(STAGES)
        if dense:
            stages.insert(stages.index("generate") + (0 if dense_first else 1), "generate_dense")
        for stage in stages:
            t0 = time.perf_counter()
            r = subprocess.run(
                [python, "-m", "calibatt_cli", *stage_args(stage, config)],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            run[stage] = round(time.perf_counter() - t0, 3)
            log.append(f"$ calibatt {stage}\n{r.stdout}{r.stderr}")
            if r.returncode != 0:
                raise SystemExit(f"{name}: calibatt {stage} failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
        run["total"] = round(sum(run[s] for s in STAGES), 3)
        run["bundle_sha256"] = sha256(work / "out" / "tiny.bundle.safetensors")
        run["video_sha256"] = sha256(work / "out" / "demo.mp4")
        if dense:
            run["dense_video_sha256"] = sha256(work / "out" / "dense.mp4")
        if keep is not None:
            (keep / f"{name}.log").write_text("\n".join(log))
        return run
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME=ROOT",
        help="a checkout to time (repeatable, run in this order in every repeat); default: this one",
    )
    ap.add_argument("--repeats", "-r", type=int, default=3)
    ap.add_argument("--python", default=sys.executable, help="interpreter for the commands (default: this one)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/demo-cpu-...)")
    ap.add_argument("--logs", type=Path, default=None, help="folder for the last run's output of each variant")
    ap.add_argument(
        "--dense",
        action="store_true",
        help="also time `generate --dense` in every run (alternating before and after the sparse generate): "
        "the sparse generate's speed against the stock pipeline's",
    )
    args = ap.parse_args()

    variants = {}
    for item in args.variant or [f"this={REPO}"]:
        name, _, root = item.partition("=")
        root_path = Path(root).resolve()
        if not name or not (root_path / "calibatt_cli").is_dir():
            raise SystemExit(f"--variant '{item}': expected NAME=ROOT with ROOT a calibatt checkout")
        variants[name] = root_path
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)

    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {n: [] for n in variants}
    for rep in range(args.repeats):
        for name, root in variants.items():
            run = one_run(name, root, args.python, args.logs, dense=args.dense, dense_first=rep % 2 == 1)
            runs[name].append(run)
            times = "  ".join(f"{s} {run[s]:6.1f}" for s in (*STAGES, "total"))
            print(f"repeat {rep + 1}/{args.repeats} {name:>10}: {times}   load {run['load1_at_start']}", flush=True)
    load_after = [round(x, 2) for x in os.getloadavg()]

    results = {}
    for name, rs in runs.items():
        results[name] = {
            "root": str(variants[name]),
            "runs": rs,
            "median": {s: round(statistics.median(r[s] for r in rs), 2) for s in (*STAGES, "total")},
        }
        if args.dense:
            med = statistics.median(r["generate_dense"] for r in rs)
            results[name]["median"]["generate_dense"] = round(med, 2)
            # > 1: the sparse generate is faster than the stock pipeline's
            results[name]["dense_over_sparse_generate"] = round(med / statistics.median(r["generate"] for r in rs), 3)
    digests = {(r["bundle_sha256"], r["video_sha256"]) for rs in runs.values() for r in rs}
    same = len(digests) == 1 and len({r.get("dense_video_sha256") for rs in runs.values() for r in rs}) == 1

    print(f"\nmedians over {args.repeats} repeats (s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}")
    print(f"{'variant':>10}  " + "  ".join(f"{s:>9}" for s in (*STAGES, "total")))
    for name, res in results.items():
        print(f"{name:>10}  " + "  ".join(f"{res['median'][s]:9.2f}" for s in (*STAGES, "total")))
    first = next(iter(results))
    for name in list(results)[1:]:
        ratio = results[first]["median"]["total"] / results[name]["median"]["total"]
        print(f"{first} / {name} total: {ratio:.2f}x")
    for name, res in results.items():
        if args.dense:
            print(
                f"{name}: generate --dense {res['median']['generate_dense']:.2f} s, sparse generate "
                f"{res['median']['generate']:.2f} s: dense / sparse {res['dense_over_sparse_generate']}"
            )
    print(f"same bundle and video in every run: {same}")
    print(f"load average before {load_before}, after {load_after}")

    date = datetime.date.today().isoformat()
    out = args.out or REPO / "bench" / "results" / f"demo-cpu-{date}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": date,
        "what": "make demo's three commands (calibrate, compile, generate) on configs/tiny.yaml, fresh processes"
        + ("; and generate --dense, alternating before and after the sparse generate" if args.dense else ""),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "2"),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "repeats": args.repeats,
        "same_results": same,
        "variants": results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    if not same:
        raise SystemExit("the runs' bundles or videos differ (see bundle_sha256 / video_sha256 in the results)")


if __name__ == "__main__":
    main()
