"""Procedural data: determinism, caption/attribute consistency, held-out combinations, vocabulary,
and the fixed latent transform's invertibility."""

import numpy as np
import torch

from calibatt_cli.tiny import procedural as P
from calibatt_cli.tiny.latent import PixelShuffleLatent, channel_to_space_time, space_time_to_channel
from calibatt_cli.tiny.model import LATENT, VOCAB_WORDS


def test_batches_are_a_function_of_seed_and_step():
    a = P.training_batch(3, 7, 8)
    assert a == P.training_batch(3, 7, 8)
    assert a != P.training_batch(3, 8, 8)
    assert torch.equal(P.render(a[:2]), P.render(P.training_batch(3, 7, 8)[:2]))


def test_held_out_triples_never_sampled_for_training():
    assert len(P.HELD_OUT) == 24
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        spec = P.sample_spec(rng, two_objects_p=0.5)
        for o in spec.objects:
            assert o.triple not in P.HELD_OUT, o.triple
            seen.add(o.triple)
    # every colour, shape and motion still appears in training
    assert {t[0] for t in seen} == set(P.COLOURS)
    assert {t[1] for t in seen} == set(P.SHAPES)
    assert {t[2] for t in seen} == set(P.MOTIONS)
    held = P.sample_spec(np.random.default_rng(1), held_out=True)
    assert held.objects[0].triple in P.HELD_OUT


def test_captions_name_the_attributes_and_use_the_vocabulary():
    rng = np.random.default_rng(5)
    vocab = set(VOCAB_WORDS)
    for _ in range(300):
        spec = P.sample_spec(rng, two_objects_p=0.5)
        cap = P.caption(spec)
        assert set(cap.split()) <= vocab, cap
        assert cap.endswith(f"on a {spec.background} background")
        for o in spec.objects:
            assert f"{o.colour} {o.shape} {P.MOTION_PHRASES[o.motion]}" in cap
            assert (o.size in cap.split()) == spec.say_size
    for p in P.held_out_prompts(16):
        assert set(p.split()) <= vocab


def test_objects_stay_inside_the_frame():
    rng = np.random.default_rng(2)
    for _ in range(500):
        for o in P.sample_spec(rng).objects:
            tr = P.trajectory(o, P.FRAMES)
            x, y, half = tr[:, 0], tr[:, 1], tr[:, 2]
            assert (x - half >= 0).all() and (x + half <= P.SIZE).all(), o
            assert (y - half >= 0).all() and (y + half <= P.SIZE).all(), o


def test_latent_transform_is_invertible():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 17, 64, 64) * 2 - 1
    z = space_time_to_channel(x, 2, 2)
    assert z.shape == (2, 24, 9, 32, 32)
    err = (channel_to_space_time(z, 2, 2) - x).abs().max().item()
    assert err == 0.0, f"max_diff={err}"
    vae = PixelShuffleLatent(**LATENT)
    z = vae.encode(x)
    back = vae.decode(z).sample
    assert torch.equal(back, x)
    assert vae.config.z_dim == 24 and vae.dtype == torch.float32
