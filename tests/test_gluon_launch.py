"""The persistent Gluon kernel's launch arguments, checked on the CPU: its launcher runs up to the launch
(descriptors, records, workspaces) with the kernel replaced by a recorder. `calibatt compile` caches the
binaries of the launches it makes; one whose argument types differ is another binary, which a strict
`generate` would have to compile."""

import inspect

import pytest
import torch

from calibatt_kernels import attn_gluon, mask_to_index, split_merge
from calibatt_kernels.index import index_on_device

PROGRAMS = 132  # an H100's SM count: what the launcher's grid and the last-wave split see
NAMES = list(inspect.signature(attn_gluon.kernel_fn(True).fn).parameters)


class Recorder:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _launch(monkeypatch, mask: torch.Tensor, split: bool) -> dict:
    """The pointer arguments' dtypes of one launch of the persistent kernel on `mask` ([H, M, M] blocks of
    128 tokens, head dim 128), with its records' last wave split over PROGRAMS programs or not."""
    heads, m, _ = mask.shape
    rec = Recorder()
    monkeypatch.setattr(attn_gluon, "_gl_attn_persistent", rec)
    monkeypatch.setattr(attn_gluon, "num_sms", lambda device: PROGRAMS)
    monkeypatch.setattr(split_merge, "merge_splits", lambda *a, **k: None)
    counts, offsets, ids, id_words, schedule = index_on_device(mask_to_index(mask), torch.device("cpu"))
    words = ids if id_words else attn_gluon.index_words(ids)
    records = attn_gluon.tile_records(counts, offsets, words, schedule)
    splits = None
    if split:
        records, split_rows, s = split_merge.split_last_wave(records, words, PROGRAMS)
        assert split_rows is not None, "these masks must split their last wave"
        splits = (split_rows, s)
    q, k, v = torch.zeros(3, 1, m * 128, heads, 128, dtype=torch.bfloat16).transpose(2, 3)
    out = torch.empty_like(q)
    attn_gluon.block_sparse_attention_gluon(
        q, k, v, out, counts, offsets, words, schedule, scale=0.1, records=records, splits=splits
    )
    ((args, _),) = rec.calls
    return {n: a.dtype for n, a in zip(NAMES, args, strict=False) if isinstance(a, torch.Tensor)}


def test_split_and_unsplit_launches_are_one_binary(monkeypatch):
    """Whether the last wave is split depends on the masks (here: 40 heads x 4 rows of 4 blocks split over
    132 programs; 12 heads x 1 block do not), so the cache's binaries must not: every pointer argument has
    the same type in both launches, the type the ahead-of-time signature gives it."""
    unsplit = _launch(monkeypatch, torch.ones(12, 1, 1, dtype=torch.bool), split=False)
    split = _launch(monkeypatch, torch.ones(40, 4, 4, dtype=torch.bool), split=True)
    assert unsplit == split
    monkeypatch.undo()
    sig, _, _, _ = attn_gluon.aot_source_args(torch.bfloat16, 128)
    for name in ("WsO", "WsML", "Records", "Words"):
        assert sig[name] == {torch.float32: "*fp32", torch.int32: "*i32"}[split[name]], name


@pytest.mark.parametrize("heads", [12, 40])
def test_one_block_masks_do_not_split(heads):
    """The launch `prewarm` makes (one block per head) never splits, so it is the unsplit launch above."""
    counts, offsets, ids, id_words, schedule = index_on_device(
        mask_to_index(torch.ones(heads, 1, 1, dtype=torch.bool)), torch.device("cpu")
    )
    words = ids if id_words else attn_gluon.index_words(ids)
    _, split_rows, _ = split_merge.split_last_wave(
        attn_gluon.tile_records(counts, offsets, words, schedule), words, PROGRAMS
    )
    assert split_rows is None
