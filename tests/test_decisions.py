"""Flipped decisions, order included, are told apart from numeric error: constructed ties, and a real export."""

import numpy as np
import torch

from tc_export import ExportConfig, ParityConfig, ToMeConfig, check_parity, compress, export_onnx
from tc_export.export.checks.decisions import SiteCall, compare_sites, onnx_site_calls, torch_site_calls
from tc_export.ops.tome import ToMeMerge

from .conftest import tiny_timm_vit


def _call(op, x, metric):
    size = torch.ones(1, x.shape[1], 1)
    with torch.no_grad():
        _, out_size = op(x, size, metric)
    return SiteCall("tomemerge_0", op, (x, size, metric), out_size.numpy())


def test_a_constructed_tie_broken_both_ways_is_one_flipped_site():
    # A token 0 matches B tokens 1 and 3 exactly alike (a tie: the lower index, token 1, wins); a small nudge of
    # token 1 away from it (beyond the cosines that count as equal, ops.rows.COSINE_CAP) makes token 3 the match.
    x = torch.arange(12.0).reshape(1, 6, 2)
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    nudged = metric.clone()
    nudged[0, 1, 1] = 1e-2
    op = ToMeMerge(1, 0, sort_unmerged=True)
    ref, cand = _call(op, x, metric), _call(op, x, nudged)
    assert ref.sizes.flatten().tolist() == [1, 1, 2, 1, 1] and cand.sizes.flatten().tolist() == [1, 1, 1, 2, 1]
    report = compare_sites([ref, ref], [ref, cand])
    assert report.sites == 2 and [(d.index, d.kind) for d in report.differing] == [(1, "merge")]
    assert report.differing[0].margin is not None and report.differing[0].margin < 1e-4
    assert "1 of 2 token-op sites decided differently" in report.describe() and "flipped" in report.describe()


def test_a_near_tie_in_the_unmerged_order_is_a_decision_not_numeric():
    """No class token, r=1: A token 0 merges; A tokens 2 and 4 tie for the next rank (0.8 each) and stay unmerged,
    in descending score order. A 1e-6 nudge swaps them: the same merge and the same sizes, another order, which
    decides the next layer's A/B split. The report says so, with the margin and --sort-unmerged."""
    x = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0))
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]]])
    ahead, behind = metric.clone(), metric.clone()
    ahead[0, 2] = torch.tensor([0.6 - 1e-6, 0.8 + 1e-6])  # token 2 ranks before token 4
    behind[0, 2] = torch.tensor([0.6 + 1e-6, 0.8 - 1e-6])  # token 4 before token 2
    op = ToMeMerge(1, 0)  # the published order: unmerged tokens by descending score
    ref, cand = _call(op, x, ahead), _call(op, x, behind)
    np.testing.assert_array_equal(ref.sizes, cand.sizes)  # the sizes alone cannot see this flip
    report = compare_sites([ref], [cand])
    [difference] = report.differing
    assert difference.kind == "order" and difference.tokens == 2
    assert difference.margin is not None and 1e-7 < difference.margin < 1e-5
    message = report.describe()
    assert "numeric" not in message.replace("not a numeric bug", "")
    assert "another order" in message and "--sort-unmerged" in message and "score margin" in message
    sorting = ToMeMerge(1, 0, sort_unmerged=True)  # sorted back into place: the tie cannot flip the order
    assert compare_sites([_call(sorting, x, ahead)], [_call(sorting, x, behind)]).differing == []


def test_sites_without_sizes_are_not_compared():
    x = torch.randn(1, 6, 3)
    metric = torch.randn(1, 6, 2)
    op = ToMeMerge(1, 0)
    empty = SiteCall("tomemerge_1", op, (x, None, metric), np.empty(0))
    report = compare_sites([_call(op, x, metric), empty], [_call(op, x, metric), _call(op, x, metric)])
    assert report.sites == 1 and report.differing == []


def test_real_export_makes_the_same_decisions_and_a_numeric_bug_says_so(tmp_path):
    model = tiny_timm_vit(depth=3)
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    compressed = compress(model, ToMeConfig(r=4), {"x": images})
    path = tmp_path / "m.onnx"
    export_onnx(compressed.module, {"x": images}, path, ExportConfig(), input_names=["pixel_values"])
    ref = torch_site_calls(compressed.module, {"x": images})
    cand = onnx_site_calls(path, {"pixel_values": images.numpy()}, ref)
    assert len(ref) == len(cand) == 3 and all(len(c.inputs) == 3 for c in cand)
    assert compare_sites(ref, cand).differing == []
    with torch.no_grad():  # a numeric bug after every token op: the head's bias
        compressed.module.head.bias += 1.0
    report = check_parity(compressed.module, path, lambda seed: {"x": images}, {"x": "pixel_values"}, ["logits"],
                          ParityConfig(samples=1))
    assert not report and report.decisions is not None and report.decisions.differing == []
    message = report.failure_message(1e-4, 1e-3)
    assert "all 3 token-op sites made the same decisions on the input of seed 0, token order included: the difference is numeric" in message
