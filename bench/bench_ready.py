"""Time from `calibatt generate`'s start to its first denoising step, by part (`generate --json`'s ready_parts),
for two source trees side by side: the host-side set-up a GPU run pays too (the model's identity, the cache's
checks and plan, the processors' install, the pipeline's set-up).

    python bench/bench_ready.py --workdir /tmp/wready --trees /tmp/base . --runs 5 --dense --profile 30
    python bench/bench_ready.py --workdir /tmp/wready --device cuda --head-dim 128 --ffn-dim 8960 \
        --height 480 --width 832 --frames 81 --steps 12 --trees /tmp/base . --dense --profile 40   # a GPU: 1.3B

1. Writes (once) a random-weight Wan 2.1 pipeline as a diffusers folder with 1.3B's depth and heads (30 blocks,
   12 heads) at a small width (--head-dim, --ffn-dim), the real VAE (configs/wan2.1/vae) and a one-layer UMT5
   of the real width (4096), as bench_cli_wan.py does, or with --text-encoder full the real UMT5-XXL encoder's
   shape (11.4 GB: the stock load a user of Wan 2.1 1.3B waits for includes it); calibrates it (library call),
   replaces the masks by bench_e2e.py's local masks at --density, and runs `calibatt compile` with the first
   tree.
2. Runs `calibatt generate --strict --json` (and with --dense the stock pipeline eager through calibatt's
   loader, and the stock load as diffusers documents it, `from_pretrained` then `.to(device)`, in a process of
   its own: the issue's "stock load") with each tree in turn, alternating, --runs times each, and reports the
   median of every part. With --load-threads N M, calibatt's run runs with model.load_threads=N and =M (the
   stock pipeline's always with 1, diffusers' pipe.to). The trees share the cache: they must agree on what a
   cache is (same kernels' sources and cache schema). Each run also records the process's time outside the
   generate call: `before` (interpreter start, imports, the CLI's checks) and `exit`.
3. With --importtime, one more run per tree and variant under `python -X importtime`: the top-level imports'
   cumulative seconds. With --profile N, one more run per tree through the library under cProfile, from the
   generate call to the end of the first denoising step: the N functions of most cumulative time.

The machine, checkpoint and video size are recorded in the JSON: numbers from a CPU say what host work costs,
not what a GPU's load does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_load import load, tree_env  # noqa: E402

PROMPT = "a red car driving along a coastal road at sunset"

# Runs generate through the library under cProfile until the first step ends (argv: config, prompt, output,
# profile out, top N); prints the N functions of most cumulative time as JSON.
PROFILE = """
import cProfile, json, pstats, sys
from calibatt_cli.config import load_config
from calibatt_cli.generate import generate

config, prompt, output, top = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = load_config(config, ["generate.strict=true"])
prof = cProfile.Profile()
prof.enable()
res = generate(cfg, [prompt], output=output, on_step=prof.disable)
stats = pstats.Stats(prof)
rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:top]
print(json.dumps({
    "ready_parts": {k: round(v, 3) for k, v in res.ready_parts.items()},
    "top_cumulative": [
        {"function": f"{path}:{line}({name})", "calls": nc, "cumulative_s": round(ct, 4), "own_s": round(tt, 4)}
        for (path, line, name), (cc, nc, tt, ct, callers) in rows
    ],
}))
"""


def stock_load(work: Path, device: str) -> dict:
    """The stock pipeline's load as diffusers documents it (from_pretrained, then .to(device)) in a process of
    its own: bench_load.py's "stock" variant."""
    import yaml

    dtype = yaml.safe_load((work / "config.yaml").read_text())["model"]["dtype"]
    return load(work / "weights", device, dtype, "stock")


def setup(work: Path, args) -> None:
    from bench_cli_wan import synthetic_bundle, write_config, write_weights

    weights = work / "weights"
    if not (weights / "model_index.json").is_file():
        write_weights(weights, args.device, args.text_encoder, attention_head_dim=args.head_dim, ffn_dim=args.ffn_dim)
    cfg_args = argparse.Namespace(
        device=args.device, height=args.height, width=args.width, frames=args.frames, steps=args.steps
    )
    cfg = write_config(work, weights, cfg_args)
    text = cfg.read_text().replace("name: wan2.1-1.3b", "name: wan2.1")  # the size comes from the weights
    cfg.write_text(text)
    synthetic_bundle(cfg, args.density, "local")
    env = tree_env(ROOT)
    cmd = [sys.executable, "-m", "calibatt_cli", "compile", "--config", str(cfg), "--recompile"]
    subprocess.run(cmd, env=env, check=True, cwd=work)


