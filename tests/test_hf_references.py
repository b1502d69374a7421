"""Compressed transformers models (ViT, CLIP vision, DINOv2, Whisper encoder; Data2VecVision and DistilBERT from
hf:DIR directories) against the independent per-sample forwards of tests/reference_encoders.py with the published
methods of tests/reference.py, at batch 2 (not against their own ONNX). The support matrix checks each family x
method at batch 1."""

import pytest
import torch

from tc_export import compress
from tc_export.passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig

from . import reference_encoders as encoders
from .reference import reference_adjacent, reference_merge, reference_prumerge, reference_topk
from .test_hf_models import tiny

ENCODERS = {"vit": encoders.hf_vit, "clip": encoders.hf_clip_vision, "dinov2": encoders.hf_dinov2,
            "whisper": encoders.hf_whisper_encoder}


def _tome(r: int, protected: int) -> encoders.Hooks:
    return encoders.Hooks(lambda i, x, s, k, p: reference_merge(x, k.mean(0), s, r, protected))


CASES = {
    "vit-tome": ("vit", ToMeConfig(r=3), _tome(3, 1)),
    "clip-tome": ("clip", ToMeConfig(r=3), _tome(3, 1)),
    "dinov2-tome": ("dinov2", ToMeConfig(r=2), _tome(2, 1)),
    "clip-topk": ("clip", TopKConfig(keep=0.5, layers=(1,), fuse=True), encoders.Hooks(
        lambda i, x, s, k, p: reference_topk(x, s, p[:, 0].mean(0), 0.5, 1, True, False) if i == 1 else (x, s),
        prop_attn=False)),
    "vit-prumerge": ("vit", PruMergeConfig(tokens=6, layers=(1,), extra=True), encoders.Hooks(
        before_layer=lambda i, x, s, q, k: reference_prumerge(x, s, q, k, 6, 1, True) if i == 1 else (x, s),
        prop_attn=False)),
    # no class token: the unmerged A tokens stay in descending score order, as the published ToMe leaves them
    "whisper-tome": ("whisper", ToMeConfig(r=5), _tome(5, 0)),
    "whisper-adjacent": ("whisper", AdjacentConfig(r=8), encoders.Hooks(
        lambda i, x, s, k, p: reference_adjacent(x, k.mean(0), s, 8, 0))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hf_model_matches_independent_reference(name):
    kind, config, hooks = CASES[name]
    loaded = tiny(kind)
    inputs = loaded.example_inputs(batch=2)
    compressed = compress(loaded, config, inputs)  # torch.export fixes the batch
    want, counts = encoders.run(ENCODERS[kind](loaded.module), inputs, hooks)
    assert counts == compressed.token_counts()
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=2e-5)


def test_reference_forwards_equal_the_uncompressed_models():
    """With no method the per-sample forwards reproduce the transformers models (the yardstick itself is right)."""
    for kind, encoder in {**ENCODERS, "bert": encoders.hf_bert_sentence}.items():
        loaded = tiny(kind)
        inputs = loaded.example_inputs(batch=2)
        want, _ = encoders.run(encoder(loaded.module), inputs, encoders.Hooks())
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(**inputs), want, rtol=1e-4, atol=2e-5, msg=kind)


def _directory(tmp_path, model):
    from tc_export.models import load_model

    model.save_pretrained(tmp_path)
    return load_model(f"hf:{tmp_path}", warn_random=False)


def test_data2vec_vision_directory_matches_reference(tmp_path):
    """A BEiT-layout tower from a local directory (hf:DIR, mean pooled): its SDPA takes the size bias from the
    second layer on and returns another memory layout, which the graph's permute + view must survive."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Data2VecVisionConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                               intermediate_size=128, image_size=64)
    loaded = _directory(tmp_path, transformers.Data2VecVisionModel(config))
    inputs = loaded.example_inputs(batch=2)
    compressed = compress(loaded, ToMeConfig(r=2), inputs)
    want, counts = encoders.run(encoders.hf_data2vec_vision(loaded.module), inputs, _tome(2, 1))
    assert counts == compressed.token_counts()
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=2e-5)


def test_distilbert_directory_matches_padded_reference(tmp_path):
    """A text encoder the presets do not name (hf:DIR, mean pooled), padded: pads merge among themselves."""
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=128, vocab_size=500)
    loaded = _directory(tmp_path, transformers.DistilBertModel(config))
    inputs = loaded.example_inputs(batch=2)
    assert (inputs["attention_mask"] == 0).any()  # the example sentences are padded
    compressed = compress(loaded, ToMeConfig(r=4), inputs)
    hooks = encoders.Hooks(lambda i, x, s, k, p: reference_merge(x, k.mean(0), s, 4, 0, padded=True))
    want, _ = encoders.run(encoders.hf_distilbert_mean(loaded.module), inputs, hooks)
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs), want, rtol=1e-4, atol=2e-5)
