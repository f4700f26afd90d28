"""Training the tiny text-to-video model on procedural clips (rectified flow, as Wan).

Per step: draw a batch of clip specs from (seed, step) alone, render them on the device, map them into
the fixed latent (latent.py), draw sigma = shift*u / (1 + (shift-1)*u) with u ~ U(0, 1) (the
same shift as the sampler's schedule), x_t = (1 - sigma) x0 + sigma noise, and regress the transformer's
output on the velocity noise - x0 (what FlowMatchEulerDiscreteScheduler integrates). The text encoder
(small UMT5 over the word-level vocabulary) trains jointly; captions are dropped (empty prompt) with
probability `caption_dropout` so classifier-free guidance has an unconditional model to contrast with.

Every random draw is seeded from (seed, step), so a run resumed from a checkpoint continues exactly as
the uninterrupted run would. Checkpoints are safetensors (weights, EMA weights, AdamW moments) plus a
JSON sidecar (step, config, loss log); nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CalibattError
from ..util import atomic_path, check_output_dir, check_output_path, sha256_hex, write_text_atomic
from . import model as tiny
from . import procedural as P
from .latent import space_time_to_channel

CKPT = "ckpt-{:02d}.safetensors"  # shards of at most SHARD_BYTES (device transfers cap file sizes)
SHARD_BYTES = 12 << 20
CKPT_INFO = "ckpt.json"


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    seed: int = 0  # weights init, data stream, noise: everything
    steps: int = 6000  # total optimizer steps (a resumed run continues up to this)
    batch: int = 64
    lr: float = 4e-4  # AdamW peak rate, reached after `warmup` steps
    warmup: int = 200
    # constant: the EMA does the averaging; cosine: anneal to 0 at `steps`, from
    # where this optimizer began (a warm start anneals only its own run), which sharpens samples
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # share of empty prompts, for classifier-free guidance
    shift: float = 3.0  # timestep shift of the training sigmas (generate.flow_shift)
    two_objects_p: float = 0.2  # share of clips with a second object
    # Extra loss weight on the pixels the objects cover (and a 1-pixel rim): an object covers a few
    # percent of a frame, so with a uniform loss the flat background dominates and shapes stay blurry (shape was the
    # judge's weakest attribute). 0: uniform MSE.
    fg_weight: float = 0.0
    device: str = "cpu"
    bf16: bool = True  # autocast the transformer to bfloat16 on CUDA (ignored on CPU)
    # torch.compile the transformer (forward and backward): fuses its many small pointwise ops (norms,
    # modulation, RoPE at dim 192), which dominate a step of this small model. Same weights and names.
    compile: bool = False  # named as checkpoints and weights records store it (the CLI's --compile)
    log_every: int = 50
    ckpt_every: int = 500
    max_seconds: float | None = None  # stop (with a checkpoint) after this long: device calls are capped
    init_from: str | None = None  # warm start from exported weights (e.g. the shipped tiny.safetensors)
    transformer: dict = field(default_factory=lambda: dict(tiny.TRANSFORMER))  # architecture overrides
    text: dict = field(default_factory=lambda: dict(tiny.TEXT))

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise CalibattError(f"lr schedule {self.lr_schedule!r} is not known; use {' or '.join(LR_SCHEDULES)}")


@dataclass
class TrainResult:
    step: int
    losses: list  # [step, mean loss since the previous log line]
    checkpoint: Path
    seconds: float


def foreground(specs: list[P.ClipSpec], video: torch.Tensor) -> torch.Tensor:
    """float [B, 1, F, H, W]: 1 where the clip differs from its background alone (the objects, antialiased
    edges included), grown by one pixel so each shape's outline counts too."""
    bare = P.render([dataclasses.replace(s, objects=()) for s in specs], video.device)
    cover = ((video - bare).abs().amax(dim=1) > 1e-3).float()  # [B, F, H, W]
    return F.max_pool2d(cover.flatten(0, 1).unsqueeze(1), 3, stride=1, padding=1).view_as(cover).unsqueeze(1)


