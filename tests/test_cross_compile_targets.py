"""The portable path's kernels compile for Ampere (sm_80) and Ada (sm_89) on this CPU, as they do for sm_90
(test_compile.py): ptxas ships in the Triton wheel, so no GPU of those kinds is needed to see that they build
and fit the architecture's shared memory. Only sm_90 has run them on a GPU so far.

Each compile of Wan's kernel class (head dim 128, block 128, bf16) takes ~9 s on a CI core, so the test
compiles the default config of each target and checks the rest of the candidate list. Every candidate:
`calibatt compile --target sm_80` (or sm_89) with the model's config."""

from __future__ import annotations

import pytest
import torch

from calibatt_cli.cache import aot
from calibatt_kernels import dispatch

WAN = dict(dtype=torch.bfloat16, block_size=(128, 128), head_dim=128)


def _candidates(cap):
    return dispatch.candidate_configs(cap, WAN["block_size"], WAN["head_dim"], WAN["dtype"])


@pytest.mark.parametrize("target", ["sm_80", "sm_89"])
def test_default_config_compiles_and_fits(target, monkeypatch):
    cap = aot.parse_target(target)
    cands = _candidates(cap)
    # before Hopper: no Gluon kernel, no TMA; the tl kernel's default config comes first
    assert cands and all(c.backend == "tl" and c.use_tma is False for c in cands), cands
    assert cands[0].kernel == "tl_persistent"
    monkeypatch.setattr(dispatch, "candidate_configs", lambda *a, **kw: cands[:1])
    reports = aot.cross_compile(target, qk_norm_rope_heads=12, **WAN)
    assert [r.status for r in reports] == ["ok", "ok"], [(r.config, r.status, r.error) for r in reports]
    attn = reports[0]
    assert attn.config == cands[0].to_manifest()
    assert 0 < attn.shared_kib * 1024 <= aot.SHARED_LIMIT[cap[0] * 10 + cap[1]], attn
