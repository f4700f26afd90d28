"""place_pipeline / to_device: a pipeline's tensors moved by several threads give what .to(device) gives."""

import copy

import pytest
import torch
from torch import nn

from calibatt_cli.models.base import pieces, place_pipeline, to_device


class Net(nn.Module):
    """What a loaded pipeline module holds: tied weights, a frozen and a transposed parameter, mixed dtypes,
    a non-persistent buffer shared by two modules, and a submodule used twice."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.norm = nn.LayerNorm(8).to(torch.float64)
        self.frozen = nn.Parameter(torch.rand(3, generator=g), requires_grad=False)
        self.strided = nn.Parameter(torch.rand(4, 6, generator=g).t())
        freqs = torch.arange(4.0)
        self.register_buffer("freqs", freqs, persistent=False)
        self.inner = nn.Module()
        self.inner.register_buffer("freqs", freqs, persistent=False)
        self.twice = nn.ModuleList([self.norm, self.norm])


def _tensors(m: nn.Module) -> dict:
    return {
        **dict(m.named_parameters(remove_duplicate=False)),
        **{f"buffer:{k}": v for k, v in m.named_buffers(remove_duplicate=False)},
    }


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a.device, a.dtype, a.shape, a.stride(), a.requires_grad) == (
        b.device,
        b.dtype,
        b.shape,
        b.stride(),
        b.requires_grad,
    )
    assert type(a) is type(b)


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_moved_modules_are_what_to_gives(workers):
    """On the meta device (no GPU here): every tensor where .to puts it, with its dtype, shape, strides and
    requires_grad; parameters tied as .to leaves them (it unties them on the meta device, where a parameter
    cannot keep its object); a buffer shared by two modules stays one tensor (.to would copy it twice)."""
    nets = [Net(), Net()]
    want = [copy.deepcopy(n).to("meta") for n in nets]
    to_device(nets, torch.device("meta"), workers)
    for net, ref in zip(nets, want, strict=True):
        got, exp = _tensors(net), _tensors(ref)
        assert got.keys() == exp.keys()
        for k in got:
            _same_layout(got[k], exp[k])
        assert (net.head.weight is net.emb.weight) == (ref.head.weight is ref.emb.weight)
        assert net.freqs is net.inner.freqs
    assert nets[0].emb.weight is not nets[1].emb.weight


def test_a_pipeline_moves_its_modules_and_leaves_the_rest():
    class Pipe:
        def __init__(self) -> None:
            self.transformer, self.text_encoder = Net(), Net()
            self.tokenizer = object()
            self.components = {
                "transformer": self.transformer,
                "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer,
                "vae": None,
            }

    pipe = Pipe()
    tokenizer = pipe.tokenizer
    place_pipeline(pipe, "meta", workers=2)
    for m in (pipe.transformer, pipe.text_encoder):
        assert {t.device.type for t in _tensors(m).values()} == {"meta"}
    assert pipe.tokenizer is tokenizer


def test_one_worker_is_the_pipelines_own_to():
    class Pipe:
        components = {"transformer": Net()}

        def to(self, device):
            self.moved_to = device

    pipe = Pipe()
    place_pipeline(pipe, "meta", workers=1)
    assert pipe.moved_to == "meta"
    assert {t.device.type for t in _tensors(pipe.components["transformer"]).values()} == {"cpu"}


@pytest.mark.parametrize(
    "src",
    [
        torch.arange(1000, dtype=torch.float32),
        torch.arange(999, dtype=torch.bfloat16).view(9, 111),
        torch.arange(24, dtype=torch.int64).view(2, 3, 4),
        torch.arange(77, dtype=torch.float16).view(7, 11).t(),  # not contiguous: one piece
        torch.tensor(3.5),
        torch.empty(0, 5),
    ],
)
@pytest.mark.parametrize("piece_bytes", [1, 8, 100, 4096])
def test_pieces_copy_the_whole_tensor_and_stay_under_the_size(src, piece_bytes):
    """Copying every piece of src into an empty dst gives src; each piece of a contiguous tensor holds at most
    piece_bytes (or one element, where an element is larger), and the pieces do not overlap."""
    dst = torch.full_like(src, -1)
    got = pieces(src, dst, piece_bytes)
    for d, s in got:
        d.copy_(s)
    assert torch.equal(dst, src)
    if src.is_contiguous():
        assert all(s.nbytes <= max(piece_bytes, src.element_size()) for _, s in got)
        assert sum(s.numel() for _, s in got) == src.numel()
    else:
        assert len(got) == 1 and got[0][1] is src


def test_nothing_to_move_is_a_no_op():
    net = Net()
    before = {k: v.data_ptr() for k, v in _tensors(net).items()}
    to_device([net], torch.device("cpu"), 4)
    assert {k: v.data_ptr() for k, v in _tensors(net).items()} == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("piece_bytes", [4096, 1 << 20])
def test_moved_to_the_gpu_the_values_are_what_to_gives(staged, piece_bytes):
    """Copied on the workers' streams, read on this thread's: bit-exact with .to("cuda"), ties kept; with
    pieces of 4 KiB each thread's two pinned buffers are reused many times, and the large table's pieces
    land in place."""
    nets = [Net() for _ in range(3)]
    for n in nets:
        n.table = nn.Parameter(torch.randn(3000, 257, dtype=torch.bfloat16), requires_grad=False)
    want = [copy.deepcopy(n).to("cuda") for n in nets]
    to_device(nets, torch.device("cuda"), workers=4, staged=staged, piece_bytes=piece_bytes)
    for net, ref in zip(nets, want, strict=True):
        got, exp = _tensors(net), _tensors(ref)
        for k in got:
            _same_layout(got[k], exp[k])
            assert torch.equal(got[k], exp[k]), k
        assert net.head.weight is net.emb.weight and ref.head.weight is ref.emb.weight
        assert net.freqs is net.inner.freqs
        x = torch.arange(5, device="cuda")
        assert torch.equal(net.head(net.emb(x)), ref.head(ref.emb(x)))
