"""Triton kernels against the PyTorch path, bit for bit, under Triton's interpreter on CPU.

Not collected on its own (no ``test_`` prefix): ``tests/test_kernels.py`` runs it in a subprocess
with ``TRITON_INTERPRET=1 LONGSEQ_KERNELS=triton`` (the interpreter must be on before triton's
kernels are defined) and asserts that every case passed and none skipped.
"""
import itertools
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LONGSEQ_KERNELS") != "triton":
    pytest.skip("needs TRITON_INTERPRET=1 LONGSEQ_KERNELS=triton (tests/test_kernels.py sets them)",
                allow_module_level=True)

from longseq import kernels as K  # noqa: E402
from longseq.kernels import reference as R  # noqa: E402
from longseq.sharding import split_sizes  # noqa: E402

P = 3
SHAPES = {4: (3, 5, 7, 4), 5: (3, 4, 5, 3, 6)}   # every dim >= P, most uneven over 3
PAIRS = [(nd, sd, gd) for nd in (4, 5) for sd, gd in itertools.permutations(range(nd), 2)]


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _no_fallback(monkeypatch):
    """The PyTorch path must not run: the case would otherwise compare the reference with itself."""
    def boom(*a, **k):
        raise AssertionError("the kernel path fell back to the PyTorch reference")
    for name in ("pack", "unpack", "scan_update"):
        monkeypatch.setattr(R, name, boom)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nd,sd,gd", PAIRS)
def test_switch_pack_unpack_bitwise(monkeypatch, nd, sd, gd, dtype):
    g = torch.Generator().manual_seed(nd * 100 + sd * 10 + gd)
    shape = SHAPES[nd]
    whole = torch.randn(*shape, generator=g).to(dtype)
    # a strided input: the same values held in a permuted buffer (reversed dim order)
    strided = whole.permute(*reversed(range(nd))).contiguous().permute(*reversed(range(nd)))
    assert not strided.is_contiguous()
    send = split_sizes(shape[sd], P)
    gsizes = split_sizes(shape[gd], P)
    want = {id(x): R.pack(x, sd, send) for x in (whole, strided)}
    want_out = R.unpack(want[id(whole)], shape, gd, gsizes)
    _no_fallback(monkeypatch)
    for x in (whole, strided):
        got = K.pack(x, sd, send)
        assert torch.equal(_bits(got), _bits(want[id(x)])), (nd, sd, gd, x.is_contiguous())
    out = K.unpack(want[id(whole)], shape, gd, gsizes)
    assert out.is_contiguous() and torch.equal(_bits(out), _bits(want_out))
    back = K.unpack(K.pack(strided, sd, send), shape, sd, send)   # unpack inverts pack along one dim
    assert torch.equal(_bits(back), _bits(whole))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool])
def test_other_element_sizes(monkeypatch, dtype):
    x = (torch.randn(4, 5, 6, 3) * 10).to(dtype)
    send = split_sizes(5, P)
    want = R.pack(x.transpose(0, 2), 1, send)
    _no_fallback(monkeypatch)
    got = K.pack(x.transpose(0, 2), 1, send)
    assert torch.equal(got, want)
    assert torch.equal(K.unpack(got, x.transpose(0, 2).shape, 1, send), x.transpose(0, 2))


@pytest.mark.parametrize("local_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_decay", [True, False])
def test_scan_update_bitwise(monkeypatch, out_dtype, local_dtype, with_decay):
    g = torch.Generator().manual_seed(3)
    rows, cols = 37, 19     # neither a multiple of the tile
    inp = torch.randn(rows, cols, generator=g).to(out_dtype)
    local = torch.randn(rows, cols, generator=g).to(local_dtype)
    decay = torch.rand(rows, 1, generator=g).to(out_dtype) if with_decay else None
    want = R.scan_update(torch.empty(rows, cols, dtype=out_dtype), inp, local, decay)
    _no_fallback(monkeypatch)
    out = torch.full((rows, cols), float("nan"), dtype=out_dtype)
    assert K.scan_update(out, inp, local, decay) is out
    assert torch.equal(out, want)
