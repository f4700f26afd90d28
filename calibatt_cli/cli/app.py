"""The typer app: each command loads the config, calls one library function, and renders the result
(render.py). The tiny model's commands (train, judge) come from its kit (tiny/cli.py)."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from ..config import Config, dump_yaml, load_config
from ..errors import CalibattError
from . import render
from .render import console, out

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Calibrated block-sparse attention for video DiTs.")
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: configs/tiny.yaml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model name (model.name).")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="Local weights folder (model.path).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Use a bundle or cache made for other weights or sampling settings (compile.force); each "
        "difference is warned of and recorded.",
    ),
]

_debug = False

# The cyclic collector's full collections, held back while a `calibatt` process starts a command on the CPU
# (`_hold_full_collections`): importing torch, diffusers and transformers and building the model grows the heap
# by ~500k objects, and every 25 % of growth triggered a full collection walking all of them (0.7 s of the
# start of calibrate and of generate on the CPU demo). The young generations still collect. Only the program
# (run) holds them; in-process callers of main keep the interpreter's settings.
_program = False
_held_thresholds: tuple[int, int, int] | None = None  # the collector's thresholds to restore; None: not held


def _hold_full_collections() -> None:
    """Hold back full collections until `_release_full_collections` (the program only; no-op in-process)."""
    global _held_thresholds
    if _program and _held_thresholds is None:
        import gc

        _held_thresholds = gc.get_threshold()
        gc.set_threshold(_held_thresholds[0], _held_thresholds[1], 2**30)


def _release_full_collections() -> None:
    global _held_thresholds
    held, _held_thresholds = _held_thresholds, None
    if held is not None:
        import gc

        gc.set_threshold(*held)


def _started(cfg: Config, on_step):
    """`on_step` that ends the start-up hold at the first denoising step (the model is loaded: what the
    command allocates from then on is its work's). Off the CPU (large models, compiled blocks) the hold ends
    here, once the config is loaded: full collections then run throughout loading, as the interpreter sets them."""
    if not cfg.model.device.startswith("cpu"):
        _release_full_collections()
        return on_step

    def step():
        _release_full_collections()
        on_step()

    return step


def _load(config: Path | None, sets: list[str] | None, **flags) -> Config:
    overrides = list(sets or [])
    for key, value in flags.items():
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return load_config(config, overrides)


@app.command("config")
def config_cmd(config: ConfigOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Print the resolved config."""
    _set_debug(debug)
    cfg = _load(config, set_)
    out.print(f"# resolved from {cfg.source}", highlight=False)
    out.print(dump_yaml(cfg), end="", highlight=False, markup=False)
    from ..models import model_identity

    try:
        ident = model_identity(cfg)
    except CalibattError as e:
        out.print(f"# token grid: not derivable ({e})", highlight=False, markup=False, soft_wrap=True)
        return
    render.token_grid(cfg, ident)


@app.command()
def calibrate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts file (calibration.prompts).")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Dropped mass per row (calibration.epsilon).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Bundle path (calibration.output).")] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="Record only shard i/N of the prompts into a shard file (-o); see merge-shards."),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Run the dense model on the prompt set and write a mask bundle (under torchrun: prompts shared out)."""
    _hold_full_collections()
    from ..calibrate import calibrate as run_calibration
    from ..calibrate import calibrate_shard, read_prompts

    _set_debug(debug)
    cfg = _load(
        config,
        set_,
        **{
            "model.name": model,
            "model.path": _s(weights),
            "calibration.prompts": _s(prompts),
            "calibration.epsilon": epsilon,
            "calibration.output": _s(output),
        },
    )
    n_prompts = len(read_prompts(cfg.calibration.prompts, cfg))
    with render.progress() as bar:
        task = bar.add_task("calibrating", total=n_prompts * cfg.generate.steps)
        on_step = _started(cfg, lambda: bar.advance(task))
        if shard is not None:
            render.shard(calibrate_shard(cfg, shard, on_step=on_step))
            return
        res = run_calibration(cfg, on_step=on_step)
    if res.bundle is not None:  # rank 0 of a torchrun launch, or the one process
        render.calibration(res)


@app.command("merge-shards")
def merge_shards_cmd(
    shards: Annotated[list[Path], typer.Argument(help="The N files of `calibrate --shard i/N`, any order.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle path to write.")],
    debug: DebugOpt = False,
) -> None:
    """Merge the shard files of one calibration into its bundle (bit-identical to a one-process run)."""
    from ..calibrate import merge_shards

    _set_debug(debug)
    render.calibration(merge_shards(shards, output))


@app.command("compile")
def compile_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    bundle: Annotated[Path | None, typer.Option(help="Mask bundle (compile.bundle).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory (compile.cache_dir).")] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Without a GPU: check that every kernel config compiles "
            "for an architecture, e.g. sm_90 (writes no cache)."
        ),
    ] = None,
    recompile: Annotated[bool, typer.Option(help="Rebuild even if the cache is up to date.")] = False,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Turn a mask bundle into a kernel cache directory for generate (or, with --target, cross-compile)."""
    _hold_full_collections()  # while torch imports (compile's work may compile graphs: released before it)
    from ..cache.aot import cross_compile_configs
    from ..cache.build import compile_cache

    _set_debug(debug)
    cfg = _load(
        config,
        set_,
        **{
            "model.name": model,
            "model.path": _s(weights),
            "compile.bundle": _s(bundle),
            "compile.cache_dir": _s(cache_dir),
            "compile.target": target,
            "compile.force": True if force else None,
        },
    )
    _release_full_collections()
    if cfg.compile.target is not None:
        xres = cross_compile_configs(cfg)
        render.cross_compile(xres)
        if xres.failed:
            raise CalibattError(render.cross_compile_failures(xres))
        return
    render.cache(compile_cache(cfg, recompile=recompile))


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What the video shows.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="MP4 path (generate.output).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Render every prompt of a file (one a line).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (generate.seed).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (generate.steps).")] = None,
    dense: Annotated[bool, typer.Option("--dense", help="Run the stock dense pipeline (baseline).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON result line.")] = False,
    measure_mass: Annotated[bool, typer.Option(help="Measure the attention mass the masks keep (slower).")] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail if any kernel compiles or falls back (generate.strict).")
    ] = False,
    cfg_parallel: Annotated[
        bool, typer.Option("--cfg-parallel", help="Under torchrun: the two guidance branches on two processes.")
    ] = False,
    ulysses: Annotated[
        int | None, typer.Option(help="Under torchrun: sequence parallel over K processes (parallel.ulysses).")
    ] = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Generate MP4s with the compiled sparse attention (under torchrun: spread over the processes)."""
    _hold_full_collections()
    from ..calibrate import read_prompts
    from ..generate import generate as run_generate

    _set_debug(debug)
    cfg = _load(
        config,
        set_,
        **{
            "model.name": model,
            "model.path": _s(weights),
            "generate.output": _s(output),
            "generate.seed": seed,
            "generate.steps": steps,
            "generate.dense": True if dense else None,
            "generate.strict": True if strict else None,
            "parallel.cfg_parallel": True if cfg_parallel else None,
            "parallel.ulysses": ulysses,
            "compile.force": True if force else None,
        },
    )
    if prompts is not None and prompt is not None:
        raise CalibattError("give either a prompt or --prompts FILE, not both")
    todo = read_prompts(prompts) if prompts is not None else [prompt if prompt is not None else ""]
    with render.progress() as bar:
        task = bar.add_task("generating", total=len(todo) * cfg.generate.steps)
        res = run_generate(cfg, todo, on_step=_started(cfg, lambda: bar.advance(task)), measure_mass=measure_mass)
    if not _main_process():
        return  # rank 0 reports for the whole launch
    if json_out:
        render.guard_line(res)
        out.print(json.dumps(res.summary()), highlight=False, markup=False, soft_wrap=True)
        return
    render.generation(res)


@app.command()
def evaluate(
    prompts: Annotated[Path, typer.Option(help="Prompts file (one a line): each is rendered dense and sparse.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated sampling seeds, e.g. 0,1.")] = "0",
    out_dir: Annotated[Path, typer.Option("--out", help="Report folder (its parent must exist).")] = Path("report"),
    min_psnr: Annotated[float | None, typer.Option(help="Gate: exit 1 if a clip's PSNR is below DB.")] = None,
    min_mass: Annotated[float | None, typer.Option(help="Gate: exit 1 if a clip's retained mass is below M.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON result line.")] = False,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score sparse against dense on your prompts: a report page, and a CI gate (exit 1 below the limits)."""
    from ..calibrate import read_prompts
    from ..evaluate import evaluate as run_evaluate
    from ..evaluate import parse_seeds

    _set_debug(debug)
    cfg = _load(
        config,
        set_,
        **{"model.name": model, "model.path": _s(weights), "compile.force": True if force else None},
    )
    todo, seed_list = read_prompts(prompts), parse_seeds(seeds)
    with render.progress() as bar:
        task = bar.add_task("evaluating", total=2 * len(todo) * len(seed_list) * cfg.generate.steps)
        rep = run_evaluate(cfg, todo, seed_list, out_dir, min_psnr, min_mass, on_step=lambda: bar.advance(task))
    render.evaluation(rep, json_out)
    if not rep.passed:
        console.print(rep.gate_line, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Mask bundle to summarise.")],
    png: Annotated[Path | None, typer.Option(help="Write mask heatmaps (one PNG per bucket x layer) here.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Summarise a mask bundle: density by layer and step bucket, retained mass."""
    from ..bundle import load_bundle, write_heatmaps
    from ..util import check_output_dir

    _set_debug(debug)
    if png is not None:
        check_output_dir(png, "heatmap")  # before the summary: a bad path fails alone
    b = load_bundle(bundle)
    render.bundle_summary(b, bundle)
    if png is not None:
        written = write_heatmaps(b, png)
        out.print(f"wrote {len(written)} heatmaps to {png}", highlight=False)


def _register_training_commands() -> None:
    from ..tiny import cli as tiny_cli

    app.command()(tiny_cli.train)
    app.command()(tiny_cli.judge)


_register_training_commands()


def _s(p) -> str | None:
    return None if p is None else str(p)


def _set_debug(flag: bool) -> None:
    global _debug
    _debug = _debug or flag


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _rank() -> int:
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _main_process() -> bool:
    return _rank() == 0


def _joined() -> bool:
    """Whether this process joined a torchrun world (errors after that may differ between processes)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _report(e: CalibattError) -> None:
    """One line per error. Under torchrun, an error before the processes join comes from the config and is
    the same on every process: rank 0 says it; the others wait a moment (so torchrun, stopping the workers
    when one exits, does not cut rank 0 off) and exit quietly. After joining, each process says its own."""
    rank = _rank()
    if rank == 0 or _joined():
        prefix = f"rank {rank}: " if rank else ""
        console.print(f"[bold red]{prefix}error:[/] {e}", highlight=False, soft_wrap=True)
    else:
        import contextlib
        import time

        with contextlib.suppress(KeyboardInterrupt):  # torchrun stopping us once rank 0 has exited
            time.sleep(2.0)


def _leave_world() -> None:
    if _joined():
        import torch.distributed as dist

        dist.destroy_process_group()


def main() -> None:
    # Under torchrun only rank 0 reports; the others keep to errors.
    logging.basicConfig(level=logging.WARNING if _main_process() else logging.ERROR, format="%(message)s")
    # Ctrl-C and kill (SIGTERM, e.g. a CI timeout) both unwind through the atomic writers, which remove
    # their temp files. Set explicitly: a shell starting us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        rv = app(standalone_mode=False)
        # Non-standalone typer turns Ctrl-C into a returned exit code (130) instead of raising.
        if rv == 130:
            raise KeyboardInterrupt
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except CalibattError as e:
        if _debug:
            raise
        _report(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted; nothing partial was written", highlight=False)
        sys.exit(130)
    except _click_errors("Exit") as e:
        sys.exit(e.exit_code)
    except _click_errors("NoArgsIsHelpError") as e:
        e.show()  # bare `calibatt` or a bare group: the help, with click's exit code
        sys.exit(e.exit_code)
    except _click_errors("UsageError") as e:
        # Unknown option or command, bad value, missing argument: one line naming it, click's exit code (2).
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        console.print(
            f"[bold red]error:[/] {escape(e.format_message())}{escape(where)}", highlight=False, soft_wrap=True
        )
        sys.exit(e.exit_code)
    except _click_errors("ClickException") as e:
        e.show()
        sys.exit(e.exit_code)
    except _click_errors("Abort"):
        console.print("aborted", highlight=False)
        sys.exit(130)
    finally:
        _leave_world()


def run() -> None:
    """The `calibatt` program (the console script, `python -m calibatt_cli`): `main`, then `leave`. Callers in
    the same process (the tests) call `main`, which returns or raises SystemExit as usual."""
    global _program
    _program = True
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    leave(code)


def leave(code) -> NoReturn:
    """Exit with `code` without the interpreter's teardown. Tearing down every module of torch, diffusers and
    transformers one object at a time costs about a second per command, and nothing of it outlives the process:
    what must happen at exit still does (the atexit handlers: logging, temporary folders, torch's own; the
    streams are flushed). A message instead of a code, or a thread still running (the interpreter joins it),
    takes the usual exit."""
    import atexit
    import contextlib
    import ctypes
    import os
    import threading

    code = 0 if code is None else code
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not isinstance(code, int) or others:
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: the interpreter reports it (and sets its exit status)
        sys.exit(code)
    with contextlib.suppress(OSError, AttributeError):  # (no C library to ask: nothing more to flush)
        ctypes.CDLL(None).fflush(None)  # what C code printed through stdio
    os._exit(code)


def _click_errors(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class `name` from every click the installed typer may raise: newer typer releases
    raise their own bundled copy (`typer._click`), whose classes are not the `click` package's."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)
