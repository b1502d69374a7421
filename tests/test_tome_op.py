"""The static-shape ToMe op against the straightforward per-sample reference."""

import pytest
import torch

from tc_export.ops.attention import proportional_bias
from tc_export.ops.tome import ToMeMerge, effective_r, tome_merge

from .reference import reference_merge


def _inputs(batch: int, tokens: int, channels: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=g)
    metric = torch.randn(batch, tokens, 5, generator=g)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=g).float()
    return x, metric, size


@pytest.mark.parametrize("tokens", [9, 10, 17, 197])
@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("r", [0, 1, 3, 8, 1000])
def test_merge_matches_reference(tokens, protected, r):
    x, metric, size = _inputs(3, tokens, seed=tokens + protected + r)
    got_x, got_size = tome_merge(x, metric, size, r, protected)
    for b in range(3):
        want_x, want_size = reference_merge(x[b], metric[b], size[b], r, protected)
        assert got_x[b].shape == want_x.shape
        torch.testing.assert_close(got_x[b], want_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_size[b], want_size)


def test_token_count_and_cap():
    assert effective_r(197, 16, 1) == 16
    assert effective_r(21, 16, 1) == 10  # (21 - 1) // 2
    assert effective_r(10, 16, 0) == 5
    assert effective_r(3, 16, 2) == 0
    x, metric, _ = _inputs(2, 21)
    out, size = ToMeMerge(16, 1)(x, None, metric)
    assert out.shape == (2, 11, 8)
    assert size.sum(dim=1).eq(21).all()  # no token is lost: sizes add up


def test_protected_tokens_stay_first_and_unmerged():
    x, metric, _ = _inputs(4, 31)
    metric[:, 0] = metric[:, 2]  # make the class token the perfect match of another token
    out, size = tome_merge(x, metric, None, 15, protected=1)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    assert size[:, 0].eq(1).all()


def test_merge_average_is_size_weighted():
    # Two identical-direction tokens: A token 2 (size 3) merges into B token 1 (size 1).
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [5.0, 0.0], [0.0, -1.0]]])
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.01], [0.0, -1.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0]]])
    out, new_size = tome_merge(x, metric, size, 1, protected=0)
    # unmerged A: token 0; then B: token 1 (merged with token 2), token 3
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 1.0], [(1.0 + 15.0) / 4, 0.0], [0.0, -1.0]]))
    torch.testing.assert_close(new_size[0, :, 0], torch.tensor([1.0, 4.0, 1.0]))


def test_proportional_bias_shape_and_values():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = proportional_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.log(torch.tensor([1.0, 2.0, 4.0])))
