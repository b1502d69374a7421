"""Decision-pinned parity (export/checks/pinned.py, export/checks/pinned_verify.py, ops/pinning.py): fp16 exports whose near-ties
flip pass with ONNX Runtime's decisions pinned, mutations still fail naming the site, fp32 is unchanged."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import tc_export.ops.tome
import tc_export.ops.topk
from tc_export.export.checks.pinned import FLIP_MARGINS
from tc_export.ops.adjacent import AdjacentMerge
from tc_export.ops.pinning import PinningError, Tape, active, choose, record
from tc_export.ops.prumerge import PruMerge
from tc_export.ops.tome import ToMeMerge
from tc_export.ops.topk import TopKPrune

from .conftest import tiny_timm_vit
from .test_cli import run_cli

TINY224 = ["timm:vit_tiny_patch16_224"]
TINY64 = ["timm:vit_tiny_patch16_224", "--img-size", "64"]
PINNED = "passed with ONNX Runtime's decisions pinned"


def near_tied(model, key_noise=1e-3, query_scale=1e-2):
    """Near-ties by construction: keys nearly rank one (every key along one direction, plus ``key_noise``), and
    queries scaled down (class attention nearly uniform), while the values stay as they are: scores tie up to
    what fp16 rounding decides, the tokens they pick do not."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            weight = block.attn.qkv.weight
            width = weight.shape[1]
            weight[:width].mul_(query_scale)
            u, v = torch.randn(width, 1, generator=generator), torch.randn(1, width, generator=generator)
            weight[width:2 * width].copy_(u @ v / width**0.5 + key_noise * torch.randn(width, width,
                                                                                      generator=generator))
    return model


