"""Quick check of the persistent Gluon kernel (v9) on a small problem against the fp32 reference, with
empty rows, a partial last block and diffusers' layout. Prints the relative error."""
import sys

import torch

import calibatt_kernels as ck
from calibatt_kernels import block_sparse_gluon as g
m = g
from calibatt_kernels.block_sparse import _device_index

torch.manual_seed(0)
B, H, N, D = 2, 3, 3000, 128
q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
mb = (N + 127) // 128
mask = torch.rand(B, H, mb, mb, device="cuda") < 0.3
mask[0, 1, 3] = False
mask[1, 2, -1] = False
mask[1, 2, -1, -1] = True
ix = ck.mask_to_index(mask)
c, o, w, _, _ = _device_index(ix, q.device)
sch = ix.schedule.to(device="cuda", dtype=torch.int32)
ok = True
for persistent, m.P_STAGES in ((False, (3, 2)), (True, (3, 2)), (True, (2, 3))):
    out = torch.full_like(q, float("nan"))
    g.block_sparse_attention_gluon(q, k, v, out, c, o, w, sch, scale=D ** -0.5, persistent=persistent)
    torch.cuda.synchronize()
    ref = ck.block_sparse_attention_ref(q.float(), k.float(), v.float(), mask)
    rel = float((out.float() - ref).norm() / ref.norm())
    print("persistent", persistent, m.P_STAGES, "rel", rel, "nan", int(out.isnan().sum()), flush=True)
    ok &= rel < 1e-2 and not out.isnan().any()
sys.exit(0 if ok else 1)
