"""Thin typer CLI: each command loads the config, calls one library function, prints a summary."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import Config, dump_yaml, load_config
from .errors import CalibattError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Calibrated block-sparse attention for video DiTs.")
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: configs/tiny.yaml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model name (model.name).")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="Local weights folder (model.path).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]

_debug = False


def _load(config: Path | None, sets: list[str] | None, **flags) -> Config:
    overrides = list(sets or [])
    for key, value in flags.items():
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return load_config(config, overrides)


def _progress() -> Progress:
    # Only on a terminal: in logs and pipes a half-drawn bar would sit above an error line.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, disable=not console.is_terminal)


@app.command("config")
def config_cmd(config: ConfigOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Print the resolved config."""
    _set_debug(debug)
    cfg = _load(config, set_)
    out.print(f"# resolved from {cfg.source}", highlight=False)
    out.print(dump_yaml(cfg), end="", highlight=False, markup=False)
    from .models import model_identity

    try:
        ident = model_identity(cfg)
    except CalibattError as e:
        out.print(f"# token grid: not derivable ({e})", highlight=False, markup=False, soft_wrap=True)
        return
    f, h, w = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    n, bs = f * h * w, cfg.calibration.block_size
    out.print(f"# token grid (derived): {f} x {h} x {w} = {n:,} tokens; {-(-n // bs)} blocks of {bs}; "
              f"{ident.layers} layers x {ident.heads} heads x head dim {ident.head_dim}",
              highlight=False, soft_wrap=True)


@app.command()
def calibrate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts file (calibration.prompts).")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Dropped mass per row (calibration.epsilon).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Bundle path (calibration.output).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Run the dense model on the prompt set and write a mask bundle."""
    from .calibrate import calibrate as run_calibration
    from .calibrate import read_prompts

    _set_debug(debug)
    cfg = _load(config, set_, **{"model.name": model, "model.path": _s(weights), "calibration.prompts": _s(prompts),
                                 "calibration.epsilon": epsilon, "calibration.output": _s(output)})
    n_prompts = len(read_prompts(cfg.calibration.prompts, cfg))
    with _progress() as bar:
        task = bar.add_task("calibrating", total=n_prompts * cfg.generate.steps)
        res = run_calibration(cfg, on_step=lambda: bar.advance(task))
    s = res.bundle.meta["summary"]
    table = Table(title=f"mask bundle {res.path}")
    for col in ("bucket", "steps", "density", "retained mass", "samples"):
        table.add_column(col)
    dens = res.bundle.meta["entries"]["density"]
    kept = res.bundle.meta["entries"]["retained_mass"]
    for b in range(len(dens)):
        steps = [i for i, x in enumerate(res.bundle.step_buckets) if x == b]
        d = sum(map(sum, dens[b])) / (len(dens[b]) * len(dens[b][0]))
        r = sum(map(sum, kept[b])) / (len(kept[b]) * len(kept[b][0]))
        table.add_row(str(b), f"{steps[0]}-{steps[-1]}", f"{d:.3f}", f"{r:.5f}",
                      str(res.bundle.meta["samples_per_bucket"][b]))
    console.print(table)
    console.print(f"density {s['density']:.3f}, retained mass {s['retained_mass']:.5f}, "
                  f"{res.seconds:.1f} s, hash {res.bundle.content_hash[:12]}")
    out.print(str(res.path), highlight=False)


