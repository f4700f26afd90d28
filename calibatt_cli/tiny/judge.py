"""An automatic judge of prompt adherence for procedural-style prompts (no learned weights).

For each clip (uint8 [F, H, W, 3]):
1. background: per row, the median of the two border columns and the top/bottom border rows blend
   (the procedural backgrounds are plain or vertical gradients, so each row is one colour);
2. foreground: pixels farther than FG_DISTANCE (RGB) from their row's background;
3. colour: each foreground pixel within PALETTE_DISTANCE of a palette colour gets that colour's label
   (blends at edges belong to none); the main object is the colour with
   the most pixels over the clip (for a two-object prompt, the judge looks for the named colour);
4. shape: per frame, the mask's fill of its bounding box (square ~1, circle ~0.79, triangle ~0.5) and
   its top/bottom asymmetry (triangles point up), measured on the object's solid body: interior holes
   filled (texture pixels that miss the palette inside an object say nothing about its outline), then
   parts thinner than 3 pixels and all but the largest piece removed (a ragged, half-lit pixel row along
   one edge, or a speck elsewhere, would stretch the bounding box); the clip's shape is the majority
   over frames;
5. motion: the centroid track and the area track: growing / shrinking when the area changes by > 1.8x,
   bouncing when the vertical track
   leaves and comes back, else the net displacement's direction.
A clip matches its prompt when colour, shape and motion all match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .procedural import COLOURS, Expected, parse_prompt

FG_DISTANCE = 60.0  # RGB distance from the background above which a pixel is foreground
PALETTE_DISTANCE = 90.0  # farther than this from every palette colour: an edge blend, not an object pixel
MIN_PIXELS = 6  # fewer foreground pixels of a colour in a frame: the object is absent in that frame


@dataclass
class Detection:
    colour: str | None
    shape: str | None
    motion: str | None
    track: list = field(default_factory=list, repr=False)  # (frame, cx, cy, area) where visible


def background(frames: np.ndarray) -> np.ndarray:
    """Per-frame, per-row background colour [F, H, 3] from the left and right border columns."""
    border = np.concatenate([frames[:, :, :2], frames[:, :, -2:]], axis=2).astype(np.float32)  # [F, H, 4, 3]
    return np.median(border, axis=2)


def _palette() -> tuple[list[str], np.ndarray]:
    return list(COLOURS), np.asarray(list(COLOURS.values()), np.float32)


def colour_labels(frames: np.ndarray) -> np.ndarray:
    """[F, H, W] int: -1 for background, else the index of the nearest palette colour."""
    x = frames.astype(np.float32)
    bg = background(frames)[:, :, None, :]
    fg = np.linalg.norm(x - bg, axis=-1) > FG_DISTANCE
    _, pal = _palette()
    d = np.linalg.norm(x[..., None, :] - pal, axis=-1)  # [F, H, W, P]
    labels = d.argmin(-1)
    return np.where(fg & (d.min(-1) < PALETTE_DISTANCE), labels, -1)


def _neighbourhood(mask: np.ndarray, op) -> np.ndarray:
    """`op` (np.logical_and: erosion, np.logical_or: dilation) of each pixel's 3 x 3 neighbourhood; outside
    the frame counts as background."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out = op(out, p[dy : dy + h, dx : dx + w])
    return out


def _flood(seed: np.ndarray, allowed: np.ndarray, *, diagonal: bool) -> np.ndarray:
    """The pixels of `allowed` connected to `seed` (4-connected, or 8-connected with `diagonal`)."""
    region = seed & allowed
    while True:
        if diagonal:
            grown = _neighbourhood(region, np.logical_or)
        else:
            grown = region.copy()
            grown[1:] |= region[:-1]
            grown[:-1] |= region[1:]
            grown[:, 1:] |= region[:, :-1]
            grown[:, :-1] |= region[:, 1:]
        grown &= allowed
        if np.array_equal(grown, region):
            return region
        region = grown


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """A bool mask with its holes filled: background pixels that no 4-connected path of background pixels
    links to the mask's border become foreground."""
    pad = np.pad(mask, 1)
    border = np.zeros_like(pad)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return ~_flood(border, ~pad, diagonal=False)[1:-1, 1:-1]


def outline_clean(mask: np.ndarray) -> np.ndarray:
    """The object's solid body: holes filled, then a 3 x 3 opening (erode, dilate) that removes whatever is
    thinner than 3 pixels (ragged fringes along an edge, isolated stray pixels), then the largest
    8-connected piece. The bounding-box fill of a shape is only as good as its extreme pixels: a
    half-lit pixel row along one side of a generated square, or a speck elsewhere, stretches the box and
    reads as a circle. An object too small to survive the opening is kept as it was."""
    mask = fill_holes(mask)
    body = _neighbourhood(_neighbourhood(mask, np.logical_and), np.logical_or)
    if body.sum() < MIN_PIXELS:
        return mask
    best = np.zeros_like(body)
    left = body.copy()
    while left.sum() > best.sum():  # a piece larger than the best so far may remain
        ys, xs = np.nonzero(left)
        seed = np.zeros_like(body)
        seed[ys[0], xs[0]] = True
        piece = _flood(seed, body, diagonal=True)
        if piece.sum() > best.sum():
            best = piece
        left &= ~piece
    return best


