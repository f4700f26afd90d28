"""The judge: parses template prompts and scores ground-truth procedural clips as matching."""

import numpy as np
import pytest

from calibatt_cli import procedural as P
from calibatt_cli.judge import judge, parse_prompt


def test_parse_prompt():
    e = parse_prompt("a small red circle moving left and a blue square moving up on a dark gradient background")
    assert (e.colour, e.shape, e.motion, e.background, e.size) == ("red", "circle", "left", "dark gradient", "small")
    assert parse_prompt("an orange square shrinking on a white background").motion == "shrinking"
    with pytest.raises(ValueError):
        parse_prompt("a dog running")


def test_ground_truth_single_object_clips_score_100():
    rng = np.random.default_rng(11)
    specs = [P.sample_spec(rng, two_objects_p=0.0) for _ in range(120)]
    video = P.render(specs)
    report = judge([P.to_frames(v) for v in video], [P.caption(s) for s in specs])
    bad = [v.as_dict() for v in report.verdicts if not v.match]
    assert report.score == 1.0, f"score={report.score} failures={bad[:3]}"


def test_ground_truth_held_out_and_two_object_clips():
    rng = np.random.default_rng(12)
    specs = [P.sample_spec(rng, held_out=True) for _ in range(40)]
    specs += [P.sample_spec(rng, two_objects_p=1.0) for _ in range(40)]
    video = P.render(specs)
    report = judge([P.to_frames(v) for v in video], [P.caption(s) for s in specs])
    assert report.score >= 0.95, f"score={report.score}"


def test_wrong_prompts_are_rejected():
    rng = np.random.default_rng(13)
    specs = [P.sample_spec(rng, two_objects_p=0.0) for _ in range(30)]
    video = P.render(specs)
    wrong = []
    for s in specs:
        o = s.objects[0]
        other = next(m for m in ("left", "right", "growing") if m != o.motion and not (
            o.motion == "bouncing" and m == "growing"))
        wrong.append(P.caption(P.ClipSpec((P.ObjectSpec(o.colour, o.shape, other, o.size, o.start, o.travel),),
                                          s.background, s.say_size)))
    report = judge([P.to_frames(v) for v in video], wrong)
    assert report.score == 0.0, f"score={report.score}"