@app.command("compile")
def compile_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    bundle: Annotated[Path | None, typer.Option(help="Mask bundle (compile.bundle).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory (compile.cache_dir).")] = None,
    target: Annotated[str | None, typer.Option(help="Without a GPU: check that every kernel config compiles "
                                                    "for an architecture, e.g. sm_90 (writes no cache).")] = None,
    recompile: Annotated[bool, typer.Option(help="Rebuild even if the cache is up to date.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Turn a mask bundle into a kernel cache directory for generate (or, with --target, cross-compile)."""
    from .aot import config_label
    from .compiler import compile_cache, cross_compile_configs

    _set_debug(debug)
    cfg = _load(config, set_, **{"model.name": model, "model.path": _s(weights), "compile.bundle": _s(bundle),
                                 "compile.cache_dir": _s(cache_dir), "compile.target": target})
    if cfg.compile.target is not None:
        xres = cross_compile_configs(cfg)
        bs = (xres.block_size, xres.block_size)
        table = Table(title=f"kernels for {xres.target} ({xres.dtype}, head dim {xres.head_dim}, "
                            f"block {xres.block_size})")
        for col in ("config", "status", "shared KiB", "seconds", "error"):
            table.add_column(col)
        for r in xres.variants:
            table.add_row(config_label(r.config, bs), r.status, "-" if r.shared_kib is None else f"{r.shared_kib:.0f}",
                          f"{r.seconds:.1f}", r.error or "")
        console.print(table)
        n_ok = sum(r.status == "ok" for r in xres.variants)
        console.print(f"{n_ok} of {len(xres.variants)} kernels compile and fit {xres.target}, "
                      f"{len(xres.failed)} failed, {xres.seconds:.1f} s")
        if xres.failed:
            raise CalibattError(f"{len(xres.failed)} kernel(s) failed to compile for {xres.target}: "
                                + "; ".join(f"{config_label(r.config, bs)}: {r.error}" for r in xres.failed))
        return
    res = compile_cache(cfg, recompile=recompile)
    m = res.manifest
    bs = (m["block_size"], m["block_size"])
    table = Table(title=f"cache {res.cache_dir} ({'up to date' if res.reused else 'built'})")
    for col in ("bucket", "layer", "density", "max blocks/row", "config", "ms", "vs dense",
                "predicted attention speedup"):
        table.add_column(col)
    for g in m["groups"]:
        timed = g.get("ms") is not None
        table.add_row(str(g["bucket"]), str(g["layer"]), f"{g['density']:.3f}", str(g["max_blocks_per_row"]),
                      config_label(g["config"], bs) if g.get("config") else "default",
                      f"{g['ms']:.3f}" if timed else "-", f"{g['speedup']:.2f}x" if timed else "-",
                      f"{1 / max(g['density'], 1e-9):.2f}x")
    console.print(table)
    k = m["kernels"]
    tuned = (f", dense SDPA {k['dense_ms']:.3f} ms, {len(k['winners'])} config(s) chosen of "
             f"{len(k['candidates'])}, {k['triton_files']} kernels cached") if k.get("tuned") else ""
    index = f", mask index {m['index_bytes'] / 2**20:.1f} MiB" if "index_bytes" in m else ""
    console.print(f"device {m['device']['name']}, backend {k['backend']}{tuned}{index}, {res.seconds:.2f} s")
    out.print(str(res.cache_dir), highlight=False)


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
    strict: Annotated[bool, typer.Option("--strict", help="Fail if any kernel compiles (generate.strict).")] = False,
    debug: DebugOpt = False,
) -> None:
    """Generate MP4s with the compiled sparse attention."""
    from .calibrate import read_prompts
    from .generate import generate as run_generate

    _set_debug(debug)
    cfg = _load(config, set_, **{"model.name": model, "model.path": _s(weights), "generate.output": _s(output),
                                 "generate.seed": seed,
                                 "generate.steps": steps, "generate.dense": True if dense else None,
                                 "generate.strict": True if strict else None})
    if prompts is not None and prompt is not None:
        raise CalibattError("give either a prompt or --prompts FILE, not both")
    todo = read_prompts(prompts) if prompts is not None else [prompt if prompt is not None else ""]
    with _progress() as bar:
        task = bar.add_task("generating", total=len(todo) * cfg.generate.steps)
        res = run_generate(cfg, todo, on_step=lambda: bar.advance(task), measure_mass=measure_mass)
    s = res.summary()
    if json_out:
        out.print(json.dumps(s), highlight=False, soft_wrap=True)
        return
    for v in res.videos:
        console.print(f"wrote {v.output} ({v.frames.shape[0]} frames {v.frames.shape[2]}x{v.frames.shape[1]}, "
                      f"{v.seconds:.1f} s)")
    mode = "dense (stock pipeline)" if res.dense else (
        f"sparse: mean density {res.mean_density:.3f} (sparse steps {res.sparse_density:.3f})")
    kept = "" if res.retained_mass is None else f", retained mass {res.retained_mass:.5f}"
    console.print(f"{len(res.videos)} video(s), {res.steps} steps, {mode}{kept}, {s['seconds']:.1f} s sampling, "
                  f"{res.load_seconds:.1f} s model load")


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Mask bundle to summarise.")],
    png: Annotated[Path | None, typer.Option(help="Write mask heatmaps (one PNG per bucket x layer) here.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Summarise a mask bundle: density by layer and step bucket, retained mass."""
    from .bundle import load_bundle
    from .inspect_bundle import density_table, write_heatmaps

    _set_debug(debug)
    b = load_bundle(bundle)
    m = b.meta
    header, rows = density_table(b)
    table = Table(title=f"{bundle}: model {m['model']['name']} ({m['model']['hash']}), grid {m['grid']['tokens']}, "
                        f"block {m['block_size']}, epsilon {m['epsilon']}")
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    out.print(table)
    if png is not None:
        written = write_heatmaps(b, png)
        out.print(f"wrote {len(written)} heatmaps to {png}", highlight=False)


def _register_training_commands() -> None:
    from . import cli_train

    app.command()(cli_train.train)
    app.command()(cli_train.judge)


_register_training_commands()


def _s(p) -> str | None:
    return None if p is None else str(p)


def _set_debug(flag: bool) -> None:
    global _debug
    _debug = _debug or flag


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
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
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
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
        console.print(f"[bold red]error:[/] {escape(e.format_message())}{escape(where)}", highlight=False,
                      soft_wrap=True)
        sys.exit(e.exit_code)
    except _click_errors("ClickException") as e:
        e.show()
        sys.exit(e.exit_code)
    except _click_errors("Abort"):
        console.print("aborted", highlight=False)
        sys.exit(130)


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
