"""Exact ties are decided lower index first, in PyTorch and in the exported graph alike, in every op that ranks.

Each case is built so that the decisive scores tie exactly (repeated keys, equal class attention, padding): the
op's eager decisions, ONNX Runtime's decisions on the exported op and the independent per-sample references
(tests/reference.py, lower index first by construction) must all agree. ``torch.topk`` alone orders such ties
differently (checked below), so these tests fail without ``ops.rows.top_k``.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tc_export.export.onnx_export import ExportConfig, export_onnx
from tc_export.ops import adjacent as adjacent_module
from tc_export.ops import prumerge as prumerge_module
from tc_export.ops import pinning as pinning_module
from tc_export.ops import tome as tome_module
from tc_export.ops import topk as topk_module
from tc_export.ops.adjacent import AdjacentMerge
from tc_export.ops.prumerge import PruMerge
from tc_export.ops.rows import COSINE_CAP, top_k
from tc_export.ops.tome import ToMeMerge
from tc_export.ops.topk import TopKPrune

from .reference import (
    COSINE_CAP as REFERENCE_CAP,
    reference_adjacent,
    reference_keep_count,
    reference_merge,
    reference_prumerge,
    reference_topk,
)

RANKING_MODULES = (tome_module, topk_module, prumerge_module, adjacent_module)


class _Call(nn.Module):
    """An op called with fixed positional inputs (ONNX export of one op, flat)."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x, size, *signals):
        return self.op(x, size, *signals)