def generate(tree: Path, work: Path, *flags: str, importtime: bool = False) -> dict:
    """One `calibatt generate --json` of `tree` in a fresh process: wall seconds, ready_parts, and the process's
    time outside the generate call: `before` (interpreter start, imports, the CLI's checks: from the process's
    start to the JSON line, less the generate call's own time) and `exit` (from the JSON line to the process's
    end). With `importtime`, also the top-level imports' cumulative seconds (python -X importtime)."""
    env = tree_env(tree)
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    cmd = [sys.executable, "-m", "calibatt_cli", "generate", PROMPT, "--config", str(work / "config.yaml"), "--json"]
    cmd += ["-o", str(work / "video.mp4"), *flags]
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH's tree
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, cwd=work)
        lines, t_json = [], None
        for line in p.stdout:
            lines.append(line)
            if line.startswith("{"):
                t_json = time.perf_counter()
        rc = p.wait()
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read()
    if rc != 0 or t_json is None:
        raise SystemExit(f"generate failed in {tree}:\n{''.join(lines)[-2000:]}\n{stderr[-3000:]}")
    g = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    parts = g["ready_parts"]
    in_call = g["ready_seconds"] - parts.get("rest", 0.0) + g["seconds"]  # the call, to its videos' end
    row = {"wall": wall, "ready": g["ready_seconds"], "load": g["load_seconds"], **parts}
    row.update(before=t_json - t0 - in_call, sampling=g["seconds"], exit=wall - (t_json - t0))
    if importtime:
        row["imports"] = top_imports(stderr)
    return row


def top_imports(stderr: str, n: int = 12) -> dict:
    """The cumulative seconds of the imports made at the top level (not from inside another module's import),
    from `-X importtime`'s lines: the n largest."""
    out = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        # nesting shows as two more spaces of indent per level: the top level has the separator's one
        if cumulative.strip().isdigit() and not name.startswith("  "):
            out[name.strip()] = out.get(name.strip(), 0) + int(cumulative) / 1e6
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:n]}


