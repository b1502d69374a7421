"""Plugin kernels (tc_export.plugins): numerics under Triton's interpreter, AOT compilation, launch parameters.

The kernels run once, in a subprocess with ``TRITON_INTERPRET=1`` (the variable must be set before Triton is
imported, and must not leak into other tests), on every case below; the tests compare each result with plain
per-sample references written here from the published method descriptions (ToMe, EViT) and the plugin
contract (protected prefix first; unmerged A tokens ascending with a protected prefix, by descending score
without; ties -> lower index). AOT compilation runs in this process (a real CUDA target, no GPU needed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch

from tc_export.errors import ConfigError
from tc_export.plugins.launch import tome_merge_launch, topk_select_launch

pytest.importorskip("triton")

FLOOR = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Independent references: one sample at a time, Python loops, values in float64.


def reference_tome_sample(x, size, metric, r, protected, padded):
    """ToMe merge of one sample x (N, C), size (N,), metric (N, d) -> (rows, sizes, sources).

    ``sources[k]`` is the token whose row output row k copies, or ("merged", j) for a B token that received
    merges (its value is then a size-weighted average).
    """
    n = x.shape[0]
    r = max(0, min(r, (n - protected) // 2))
    xs, ss = x.double(), size.double()
    if r == 0:
        return xs, ss, list(range(n))
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    a_tok, b_tok = list(range(0, n, 2)), list(range(1, n, 2))
    pair_count = len(a_tok) * len(b_tok)

    def score(i, j):
        ta, tb = a_tok[i], b_tok[j]
        if ta < protected or tb < protected:
            return float("-inf")
        if padded:
            pa, pb = float(size[ta]) == 0, float(size[tb]) == 0
            # rows.py's rule, in float32 as the op computes it: 0.5 * (1 - pair index / pair count)
            index = torch.tensor(i * len(b_tok) + j, dtype=torch.float32)
            order = 0.5 * (1.0 - index / pair_count)
            if pa and pb:
                return float(2.0 + order)
            if pa or pb:
                return float(-2.0 - order)
        return float(torch.dot(m[ta], m[tb]))

    best, best_col = [], []
    for i in range(len(a_tok)):
        row = [score(i, j) for j in range(len(b_tok))]
        top = max(row)
        best.append(top)
        best_col.append(row.index(top))  # first (lowest) column on ties
    ranked = sorted(range(len(a_tok)), key=lambda i: (-best[i], i))
    merged = ranked[:r]
    unmerged = [i for i in ranked[r:] if a_tok[i] >= protected]
    if protected > 0:
        unmerged.sort()
    new_b, new_size_b = {}, {}
    for j in range(len(b_tok)):
        into = [i for i in merged if best_col[i] == j]
        total = ss[b_tok[j]] + sum(ss[a_tok[i]] for i in into)
        weighted = ss[b_tok[j]] * xs[b_tok[j]] + sum(ss[a_tok[i]] * xs[a_tok[i]] for i in into)
        new_b[j] = weighted / total if (into and total > 0) else xs[b_tok[j]]
        new_size_b[j] = total
        new_b[j, "merged"] = bool(into)
    rows, sizes, sources = [], [], []
    for t in range(protected):
        rows.append(xs[t]), sizes.append(ss[t]), sources.append(t)
    for i in unmerged:
        rows.append(xs[a_tok[i]]), sizes.append(ss[a_tok[i]]), sources.append(a_tok[i])
    for j in range(len(b_tok)):
        if b_tok[j] >= protected:
            rows.append(new_b[j]), sizes.append(new_size_b[j])
            sources.append(("merged", b_tok[j]) if new_b[j, "merged"] else b_tok[j])
    return torch.stack(rows), torch.stack(sizes), sources


def reference_topk_sample(x, size, attn, keep, protected, fuse, keep_order):
    """EViT selection of one sample -> (rows, sizes, sources); the fused token's source is "fused"."""
    n = x.shape[0]
    xs, ss, a = x.double(), size.double(), attn.double()
    ranked = sorted(range(protected, n), key=lambda t: (-float(attn[t]), t))
    kept, pruned = ranked[:keep], ranked[keep:]
    if keep_order:
        kept.sort()
    sources = list(range(protected)) + kept
    rows = [xs[t] for t in sources]
    sizes = [ss[t] for t in sources]
    if fuse:
        rows.append(sum((a[t] * xs[t] for t in pruned), torch.zeros_like(xs[0])))
        sizes.append(sum((ss[t] for t in pruned), torch.zeros_like(ss[0])))
        sources.append("fused")
    return torch.stack(rows), torch.stack(sizes), sources