def _ort(op: nn.Module, inputs: list[torch.Tensor], tmp_path) -> list[np.ndarray]:
    names = [f"in{i}" for i in range(len(inputs))]
    module = _Call(op).eval()
    path = tmp_path / f"{type(op).__name__}.onnx"

    class Named(nn.Module):  # keyword inputs for export_onnx
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, **kwargs):
            return self.inner(*(kwargs[n] for n in names))

    export_onnx(Named(), dict(zip(names, inputs)), path, ExportConfig(functions=False), output_names=["x", "size"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def _eager(op: nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in op(*inputs)]


def _per_sample(reference, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    outs = [reference(*(t[b] for t in inputs)) for b in range(inputs[0].shape[0])]
    return [np.stack([o[0].numpy() for o in outs]), np.stack([o[1].numpy() for o in outs])]


def _agree(eager, onnx, reference) -> None:
    for got, name in ((eager, "eager"), (onnx, "ONNX Runtime")):
        np.testing.assert_array_equal(got[1], reference[1], err_msg=f"{name} sizes")  # the decisions (and order)
        np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5, err_msg=f"{name} tokens")


def _tokens(batch: int, tokens: int, channels: int = 6, seed: int = 0) -> torch.Tensor:
    """Distinct token features (the ones the outputs are checked on), apart from the tied scores."""
    return torch.randn(batch, tokens, channels, generator=torch.Generator().manual_seed(seed))


def _repeated_keys(batch: int, tokens: int, kinds: int = 3, seed: int = 0) -> torch.Tensor:
    """Keys drawn from ``kinds`` directions: many pairs score exactly alike (cosine 1 among equal keys)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(kinds, 4, generator=generator)
    return directions[torch.randint(0, kinds, (batch, tokens), generator=generator)]


def _sizes(batch: int, tokens: int, pads: int = 0) -> torch.Tensor:
    """Sizes (B, N, 1): 1, or 0 for the last ``pads`` tokens (padding). The distinct token features show which
    tokens an output row holds and in which order."""
    size = torch.ones(batch, tokens, 1)
    size[:, tokens - pads:] = 0.0
    return size


def test_top_k_orders_exact_ties_lower_index_first_in_pytorch_and_onnx_runtime(tmp_path):
    """The shared ranking on tie-heavy rows of several lengths and k (ONNX Runtime's TopK takes other paths for
    small and large k), largest and smallest: eager, ORT and a stable sort agree; ``torch.topk`` does not."""
    generator = torch.Generator().manual_seed(0)
    rows = {f"v{length}": torch.randint(0, 4, (3, length), generator=generator).float() for length in (7, 64, 300)}
    cases = [(name, k, largest) for name, values in rows.items() for k in sorted({1, 2, values.shape[1] // 3,
                                                                                    values.shape[1]})
             for largest in (True, False)]

    class Rank(nn.Module):
        def forward(self, **values):
            return tuple(top_k(values[name], k, largest)[1] for name, k, largest in cases)

    path = tmp_path / "rank.onnx"
    export_onnx(Rank(), rows, path, ExportConfig(functions=False), output_names=[f"i{n}" for n in range(len(cases))])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {name: values.numpy() for name, values in rows.items()})
    plain_topk_differs = False
    for (name, k, largest), onnx_index in zip(cases, got):
        values = rows[name]
        want = np.argsort(-values.numpy() if largest else values.numpy(), axis=-1, kind="stable")[:, :k]
        eager_values, eager_index = top_k(values, k, largest)
        np.testing.assert_array_equal(eager_index.numpy(), want, err_msg=f"eager {name} k={k} largest={largest}")
        np.testing.assert_array_equal(onnx_index, want, err_msg=f"ORT {name} k={k} largest={largest}")
        np.testing.assert_array_equal(eager_values.numpy(), np.take_along_axis(values.numpy(), want, -1))
        plain = values.topk(k, dim=-1, largest=largest).indices.numpy()
        plain_topk_differs |= not np.array_equal(plain, want)
    assert plain_topk_differs  # the cases do contain ties torch.topk decides otherwise


def test_top_k_exports_one_topk_node(tmp_path):
    class Rank(nn.Module):
        def forward(self, v):
            return top_k(v, 3)[1]

    path = tmp_path / "rank.onnx"
    model = export_onnx(Rank(), {"v": torch.randn(2, 9)}, path, ExportConfig(functions=False), output_names=["i"])
    assert [n.op_type for n in model.graph.node] == ["TopK"]


def test_identical_keys_score_exactly_alike():
    """A key's cosine with an equal key is 1 up to rounding that differs per key and per runtime; capped at
    ``COSINE_CAP`` they tie exactly. The reference caps at the same value."""
    assert COSINE_CAP == REFERENCE_CAP < 1.0
    keys = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * 3
    unit = keys / keys.norm(dim=-1, keepdim=True)
    raw = (unit * unit).sum(-1)
    assert len(set(raw.tolist())) > 1  # the rounding error this is about
    from tc_export.ops.rows import tie_cosines

    assert set(tie_cosines(raw).tolist()) == {COSINE_CAP}


TOME_CASES = {
    "no prefix": dict(protected=0),
    "class token": dict(protected=1),
    "class + distillation": dict(protected=2),
    "padded": dict(protected=0, pads=5),
    "padded, class token": dict(protected=1, pads=4),
    "sorted unmerged": dict(protected=0, sort_unmerged=True),
    "window 2": dict(protected=0, window=2),
    "window 1, padded": dict(protected=1, window=1, pads=3),
}


@pytest.mark.parametrize("case", list(TOME_CASES))
def test_tome_ties(case, tmp_path):
    """ToMe with repeated keys: ties in each A token's best match, in the ranking of the A tokens and in the order
    of the unmerged ones (no class token: descending score, ties by index)."""
    settings = dict(TOME_CASES[case])
    pads = settings.pop("pads", 0)
    batch, tokens, r = 2, 21, 5
    x, metric, state = _tokens(batch, tokens), _repeated_keys(batch, tokens), _sizes(batch, tokens, pads)
    op = ToMeMerge(r, settings["protected"], padded=bool(pads), sort_unmerged=settings.get("sort_unmerged"),
                   window=settings.get("window"))
    inputs = [x, state, metric]
    want = _per_sample(lambda xs, ss, ms: reference_merge(xs, ms, ss, r, settings["protected"], padded=bool(pads),
                                                          sort_unmerged=settings.get("sort_unmerged"),
                                                          window=settings.get("window")), inputs)
    _agree(_eager(op, inputs), _ort(op, inputs, tmp_path), want)


def test_tome_ties_need_the_shared_ranking(monkeypatch):
    """Mutation: ToMe ranked with plain ``torch.topk`` no longer matches the lower-index-first reference here."""
    batch, tokens, r = 2, 21, 5
    inputs = [_tokens(batch, tokens), _sizes(batch, tokens), _repeated_keys(batch, tokens)]
    want = _per_sample(lambda xs, ss, ms: reference_merge(xs, ms, ss, r, 0), inputs)
    monkeypatch.setattr(pinning_module, "top_k", lambda v, k, largest=True: v.topk(k, dim=-1, largest=largest))
    got = _eager(ToMeMerge(r, 0), inputs)
    assert not np.array_equal(got[1], want[1])


@pytest.mark.parametrize("fuse,keep_order", [(False, False), (True, False), (False, True)])
def test_topk_ties(fuse, keep_order, tmp_path):
    """Top-K with class attention taking few distinct values: which tokens survive, and their order."""
    batch, tokens, protected, keep = 2, 17, 1, 6
    generator = torch.Generator().manual_seed(1)
    attention = torch.randint(1, 4, (batch, tokens), generator=generator).float() / 8
    op = TopKPrune(keep, protected, fuse=fuse, keep_order=keep_order)
    inputs = [_tokens(batch, tokens), _sizes(batch, tokens), attention]
    fraction = keep / (tokens - protected)
    assert reference_keep_count(tokens, fraction, protected) == keep
    want = _per_sample(lambda xs, ss, a: reference_topk(xs, ss, a, fraction, protected, fuse, keep_order), inputs)
    _agree(_eager(op, inputs), _ort(op, inputs, tmp_path), want)


def test_prumerge_ties(tmp_path):
    """PruMerge with tied class attention (equal keys give equal logits) and tied neighbours among its 32: the
    kept tokens, their order and each one's cluster (ties go to the earlier candidate in the published order)."""
    batch, tokens, protected, kept = 2, 45, 1, 5
    key = _repeated_keys(batch, tokens, kinds=4, seed=2)
    query = key.clone()
    op = PruMerge(kept, protected)
    inputs = [_tokens(batch, tokens), _sizes(batch, tokens), query, key]
    want = _per_sample(lambda xs, ss, q, k: reference_prumerge(xs, ss, q, k, kept, protected, True), inputs)
    _agree(_eager(op, inputs), _ort(op, inputs, tmp_path), want)


@pytest.mark.parametrize("pads", [0, 6])
def test_adjacent_ties(pads, tmp_path):
    """Adjacent merging with repeated keys: many pairs score exactly 1 (capped), r picks among them by index."""
    batch, tokens, protected, r = 2, 24, 1, 4
    inputs = [_tokens(batch, tokens), _sizes(batch, tokens, pads), _repeated_keys(batch, tokens, 2, 3)]
    op = AdjacentMerge(r, protected, padded=bool(pads))
    want = _per_sample(lambda xs, ss, ms: reference_adjacent(xs, ms, ss, r, protected, padded=bool(pads)), inputs)
    _agree(_eager(op, inputs), _ort(op, inputs, tmp_path), want)


def test_every_ranking_op_uses_the_shared_ranking():
    """No op in tc_export/ops ranks with ``torch.topk``/``sort``/``argsort`` directly (their tie order is
    unspecified); they all go through ``ops.rows.top_k``, their decisions through ``ops.pinning.choose`` (which
    ranks with it: the half-precision replay pins exactly these)."""
    import inspect
    import pathlib
    import re

    root = pathlib.Path(inspect.getfile(top_k)).parent
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if path.name == "rows.py":
            text = text.split("def top_k", 1)[0] + text.split("def tie_cosines", 1)[1]
        assert not re.search(r"\.(topk|sort|argsort|argmax|argmin)\(|torch\.(topk|sort|argsort)\(", text), path
    assert all(hasattr(module, "choose") for module in RANKING_MODULES)
    assert pinning_module.top_k is top_k


def test_t5_encoder_padded_exports_with_parity_by_default(tmp_path, capsys):
    """The issue's case: a T5 encoder (no position embedding: repeated token ids give equal keys in the first
    layer) on padded inputs, no class token, ToMe r=4 through the command line. Its exact ties (padding, repeated
    tokens) are decided alike in PyTorch and ONNX Runtime, so parity passes with the default tolerances."""
    import transformers

    from .test_cli import run_cli

    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=100)
    transformers.T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    code, out, err = run_cli([f"hf:{tmp_path / 't5'}", "--method", "tome", "--r", "4", "-o", tmp_path / "t5.onnx"],
                             capsys)
    assert code == 0, err
    assert "tokens per layer: 128 124 120" in out
    assert "parity PyTorch vs ONNX Runtime (2 seeded inputs, atol 0.0001, rtol 0.001): passed" in out