class Trainer:
    """The model, its EMA and the optimizer; `step(i)` runs optimizer step i."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.tokenizer, self.text_encoder, self.transformer, self.latent = tiny.build_modules(
            cfg.seed, cfg.transformer, cfg.text
        )
        for m in (self.text_encoder, self.transformer, self.latent):
            m.to(self.device).train()
        if cfg.compile:
            self.transformer.compile()  # in place: parameters, names and checkpoints stay as they are
        self.named = [(f"transformer.{n}", p) for n, p in self.transformer.named_parameters()]
        self.named += [(f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters()]
        self.ema = {n: p.detach().clone() for n, p in self.named}
        self.opt = torch.optim.AdamW(
            [p for _, p in self.named], lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
        )
        self.step_done = 0  # optimizer steps taken
        self.start_step = 0  # where this optimizer's life began (a warm start has fresh Adam moments)
        self.losses: list = []

    def lr_at(self, i: int) -> float:
        lr = self.cfg.lr * min(1.0, (i + 1 - self.start_step) / max(1, self.cfg.warmup))
        if self.cfg.lr_schedule == "cosine":
            done = (i - self.start_step) / max(1, self.cfg.steps - self.start_step)
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return lr

    def batch(self, i: int) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """(latents, captions, per-element loss weights in latent layout, or None for a uniform loss)."""
        specs = P.training_batch(self.cfg.seed, i, self.cfg.batch, two_objects_p=self.cfg.two_objects_p)
        drop = np.random.default_rng([self.cfg.seed, i, 1]).random(len(specs)) < self.cfg.caption_dropout
        captions = ["" if d else P.caption(s) for s, d in zip(specs, drop, strict=True)]
        with torch.no_grad():
            video = P.render(specs, self.device)
            x0 = self.latent.encode(video)
            weight = None
            if self.cfg.fg_weight > 0:
                cover = foreground(specs, video)
                weight = 1.0 + self.cfg.fg_weight * cover.expand_as(video)
                # the latent is a fixed rearrangement of pixels: the weights rearrange the same way
                weight = space_time_to_channel(
                    weight, self.latent.config.scale_factor_temporal, self.latent.config.scale_factor_spatial
                )
        return x0, captions, weight

    def loss(self, i: int) -> torch.Tensor:
        x0, captions, weight = self.batch(i)
        g = torch.Generator(device=self.device).manual_seed(int(sha256_hex(f"{self.cfg.seed}:{i}")[:12], 16))
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        u = torch.rand(x0.shape[0], generator=g, device=self.device)
        sigma = self.cfg.shift * u / (1 + (self.cfg.shift - 1) * u)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        use_bf16 = self.cfg.bf16 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            emb = tiny.encode_text(self.tokenizer, self.text_encoder, captions)
            pred = self.transformer(xt, timestep=sigma * 1000, encoder_hidden_states=emb, return_dict=False)[0]
        if weight is None:
            return F.mse_loss(pred.float(), noise - x0)
        return (weight * (pred.float() - (noise - x0)) ** 2).sum() / weight.sum()

    def step(self, i: int) -> torch.Tensor:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(i)
        loss = self.loss(i)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in self.named], self.cfg.grad_clip)
        self.opt.step()
        # EMA warms up: early on the average would otherwise be dominated by the random init.
        decay = min(self.cfg.ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for n, p in self.named:
                self.ema[n].lerp_(p.detach(), 1 - decay)
        self.step_done = i + 1
        return loss.detach()  # a tensor: converting would wait for the GPU every step

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(exist_ok=True)  # the one level train() checked (util.check_output_dir)
        tensors = {}
        state = self.opt.state_dict()["state"]
        for k, (n, p) in enumerate(self.named):
            tensors[f"model.{n}"] = p.detach().contiguous().clone()
            tensors[f"ema.{n}"] = self.ema[n].contiguous().clone()
            if k in state:
                for key in ("exp_avg", "exp_avg_sq"):
                    tensors[f"adam.{key}.{n}"] = state[k][key].contiguous().clone()
                tensors[f"adam.step.{n}"] = torch.as_tensor(state[k]["step"], dtype=torch.float64).reshape(1)
        shards: list[dict] = [{}]
        size = 0
        for k, v in tensors.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][k] = v.cpu()
            size += nbytes
        names = [CKPT.format(j) for j in range(len(shards))]
        for name, shard in zip(names, shards, strict=True):
            with atomic_path(folder / name) as tmp:
                save_file(shard, str(tmp))
        # The JSON is written last: it names the shards, so a checkpoint is complete once it is there.
        info = {
            "step": self.step_done,
            "start_step": self.start_step,
            "shards": names,
            "config": asdict(self.cfg),
            "losses": self.losses,
        }
        write_text_atomic(folder / CKPT_INFO, json.dumps(info, indent=1))
        return folder / CKPT_INFO

    def warm_start(self, weights: Path) -> None:
        """Weights (and EMA) from an export, e.g. the shipped model, continuing its step count: the data
        stream is seeded by step, so the warm-started run sees clips the first run never drew. Without the
        optimizer state, the learning rate warms up again."""
        from safetensors.torch import load_file

        weights = Path(weights)
        t = load_file(str(weights), device=str(self.device))
        grown = self._grown_blocks(t)
        missing = [
            n
            for n, _ in self.named
            if n not in t and not n.endswith("encoder.embed_tokens.weight") and _block_of(n) not in grown
        ]
        if missing:
            raise CalibattError(
                f"{weights} does not fit this architecture (missing {missing[:3]}); "
                f"train from scratch or pass matching weights"
            )
        with torch.no_grad():
            for n, p in self.named:
                if _block_of(n) in grown:
                    # A block added on top of the trained ones starts as the identity: its residual
                    # branches (self-attention, cross-attention, FFN) end in zeroed projections, so the
                    # grown model computes exactly what the trained one did, and gradients still reach
                    # those projections (their inputs are not zero) to grow the block from there.
                    if any(n.endswith(f"{branch}.{w}") for branch in GROWN_ZERO for w in ("weight", "bias")):
                        p.zero_()
                    self.ema[n].copy_(p)
                    continue
                src = t[n] if n in t else t["text_encoder.shared.weight"]  # the tied T5 embedding
                p.copy_(src)
                self.ema[n].copy_(src)
        info = weights.with_suffix(".json")
        step = json.loads(info.read_text()).get("step", 0) if info.is_file() else 0
        self.step_done = self.start_step = int(step)

    def _grown_blocks(self, t: dict) -> set[int]:
        """Indices of our transformer blocks that weights `t` (with fewer blocks) do not have."""
        theirs = {_block_of(n) for n in t} - {None}
        ours = {_block_of(n) for n, _ in self.named} - {None}
        if theirs and not theirs <= ours:
            raise CalibattError(
                f"the weights have {len(theirs)} transformer blocks, this model {len(ours)}; "
                f"a warm start can add blocks, not remove them (--layers {len(theirs)} or more)"
            )
        return ours - theirs if theirs else set()

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        info = json.loads((folder / CKPT_INFO).read_text())
        ours, theirs = _arch(asdict(self.cfg)), _arch(info["config"])
        if ours != theirs:
            raise CalibattError(
                f"checkpoint {folder} was trained with another seed or architecture ({theirs}); "
                f"use another --out folder"
            )
        t = {}
        for name in info["shards"]:
            t.update(load_file(str(folder / name), device=str(self.device)))
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(t[f"model.{n}"])
                self.ema[n].copy_(t[f"ema.{n}"])
        opt_state = self.opt.state_dict()
        for k, (n, _) in enumerate(self.named):
            if f"adam.step.{n}" in t:
                opt_state["state"][k] = {
                    "step": t[f"adam.step.{n}"].reshape(()).float().cpu(),
                    "exp_avg": t[f"adam.exp_avg.{n}"],
                    "exp_avg_sq": t[f"adam.exp_avg_sq.{n}"],
                }
        self.opt.load_state_dict(opt_state)
        self.step_done = int(info["step"])
        self.start_step = int(info.get("start_step", 0))
        self.losses = info["losses"]


# The last projection of each residual branch of a Wan block: zero in a block grown onto trained weights.
GROWN_ZERO = ("attn1.to_out.0", "attn2.to_out.0", "ffn.net.2")


def _block_of(name: str) -> int | None:
    """The transformer block index of a parameter name ("transformer.blocks.3.ffn..." -> 3), else None."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "transformer" and parts[1] == "blocks":
        return int(parts[2])
    return None


