"""`calibatt calibrate`: measure block attention mass on the dense model and keep the blocks that matter."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__, parallel
from .bundle import MaskBundle, sampling_identity, save_bundle
from .config import Config, resolve_input
from .errors import ConfigError
from .masks import retained_mass, select_blocks
from .models import check_device, load_model, model_identity
from .runtime import MassRecorder, RecordController
from .runtime.controllers import mass_from_fixed
from .util import atomic_path, canonical_json, check_output_path, sha256_hex


def step_buckets(steps: int, warmup_steps: int, buckets: int) -> list[int]:
    """step -> bucket; warm-up steps are -1 (always dense); the rest split into contiguous groups."""
    sparse = steps - warmup_steps
    if buckets > sparse:
        raise ConfigError(
            f"calibration.buckets ({buckets}) exceeds the {sparse} sparse steps (generate.steps - warmup_steps); "
            f"lower calibration.buckets"
        )
    out = [-1] * warmup_steps
    for i in range(sparse):
        out.append(i * buckets // sparse)
    return out


def read_prompts(path: str | Path, cfg: Config | None = None) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    p = resolve_input(path, cfg) if cfg is not None else Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts file '{path}' not found; pass an existing file (one prompt a line)")
    prompts = [line.strip() for line in p.read_text().splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts file '{path}' has no prompts; write one prompt a line")
    return prompts


@dataclass
class CalibrationResult:
    bundle: MaskBundle | None  # None on the processes of a torchrun launch that do not write it (rank > 0)
    path: Path
    seconds: float
    mass: torch.Tensor  # float64 [buckets, layers, heads, Mq, Mk], the averaged block mass


@dataclass
class ShardResult:
    path: Path
    shard: tuple[int, int]  # (i, n)
    prompts: int  # how many of the prompts this shard recorded
    seconds: float


def calibrate(cfg: Config, on_step: Callable[[], None] | None = None) -> CalibrationResult:
    """Record the dense model's block mass over the prompts and write the bundle. Under torchrun the prompts
    are shared out over the processes, the fixed-point sums are added across them, and rank 0 writes a bundle
    bit-identical to one process's."""
    check_device(cfg.model.device)
    c = cfg.calibration
    out_path = check_output_path(Path(c.output), "bundle")
    prompts = read_prompts(c.prompts, cfg)
    meta = bundle_meta(cfg, prompts)
    _check_data_parallel_only(cfg)
    layout = parallel.setup(cfg.parallel, cfg.model.device)
    t0 = time.perf_counter()
    totals, counts = record_mass(cfg, prompts, layout.shard(len(prompts)), layout, on_step)
    totals = parallel.all_reduce_sum(totals, layout)
    counts = parallel.all_reduce_sum(counts, layout)
    res = finish_bundle(meta, totals, counts, out_path, write=layout.is_main)
    parallel.barrier(layout)  # the bundle exists on return, on every rank
    res.seconds = time.perf_counter() - t0
    return res


def calibrate_shard(cfg: Config, shard: str, on_step: Callable[[], None] | None = None) -> ShardResult:
    """`calibrate --shard i/N`: record prompts i, i+N, i+2N, ... and write their block-mass sums to
    calibration.output; `merge_shards` turns the N files into the bundle one process would have written."""
    i, n = parse_shard(shard)
    check_device(cfg.model.device)
    c = cfg.calibration
    out_path = check_output_path(Path(c.output), "shard")
    prompts = read_prompts(c.prompts, cfg)
    meta = bundle_meta(cfg, prompts)
    _check_data_parallel_only(cfg)
    if parallel.world_size() > 1:
        raise ConfigError("--shard is for separate jobs; under torchrun, calibrate shares the prompts by itself")
    mine = list(range(i, len(prompts), n))
    if not mine:
        raise ConfigError(f"shard {i}/{n} has no prompts ({len(prompts)} prompts); use at most {len(prompts)} shards")
    t0 = time.perf_counter()
    totals, counts = record_mass(cfg, prompts, mine, parallel.Layout(), on_step)
    body = {"schema_version": SHARD_SCHEMA, "shard": [i, n], "prompt_indices": mine, "bundle_meta": meta}
    tensors = {"mass_fixed": totals, "counts": counts}
    body["content_hash"] = _shard_hash(body, tensors)
    with atomic_path(out_path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={SHARD_KEY: json.dumps(body)})
    return ShardResult(out_path, (i, n), len(mine), time.perf_counter() - t0)


