"""mdgd.buffers: flat gradient buffers, .grad views and segment layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdgd.buffers import FlatGrads, segment_layout


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def test_views_cover_the_buffer_in_order():
    m = _model()
    names, params = zip(*m.named_parameters())
    fg = FlatGrads(names, params, ("g", "h"))
    assert fg.numel == sum(p.numel() for p in params) == fg.buffers["g"].numel()
    offset = 0
    for p, v in zip(params, fg.views["g"]):
        assert v.shape == p.shape
        assert v.data_ptr() == fg.buffers["g"].data_ptr() + offset * v.element_size()
        offset += p.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autograd_accumulates_into_the_views(dtype):
    m = _model(dtype)
    names, params = zip(*m.named_parameters())
    fg = FlatGrads(names, params, ("g", "h"))
    x = torch.randn(4, 5, dtype=dtype)
    want_g = torch.autograd.grad(m(x).square().sum(), params)
    want_h = torch.autograd.grad(m(x).sum(), params)
    for _ in range(2):  # two micro-batches add up in place
        fg.point("g")
        m(x).square().sum().backward()
        fg.point("h")
        m(x).sum().backward()
    for p, v, wg, wh, vg in zip(params, fg.views["h"], want_g, want_h, fg.views["g"]):
        assert p.grad is v  # not replaced: written in place
        torch.testing.assert_close(vg, 2 * wg)
        torch.testing.assert_close(v, 2 * wh)
    fg.zero_()
    assert not fg.buffers["g"].any() and not fg.buffers["h"].any()
    fg.detach_grads()
    assert all(p.grad is None for p in params)


def test_mixed_dtypes_are_refused():
    m = _model()
    m[2].bias.data = m[2].bias.data.double()
    names, params = zip(*m.named_parameters())
    with pytest.raises(ValueError, match="one dtype and device"):
        FlatGrads(names, params, ("g",))
    with pytest.raises(ValueError, match="at least one"):
        FlatGrads([], [], ("g",))


def test_segment_layouts():
    names, sizes = ["a", "b", "c"], [10, 3, 7]
    t = segment_layout(names, sizes, None, "tensor")
    assert (t.sizes, t.names, t.param_index) == (sizes, names, [0, 1, 2])
    g = segment_layout(names, sizes, None, "global")
    assert g.sizes == [20] and len(g.names) == 1
    b = segment_layout(names, sizes, 4, "block:4")
    assert b.sizes == [4, 4, 2, 3, 4, 3]
    assert b.param_index == [0, 0, 0, 1, 2, 2]
    assert b.names[2] == "a[block 2 of 3]"
    assert sum(b.sizes) == sum(sizes)
