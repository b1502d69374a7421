"""Flipped merge decisions are counted apart from numeric error: constructed ties, and a real export."""

import numpy as np
import torch

from tc_export import ExportConfig, ParityConfig, ToMeConfig, check_parity, compress, export_onnx
from tc_export.export.decisions import compare_decisions, onnx_site_sizes, torch_site_sizes
from tc_export.ops.tome import tome_merge

from .conftest import tiny_timm_vit


def test_a_constructed_tie_broken_both_ways_is_one_flipped_site():
    # A token 0 matches B tokens 1 and 3 exactly alike (a tie: the lower index, token 1, wins); a small nudge of
    # token 1 away from it makes token 3 the match instead.
    x = torch.arange(6.0).reshape(1, 6, 1)
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    nudged = metric.clone()
    nudged[0, 1, 1] = 1e-3
    _, size_a = tome_merge(x, metric, None, 1, 0, sort_unmerged=True)
    _, size_b = tome_merge(x, nudged, None, 1, 0, sort_unmerged=True)
    assert size_a.flatten().tolist() == [1, 1, 2, 1, 1] and size_b.flatten().tolist() == [1, 1, 1, 2, 1]
    ones = np.ones((1, 6, 1), np.float32)
    report = compare_decisions([ones, size_a.numpy()], [ones, size_b.numpy()])
    assert report.sites == 2 and report.differing == [(1, 2)]
    assert "1 of 2 token-op sites decided differently" in report.describe() and "flipped" in report.describe()


def test_counting_ignores_sites_without_sizes_and_counts_each_site():
    a = [np.ones((1, 4, 1)), np.array([[[2.0], [1.0], [1.0]]]), np.empty(0)]
    b = [np.ones((1, 4, 1)), np.array([[[1.0], [2.0], [1.0]]]), np.ones((1, 2, 1))]
    report = compare_decisions(a, b)
    assert report.sites == 2 and report.differing == [(1, 2)]


def test_real_export_makes_the_same_decisions_and_a_numeric_bug_says_so(tmp_path):
    model = tiny_timm_vit(depth=3)
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    compressed = compress(model, ToMeConfig(r=4), {"x": images})
    path = tmp_path / "m.onnx"
    export_onnx(compressed.module, {"x": images}, path, ExportConfig(), input_names=["pixel_values"])
    ref = torch_site_sizes(compressed.module, {"x": images})
    cand = onnx_site_sizes(path, {"pixel_values": images.numpy()})
    assert len(ref) == len(cand) == 3
    assert compare_decisions(ref, cand).differing == []
    with torch.no_grad():  # a numeric bug after every token op: the head's bias
        compressed.module.head.bias += 1.0
    report = check_parity(compressed.module, path, lambda seed: {"x": images}, {"x": "pixel_values"}, ["logits"],
                          ParityConfig(samples=1))
    assert not report and report.decisions is not None and report.decisions.differing == []
    message = report.failure_message(1e-4, 1e-3)
    assert "all 3 token-op sites made the same decisions: the difference is numeric" in message
