"""Training smoke test on CPU: two steps, and a run resumed from a checkpoint equals an uninterrupted one."""

import json

import torch
from safetensors.torch import load_file

from calibatt_cli.tiny.train import CKPT_INFO, TrainConfig, export_weights, train

SMALL = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=1,
    attention_head_dim=64,
    in_channels=24,
    out_channels=24,
    text_dim=64,
    freq_dim=64,
    ffn_dim=64,
    num_layers=1,
    rope_max_seq_len=64,
)


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch=2, transformer=dict(SMALL), log_every=1, ckpt_every=100, warmup=1)


def _state(folder) -> dict:
    info = json.loads((folder / CKPT_INFO).read_text())
    out = {}
    for name in info["shards"]:
        out.update(load_file(str(folder / name)))
    return out


def test_two_steps_checkpoint_and_resume(tmp_path):
    full = train(_cfg(2), tmp_path / "full")
    assert full.step == 2 and len(full.losses) == 2
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in full.losses)

    train(_cfg(1), tmp_path / "resumed")
    resumed = train(_cfg(2), tmp_path / "resumed")
    assert resumed.losses == full.losses
    a, b = _state(tmp_path / "full"), _state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff == 0.0, f"max_diff={diff}"

    digest = export_weights(tmp_path / "full", tmp_path / "w.safetensors")
    info = json.loads((tmp_path / "w.json").read_text())
    assert info["sha256"] == digest and info["step"] == 2
    assert not any(k.startswith(("ema.", "adam.")) for k in load_file(str(tmp_path / "w.safetensors")))


def test_warm_start_from_the_shipped_weights(tmp_path):
    """Training can continue from the shipped model (no optimizer checkpoint needed): weights and EMA
    start equal to it, the step count continues from its record, and a step trains."""
    import json

    from safetensors.torch import load_file

    from calibatt_cli.tiny import model as tiny_mod
    from calibatt_cli.tiny.train import Trainer

    shipped_step = json.loads(tiny_mod.WEIGHTS_INFO.read_text())["step"]
    cfg = TrainConfig(
        steps=shipped_step + 1, batch=2, log_every=1, ckpt_every=100, warmup=1, init_from=str(tiny_mod.WEIGHTS)
    )
    trainer = Trainer(cfg)
    trainer.warm_start(tiny_mod.WEIGHTS)
    shipped = load_file(str(tiny_mod.WEIGHTS))
    matched = [n for n, _ in trainer.named if n in shipped]
    assert len(matched) >= len(trainer.named) - 1, "every parameter (but a tied embedding) comes from the file"
    for n, p in trainer.named:
        if n in shipped:
            assert torch.equal(p.detach(), shipped[n]) and torch.equal(trainer.ema[n], shipped[n]), n
    assert trainer.step_done == shipped_step
    res = train(cfg, tmp_path / "ck")
    assert res.step == shipped_step + 1
    assert json.loads((tmp_path / "ck" / "ckpt.json").read_text())["start_step"] == shipped_step


def test_cosine_schedule_warms_up_then_anneals_to_zero():
    from calibatt_cli.tiny.train import Trainer

    t = Trainer(TrainConfig(steps=1200, lr=1e-3, warmup=100, lr_schedule="cosine", transformer=dict(SMALL)))
    t.start_step = 200  # a warm start: the schedule spans this optimizer's own run, steps 200..1200
    lrs = [t.lr_at(i) for i in range(200, 1200)]
    assert abs(lrs[0] - 1e-5) < 1e-9  # warm-up: 1/100 of the peak at its first step
    peak = max(lrs)
    assert 0.95e-3 < peak <= 1e-3 and lrs.index(peak) < 110  # the cosine has begun by then
    after = lrs[lrs.index(peak) :]
    assert all(a >= b for a, b in zip(after[:-1], after[1:], strict=True)) and after[-1] < 1e-7
    const = Trainer(TrainConfig(steps=1200, lr=1e-3, warmup=100, transformer=dict(SMALL)))
    assert const.lr_at(150) == const.lr_at(1199) == 1e-3
    import pytest

    from calibatt_cli.errors import CalibattError

    with pytest.raises(CalibattError, match="lr schedule 'linear' is not known; use constant or cosine"):
        TrainConfig(lr_schedule="linear")


