"""`calibatt train` and `calibatt judge`: thin typer commands over the tiny model's train.py and judge.py.

The tiny model's kit keeps its commands; cli/app.py registers them on the one `calibatt` app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import CalibattError
from ..util import check_output_dir, check_output_path

console = Console(stderr=True)
out = Console()


def train(
    out_dir: Annotated[Path, typer.Option("--out", help="Checkpoint folder; training resumes from it.")] = Path(
        ".ckpt/tiny"
    ),
    steps: Annotated[int, typer.Option(help="Total optimizer steps (a resumed run continues up to this).")] = 6000,
    batch: Annotated[int, typer.Option(help="Clips per step.")] = 64,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 4e-4,
    lr_schedule: Annotated[str, typer.Option(help="constant, or cosine (anneal to 0 at --steps).")] = "constant",
    fg_weight: Annotated[float, typer.Option(help="Extra loss weight on the objects' pixels (0: uniform).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of weights, data and noise.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    max_seconds: Annotated[float | None, typer.Option(help="Stop (with a checkpoint) after this long.")] = None,
    log_every: Annotated[int, typer.Option(help="Steps per loss line.")] = 50,
    ckpt_every: Annotated[int, typer.Option(help="Steps per checkpoint.")] = 500,
    export: Annotated[
        Path | None,
        typer.Option(help="Also write the EMA weights here (e.g. calibatt_cli/tiny/weights/tiny.safetensors)."),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Warm start (when --out has no checkpoint) from exported "
            "weights, e.g. calibatt_cli/tiny/weights/tiny.safetensors."
        ),
    ] = None,
    torch_compile: Annotated[
        bool,
        typer.Option(
            "--compile", help="torch.compile the transformer (faster steps on a GPU, after a minute of compiling)."
        ),
    ] = False,
    layers: Annotated[
        int | None,
        typer.Option(
            help="Transformer blocks (default: the tiny model's). With "
            "--init-from weights of fewer blocks, the extra blocks are "
            "added on top, starting as the identity."
        ),
    ] = None,
) -> None:
    """Train the tiny text-to-video model on procedural clips (resumable)."""
    from .train import TrainConfig, export_weights
    from .train import train as run_train

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CalibattError(f"--device {device} but no CUDA GPU is visible; use --device cpu")
    if layers is not None and layers < 1:
        raise CalibattError(f"--layers {layers}: give at least 1")
    check_output_dir(out_dir, "checkpoint")  # both before any training step
    if export is not None:
        check_output_path(export, "weights")
    cfg = TrainConfig(
        seed=seed,
        steps=steps,
        batch=batch,
        lr=lr,
        lr_schedule=lr_schedule,
        device=device,
        fg_weight=fg_weight,
        compile=torch_compile,
        max_seconds=max_seconds,
        log_every=log_every,
        ckpt_every=ckpt_every,
        init_from=None if init_from is None else str(init_from),
    )
    if layers is not None:
        cfg.transformer["num_layers"] = layers
    res = run_train(
        cfg,
        out_dir,
        on_log=lambda s, loss, t: console.print(f"step {s:6d}  loss {loss:.5f}  {t:7.1f} s", highlight=False),
    )
    console.print(f"step {res.step}/{steps}, {res.seconds:.1f} s, checkpoint {res.checkpoint}", highlight=False)
    if export is not None:
        digest = export_weights(out_dir, export)
        console.print(f"weights {export} sha256 {digest}", highlight=False)


def judge(
    videos: Annotated[list[Path], typer.Argument(help="MP4 files to judge.")],
    prompts: Annotated[Path | None, typer.Option(help="Prompts file, one a line, in the videos' order.")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="The prompt of each video, in order.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON result line.")] = False,
) -> None:
    """Score prompt adherence (colour, shape, motion) of procedural-style videos."""
    from ..calibrate import read_prompts
    from ..video import read_mp4
    from .judge import judge as run_judge

    if (prompts is None) == (not prompt):
        raise CalibattError("give the prompts with either --prompts FILE or --prompt (once per video)")
    texts = read_prompts(prompts) if prompts is not None else list(prompt)
    if len(texts) != len(videos):
        raise CalibattError(f"{len(videos)} videos but {len(texts)} prompts; give one prompt per video")
    for v in videos:
        if not v.is_file():
            raise CalibattError(f"video '{v}' not found")
    try:
        report = run_judge([read_mp4(v) for v in videos], texts)
    except ValueError as e:
        raise CalibattError(str(e)) from None
    if json_out:
        out.print(
            json.dumps({**report.summary(), "clips": [v.as_dict() for v in report.verdicts]}),
            highlight=False,
            soft_wrap=True,
        )
        return
    table = Table(title="prompt adherence")
    for col in ("video", "colour", "shape", "motion", "match"):
        table.add_column(col)
    for path, v in zip(videos, report.verdicts, strict=True):
        d = v.detected
        table.add_row(
            str(path),
            _mark(d.colour, v.colour_ok),
            _mark(d.shape, v.shape_ok),
            _mark(d.motion, v.motion_ok),
            "yes" if v.match else "no",
        )
    console.print(table)
    s = report.summary()
    console.print(
        f"score {s['score']:.3f} over {s['clips']} clips (colour {s['colour']:.3f}, shape {s['shape']:.3f}, "
        f"motion {s['motion']:.3f})",
        highlight=False,
    )


def _mark(value, ok: bool) -> str:
    return f"{value}" if ok else f"[red]{value}[/]"
