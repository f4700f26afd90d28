"""`calibatt inspect`: what a bundle keeps, as a table and optional heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import MaskBundle
from .util import atomic_path


def density_table(bundle: MaskBundle) -> tuple[list[str], list[list[str]]]:
    """Rows: layers; columns: density per bucket (mean over heads), then retained mass."""
    dens = np.asarray(bundle.meta["entries"]["density"])  # [buckets, layers, heads]
    kept = np.asarray(bundle.meta["entries"]["retained_mass"])
    buckets = bundle.step_buckets
    header = ["layer"]
    for b in range(dens.shape[0]):
        steps = [i for i, x in enumerate(buckets) if x == b]
        header.append(f"density b{b} (steps {steps[0]}-{steps[-1]})")
    header.append("retained mass (min over heads)")
    rows = []
    for layer in range(dens.shape[1]):
        row = [str(layer)] + [f"{dens[b, layer].mean():.3f}" for b in range(dens.shape[0])]
        row.append(f"{kept[:, layer].min():.5f}")
        rows.append(row)
    rows.append(["all"] + [f"{dens[b].mean():.3f}" for b in range(dens.shape[0])] + [f"{kept.min():.5f}"])
    return header, rows


def write_heatmaps(bundle: MaskBundle, out_dir: Path, scale: int = 4) -> list[Path]:
    """One PNG per (bucket, layer): the heads' masks side by side, kept blocks white."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = bundle.masks.numpy()
    nb, nl, nh, mq, mk = masks.shape
    written = []
    for b in range(nb):
        for layer in range(nl):
            gap = 2
            canvas = np.full((mq, nh * mk + (nh - 1) * gap), 96, np.uint8)
            for h in range(nh):
                canvas[:, h * (mk + gap): h * (mk + gap) + mk] = masks[b, layer, h] * 255
            img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, mq * scale), Image.NEAREST)
            path = out_dir / f"bucket{b}-layer{layer:02d}.png"
            with atomic_path(path, suffix=".png") as tmp:
                img.save(tmp, format="PNG")
            written.append(path)
    return written