def test_foreground_weights_cover_the_objects_and_their_rim():
    """fg_weight: the loss weight is 1 + w on the object's pixels (a 1-pixel rim included), 1 elsewhere, and
    lands on the same latent elements as those pixels."""
    from calibatt_cli.tiny import procedural as P
    from calibatt_cli.tiny.train import Trainer, foreground

    spec = P.ClipSpec((P.ObjectSpec("red", "square", "left", "large", (32.0, 32.0), 0.0),), "black", False)
    video = P.render([spec])
    cover = foreground([spec], video)[0, 0, 0]  # frame 0, [H, W]
    half = P.trajectory(spec.objects[0], spec.frames)[0, 2]
    inside = (torch.arange(64) + 0.5 - 32).abs() < half * 0.9 - 1  # the square's core along one axis
    assert cover[inside][:, inside].min() == 1.0
    far = (torch.arange(64) + 0.5 - 32).abs() > half * 0.9 + 2  # more than the rim away
    assert cover[far].max() == 0.0 and cover[:, far].max() == 0.0

    trainer = Trainer(TrainConfig(batch=3, transformer=dict(SMALL), fg_weight=4.0))
    x0, _, weight = trainer.batch(0)
    assert weight.shape == x0.shape
    assert set(weight.unique().tolist()) == {1.0, 5.0}
    assert 0.005 < (weight == 5.0).float().mean() < 0.5  # objects are a small share of the pixels
    assert trainer.loss(0).isfinite()


def test_warm_start_grows_blocks_that_start_as_the_identity(tmp_path):
    """Weights of a 1-block model warm-start a 2-block one: the grown model computes exactly what the small
    one did, its new block's residual projections are zero, and one step moves them (gradients reach them).
    The other way round is refused."""
    import pytest

    from calibatt_cli.errors import CalibattError
    from calibatt_cli.tiny.train import GROWN_ZERO, Trainer

    train(_cfg(1), tmp_path / "small")
    export_weights(tmp_path / "small", tmp_path / "small.safetensors")
    small = Trainer(_cfg(1))
    small.warm_start(tmp_path / "small.safetensors")
    big_cfg = TrainConfig(
        steps=3,
        batch=2,
        transformer=dict(SMALL, num_layers=2),
        log_every=1,
        ckpt_every=100,
        warmup=1,
        init_from=str(tmp_path / "small.safetensors"),
    )
    big = Trainer(big_cfg)
    big.warm_start(tmp_path / "small.safetensors")
    zeroed = [
        n for n, p in big.named if n.startswith("transformer.blocks.1.") and any(f".{z}." in n for z in GROWN_ZERO)
    ]
    assert len(zeroed) == 6 and all(not dict(big.named)[n].any() for n in zeroed)
    x = torch.randn(1, 24, 3, 8, 8)
    t = torch.tensor([400.0])
    text = torch.randn(1, 5, 64)
    with torch.no_grad():
        want = small.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text).sample
        got = big.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text).sample
    assert torch.equal(got, want)
    res = train(big_cfg, tmp_path / "big")
    assert res.step == 3
    state = _state(tmp_path / "big")
    assert all(state[f"model.{n}"].abs().max() > 0 for n in zeroed), "the grown block must train"

    with pytest.raises(CalibattError, match="can add blocks, not remove them"):
        Trainer(_cfg(1)).warm_start(_export(tmp_path / "big"))


def _export(folder):
    dest = folder.parent / f"{folder.name}.safetensors"
    export_weights(folder, dest)
    return dest


def test_compile_keeps_parameter_names_and_checkpoint_keys(tmp_path):
    """--compile compiles the transformer in place: a wrapper module (torch.compile(m)) would prefix every
    name with `_orig_mod.`, and checkpoints and exports would stop loading into the eager model. (Running
    a compiled step takes ~45 s of compiling here; its losses against eager are in docs/training.md.)"""
    from calibatt_cli.tiny.train import Trainer

    eager = Trainer(TrainConfig(batch=2, transformer=dict(SMALL)))
    compiled = Trainer(TrainConfig(batch=2, transformer=dict(SMALL), compile=True))
    assert compiled.transformer._compiled_call_impl is not None and eager.transformer._compiled_call_impl is None
    assert [n for n, _ in compiled.named] == [n for n, _ in eager.named]
    assert compiled.transformer.state_dict().keys() == eager.transformer.state_dict().keys()
