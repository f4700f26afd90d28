"""The Wan pipeline's load onto the device, by way of placing its weights, each run in a fresh process.

    python bench/bench_load.py --weights /tmp/wready-full/weights --device cuda --runs 3 \
        --variants stock threads:8 threads:16 pageable:8 device_map

Variants (each run's process imports the pipeline's classes and starts CUDA before its clock, as a script does
at its top; the clock covers from_pretrained and the placement, to the device's last copy):
- stock: diffusers' documented load, from_pretrained then pipe.to(device) (bench_ready.py's "diffusers load");
- threads:N: from_pretrained, then `models.base.to_device` with N threads, each staging its pieces through
  pinned buffers (what model.load_threads=N runs);
- pageable:N: the same threads, each copying straight from the pageable (memory-mapped) tensors;
- device_map: from_pretrained(device_map=device), diffusers' and transformers' own load onto the device.

Variants alternate within each run. The folder is written first if it holds no pipeline (bench_ready.py's
checkpoint: Wan 2.1 1.3B's transformer at --head-dim and --ffn-dim, the real VAE, and with --text-encoder full
the real UMT5-XXL encoder's shape). Its files are read once before the first run, so every run reads them from
the page cache, as a user's second load does. Writes bench/results/load-<card>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# One load (argv: weights folder, device, the transformer's and text encoder's dtype, variant); prints its
# seconds as JSON.
LOAD = """
import json, sys, time, torch

ti = time.perf_counter()
from diffusers import AutoencoderKLWan, WanPipeline
from calibatt_cli.models.base import to_device

weights, device, dtype, variant = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
kind, _, n = variant.partition(":")
torch.zeros(1, device=device)
t0 = time.perf_counter()
where = {"device_map": device} if kind == "device_map" else {}
vae = AutoencoderKLWan.from_pretrained(weights, subfolder="vae", dtype=torch.float32, **where)
pipe = WanPipeline.from_pretrained(weights, vae=vae, dtype=dtype, **where)
t1 = time.perf_counter()
if kind == "stock":
    pipe.to(device)
elif kind in ("threads", "pageable"):
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    to_device(modules, torch.device(device), int(n), staged=kind == "threads")
if device == "cuda":
    torch.cuda.synchronize()
t2 = time.perf_counter()
on = {p.device.type for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()}
assert on == {torch.device(device).type}, f"{variant}: weights on {on}"
print(json.dumps({"load": t2 - t0, "from_pretrained": t1 - t0, "place": t2 - t1, "import_and_cuda": t0 - ti}))
"""

VARIANTS = ("stock", "threads", "pageable", "device_map")


def check_variant(v: str) -> str:
    kind, _, n = v.partition(":")
    if kind not in VARIANTS or (kind in ("threads", "pageable")) != n.isdigit() or (n and int(n) < 1):
        raise argparse.ArgumentTypeError(f"'{v}': one of stock, threads:N, pageable:N, device_map")
    return v


def tree_env(tree: Path) -> dict:
    """The environment for a process of `tree`: its sources first on the path, then what the path held (the
    device image's extra packages)."""
    path = [str(tree), str(tree / "kernels"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def load(weights: Path, device: str, dtype: str, variant: str) -> dict:
    """One load of `variant` in a fresh process of this tree: its seconds."""
    cmd = [sys.executable, "-c", LOAD, str(weights), device, dtype, variant]
    r = subprocess.run(cmd, capture_output=True, text=True, env=tree_env(ROOT), cwd=weights.parent)
    if r.returncode != 0:
        raise SystemExit(f"the {variant} load failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def read_once(folder: Path) -> None:
    """Read every file of the folder: the runs then all find it in the page cache."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                while f.read(64 << 20):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="a Wan diffusers folder (written here if it holds none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", help="the transformer's and text encoder's dtype")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", type=check_variant, default=["stock", "threads:8"])
    ap.add_argument("--text-encoder", choices=("one-layer", "full"), default="full")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn-dim", type=int, default=8960)
    ap.add_argument("--json", help="write the results here (default bench/results/load-<card>-<date>.json)")
    args = ap.parse_args()
    weights = Path(args.weights).resolve()
    if not (weights / "model_index.json").is_file():
        from bench_cli_wan import write_weights

        write_weights(weights, args.device, args.text_encoder, attention_head_dim=args.head_dim, ffn_dim=args.ffn_dim)
    read_once(weights)
    rows: dict[str, list[dict]] = {v: [] for v in args.variants}
    for i in range(args.runs):
        order = args.variants if i % 2 == 0 else args.variants[::-1]  # alternate which goes first
        for v in order:
            rows[v].append(load(weights, args.device, args.dtype, v))
            print(v, json.dumps({k: round(x, 3) for k, x in rows[v][-1].items()}), flush=True)
    medians = {v: {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]} for v, runs in rows.items()}
    base = medians[args.variants[0]]["load"]
    if args.device == "cuda":
        import torch

        machine = f"{torch.cuda.get_device_name()}, {os.cpu_count()} host cores"
    else:
        machine = f"{os.cpu_count()} cores"
    sizes = {p.relative_to(weights).as_posix(): p.stat().st_size for p in sorted(weights.rglob("*.safetensors"))}
    res = {
        "device": args.device,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "checkpoint": f"random-weight Wan 2.1 diffusers folder, text encoder {args.text_encoder}",
        "file_bytes": sizes,
        "runs": args.runs,
        "order": "alternating, the listed order on even runs",
        "medians": medians,
        # each variant's load over the first variant's (the baseline), medians of the same runs
        f"load_vs_{args.variants[0]}": {v: round(m["load"] / base, 3) for v, m in medians.items()},
        "runs_raw": rows,
    }
    where = machine.split(",")[0].lower().replace(" ", "-") if args.device == "cuda" else args.device
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / f"load-{where}-{res['date']}.json"
    n = 2
    while not args.json and out.exists():  # another run of the day gets its own file
        out, n = out.with_name(f"load-{where}-{res['date']}-{n}.json"), n + 1
    out.write_text(json.dumps(res, indent=1))
    print(f"{'variant':14s} {'load s':>8s} {'from_pretrained':>16s} {'place':>8s} {'vs ' + args.variants[0]:>12s}")
    for v, m in medians.items():
        print(f"{v:14s} {m['load']:8.3f} {m['from_pretrained']:16.3f} {m['place']:8.3f} {m['load'] / base:12.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