def classify_shape(mask: np.ndarray, *, clean: bool = True) -> str | None:
    """One frame's binary mask -> circle, square or triangle (None if too small). `clean`: classify the
    object's solid body (outline_clean: holes filled, fringes and specks removed) rather than the raw mask.

    Measured on rendered clips: a triangle (apex up) fills ~0.5 of its box and its bottom half holds
    ~0.5 more of the box than its top half; squares fill >= 0.92, circles 0.69-0.89, both symmetric."""
    if clean:
        mask = outline_clean(mask)
    ys, xs = np.nonzero(mask)
    if len(xs) < MIN_PIXELS:
        return None
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    h = box.shape[0]
    if h < 2:
        return None
    fill = box.mean()
    asym = box[h - h // 2 :].mean() - box[: h // 2].mean()
    if asym > 0.25 or fill < 0.63:
        return "triangle"
    return "square" if fill >= 0.905 else "circle"


def classify_motion(track: np.ndarray, size: int) -> str | None:
    """track [n, 4] of (frame, cx, cy, area) -> a motion name."""
    if len(track) < 3:
        return None
    n = len(track)
    q = max(1, n // 4)
    area0, area1 = track[:q, 3].mean(), track[-q:, 3].mean()
    if area1 > 1.8 * area0:
        return "growing"
    if area0 > 1.8 * area1:
        return "shrinking"
    cx, cy = track[:, 1], track[:, 2]
    dx, dy = cx[-q:].mean() - cx[:q].mean(), cy[-q:].mean() - cy[:q].mean()
    still = 0.08 * size
    ry = cy.max() - cy.min()
    if ry > 0.15 * size and abs(dy) < 0.4 * ry and abs(dx) < 0.5 * ry:
        return "bouncing"  # went up (or down) and came back
    if abs(dx) < still and abs(dy) < still:
        return None
    if abs(dx) > still and abs(dy) > still and 0.4 < abs(dx) / abs(dy) < 2.5:
        return "diagonal" if dx > 0 and dy > 0 else None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def detect(frames: np.ndarray, colour: str | None = None) -> Detection:
    """Detect the main object (or, given `colour`, the object of that colour)."""
    names, _ = _palette()
    labels = colour_labels(frames)
    if colour is None:
        counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(names))
        if counts.sum() == 0:
            return Detection(None, None, None)
        idx = int(counts.argmax())
    else:
        idx = names.index(colour)
        if (labels == idx).sum(axis=(1, 2)).max() < MIN_PIXELS:
            return Detection(None, None, None)
    mask = labels == idx
    shapes, track = [], []
    for f in range(len(frames)):
        area = int(mask[f].sum())
        if area < MIN_PIXELS:
            continue
        ys, xs = np.nonzero(mask[f])
        track.append((f, xs.mean(), ys.mean(), area))
        s = classify_shape(mask[f])
        if s is not None:
            shapes.append(s)
    shape = max(set(shapes), key=shapes.count) if shapes else None
    motion = classify_motion(np.asarray(track, np.float64), frames.shape[2]) if track else None
    return Detection(names[idx], shape, motion, track)


@dataclass
class Verdict:
    prompt: str
    expected: Expected
    detected: Detection

    @property
    def colour_ok(self) -> bool:
        return self.detected.colour == self.expected.colour

    @property
    def shape_ok(self) -> bool:
        return self.detected.shape == self.expected.shape

    @property
    def motion_ok(self) -> bool:
        return self.detected.motion == self.expected.motion

    @property
    def match(self) -> bool:
        return self.colour_ok and self.shape_ok and self.motion_ok

    def as_dict(self) -> dict:
        d = self.detected
        return {
            "prompt": self.prompt,
            "detected": {"colour": d.colour, "shape": d.shape, "motion": d.motion},
            "colour_ok": self.colour_ok,
            "shape_ok": self.shape_ok,
            "motion_ok": self.motion_ok,
            "match": self.match,
        }


def judge_clip(frames: np.ndarray, prompt: str) -> Verdict:
    """frames: uint8 [F, H, W, 3]. A two-object prompt is judged on its first object, found by colour."""
    want = parse_prompt(prompt)
    two = " and a" in prompt.lower() or " and an" in prompt.lower()
    return Verdict(prompt, want, detect(frames, want.colour if two else None))


@dataclass
class JudgeReport:
    verdicts: list[Verdict]

    @property
    def score(self) -> float:
        return sum(v.match for v in self.verdicts) / max(1, len(self.verdicts))

    def summary(self) -> dict:
        n = max(1, len(self.verdicts))
        return {
            "clips": len(self.verdicts),
            "score": round(self.score, 4),
            "colour": round(sum(v.colour_ok for v in self.verdicts) / n, 4),
            "shape": round(sum(v.shape_ok for v in self.verdicts) / n, 4),
            "motion": round(sum(v.motion_ok for v in self.verdicts) / n, 4),
        }


def judge(clips: list[np.ndarray], prompts: list[str]) -> JudgeReport:
    """Share of clips whose main object has the prompt's colour, shape and motion."""
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts")
    return JudgeReport([judge_clip(c, p) for c, p in zip(clips, prompts, strict=True)])