def _arch(cfg: dict) -> dict:
    return json.loads(json.dumps({k: cfg[k] for k in ("seed", "transformer", "text", "batch")}))


def train(cfg: TrainConfig, out: Path, on_log: Callable[[int, float, float], None] | None = None) -> TrainResult:
    """Train (resuming from `out`/ckpt.* if present) until cfg.steps or cfg.max_seconds; checkpoint to `out`."""
    out = check_output_dir(Path(out), "checkpoint")
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    trainer = Trainer(cfg)
    if (out / CKPT_INFO).is_file():
        trainer.load(out)
    elif cfg.init_from:
        trainer.warm_start(Path(cfg.init_from))
    acc, n = 0.0, 0
    for i in range(trainer.step_done, cfg.steps):
        acc = acc + trainer.step(i)
        n += 1
        done = i + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            trainer.losses.append([done, round(float(acc) / n, 6)])
            if on_log is not None:
                on_log(done, float(acc) / n, time.perf_counter() - t0)
            acc, n = 0.0, 0
        if done % cfg.ckpt_every == 0:
            trainer.save(out)
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
            break
    if n:
        trainer.losses.append([trainer.step_done, round(float(acc) / n, 6)])
    path = trainer.save(out)
    return TrainResult(trainer.step_done, trainer.losses, path, time.perf_counter() - t0)