# ----------------------------------------------------------------------------------------------------------
# Cases.


@dataclass(frozen=True)
class Case:
    op: str  # "tome" | "topk"
    batch: int
    tokens: int
    channels: int
    settings: dict = field(default_factory=dict)
    kind: str = "random"  # random | ties_all | ties_dup | padded | ties
    dtype: torch.dtype = torch.float32
    signal_dim: int = 4
    state: int = 1  # columns of the token state: the size, then positions times size

    @property
    def id(self) -> str:
        flags = "-".join(f"{k}{int(v)}" for k, v in self.settings.items())
        dtype = "fp16" if self.dtype == torch.float16 else "fp32"
        state = f"-S{self.state}" if self.state > 1 else ""
        return f"{self.op}-B{self.batch}-N{self.tokens}-C{self.channels}-{flags}-{self.kind}-{dtype}{state}"


def _tome(b, n, c, r, p, kind="random", dtype=torch.float32, d=4, padded=False, state=1):
    return Case("tome", b, n, c, {"r": r, "protected": p, "padded": padded}, kind, dtype, d, state)


def _topk(b, n, c, keep, p, fuse, order, kind="random", dtype=torch.float32, state=1):
    return Case("topk", b, n, c, {"keep": keep, "protected": p, "fuse": fuse, "keep_order": order}, kind, dtype,
                state=state)


TOME_CASES = [
    _tome(1, 8, 4, 2, 0),
    _tome(3, 16, 4, 2, 0, d=6),  # no protected prefix: 6 unmerged A rows stay in descending-score order
    _tome(3, 9, 6, 3, 1, d=5),
    _tome(1, 7, 3, 100, 0, d=2),  # r capped at (N - protected) // 2
    _tome(3, 10, 5, 4, 2),
    _tome(3, 13, 4, 3, 5, d=3),
    _tome(1, 12, 4, 0, 1),  # r = 0: identity
    _tome(3, 11, 70, 4, 1, d=8),  # C over two channel blocks
    _tome(2, 131, 3, 40, 1, d=3),  # 65 B columns: two scoring blocks
    _tome(3, 9, 6, 3, 0, "ties_all"),
    _tome(3, 9, 6, 3, 1, "ties_all"),
    _tome(3, 12, 5, 4, 2, "ties_all"),
    _tome(1, 131, 3, 12, 0, "ties_all", d=2),  # ties across scoring blocks: the lower column still wins
    _tome(3, 15, 4, 5, 0, "ties_dup"),
    _tome(3, 15, 4, 5, 1, "ties_dup"),
    _tome(2, 14, 4, 4, 5, "ties_dup"),
    _tome(3, 12, 4, 3, 1, "padded", padded=True),
    _tome(3, 13, 4, 6, 0, "padded", padded=True),
    _tome(3, 14, 4, 2, 0, "padded", padded=True),
    _tome(2, 16, 4, 7, 2, "padded", padded=True),
    _tome(3, 9, 6, 3, 1, dtype=torch.float16),
    _tome(3, 14, 6, 5, 0, "ties_dup", dtype=torch.float16),
    _tome(3, 12, 4, 4, 1, "padded", dtype=torch.float16, padded=True),
    _tome(3, 9, 6, 3, 1, d=5, state=3),  # positions carried: summed like the sizes
    _tome(3, 16, 4, 2, 0, d=6, state=4),
    _tome(2, 131, 3, 40, 1, d=3, state=3),
    _tome(3, 12, 4, 3, 1, "padded", padded=True, state=3),
]
TOPK_CASES = [
    _topk(1, 8, 4, 3, 0, False, False),
    _topk(3, 9, 5, 4, 1, True, False),
    _topk(3, 9, 5, 4, 1, True, True),
    _topk(3, 10, 3, 1, 2, False, True),
    _topk(3, 12, 4, 7, 5, True, False),
    _topk(1, 7, 4, 6, 1, True, True),  # nothing pruned: fused token 0, size 0
    _topk(2, 70, 3, 20, 1, True, True),  # 69 scores: two ranking blocks
    _topk(3, 11, 70, 5, 1, True, False),  # C over two channel blocks
    _topk(3, 12, 4, 5, 0, False, False, "ties"),
    _topk(3, 12, 4, 5, 1, True, True, "ties"),
    _topk(3, 15, 4, 6, 2, True, False, "ties"),
    _topk(1, 70, 3, 30, 1, True, True, "ties"),  # ties across ranking blocks
    _topk(3, 9, 5, 4, 1, True, False, dtype=torch.float16),
    _topk(3, 13, 5, 5, 1, True, True, "ties", dtype=torch.float16),
    _topk(3, 9, 5, 4, 1, True, False, state=3),  # positions carried: gathered, summed into the fused token
    _topk(3, 10, 3, 1, 2, False, True, state=4),
    _topk(2, 70, 3, 20, 1, True, True, state=3),
]
ALL_CASES = TOME_CASES + TOPK_CASES


