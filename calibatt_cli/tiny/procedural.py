"""Procedural text-to-video data: one or two flat shapes moving over a plain or gradient background.

A clip is described by a `ClipSpec` (attributes + geometry), drawn by `sample_spec` from a seeded numpy
Generator, captioned by `caption` from a template, and drawn by `render` (torch, batched, any device).
Everything is a pure function of the seed, so the training stream is reproducible without storing data.

Generalisation is measured on HELD_OUT: (colour, shape, motion) triples that the training sampler never
produces, for either object of a clip. Every colour, shape and motion still appears in training.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

FRAMES = 17  # 1 + 2*8: 9 latent frames with the temporal stride 2 of latent.py
SIZE = 64  # 32 x 32 latent with spatial stride 2; patch 2 -> 9 x 16 x 16 = 2,304 tokens

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (245, 225, 40),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "purple": (150, 60, 210),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "diagonal", "bouncing", "growing", "shrinking")
# name -> (top colour, bottom colour); plain backgrounds have both equal. Gradients run top to bottom.
BACKGROUNDS = {
    "black": ((0, 0, 0), (0, 0, 0)),
    "gray": ((120, 120, 120), (120, 120, 120)),
    "white": ((255, 255, 255), (255, 255, 255)),
    "dark gradient": ((5, 5, 25), (70, 70, 110)),
    "light gradient": ((250, 250, 250), (165, 175, 200)),
}
SIZES = {"small": 6.0, "medium": 8.5, "large": 11.0}  # half extent in pixels at 64 x 64
# Object colours too close to a background to be seen on it.
_CLASHES = {("white", "white"), ("white", "light gradient"), ("yellow", "white"), ("yellow", "light gradient")}

MOTION_PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "diagonal": "moving diagonally",  # always from top left towards bottom right
    "bouncing": "bouncing",  # bounces on a floor twice (up, down, up, down)
    "growing": "growing",
    "shrinking": "shrinking",
}


def _held_out() -> frozenset[tuple[str, str, str]]:
    # A fixed Latin-square-like pick: 1/8 of all triples, spread so that every colour, shape and motion
    # keeps most of its combinations in training.
    out = set()
    for ci, c in enumerate(COLOURS):
        for si, s in enumerate(SHAPES):
            for mi, m in enumerate(MOTIONS):
                if (ci + 3 * si + 5 * mi) % 8 == 3:
                    out.add((c, s, m))
    return frozenset(out)


HELD_OUT = _held_out()


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    motion: str
    size: str
    start: tuple[float, float]  # centre (x, y) in pixels at frame 0
    travel: float  # pixels moved over the clip (amplitude for bouncing)

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)


@dataclass(frozen=True)
class ClipSpec:
    objects: tuple[ObjectSpec, ...]
    background: str
    say_size: bool  # whether the caption names the size
    frames: int = FRAMES
    size: int = SIZE


def caption(spec: ClipSpec) -> str:
    parts = []
    for o in spec.objects:
        first = o.size if spec.say_size else o.colour
        words = ["an" if first[0] in "aeiou" else "a"] + ([o.size] if spec.say_size else [])
        words += [o.colour, o.shape, MOTION_PHRASES[o.motion]]
        parts.append(" ".join(words))
    return " and ".join(parts) + f" on a {spec.background} background"


def _place(rng: np.random.Generator, motion: str, half: float, size: int) -> tuple[tuple[float, float], float]:
    """A start point and travel that keep the whole object inside the frame for the whole clip."""
    lo, hi = half + 2.0, size - half - 2.0
    span = hi - lo
    if motion in ("growing", "shrinking"):
        grown = half * 1.4  # the largest extent the object reaches
        lo2, hi2 = grown + 2.0, size - grown - 2.0
        return (float(rng.uniform(lo2, hi2)), float(rng.uniform(lo2, hi2))), 0.0
    travel = float(rng.uniform(0.6, 0.95) * span)
    free = span - travel
    if motion == "bouncing":
        amp = float(rng.uniform(0.5, 0.8) * span)
        floor = hi - float(rng.uniform(0.0, span - amp))
        return (float(rng.uniform(lo, hi)), floor), amp
    along = lo + float(rng.uniform(0.0, free))
    across = float(rng.uniform(lo, hi))
    if motion == "right":
        return (along, across), travel
    if motion == "left":
        return (size - along, across), travel
    if motion == "down":
        return (across, along), travel
    if motion == "up":
        return (across, size - along), travel
    if motion == "diagonal":
        return (along, lo + float(rng.uniform(0.0, free))), travel
    raise ValueError(f"unknown motion {motion!r}")


def sample_spec(
    rng: np.random.Generator, *, held_out: bool = False, two_objects_p: float = 0.2, say_size_p: float = 0.5
) -> ClipSpec:
    """One clip's spec. held_out=False: training combinations only; True: only HELD_OUT triples
    (always one object)."""
    n = 2 if (not held_out and rng.random() < two_objects_p) else 1
    background = str(rng.choice(list(BACKGROUNDS)))
    objects: list[ObjectSpec] = []
    sizes = list(SIZES) if n == 1 else ["small", "medium"]
    while len(objects) < n:
        if held_out:
            colour, shape, motion = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
        else:
            colour = str(rng.choice(list(COLOURS)))
            shape = str(rng.choice(SHAPES))
            motion = str(rng.choice(MOTIONS))
            if (colour, shape, motion) in HELD_OUT:
                continue
        if (colour, background) in _CLASHES or any(o.colour == colour for o in objects):
            continue
        size = str(rng.choice(sizes))
        start, travel = _place(rng, motion, SIZES[size], SIZE)
        objects.append(ObjectSpec(colour, shape, motion, size, start, travel))
    return ClipSpec(tuple(objects), background, bool(rng.random() < say_size_p))


# The template read backwards: what a caption asks for (the judge checks a clip against it).
_PHRASE_TO_MOTION = {v: k for k, v in MOTION_PHRASES.items()}


@dataclass(frozen=True)
class Expected:
    colour: str
    shape: str
    motion: str
    background: str
    size: str | None = None


def parse_prompt(prompt: str) -> Expected:
    """The first object's attributes and the background of a template prompt."""
    p = " ".join(prompt.lower().split())
    colours = "|".join(COLOURS)
    m = re.match(
        rf"^an? (?:(?P<size>{'|'.join(SIZES)}) )?(?P<colour>{colours}) (?P<shape>{'|'.join(SHAPES)}) "
        rf"(?P<motion>{'|'.join(_PHRASE_TO_MOTION)})\b.* on an? (?P<bg>{'|'.join(BACKGROUNDS)}) background$",
        p,
    )
    if m is None:
        raise ValueError(f"prompt is not in the procedural template: {prompt!r}")
    return Expected(m["colour"], m["shape"], _PHRASE_TO_MOTION[m["motion"]], m["bg"], m["size"])