def export_weights(ckpt_dir: Path, dest: Path = tiny.WEIGHTS, use_ema: bool = True) -> str:
    """Write the (EMA) weights of a checkpoint as the shipped `tiny` weights + JSON; returns their sha256."""
    from safetensors.torch import load_file, save_file

    ckpt_dir, dest = Path(ckpt_dir), check_output_path(Path(dest), "weights")
    info = json.loads((ckpt_dir / CKPT_INFO).read_text())
    prefix = "ema." if use_ema else "model."
    state = {}
    for name in info["shards"]:
        state.update(load_file(str(ckpt_dir / name)))
    weights = {k[len(prefix) :]: v.float().contiguous() for k, v in state.items() if k.startswith(prefix)}
    weights.pop("text_encoder.encoder.embed_tokens.weight", None)  # tied to text_encoder.shared.weight
    with atomic_path(dest) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "step": str(info["step"])})
    digest = sha256_hex(dest.read_bytes())
    record = {
        "architecture": {
            "transformer": info["config"]["transformer"],
            "text": info["config"]["text"],
            "latent": tiny.LATENT,
        },
        "weights": "ema" if use_ema else "raw",
        "step": info["step"],
        "sha256": digest,
        "train_config": info["config"],
        "final_losses": info["losses"][-5:],
    }
    write_text_atomic(dest.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    return digest


def loss_curve_summary(losses: list, every: int = 500) -> list:
    """[step, loss] pairs thinned to about one per `every` steps (for docs and logs)."""
    out, last = [], -math.inf
    for step, loss in losses:
        if step - last >= every:
            out.append([step, loss])
            last = step
    if losses and out[-1] != losses[-1]:
        out.append(losses[-1])
    return out