def make_inputs(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """x, size and the signal (metric or class attention) of a case, seeded."""
    gen = torch.Generator().manual_seed(seed)
    b, n, c = case.batch, case.tokens, case.channels
    x = torch.randn(b, n, c, generator=gen)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).float()
    if case.op == "tome":
        signal = torch.randn(b, n, case.signal_dim, generator=gen)
        if case.kind == "ties_all":  # every token the same key: every score equal
            signal = signal[:, :1].expand(b, n, case.signal_dim).clone()
        elif case.kind == "ties_dup":
            # Keys drawn from 3 scaled axis vectors (s0 e0, s1 e1, -s2 e0): normalised exactly, so every cosine is
            # exactly 1, 0 or -1 in any implementation and most scores tie. (Keys from arbitrary repeated vectors
            # would give self-similarities that differ in the last bit between implementations: near-ties.)
            scale = torch.rand(b, 3, generator=gen) + 0.5
            palette = torch.zeros(b, 3, case.signal_dim)
            palette[:, 0, 0], palette[:, 1, 1], palette[:, 2, 0] = scale[:, 0], scale[:, 1], -scale[:, 2]
            signal = palette.gather(1, torch.randint(0, 3, (b, n, 1), generator=gen).expand(b, n, case.signal_dim))
        elif case.kind == "padded":  # trailing padding (size 0), and a scattered pad in item 0
            pads = [n - 3, n - 2, n - 1]
            size[:, pads] = 0.0
            size[0, 4] = 0.0
            if b > 1:
                size[1] = 0.0  # all padding
    else:
        signal = torch.rand(b, n, generator=gen)
        if case.kind == "ties":
            signal = torch.randint(0, 3, (b, n), generator=gen).float() / 4
    if case.state > 1:  # the token state with positions (tc_export.ops.state): [size, size * position]
        size = torch.cat([size, size * torch.rand(b, n, case.state - 1, generator=gen) * 7], dim=-1)
    return {"x": x.to(case.dtype), "size": size.to(case.dtype), "signal": signal.to(case.dtype)}