def spec_from_prompt(prompt: str, rng: np.random.Generator) -> ClipSpec:
    """A random clip that matches a template prompt (one object), e.g. to show what a prompt should look like."""
    want = parse_prompt(prompt)
    size = want.size or str(rng.choice(list(SIZES)))
    start, travel = _place(rng, want.motion, SIZES[size], SIZE)
    obj = ObjectSpec(want.colour, want.shape, want.motion, size, start, travel)
    return ClipSpec((obj,), want.background, want.size is not None)


def trajectory(o: ObjectSpec, frames: int) -> np.ndarray:
    """[F, 3]: centre x, centre y and half extent per frame."""
    u = np.linspace(0.0, 1.0, frames)
    x = np.full(frames, o.start[0])
    y = np.full(frames, o.start[1])
    half = np.full(frames, SIZES[o.size])
    if o.motion == "right":
        x = x + o.travel * u
    elif o.motion == "left":
        x = x - o.travel * u
    elif o.motion == "down":
        y = y + o.travel * u
    elif o.motion == "up":
        y = y - o.travel * u
    elif o.motion == "diagonal":
        x = x + o.travel * u
        y = y + o.travel * u
    elif o.motion == "bouncing":
        y = y - o.travel * np.abs(np.sin(2.0 * math.pi * u))
    elif o.motion == "growing":
        half = half * (0.6 + 0.8 * u)
    elif o.motion == "shrinking":
        half = half * (1.4 - 0.8 * u)
    return np.stack([x, y, half], axis=1)