def profile(tree: Path, work: Path, top: int) -> dict:
    env = tree_env(tree)
    cmd = [sys.executable, "-c", PROFILE, str(work / "config.yaml"), PROMPT, str(work / "video.mp4"), str(top)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    if r.returncode != 0:
        raise SystemExit(f"profiled generate failed in {tree}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--trees", nargs="+", default=[str(ROOT)], help="source trees to compare (first: baseline)")
    ap.add_argument("--labels", nargs="+", help="a name per tree (default: the paths)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dense", action="store_true", help="also time the stock pipeline (--dense) with each tree")
    ap.add_argument("--device", default="cpu", help="cuda: time a GPU's start (set the 1.3B widths and video)")
    ap.add_argument("--profile", type=int, default=0, help="N: one profiled run per tree, its top N functions")
    ap.add_argument(
        "--importtime", action="store_true", help="one more run per tree and variant under -X importtime: its imports"
    )
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ffn-dim", type=int, default=256)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument(
        "--load-threads",
        type=int,
        nargs="+",
        help="model.load_threads of calibatt's run (default: the config's); with several, a run with each",
    )
    ap.add_argument(
        "--text-encoder",
        choices=("one-layer", "full"),
        default="one-layer",
        help="full: the real UMT5-XXL encoder's shape (11.4 GB), as the user's pipeline loads (use its own workdir)",
    )
    ap.add_argument("--json", help="write the results here (default bench/results/ready-cpu-<date>.json)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "cache" / "manifest.json").is_file():
        setup(work, args)
    trees = [Path(t).resolve() for t in args.trees]
    labels = args.labels or [str(t) for t in trees]
    # the stock pipeline eager, as bench_cli_wan.py's stock_eager row, placed by diffusers' own pipe.to (the
    # issue's "stock load")
    dense = ("--dense", "--set", "generate.compile=false", "--set", "model.load_threads=1")
    # calibatt's run with each number of loading threads, named by a suffix where there are several (none
    # given: the config's default)
    threads = args.load_threads or []
    suffixes = {"": ()}
    if threads:
        suffixes = {(f" lt={n}" if len(threads) > 1 else ""): ("--set", f"model.load_threads={n}") for n in threads}
    variants = [(f"sparse{sfx}", ("--strict", *extra)) for sfx, extra in suffixes.items()]
    variants += [("dense", dense)] if args.dense else []
    rows: dict[str, list[dict]] = {f"{lab} {v}": [] for lab in labels for v, _ in variants}
    if args.dense:
        rows["diffusers load"] = []
    for i in range(args.runs):
        order = list(zip(trees, labels, strict=True))
        if i % 2:
            order.reverse()  # alternate which tree goes first
        for tree, label in order:
            for v, flags in variants:
                rows[f"{label} {v}"].append(generate(tree, work, *flags))
                print(label, v, json.dumps({k: round(x, 3) for k, x in rows[f"{label} {v}"][-1].items()}), flush=True)
        if args.dense:
            rows["diffusers load"].append(stock_load(work, args.device))
            print("diffusers load", json.dumps({k: round(x, 3) for k, x in rows["diffusers load"][-1].items()}))
    medians = {
        name: {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]} for name, runs in rows.items()
    }
    imports = (
        {
            f"{label} {v}": generate(tree, work, *flags, importtime=True)
            for tree, label in zip(trees, labels, strict=True)
            for v, flags in variants
        }
        if args.importtime
        else None
    )
    profiles = (
        {label: profile(tree, work, args.profile) for tree, label in zip(trees, labels, strict=True)}
        if args.profile
        else None
    )

    def ratios(baseline) -> dict | None:
        """Each tree's sparse ready (per suffix) over baseline(label); None without the stock runs."""
        if not args.dense:
            return None
        return {
            f"{lab} sparse{sfx}": round(medians[f"{lab} sparse{sfx}"]["ready"] / baseline(lab), 3)
            for lab in labels
            for sfx in suffixes
        }

    weights = work / "weights"
    tcfg = json.loads((weights / "transformer" / "config.json").read_text())
    tecfg = json.loads((weights / "text_encoder" / "config.json").read_text())
    sizes = {p.relative_to(weights).as_posix(): p.stat().st_size for p in sorted(weights.rglob("*.safetensors"))}
    if args.device == "cuda":
        import torch

        machine = f"{torch.cuda.get_device_name()}, {os.cpu_count()} host cores"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared, noisy)"
    res = {
        "device": args.device,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "checkpoint": (
            f"random-weight Wan 2.1 diffusers folder: transformer {tcfg['num_layers']} blocks x "
            f"{tcfg['num_attention_heads']} heads x head dim {tcfg['attention_head_dim']}, ffn {tcfg['ffn_dim']} "
            "(bf16), the real VAE config (fp32), "
            + (
                "the real UMT5-XXL encoder's shape (24 layers, width 4096, bf16)"
                if tecfg["num_layers"] > 1
                else "a one-layer UMT5 of width 4096 (bf16)"
            )
        ),
        "file_bytes": sizes,
        "video": f"{args.height}x{args.width}, {args.frames} frames, {args.steps} steps, masks density {args.density}",
        "trees": dict(zip(labels, map(str, trees), strict=True)),
        "runs": args.runs,
        "order": "alternating, the first tree first on even runs",
        # each row's flags to calibatt generate (model.load_threads among them)
        "flags": {v: " ".join(flags) for v, flags in variants},
        "medians": medians,
        # time to the first step of calibatt generate over the stock pipeline's load (the target: <= 1.3)
        "ready_vs_stock_load": ratios(lambda lab: medians[f"{lab} dense"]["load"]),
        # ... over the stock pipeline's load as diffusers documents it (from_pretrained, .to), in its own process
        "ready_vs_diffusers_load": ratios(lambda lab: medians["diffusers load"]["load"]),
        # ... and over the stock pipeline's own time to its first step (its load and the set-up around it)
        "ready_vs_stock_ready": ratios(lambda lab: medians[f"{lab} dense"]["ready"]),
        "runs_raw": rows,
        "profiles": profiles,
        "importtime_runs": imports,
    }
    where = machine.split(",")[0].lower().replace(" ", "-") if args.device == "cuda" else args.device  # the card
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / f"ready-{where}-{res['date']}.json"
    n = 2
    while not args.json and out.exists():  # another run of the day gets its own file, never the earlier one's
        out, n = out.with_name(f"ready-{where}-{res['date']}-{n}.json"), n + 1
    out.write_text(json.dumps(res, indent=1))
    for name, m in medians.items():
        print(f"{name:24s} " + " ".join(f"{k}={v}" for k, v in m.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