RUNNER = textwrap.dedent(
    """
    import sys
    import torch
    from tc_export.plugins.launch import tome_merge_triton, topk_select_triton

    cases = torch.load(sys.argv[1])
    results = {}
    for key, case in cases.items():
        run = tome_merge_triton if case["op"] == "tome" else topk_select_triton
        results[key] = run(case["x"], case["size"], case["signal"], **case["settings"])
    torch.save(results, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case run by the kernels under TRITON_INTERPRET=1, in one subprocess."""
    folder = tmp_path_factory.mktemp("plugin_kernels")
    cases = {
        case.id: {"op": case.op, "settings": case.settings, **make_inputs(case, seed)}
        for seed, case in enumerate(ALL_CASES)
    }
    torch.save(cases, folder / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(folder / "cases.pt"), str(folder / "results.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"inputs": cases, "results": torch.load(folder / "results.pt")}


def _check_against(case: Case, inputs: dict, result: tuple, reference) -> None:
    x_out, size_out = result
    tol = {"atol": 2e-3, "rtol": 2e-3} if case.dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    for b in range(case.batch):
        rows, sizes, sources = reference(inputs["x"][b], inputs["size"][b, :, 0], inputs["signal"][b], **case.settings)
        assert x_out.shape[1] == len(sources), "token count"
        # Sizes are integer-valued: exact equality means the same tokens went to the same places.
        assert torch.equal(size_out[b, :, 0].double(), sizes.to(case.dtype).double()), f"sizes of item {b}"
        for k, source in enumerate(sources):
            if isinstance(source, int):  # a copied token: bit-exact
                assert torch.equal(x_out[b, k], inputs["x"][b, source]), f"item {b} row {k} should copy {source}"
            else:
                torch.testing.assert_close(x_out[b, k].double(), rows[k].to(case.dtype).double(), **tol)


@pytest.mark.parametrize("case", TOME_CASES, ids=lambda c: c.id)
def test_tome_kernel_matches_reference(interpreted: dict, case: Case) -> None:
    _check_against(case, interpreted["inputs"][case.id], interpreted["results"][case.id], reference_tome_sample)


@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: c.id)
def test_topk_kernel_matches_reference(interpreted: dict, case: Case) -> None:
    _check_against(case, interpreted["inputs"][case.id], interpreted["results"][case.id], reference_topk_sample)


def test_tie_cases_really_tie(interpreted: dict) -> None:
    """The constructed tie cases hold equal scores (so the tie-breaking rules are what the tests exercise)."""
    for case in ALL_CASES:
        signal = interpreted["inputs"][case.id]["signal"][0]
        if case.kind in ("ties_all", "ties_dup"):
            assert len(torch.unique(signal, dim=0)) <= 3
        elif case.kind == "ties":
            assert len(torch.unique(signal)) <= 3


RANDOM_FP32 = [c for c in ALL_CASES if c.kind in ("random", "padded") and c.dtype == torch.float32]


@pytest.mark.parametrize("case", RANDOM_FP32, ids=lambda c: c.id)
def test_kernels_match_pytorch_ops(interpreted: dict, case: Case) -> None:
    """Without ties the kernels equal the project's PyTorch ops (which leave tie order to TopK)."""
    from tc_export.ops.tome import tome_merge
    from tc_export.ops.topk import topk_prune

    inputs, (x_out, size_out) = interpreted["inputs"][case.id], interpreted["results"][case.id]
    s = case.settings
    if case.op == "tome":
        x_ref, size_ref = tome_merge(inputs["x"], inputs["signal"], inputs["size"], s["r"], s["protected"], s["padded"])
    else:
        x_ref, size_ref = topk_prune(
            inputs["x"], inputs["size"], inputs["signal"], s["keep"], s["protected"], s["fuse"], s["keep_order"]
        )
    torch.testing.assert_close(x_out, x_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(size_out, size_ref)


# ----------------------------------------------------------------------------------------------------------
# Many tokens (577: ViT-L/14 at 336 px; 1,025: InternViT at 448 px; 4,096: an 896 x 896 image at patch 14). The
# Top-K kernel loops over 256-row tiles; the ToMe kernel scores, ranks and orders the A rows over (BLOCK_A, 16),
# (BLOCK_A, 8) and (BLOCK_A, 4) tiles and merges over 64-column B tiles. Narrow rows, a small metric and a
# moderate r keep the interpreter's time down; the selection and the tiles do not depend on C. Random inputs (no
# ties) so the PyTorch op is a reference too; tie cases check the lower-index rules across tiles against the
# per-sample reference (too slow in Python at 4,096 tokens: that case checks against the PyTorch op only).

LONG_TOPK_CASES = [
    _topk(1, 577, 3, 400, 1, True, True),
    _topk(1, 1025, 2, 700, 1, True, False),
    _topk(1, 1025, 2, 300, 1, False, True, "ties"),
    pytest.param(_topk(1, 4096, 2, 2867, 0, True, True), marks=pytest.mark.slow),
]
LONG_TOME_CASES = [
    _tome(1, 577, 3, 72, 1),  # class token: unmerged A rows in their original order
    _tome(1, 1025, 2, 300, 0, state=3),  # no protected prefix: unmerged A rows by descending score; positions
    _tome(1, 577, 2, 100, 1, "padded", padded=True),
    _tome(1, 1025, 2, 96, 1, "ties_dup"),  # equal best scores across rank tiles, equal columns across B tiles
    # Padding: the pad-pair order over 2,048 x 2,048 pairs (exact in fp32) and every non-pad score.
    pytest.param(_tome(1, 4096, 2, 1000, 1, "padded", padded=True), marks=pytest.mark.slow),
]
LONG_TESTS = ("test_long_topk_kernel", "test_long_tome_kernel")
SEEDS_PER_OP = 100  # long Top-K cases are seeded 100.., long ToMe cases 200..


def _case(case) -> Case:
    return case.values[0] if hasattr(case, "values") else case


@pytest.fixture(scope="module")
def interpreted_long(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict:
    """The long cases selected in this run (the 4,096-token ones are ``slow``), under TRITON_INTERPRET=1."""
    folder = tmp_path_factory.mktemp("plugin_kernels_long")
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if getattr(item, "callspec", None) and item.originalname in LONG_TESTS}
    cases = {}
    for first_seed, group in ((SEEDS_PER_OP, LONG_TOPK_CASES), (2 * SEEDS_PER_OP, LONG_TOME_CASES)):
        for seed, case in enumerate(map(_case, group), start=first_seed):
            if case.id in wanted:
                cases[case.id] = {"op": case.op, "settings": case.settings, **make_inputs(case, seed)}
    torch.save(cases, folder / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(folder / "cases.pt"), str(folder / "results.pt")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"inputs": cases, "results": torch.load(folder / "results.pt")}


@pytest.mark.parametrize("case", LONG_TOPK_CASES, ids=lambda c: c.id)
def test_long_topk_kernel(interpreted_long: dict, case: Case) -> None:
    from tc_export.ops.topk import topk_prune

    inputs, result = interpreted_long["inputs"][case.id], interpreted_long["results"][case.id]
    _check_against(case, inputs, result, reference_topk_sample)
    if case.kind == "random":
        s = case.settings
        x_ref, size_ref = topk_prune(inputs["x"], inputs["size"], inputs["signal"], s["keep"], s["protected"],
                                     s["fuse"], s["keep_order"])
        torch.testing.assert_close(result[0], x_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result[1], size_ref)


@pytest.mark.parametrize("case", LONG_TOME_CASES, ids=lambda c: c.id)
def test_long_tome_kernel(interpreted_long: dict, case: Case) -> None:
    from tc_export.ops.tome import tome_merge

    inputs, result = interpreted_long["inputs"][case.id], interpreted_long["results"][case.id]
    if case.tokens <= 1025:
        _check_against(case, inputs, result, reference_tome_sample)
    if case.kind in ("random", "padded"):
        s = case.settings
        x_ref, size_ref = tome_merge(inputs["x"], inputs["signal"], inputs["size"], s["r"], s["protected"], s["padded"])
        assert result[0].shape == x_ref.shape == (case.batch, case.tokens - s["r"], case.channels)
        torch.testing.assert_close(result[0], x_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result[1], size_ref)


# ----------------------------------------------------------------------------------------------------------
# Launch parameters, hand-computed.


def test_tome_launch_vit_b() -> None:
    """ViT-B/16 at 224, class token, r=16: 99 A rows -> 128-row tiles, 98 B columns in 64-wide blocks, 8 warps."""
    params = tome_merge_launch(batch=8, num_tokens=197, channels=768, metric_dim=64, r=16, protected=1)
    assert params.grid == (8, 1, 1)
    assert params.num_warps == 8 and params.block == (256, 1, 1)
    assert params.out_tokens == 181
    assert dict(params.constexprs) == {
        "N": 197, "C": 768, "D": 64, "R": 16, "PROTECTED": 1, "PADDED": 0, "S": 1,
        "BLOCK_A": 128, "BLOCK_J": 64, "BLOCK_B": 64, "BLOCK_C": 64,
    }


def test_tome_launch_small_and_capped() -> None:
    params = tome_merge_launch(batch=1, num_tokens=9, channels=6, metric_dim=5, r=100, protected=2, padded=True)
    assert params.grid == (1, 1, 1) and params.num_warps == 4 and params.block == (128, 1, 1)
    assert params.constexprs["R"] == 3 and params.out_tokens == 6  # (9 - 2) // 2
    blocks = ("BLOCK_A", "BLOCK_J", "BLOCK_B", "BLOCK_C")
    assert tuple(params.constexprs[k] for k in blocks) == (16, 16, 16, 16)
    assert params.constexprs["PADDED"] == 1
    with pytest.raises(ConfigError, match="at most 4096 tokens"):
        tome_merge_launch(1, 4097, 1024, 64, 23, 1)


@pytest.mark.parametrize(("tokens", "block_a", "block_j", "warps"), [
    (257, 256, 32, 16),  # past the old 512-token limit's rows: 129 A rows
    (577, 512, 16, 16),  # ViT-L/14 at 336 px
    (1025, 1024, 8, 16),  # InternViT at 448 px
    (4096, 2048, 4, 16),  # 896 x 896 at patch 14
])
def test_tome_launch_long(tokens: int, block_a: int, block_j: int, warps: int) -> None:
    """All A rows held (BLOCK_A), (BLOCK_A, BLOCK_J) tiles of at most 8,192 elements, 64-column merge tiles."""
    params = tome_merge_launch(batch=2, num_tokens=tokens, channels=1024, metric_dim=64, r=100, protected=1)
    assert params.grid == (2, 1, 1) and params.num_warps == warps and params.block == (32 * warps, 1, 1)
    assert params.out_tokens == tokens - 100 and params.constexprs["R"] == 100
    blocks = ("BLOCK_A", "BLOCK_J", "BLOCK_B", "BLOCK_C")
    assert tuple(params.constexprs[k] for k in blocks) == (block_a, block_j, 64, 64)
    assert params.constexprs["BLOCK_A"] * params.constexprs["BLOCK_J"] <= 8192


def test_topk_launch() -> None:
    """DeiT-S, keep 0.7 of 196 with the fused token: 197 tokens -> 256-row tile, 64-wide blocks, 8 warps."""
    params = topk_select_launch(
        batch=4, num_tokens=197, channels=384, keep=138, protected=1, fuse=True, keep_order=False
    )
    assert params.grid == (4, 1, 1) and params.num_warps == 8 and params.block == (256, 1, 1)
    assert params.out_tokens == 140
    assert dict(params.constexprs) == {
        "N": 197, "C": 384, "KEEP": 138, "PROTECTED": 1, "FUSE": 1, "KEEP_ORDER": 0, "S": 1,
        "BLOCK_N": 256, "BLOCK_K": 64, "BLOCK_C": 64,
    }
    small = topk_select_launch(1, 10, 3, 2, 1, keep_order=True)
    assert small.num_warps == 4 and small.out_tokens == 3
    assert (small.constexprs["BLOCK_N"], small.constexprs["BLOCK_K"], small.constexprs["BLOCK_C"]) == (16, 16, 16)
    with pytest.raises(ConfigError, match="keep=10"):
        topk_select_launch(1, 10, 3, 10, 1)
    with pytest.raises(ConfigError, match="protected=11"):
        topk_select_launch(1, 10, 3, 1, 11)
    long = topk_select_launch(1, 4096, 1536, 2867, 0, fuse=True, keep_order=True)
    assert (long.constexprs["BLOCK_N"], long.constexprs["BLOCK_K"], long.constexprs["BLOCK_C"]) == (256, 64, 64)
    with pytest.raises(ConfigError, match="at most 4096 tokens"):
        topk_select_launch(1, 4097, 3, 2, 1)


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for Jetson Orin (8.7), Ada (8.9), Hopper (9.0).

SHAPES = {
    "tiny": {
        "tome": dict(batch=1, num_tokens=9, channels=16, metric_dim=8, r=3, protected=1, padded=True),
        "topk": dict(batch=1, num_tokens=9, channels=16, keep=4, protected=1, fuse=True, keep_order=True),
    },
    "tiny_positions": {  # a token state with (row, column) positions carried
        "tome": dict(batch=1, num_tokens=9, channels=16, metric_dim=8, r=3, protected=1, padded=True, state=3),
        "topk": dict(batch=1, num_tokens=9, channels=16, keep=4, protected=1, fuse=True, keep_order=True, state=3),
    },
    # ViT-B/16 at 224 with r=16 (ToMe), DeiT-S keep 0.7 with the fused token (EViT).
    # 4,096 tokens (both kernels loop over tiles): ToMe with the class token, padding and r=512.
    "long": {
        "tome": dict(batch=1, num_tokens=4096, channels=1536, metric_dim=64, r=512, protected=1, padded=True),
        "topk": dict(batch=1, num_tokens=4096, channels=1536, keep=2867, protected=0, fuse=True, keep_order=True),
    },
    "vit": {
        "tome": dict(batch=1, num_tokens=197, channels=768, metric_dim=64, r=16, protected=1, padded=True),
        "topk": dict(batch=1, num_tokens=197, channels=384, keep=138, protected=1, fuse=True, keep_order=True),
    },
}


def _compile(op: str, cc: int, dtype: torch.dtype, shape: str):
    from tc_export.plugins.aot import compile_tome_merge, compile_topk_select

    if op == "tome":
        params = tome_merge_launch(**SHAPES[shape]["tome"])
        return compile_tome_merge(params, cc, dtype), params
    params = topk_select_launch(**SHAPES[shape]["topk"])
    return compile_topk_select(params, cc, dtype), params


# Every target on tiny shapes; the real shapes for Jetson Orin under `slow` (compile time grows with the tiles:
# ~6 s of CPU for the ViT-B ToMe kernel).
@pytest.mark.parametrize(
    ("op", "cc", "dtype", "shape"),
    [(op, cc, torch.float32, "tiny") for op in ("tome", "topk") for cc in (87, 89, 90)]
    + [(op, 87, torch.float16, "tiny") for op in ("tome", "topk")]
    + [(op, 87, torch.float32, "tiny_positions") for op in ("tome", "topk")]
    + [pytest.param(op, 87, torch.float32, "vit", marks=pytest.mark.slow) for op in ("tome", "topk")]
    + [(op, 87, torch.float32, "long") for op in ("tome", "topk")]
    + [pytest.param(op, cc, torch.float32, "long", marks=pytest.mark.slow) for op in ("tome", "topk") for cc in (89, 90)],
)
def test_aot_compiles(op: str, cc: int, dtype: torch.dtype, shape: str) -> None:
    kernel, params = _compile(op, cc, dtype, shape)
    name = "tome_merge_kernel" if op == "tome" else "topk_select_kernel"
    assert kernel.name == name and kernel.compute_capability == cc
    # 9.0 gets Hopper's arch-specific target sm_90a.
    assert kernel.ptx_target in {f"sm_{cc}", f"sm_{cc}a"}
    assert re.search(rf"^\.visible \.entry {name}\(", kernel.ptx, re.MULTILINE)
    assert ".debug_" not in kernel.ptx  # line info off
    assert f".reqntid {params.block[0]}" in kernel.ptx and kernel.block_x == params.block[0]
    assert kernel.num_warps == params.num_warps
    # Fits the 48 KiB a launch gets without opting in to more shared memory.
    assert 0 <= kernel.shared_mem <= 48 * 1024
    # TensorRT passes inputs, the int32 scalar, outputs: 6 arguments. Triton 3.x appends two scratch pointers
    # (size 0 here) that the kernel must never read, or a launcher passing 6 arguments would break.
    assert kernel.scratch_bytes == 0
    entry = kernel.ptx[kernel.ptx.index(f".entry {name}(") :]
    params_declared = entry[: entry.index(")")].count(".param")
    assert params_declared in (6, 8)
    loaded = set(re.findall(rf"\[{name}_param_(\d+)\]", kernel.ptx))
    assert loaded <= {str(i) for i in range(6)}
    if kernel.cubin is not None:  # Triton's bundled ptxas
        assert kernel.cubin[:4] == b"\x7fELF"


# ----------------------------------------------------------------------------------------------------------
# TensorRT registration: the only untested layer (no TensorRT here).


def test_load_trt_plugins_without_tensorrt() -> None:
    from tc_export.export.tensorrt import load_trt_plugins

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here: covered by test_trt_plugins_register")
    assert load_trt_plugins() is False
    assert "tc_export.export.tensorrt.plugins" not in sys.modules


@pytest.mark.tensorrt
def test_trt_plugins_register() -> None:
    from tc_export.export.tensorrt import load_trt_plugins

    if not load_trt_plugins():
        pytest.skip("needs TensorRT >= 10.9 with its libraries (not installable on CPU-only machines)")
    import tensorrt as trt

    registry = trt.get_plugin_registry()
    for name in ("ToMeMerge", "TopKSelect"):
        assert registry.get_creator(name, "1", "tc_export") is not None, name