def _sdf(shape_id: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) to a circle (0), square (1) or upward triangle (2)."""
    circle = torch.sqrt(dx * dx + dy * dy) - half
    square = torch.maximum(dx.abs(), dy.abs()) - half * 0.9
    # Apex at (0, -h), base corners at (+-h, +h): edges' outward normals are (+-2, -1)/sqrt(5).
    side = (2.0 * dx.abs() - dy - half) / math.sqrt(5.0)
    triangle = torch.maximum(side, dy - half)
    return torch.where(shape_id == 0, circle, torch.where(shape_id == 1, square, triangle))


def render(specs: list[ClipSpec], device: torch.device | str = "cpu") -> torch.Tensor:
    """Clips as float [B, 3, F, H, W] in [-1, 1] (the latent transform's input)."""
    f, s = specs[0].frames, specs[0].size
    b = len(specs)
    n = max(len(c.objects) for c in specs)
    geo = np.zeros((b, n, f, 3), np.float32)  # x, y, half
    colour = np.zeros((b, n, 3), np.float32)
    shape = np.zeros((b, n), np.int64)
    alive = np.zeros((b, n), np.float32)
    bg = np.zeros((b, 2, 3), np.float32)
    for i, c in enumerate(specs):
        bg[i] = np.asarray(BACKGROUNDS[c.background], np.float32)
        for j, o in enumerate(c.objects):
            geo[i, j] = trajectory(o, f)
            colour[i, j] = COLOURS[o.colour]
            shape[i, j] = SHAPES.index(o.shape)
            alive[i, j] = 1.0
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    geo, colour, shape, alive, bg = t(geo), t(colour) / 127.5 - 1.0, t(shape), t(alive), t(bg) / 127.5 - 1.0
    coords = torch.arange(s, device=device, dtype=torch.float32) + 0.5
    ramp = (coords / s).view(1, 1, s, 1)  # top -> bottom
    video = (bg[:, 0].view(b, 3, 1, 1) * (1 - ramp) + bg[:, 1].view(b, 3, 1, 1) * ramp).expand(b, 3, s, s)
    video = video.unsqueeze(2).expand(b, 3, f, s, s).clone()
    for j in reversed(range(n)):  # the first (main) object is drawn last, on top
        x, y, half = (geo[:, j, :, k].view(b, f, 1, 1) for k in range(3))
        dx = coords.view(1, 1, 1, s) - x
        dy = coords.view(1, 1, s, 1) - y
        cover = (0.5 - _sdf(shape[:, j].view(b, 1, 1, 1), dx, dy, half)).clamp(0.0, 1.0)  # 1-px antialiasing
        cover = (cover * alive[:, j].view(b, 1, 1, 1)).unsqueeze(1)  # [B, 1, F, H, W]
        video = video * (1 - cover) + colour[:, j].view(b, 3, 1, 1, 1) * cover
    return video


def to_frames(video: torch.Tensor) -> np.ndarray:
    """One rendered clip [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (the pipeline's output form)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def training_batch(seed: int, step: int, batch: int, **kw) -> list[ClipSpec]:
    """The specs of one training step: a pure function of (seed, step), so resuming needs no RNG state."""
    rng = np.random.default_rng([seed, step])
    return [sample_spec(rng, **kw) for _ in range(batch)]


def held_out_prompts(n: int, seed: int = 1234) -> list[str]:
    """n distinct single-object prompts over held-out triples (eval set)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(100 * n):
        p = caption(sample_spec(rng, held_out=True, say_size_p=0.0))
        if p not in out:
            out.append(p)
        if len(out) == n:
            break
    return out
