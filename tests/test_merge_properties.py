"""Properties every merge keeps, over many random shapes (hypothesis): size mass is conserved, r=0 is the
identity, protected rows pass through unchanged, and what padding holds (or where it sits) changes nothing real."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tc_export.ops.adjacent import adjacent_merge
from tc_export.ops.tome import tome_merge

shapes = st.tuples(st.integers(1, 3), st.integers(3, 40), st.integers(1, 6), st.integers(0, 4), st.integers(0, 25),
                   st.integers(0, 10_000))
MERGES = {"tome": tome_merge, "adjacent": adjacent_merge}


def _case(batch, tokens, channels, protected, r, seed):
    g = torch.Generator().manual_seed(seed)
    protected = min(protected, tokens - 1)
    x = torch.randn(batch, tokens, channels, generator=g, dtype=torch.float64)
    metric = torch.randn(batch, tokens, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=g).double()
    return x, metric, size, protected, r


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from(list(MERGES)))
def test_mass_and_weighted_sum_are_conserved(shape, name):
    x, metric, size, protected, r = _case(*shape)
    out, out_size = MERGES[name](x, metric, size, r, protected)
    torch.testing.assert_close(out_size.sum(1), size.sum(1))
    torch.testing.assert_close((out * out_size).sum(1), (x * size).sum(1))  # a merge is a size-weighted average


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from(list(MERGES)))
def test_r_zero_is_the_identity(shape, name):
    x, metric, size, protected, _ = _case(*shape)
    out, out_size = MERGES[name](x, metric, size, 0, protected)
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(out_size, size)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from(list(MERGES)))
def test_protected_rows_pass_through(shape, name):
    x, metric, size, protected, r = _case(*shape)
    out, out_size = MERGES[name](x, metric, size, r, protected)
    torch.testing.assert_close(out[:, :protected], x[:, :protected])
    torch.testing.assert_close(out_size[:, :protected], size[:, :protected])


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(list(MERGES)), st.integers(0, 10_000))
def test_pad_contents_and_order_change_nothing_real(shape, name, seed):
    x, metric, size, protected, r = _case(*shape)
    g = torch.Generator().manual_seed(seed)
    pads = torch.rand(size.shape[:2], generator=g) < 0.4
    pads[:, :protected] = False
    size = size.masked_fill(pads.unsqueeze(-1), 0.0)
    out, out_size = MERGES[name](x, metric, size, r, protected, padded=True)
    noisy_x, noisy_metric = x.clone(), metric.clone()
    noisy_x[pads] = torch.randn(int(pads.sum()), x.shape[2], generator=g, dtype=x.dtype) * 50
    noisy_metric[pads] = torch.randn(int(pads.sum()), metric.shape[2], generator=g, dtype=x.dtype)
    noisy, noisy_size = MERGES[name](noisy_x, noisy_metric, size, r, protected, padded=True)
    real = out_size[..., 0] > 0
    torch.testing.assert_close(noisy_size, out_size)
    torch.testing.assert_close(noisy[real], out[real])
    # The real tokens' total content is what it was, wherever the pads sit.
    torch.testing.assert_close((out * out_size).sum(1), (x * size).sum(1))
