"""Half-precision graphs of models whose trace baked fp32 into the graph (export/precision.py): timm's resampled
position embedding (``.to(orig_dtype)`` traced as a cast to fp32, with torch.export's dtype assertion before it),
rotary tables rebuilt from carried positions (passes/rotary.py) and an fp32 token state under fp16 tokens (Qwen2-VL
with merge units). Each cast graph runs in fp16 throughout; what cannot be cast is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from tc_export import compress
from tc_export.errors import ConfigError
from tc_export.export.precision import check_runs_in_dtype, in_dtype
from tc_export.passes import ToMeConfig

from .test_qwen2_vl import SIZE, _tower, load

MATMULS = {torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default,
           torch.ops.aten.bmm.default, torch.ops.aten.addmm.default, torch.nn.functional.linear, torch.matmul,
           torch.nn.functional.scaled_dot_product_attention}


def matmul_input_dtypes(module: fx.GraphModule, inputs: dict[str, torch.Tensor]) -> set[torch.dtype]:
    """The dtypes of every floating tensor entering a matrix product or an attention while ``module`` runs."""
    seen: set[torch.dtype] = set()

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node):  # noqa: ANN202
            if node.op == "call_function" and node.target in MATMULS:
                for arg in node.all_input_nodes:
                    value = self.env.get(arg)
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        seen.add(value.dtype)
            if node.op == "call_module":
                target = self.module.get_submodule(str(node.target))
                if isinstance(target, nn.Linear):
                    seen.update(self.env[a].dtype for a in node.all_input_nodes)
            return super().run_node(node)

    with torch.no_grad():
        Recorder(module).run(*inputs.values())
    return seen


def test_timm_resampled_position_embedding_runs_in_fp16_as_timm_does():
    from tc_export.models import load_model
    from tc_export.models.registry import ModelOptions

    loaded = load_model("timm:test_vit", ModelOptions(), warn_random=False)
    eager = copy.deepcopy(loaded.module).half()  # timm's own forward in fp16: the independent reference
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    traced = compress(loaded, [], {"x": x}).module
    assert any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in traced.graph.nodes), \
        "the trace no longer asserts fp32 before the position embedding's cast: this test lost its subject"
    cast = in_dtype(traced, torch.float16)
    with torch.no_grad():
        got, want = cast(x=x), eager(x.half()).float()
    assert got.dtype == torch.float32  # the file's interface stays fp32
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-2), float((got - want).abs().max())
    assert matmul_input_dtypes(cast, {"x": x}) == {torch.float16}


def test_qwen2_vl_rotary_and_unit_state_run_in_fp16(tmp_path):
    _tower(tmp_path)
    loaded = load(tmp_path, SIZE)
    inputs = loaded.example_inputs(batch=1)
    compressed = compress(loaded, [ToMeConfig(r=2)], inputs)
    with torch.no_grad():
        want = compressed.module(**inputs)
    cast = in_dtype(compressed.module, torch.float16)
    assert matmul_input_dtypes(cast, inputs) == {torch.float16}  # fp32 rotary rows or sizes would show here
    frequencies = [b for name, b in cast.named_buffers() if "freqs" in name]
    assert frequencies and all(b.dtype == torch.float32 for b in frequencies)  # far positions keep their bits
    with torch.no_grad():
        got = cast(**inputs)
    assert got.shape == want.shape and float((got - want).abs().max()) < 0.05 * float(want.abs().max())


class _IntegerTable(nn.Module):
    """A table computed from booleans at run time (kept fp32 by the cast rule) multiplied into the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = (x > 0).float().sum(0).unsqueeze(1)
        return self.proj(x) @ table


def test_a_graph_still_mixing_dtypes_is_refused_in_one_line():
    module = in_dtype(fx.symbolic_trace(_IntegerTable()), torch.float16)
    with pytest.raises(ConfigError, match=r"--dtype fp16: m still mixes fp32 .*--precision fp16") as caught:
        check_runs_in_dtype(module, {"x": torch.randn(2, 4)}, "fp16", "m")
    assert "\n" not in str(caught.value)


def test_tome_on_padded_text_in_fp16_has_no_nan(tmp_path):
    """Padding's size-0 pairs merge with weight 1 / floor (inf in fp16) times a zero difference: the update runs in
    fp32, so the fp16 graph equals the fp32 one within fp16 rounding instead of turning those rows into NaN."""
    import transformers as tf

    from tc_export.models import load_model
    from tc_export.models.registry import ModelOptions

    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64), add_pooling_layer=False).save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}", ModelOptions(), warn_random=False)
    inputs = loaded.example_inputs(batch=1)
    assert int((inputs["attention_mask"] == 0).sum()) >= 8  # padded: size-0 tokens pair up
    compressed = compress(loaded, [ToMeConfig(r=4)], inputs)
    with torch.no_grad():
        want = compressed.module(**inputs)
    cast = in_dtype(compressed.module, torch.float16)
    with torch.no_grad():
        got = cast(**inputs)
    assert not torch.isnan(got).any()
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2), float((got - want).abs().max())
