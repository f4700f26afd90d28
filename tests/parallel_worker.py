"""One process of a multi-process test (tests/test_parallel.py launches it with torchrun, gloo on CPUs).

Every process first computes the one-process reference (the same on all of them), then the same sampling
spread over the launch's layout; rank 0 writes the largest relative error per case to --out (JSON)."""

import argparse
import json
import sys
from dataclasses import replace

import torch

from calibatt_cli import parallel
from calibatt_cli.calibrate import step_buckets
from calibatt_cli.config import ParallelConfig, load_config
from calibatt_cli.models import load_model, model_identity
from calibatt_cli.models.parallel import enable_ulysses, parallelize
from calibatt_cli.runtime import DenseController, SparseController, SparsePlan
from calibatt_cli.runtime.plan import plan_index, plan_tensors

MODELS = {
    # 3 heads: Ulysses 3 only
    "tiny": ["model.name=tiny-random", "video.height=32", "video.width=32", "video.frames=5"],
    # 4 heads (test-only variant of the same architecture): Ulysses 2
    "tiny4": ["model.name=tiny-random", "video.height=32", "video.width=32", "video.frames=5"],
    # joint attention, batched CFG: CFG parallel only
    "mochi": [
        "model.name=mochi-tiny-random",
        "video.height=64",
        "video.width=96",
        "video.frames=13",
        "calibration.block_size=16",
    ],
}
COMMON = [
    "model.device=cpu",
    "model.dtype=float32",
    "generate.steps=4",
    "generate.guidance=5.0",
    "calibration.buckets=2",
    "calibration.warmup_steps=1",
    "calibration.block_size=32",
]


def four_heads():
    """tiny-random with 4 heads of 64 (the built-in model has 3): Ulysses 2 needs an even head count."""
    import calibatt_cli.models.tiny as adapter
    import calibatt_cli.tiny.model as kit

    kit.TRANSFORMER = dict(kit.TRANSFORMER, num_attention_heads=4)
    adapter.TRANSFORMER = kit.TRANSFORMER


def synthetic_plan(cfg, ident) -> SparsePlan:
    """Random block masks (diagonal kept, about half the blocks) for every bucket, layer and head."""
    bs = cfg.calibration.block_size
    f, h, w = ident.token_grid(cfg.video.frames, cfg.video.height, cfg.video.width)
    nb = -(-f * h * w // bs)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(cfg.calibration.buckets, ident.layers, ident.heads, nb, nb, generator=g) < 0.5
    masks |= torch.eye(nb, dtype=torch.bool)
    tensors, groups = plan_tensors(masks)
    index = plan_index(tensors, [(x["bucket"], x["layer"]) for x in groups])
    density = masks.float().mean(dim=(-1, -2))
    buckets = step_buckets(cfg.generate.steps, cfg.calibration.warmup_steps, cfg.calibration.buckets)
    return SparsePlan(bs, buckets, index, density)


def sample(cfg, plan, layout, *, parallel_first=False) -> torch.Tensor:
    model = load_model(cfg)
    controller = DenseController()
    if plan is not None:
        controller = SparseController(plan.heads(*layout.heads(model.ident.heads)) if layout.ulysses > 1 else plan)
    if parallel_first:  # the install-order guard: a transformer made parallel before our processors go in
        enable_ulysses(model.pipe.transformer, layout)
        model.install(controller)
        split = parallelize(model, replace(layout, ulysses=1))
    else:
        model.install(controller)
        split = parallelize(model, layout)
    split.reset()
    with torch.inference_mode():
        return model.run(
            "a red circle moving left",
            cfg=cfg,
            controller=controller,
            seed=0,
            output_type="latent",
            cfg_branch=layout.cfg_rank,
        ).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, required=True)
    ap.add_argument("--cfg-parallel", action="store_true")
    ap.add_argument("--ulysses", type=int, default=1)
    ap.add_argument("--parallel-first", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.model == "tiny4":
        four_heads()
    cfg = load_config(None, COMMON + MODELS[args.model])
    ident = model_identity(cfg)
    pcfg = ParallelConfig(cfg_parallel=args.cfg_parallel, ulysses=args.ulysses)
    layout = parallel.setup(pcfg, "cpu")
    plan = synthetic_plan(cfg, ident)
    calls = {}
    errors = {}
    for mode in ("dense", "sparse"):
        p = plan if mode == "sparse" else None
        ref = sample(cfg, p, parallel.Layout())
        import calibatt_kernels as ck

        ck.reset_what_ran()
        got = sample(cfg, p, layout, parallel_first=args.parallel_first)
        calls[mode] = ck.what_ran()["calls"]
        errors[mode] = float((got - ref).norm() / ref.norm())
    if layout.is_main:
        with open(args.out, "w") as f:
            json.dump({"errors": errors, "calls": calls, "layout": layout.describe()}, f)
    parallel.teardown(layout)


if __name__ == "__main__":
    sys.exit(main())
