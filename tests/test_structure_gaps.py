"""The structure finder on graphs that are not plain ViTs: casts and assertions in the residual stream (an RMS norm
computing in float32, as T5 and AIMv2 do), and refusals that name the structure they meet."""

import pytest
import torch
from torch import nn

from tc_export import compress
from tc_export.errors import TCExportError
from tc_export.passes import ToMeConfig
from tc_export.passes.outputs import block_output
from tc_export.passes.structure import find_structure
from tc_export.passes.trace import _export_any_batch, propagate_shapes

from . import reference_encoders as encoders
from .reference import reference_merge


class CastingNorm(nn.Module):
    """An RMS norm that computes in float32 (``.to`` of the stream: a cast plus, under torch.export, an assertion)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = CastingNorm(width), CastingNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


def test_casts_and_assertions_in_the_stream_are_followed():
    """Under torch.export a ``.to(float32)`` becomes a cast plus an ``_assert_tensor_metadata`` node reading the
    stream: neither is a consumer of its own, so each block's MLP branch and output are found."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    inputs = {"input": torch.randn(2, 10, 16)}
    gm = _export_any_batch(model, inputs)
    propagate_shapes(gm, inputs)
    assert any("assert" in str(n.target) for n in gm.graph.nodes)  # the graph this test is about
    structure = find_structure(gm)
    assert len(structure.sites) == 2
    last = block_output(gm, structure, 1)
    assert "add" in last.name and any(u.op == "output" for u in last.users)


def _saved(tmp_path, model):
    from tc_export.models import load_model

    model.save_pretrained(tmp_path)
    return load_model(f"hf:{tmp_path}", warn_random=False)


def test_t5_encoder_keeps_its_relative_bias(tmp_path):
    """T5's blocks are found now; its relative position bias rides in the padding mask, which the token passes
    replace: the bias is kept and looked up at the carried positions (tests/test_relative_bias.py checks the
    values against a per-sample reference), never dropped with the mask."""
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=100)
    loaded = _saved(tmp_path, transformers.T5EncoderModel(config))
    compressed = compress(loaded, ToMeConfig(r=2), loaded.example_inputs(batch=2))
    assert compressed.report.rewired == ["layer 1: relative position bias"]


def test_aimv2_vision_matches_reference(tmp_path):
    """AIMv2's vision tower (float32 RMS norms, SwiGLU, an attention-pooling head whose learned query meets the
    compressed keys) against its per-sample forward with the published ToMe (no class token)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Aimv2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8)
    loaded = _saved(tmp_path, transformers.Aimv2VisionModel(config))
    inputs = loaded.example_inputs(batch=2)
    compressed = compress(loaded, ToMeConfig(r=3), inputs)
    hooks = encoders.Hooks(lambda i, x, s, k, p: reference_merge(x, k.mean(0), s, 3, 0))
    want, counts = encoders.run(encoders.hf_aimv2_vision(loaded.module), inputs, hooks)
    assert counts == compressed.token_counts() == [16, 13, 10]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(**inputs), encoders.run(
            encoders.hf_aimv2_vision(loaded.module), inputs, encoders.Hooks())[0], rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=2e-5)


def test_mobilebert_bottleneck_is_named(tmp_path):
    """MobileBERT runs attention and a feed-forward stack inside a narrower bottleneck whose adds are residuals
    of their own; the block's input rejoins after them. Refused as a bottleneck (was: 'not where the residual
    stream feeds the MLP branch')."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MobileBertConfig(hidden_size=32, embedding_size=16, intermediate_size=64,
                                           intra_bottleneck_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           vocab_size=100, max_position_embeddings=40)
    loaded = _saved(tmp_path, transformers.MobileBertModel(config))
    with pytest.raises(TCExportError, match="bottleneck block") as error:
        compress(loaded, ToMeConfig(r=2), loaded.example_inputs(batch=2))
    assert "16 channels inside a 32-channel block" in str(error.value)
    assert len(str(error.value).splitlines()) == 1