def merge_shards(paths: list[Path], output: Path) -> CalibrationResult:
    """The bundle from the N shard files of one calibration (any order); refuses missing, repeated or
    mismatched shards."""
    output = check_output_path(Path(output), "bundle")
    if not paths:
        raise ConfigError("no shard files given; pass the files `calibrate --shard i/N` wrote")
    t0 = time.perf_counter()
    loaded = [_load_shard(Path(p)) for p in paths]
    first = loaded[0][1]
    n = first["shard"][1]
    seen = {}
    for path, body, _ in loaded:
        if canonical_json(body["bundle_meta"]) != canonical_json(first["bundle_meta"]):
            raise ConfigError(
                f"shard '{path}' comes from another calibration (config, model or prompts differ) "
                f"than '{paths[0]}'; merge the shards of one run"
            )
        i, m = body["shard"]
        if m != n:
            raise ConfigError(f"shard '{path}' is {i}/{m}, but '{paths[0]}' is one of {n}; merge the shards of one run")
        if i in seen:
            raise ConfigError(f"shards '{seen[i]}' and '{path}' are both shard {i}/{n}; pass each shard once")
        seen[i] = path
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise ConfigError(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing; pass all {n} shard files")
    totals = sum(t["mass_fixed"] for _, _, t in loaded)
    counts = sum(t["counts"] for _, _, t in loaded)
    res = finish_bundle(first["bundle_meta"], totals, counts, output, write=True)
    res.seconds = time.perf_counter() - t0
    return res


SHARD_SCHEMA = 1
SHARD_KEY = "calibatt_calibration_shard"


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard '{shard}' must be i/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard '{shard}': i must be in 0..N-1 (e.g. 0/{max(n, 1)})")
    return i, n


def _check_data_parallel_only(cfg: Config) -> None:
    p = cfg.parallel
    parallel.check_parallel_config(p)
    if p.cfg_parallel or p.ulysses != 1:
        raise ConfigError(
            "calibrate shares the prompts over the processes (data parallel); parallel.cfg_parallel and "
            "parallel.ulysses are for generate: unset them"
        )


def _shard_hash(body: dict, tensors: dict[str, torch.Tensor]) -> str:
    rest = {k: v for k, v in body.items() if k != "content_hash"}
    return sha256_hex(canonical_json(rest), *(tensors[k].contiguous().numpy().tobytes() for k in sorted(tensors)))


def _load_shard(path: Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    fix = "re-run `calibatt calibrate --shard i/N` for it"
    if not path.is_file():
        raise ConfigError(f"shard '{path}' not found; pass the files `calibatt calibrate --shard i/N` wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if SHARD_KEY not in header:
                raise ConfigError(f"'{path}' is not a calibration shard; {fix}")
            tensors = {k: f.get_tensor(k) for k in ("mass_fixed", "counts")}
        body = json.loads(header[SHARD_KEY])
        ok = (
            body["schema_version"] == SHARD_SCHEMA
            and body["content_hash"] == _shard_hash(body, tensors)
            and tensors["mass_fixed"].dtype == torch.int64
            and tensors["counts"].dtype == torch.int64
            and tensors["mass_fixed"].shape[:2] == tensors["counts"].shape
        )
    except ConfigError:
        raise
    except Exception:  # safetensors and json raise several types for truncated or garbled files
        raise ConfigError(f"shard '{path}' is corrupt or truncated; {fix}") from None
    if not ok:
        raise ConfigError(f"shard '{path}' failed its checks (corrupt, edited or another version); {fix}")
    return path, body, tensors


def bundle_meta(cfg: Config, prompts: list[str]) -> dict:
    """What a bundle records of the run that made it (everything but the measured figures)."""
    c = cfg.calibration
    ident = model_identity(cfg)
    grid = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    return {
        "calibatt_version": __version__,
        "model": {"name": ident.name, "id": ident.model_id, "hash": ident.model_hash},
        "grid": {
            "tokens": grid,
            "num_tokens": grid[0] * grid[1] * grid[2],
            "video": {"frames": cfg.video.frames, "height": cfg.video.height, "width": cfg.video.width},
        },
        "block_size": c.block_size,
        "steps": cfg.generate.steps,
        "step_buckets": step_buckets(cfg.generate.steps, c.warmup_steps, c.buckets),
        "warmup_steps": c.warmup_steps,
        "epsilon": c.epsilon,
        "sampling": sampling_identity(cfg, ident),
        "prompts": prompts,
    }


def record_mass(
    cfg: Config,
    prompts: list[str],
    indices: list[int],
    layout: parallel.Layout,
    on_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the dense model on prompts[i] for i in `indices` (seed calibration.seed + i, as in one process) and
    return the fixed-point block-mass sums int64 [buckets, layers, heads, Mq, Mk] and the sample counts
    int64 [buckets, layers]. On the CPU the prompts are shared over `calibration.workers` threads (see
    `worker_plan`); the integer sums make the result the same bits for any number of workers."""
    c = cfg.calibration
    ident = model_identity(cfg)
    device = parallel.process_device(cfg.model.device, layout)
    run_cfg = replace(cfg, model=replace(cfg.model, device=device))
    workers, threads = worker_plan(c.workers, device, len(indices))
    if workers == 1:
        recorders = [_record(run_cfg, load_model(run_cfg), prompts, indices, on_step)]
    else:
        recorders = _record_in_threads(run_cfg, prompts, indices, on_step, workers, threads)
    grid = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    nb = -(-grid[0] * grid[1] * grid[2] // c.block_size)
    totals = torch.zeros(c.buckets, ident.layers, ident.heads, nb, nb, dtype=torch.int64)
    counts = torch.zeros(c.buckets, ident.layers, dtype=torch.int64)
    for recorder in recorders:
        for (b, layer), t in recorder.sums.items():
            totals[b, layer] += t
            counts[b, layer] += recorder.counts[(b, layer)]
    return totals, counts


def worker_plan(workers: int | str, device: str, prompts: int) -> tuple[int, int]:
    """(worker threads, torch CPU threads each) for recording `prompts` prompts. On the CPU, a model call
    spread over a few cores spends much of its time in the many small ops that split badly (and waits on
    the slowest core: on a shared machine, any busy one), while independent prompts scale with the cores:
    `auto` runs min(torch's threads, prompts) workers and shares the threads among them. A GPU records
    one prompt at a time (torchrun shares prompts over GPUs)."""
    total = torch.get_num_threads()
    if not str(device).startswith("cpu"):
        if workers not in ("auto", 1):
            raise ConfigError(
                f"calibration.workers={workers} is for the CPU; on a GPU set it to auto or 1 "
                "(torchrun shares the prompts over GPUs)"
            )
        return 1, total
    n = min(total, prompts) if workers == "auto" else min(int(workers), prompts)
    n = max(n, 1)
    return n, max(1, total // n)


def _record(
    cfg: Config,
    model,
    prompts: list[str],
    indices: list[int],
    on_step: Callable[[], None] | None,
    stop: threading.Event | None = None,
) -> MassRecorder:
    """One model's recording of prompts[i] for i in `indices` (cfg's device is the one to run on)."""
    c = cfg.calibration
    recorder = MassRecorder(step_buckets(cfg.generate.steps, c.warmup_steps, c.buckets), c.block_size)
    controller = RecordController(recorder)
    if stop is not None:
        controller.step_hooks.append(lambda: _check_stop(stop))
    if on_step is not None:
        controller.step_hooks.append(on_step)
    model.install(controller)
    try:
        with torch.inference_mode():
            for i in indices:
                # No VAE decode: calibration only needs the transformer's attention.
                model.run(prompts[i], cfg=cfg, controller=controller, seed=c.seed + i, output_type="latent")
    finally:
        model.uninstall()
    return recorder


class _Stopped(Exception):
    """A worker thread leaving early because another one failed or the run was interrupted."""


def _check_stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise _Stopped


def _record_in_threads(
    cfg: Config,
    prompts: list[str],
    indices: list[int],
    on_step: Callable[[], None] | None,
    workers: int,
    threads: int,
) -> list[MassRecorder]:
    """Worker w records indices[w::workers] on its own model with `threads` torch CPU threads (the heavy ops
    release the GIL). The models are built here one after the other: building draws from the global RNG
    (the random-weight models), which concurrent builds would interleave. A worker that fails, or Ctrl-C,
    stops the others at their next denoising step; the first error is raised."""
    models = [load_model(cfg) for _ in range(workers)]
    shares = [indices[w::workers] for w in range(workers)]
    results: list[MassRecorder | None] = [None] * workers
    errors: list[BaseException] = []
    stop = threading.Event()

    def work(w: int) -> None:
        try:
            torch.set_num_threads(threads)  # per thread: the OpenMP and MKL thread counts are thread-local
            results[w] = _record(cfg, models[w], prompts, shares[w], on_step, stop)
        except BaseException as e:  # noqa: B036 - handed to the main thread, which raises it
            errors.append(e)
            stop.set()

    saved = torch.get_num_threads()
    pool = [threading.Thread(target=work, args=(w,), name=f"calibrate-worker-{w}") for w in range(workers)]
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    except BaseException:  # Ctrl-C in the main thread: let the workers stop before unwinding
        stop.set()
        for t in pool:
            t.join()
        raise
    finally:
        torch.set_num_threads(saved)
    if errors:
        raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
    if any(r is None for r in results):  # every worker either records its share or fails
        raise RuntimeError("a calibration worker ended without its recording")
    return results


def finish_bundle(
    meta: dict, totals: torch.Tensor, counts: torch.Tensor, out_path: Path, *, write: bool
) -> CalibrationResult:
    """Masks from the summed block mass, and the bundle (written when `write`)."""
    if bool((counts == 0).any()):
        raise ConfigError("no attention was recorded for some bucket; check calibration.buckets and the prompts")
    mass = mass_from_fixed(totals) / counts[..., None, None, None].to(torch.float64)  # [buckets, layers, H, Mq, Mk]
    masks = select_blocks(mass, meta["epsilon"])
    density = masks.double().mean(dim=(-1, -2))
    retained = retained_mass(mass, masks)
    meta = dict(
        meta,
        samples_per_bucket=[int(x) for x in counts[:, 0]],
        entries={"density": _rounded(density), "retained_mass": _rounded(retained)},
        summary={"density": float(density.mean()), "retained_mass": float(retained.mean())},
    )
    bundle = save_bundle(out_path, masks, meta) if write else None
    return CalibrationResult(bundle, out_path, 0.0, mass)


def _rounded(x: torch.Tensor) -> list:
    return torch.round(x * 1e6).div(1e6).tolist()