@pytest.fixture(scope="module")
def tied_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tied.pt"
    torch.save(near_tied(tiny_timm_vit(img_size=64, depth=12)).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def class_tied_weights(tmp_path_factory):
    """PruMerge's near-ties: queries scaled by 0.1 (not 0.01) spread the class attention's full-width scores so
    that neighbours in the ranking sit about one fp16 step apart, where the runtimes' rounding of q and k decides
    (``tied_weights``' PruMerge decisions do not flip: its key cosines sit above ``ops.rows.COSINE_CAP`` and tie
    exactly, and its class attention does not flip on these inputs)."""
    path = tmp_path_factory.mktemp("w") / "class_tied.pt"
    torch.save(near_tied(tiny_timm_vit(img_size=64, depth=12), query_scale=1e-1).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights64(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w64.pt"
    torch.save(tiny_timm_vit(img_size=64, depth=12).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights224(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w224.pt"
    torch.save(tiny_timm_vit(img_size=224, depth=12).state_dict(), path)
    return path


# --- the mechanism: one choose() for every op's decisions ---------------------------------------------------------

def test_choose_is_topk_outside_a_tape_and_pins_inside():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert [t.tolist() for t in choose(scores, 2)] == [t.tolist() for t in scores.topk(2)]
    with active(Tape()) as tape:
        choose(scores, 2)
    assert tape.indices[0].tolist() == [[1, 3]]
    pinned = Tape([torch.tensor([[1, 2]])], recording=False)
    with active(pinned):
        values, indices = choose(scores, 2)
    assert indices.tolist() == [[1, 2]] and values[0].tolist() == pytest.approx([0.9, 0.5])
    assert pinned.changed and pinned.gaps == [pytest.approx((0.7 - 0.5) / 0.9)]  # own 3 (0.7) gave way to 2 (0.5)
    with active(Tape([torch.tensor([[1, 2, 3]])], recording=False)), pytest.raises(PinningError):
        choose(scores, 2)


def test_recorded_exact_ties_go_to_the_lower_index_as_in_onnx():
    scores = torch.zeros(1, 40)
    scores[0, 7] = 1.0
    with active(Tape()) as tape:
        choose(scores, 5)
    assert tape.indices[0].tolist() == [[7, 0, 1, 2, 3]]


@pytest.mark.parametrize("op", [ToMeMerge(2, 1), ToMeMerge(2, 0), AdjacentMerge(2, 1), TopKPrune(4, 1),
                                TopKPrune(4, 1, keep_order=True)], ids=repr)
def test_an_op_pinned_to_other_signals_computes_what_it_computes_on_them(op):
    """Decisions of these ops read only their signal: pinned to the decisions taken on other signals, the op gives
    what it gives on those signals (the tokens and sizes unchanged), so a pin carries every decision, order included."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 9, 4, generator=generator)
    size = torch.randint(1, 4, (1, 9, 1), generator=generator).float()
    signal = torch.randn(1, 9, 3, generator=generator) if op.signals == ("metric",) else torch.rand(1, 9,
                                                                                                  generator=generator)
    other = signal.flip(1)
    tape, expected = record(op, x, size, other)
    with active(tape.replay()):
        got = op(x, size, signal)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(op(x, size, signal)[0], expected[0])


def test_pinned_topk_keeps_exactly_the_pinned_tokens():
    """Independent of the op: the output rows are the input rows at the pinned indices (after the prefix)."""
    x = torch.randn(1, 8, 3)
    op = TopKPrune(3, 1)
    with active(Tape([torch.tensor([[6, 0, 3]])], recording=False)):
        out, _ = op(x, None, torch.rand(1, 8))
    torch.testing.assert_close(out[0], x[0, [0, 7, 1, 4]])


def test_prumerge_pins_its_kept_tokens_and_neighbours():
    generator = torch.Generator().manual_seed(4)
    x, q, k = (torch.randn(1, 10, 6, generator=generator) for _ in range(3))
    op = PruMerge(3, 1, neighbours=2)
    tape, _ = record(op, x, None, q, k)
    assert [list(t.shape) for t in tape.indices] == [[1, 9], [1, 3, 2]]  # the ranking, then each one's neighbours


# --- parity through the command line --------------------------------------------------------------------------

def _flips(out):
    return [line for line in out.splitlines() if "token-op sites flipped" in line]


@pytest.mark.parametrize("method, weights", [
    pytest.param(["topk", "--keep", "0.5", "--layers", "1,2"], "tied_weights", id="topk"),
    # the third and fourth class-attention scores of seed 0 are one fp16 step apart and flip: with 3 kept, which of
    # the two is kept moves the logits beyond the tolerance
    pytest.param(["prumerge", "--tokens", "3", "--layers", "2"], "class_tied_weights", id="prumerge"),
    pytest.param(["adjacent", "--r", "2"], "tied_weights", id="adjacent")])
def test_fp16_near_ties_flip_and_pass_pinned(method, weights, tmp_path, capsys, request):
    code, out, err = run_cli([*TINY64, "--weights", request.getfixturevalue(weights), "--method", *method,
                              "--dtype", "fp16", "--parity-samples", "3", "-o", tmp_path / "h.onnx"], capsys)
    assert code == 0, err
    assert PINNED in out and "unpinned: logits max abs" in out  # it failed as it is, and passed pinned
    assert "with the decisions pinned: logits max abs" in out and "fidelity, not parity" in out


def test_fp16_tome_flip_on_a_tiny_vit_passes_pinned(weights224, tmp_path, capsys):
    code, out, err = run_cli([*TINY224, "--weights", weights224, "--method", "tome", "--r", "16", "--dtype", "fp16",
                              "--seed", "4", "--parity-samples", "1", "-o", tmp_path / "h.onnx"], capsys)
    assert code == 0, err
    assert PINNED in out
    [line] = _flips(out)
    margin = float(line.split("largest score margin ")[1].split()[0])
    assert 0 <= margin <= FLIP_MARGINS["fp16"] and "allowed 7.8e-03" in line


def test_fp32_path_is_unchanged(tied_weights, tmp_path, capsys):
    code, out, err = run_cli([*TINY64, "--weights", tied_weights, "--method", "topk", "--keep", "0.5", "--layers",
                              "1,2", "-o", tmp_path / "f.onnx"], capsys)
    assert code == 0, err
    assert "atol 0.0001, rtol 0.001): passed · logits" in out and "pinned" not in out and not _flips(out)


# --- mutations still fail -----------------------------------------------------------------------------------------

def _mutate_after_export(monkeypatch, mutate):
    """Apply ``mutate(path)`` to the ONNX right after the job writes it (an exporter bug), or mutate PyTorch."""
    import tc_export.job.pipeline as pipeline_module

    original = pipeline_module.write_onnx

    def write(module, example, path, *args, **kwargs):
        nodes = original(module, example, path, *args, **kwargs)
        mutate(path)
        return nodes

    monkeypatch.setattr(pipeline_module, "write_onnx", write)


def test_a_wrong_merge_weight_fails_naming_the_site(weights224, tmp_path, capsys, monkeypatch):
    def squared_sizes(path):  # the PyTorch side merges with size**2 weights from here on
        monkeypatch.setattr(tc_export.ops.tome, "size_column", lambda state: state[..., :1] ** 2)

    _mutate_after_export(monkeypatch, squared_sizes)
    code, out, err = run_cli([*TINY224, "--weights", weights224, "--method", "tome", "--r", "16", "--dtype", "fp16",
                              "--seed", "4", "--parity-samples", "1", "-o", tmp_path / "h.onnx"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "parity failed with ONNX Runtime's decisions pinned on the input of seed 4: site 0 (tomemerge_0) " \
           "differs with the decisions pinned" in err  # several A tokens merge into one B token already there


def test_a_wrong_kept_index_fails_naming_the_site(tied_weights, tmp_path, capsys, monkeypatch):
    original = tc_export.ops.topk.gather_rows

    def off_by_one(x, rows, stride=1, offset=0):
        rows = rows.clone()
        rows[..., -1] = (rows[..., -1] + 1) % (x.shape[1] - offset)
        return original(x, rows, stride, offset)

    _mutate_after_export(monkeypatch, lambda path: monkeypatch.setattr(tc_export.ops.topk, "gather_rows",
                                                                      off_by_one))
    code, out, err = run_cli([*TINY64, "--weights", tied_weights, "--method", "topk", "--keep", "0.5", "--layers",
                              "1,2", "--dtype", "fp16", "-o", tmp_path / "h.onnx"], capsys)
    assert code == 1 and "site 0 (topkprune_1) differs with the decisions pinned" in err


def _insert_before(path, site, input_index, op_type, *extra):
    """The ONNX's token op ``site`` reads ``op_type(its input, *extra)`` in place of input ``input_index``."""
    model = onnx.load(str(path))
    node = [n for n in model.graph.node if n.domain == "tc_export"][site]
    for name, value in extra:
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    mutated = f"mutated_{site}_{input_index}"
    model.graph.node.insert(list(model.graph.node).index(node), onnx.helper.make_node(
        op_type, [node.input[input_index], *(name for name, _ in extra)], [mutated]))
    node.input[input_index] = mutated
    onnx.save(model, str(path))


def perturb_signal(path, site=0):
    """Token op ``site`` decides on its signal negated (keys, class attention): it keeps or merges what the
    reference ranks last, a flip by the whole spread of the scores, while its tokens stay right."""
    _insert_before(path, site, 2, "Neg")


def perturb_tokens(path, site, dtype=np.float16):
    """Token op ``site`` receives its tokens scaled by 1.5 (a numeric bug before it)."""
    _insert_before(path, site, 0, "Mul", ("mutation_scale", np.array(1.5, dtype=dtype)))


def test_a_flip_far_above_the_dtype_margin_fails(weights64, tmp_path, capsys, monkeypatch):
    _mutate_after_export(monkeypatch, perturb_signal)
    code, out, err = run_cli([*TINY64, "--weights", weights64, "--method", "topk", "--keep", "0.5", "--layers",
                              "1,2", "--dtype", "fp16", "-o", tmp_path / "h.onnx"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "site 0 (topkprune_1) flipped a decision with score margin" in err and "not a near-tie" in err
    margin = float(err.split("score margin ")[1].split()[0])
    assert margin > 3 * FLIP_MARGINS["fp16"]


# --- verify: an fp16 ONNX against an fp32 bundle ------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_bundle(tied_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned_bundle")
    args = [*TINY64, "--weights", tied_weights, "--method", "topk", "--keep", "0.5", "--layers", "1,2"]
    with pytest.raises(SystemExit) as exit_info:
        from tc_export.cli.main import main

        main([str(a) for a in [*args, "--target", "jetson-orin-nano", "-o", f"{root}/b/"]])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in [*args, "--dtype", "fp16", "-o", root / "h.onnx"]])
    assert exit_info.value.code == 0
    return root / "b", root / "h.onnx"


def test_bundle_carries_the_sites_and_the_reference_decisions(fp32_bundle):
    directory, _ = fp32_bundle
    sites = json.loads((directory / "sites.json").read_text())
    assert [s["class"] for s in sites["sites"]] == ["tc_export.ops.topk.TopKPrune"] * 2
    assert sites["sites"][0]["settings"]["keep"] == 8 and len(sites["decisions"]) == 2  # per parity input
    assert "sites.json" in json.loads((directory / "manifest.json").read_text())["files"]


def test_verify_fp16_onnx_against_fp32_bundle_passes_pinned(fp32_bundle, capsys):
    directory, half = fp32_bundle
    code, out, err = run_cli(["verify", half, "--against", directory], capsys)
    assert code == 0, err
    assert "computes in fp16, the bundle's reference in fp32: fp16 tolerances" in out
    assert "verify passed by pinned parity" in out and "token-op sites flipped on bundle input" in out


def test_verify_of_a_mutated_fp16_onnx_fails_naming_the_site(fp32_bundle, tmp_path, capsys):
    directory, half = fp32_bundle
    mutated = tmp_path / "m.onnx"
    mutated.write_bytes(half.read_bytes())
    perturb_tokens(mutated, site=1)
    code, out, err = run_cli(["verify", mutated, "--against", directory], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "site 1 (topkprune_2) differs with the decisions pinned" in err and "before it" in err


# --- bf16: what the refusal says, measured --------------------------------------------------------------------------

@pytest.mark.parametrize(("op_type", "has_kernel"), [("MatMul", False), ("Add", False), ("Softmax", False),
                                                     ("Erf", False), ("Transpose", True)])
def test_onnxruntime_cpu_bf16_kernels_are_as_the_refusal_says(op_type, has_kernel):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = ["a", "b"] if op_type in ("MatMul", "Add") else ["a"]
    graph = helper.make_graph([helper.make_node(op_type, inputs, ["y"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [4, 4]) for n in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        found = True
    except Exception:  # noqa: BLE001 - NOT_IMPLEMENTED: no kernel
        found = False
    assert found == has_kernel
