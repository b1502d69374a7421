"""Hugging Face transformers models: the same passes as for timm, export with parity, and the padding rule."""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export import ExportConfig, compress, export_onnx
from tc_export.errors import ConfigError
from tc_export.models import ModelOptions
from tc_export.models.hf_models import build_bert, build_clip_vision, build_dinov2, build_vit, build_whisper_encoder
from tc_export.passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig

from .reference import pair_score, reference_adjacent, reference_merge  # noqa: F401 - pair_score documents the rule

SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "vit":
        return build_vit(ModelOptions(img_size=64), patch_size=16, **SMALL)
    if kind == "clip":
        return build_clip_vision(ModelOptions(img_size=64), **SMALL)
    if kind == "dinov2":
        return build_dinov2(ModelOptions(img_size=56), hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    if kind == "whisper":
        return build_whisper_encoder(ModelOptions(), d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                     encoder_ffn_dim=64, max_source_positions=40, num_mel_bins=16)
    return build_bert(ModelOptions(), length=24, vocab_size=60, **SMALL)


CASES = [
    ("vit", ToMeConfig(r=3), [17, 14, 11, 8]),
    ("vit", TopKConfig(keep=0.5, layers=(1,), fuse=True), [17, 17, 10, 10]),
    ("vit", PruMergeConfig(tokens=6, layers=(1,), extra=True), [17, 17, 8, 8]),
    ("vit", AdjacentConfig(r=2), [17, 15, 13, 11]),
    ("clip", ToMeConfig(r=4), [17, 13, 9, 5]),
    ("dinov2", TopKConfig(keep=0.5, layers=(0, 2)), [17, 9, 9, 5]),
    ("dinov2", ToMeConfig(r=2), [17, 15, 13, 11]),
    ("whisper", AdjacentConfig(r=8), [40, 32, 24]),
    ("whisper", ToMeConfig(r=5), [40, 35, 30]),
    ("bert", ToMeConfig(r=4), [24, 20, 16, 12]),
    ("bert", AdjacentConfig(r=3), [24, 21, 18, 15]),
]


@pytest.mark.parametrize("kind,config,counts", CASES, ids=[f"{k}-{type(c).__name__}" for k, c, _ in CASES])
def test_hf_model_compresses_and_exports_with_parity(kind, config, counts, tmp_path):
    loaded = tiny(kind)
    inputs = loaded.example_inputs(batch=2)
    compressed = compress(loaded, config, inputs)
    assert compressed.token_counts() == counts
    path = tmp_path / "m.onnx"
    export_onnx(compressed.module, inputs, path, ExportConfig(batch=2), output_names=loaded.output_names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
    with torch.no_grad():
        want = compressed(**inputs)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=2e-5)


def test_class_token_methods_refuse_text_and_audio():
    for kind in ("bert", "whisper"):
        loaded = tiny(kind)
        with pytest.raises(ConfigError, match="no class token"):
            compress(loaded, TopKConfig(), loaded.example_inputs())


@torch.no_grad()
def reference_tome_hf_vit(wrapper, images, r):
    """ToMe on transformers' ViTForImageClassification, one sample at a time, from its weights."""
    model = wrapper.model.vit
    outputs = []
    for image in images:
        x = model.embeddings.patch_embeddings.projection(image[None]).flatten(2).transpose(1, 2)[0]
        x = torch.cat([model.embeddings.cls_token[0], x]) + model.embeddings.position_embeddings[0]
        size = torch.ones(x.shape[0], 1)
        for layer in model.layers:
            attn = layer.attention
            n, c = x.shape
            heads = wrapper.model.config.num_attention_heads
            y = layer.layernorm_before(x)
            q, k, v = (p(y).view(n, heads, c // heads).transpose(0, 1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            logits = q @ k.transpose(-1, -2) / math.sqrt(c // heads) + size[:, 0].log()
            x = x + attn.o_proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c))
            x, size = reference_merge(x, k.mean(0), size, r, protected=1)
            x = x + layer.mlp.fc2(layer.mlp.activation_fn(layer.mlp.fc1(layer.layernorm_after(x))))
        outputs.append(wrapper.model.classifier(model.layernorm(x)[0]))
    return torch.stack(outputs)


def test_hf_vit_tome_matches_reference():
    loaded = tiny("vit")
    images = loaded.example_inputs(batch=3)["pixel_values"]
    compressed = compress(loaded, ToMeConfig(r=3), {"pixel_values": images})  # torch.export fixes the batch
    with torch.no_grad():
        torch.testing.assert_close(compressed(pixel_values=images), reference_tome_hf_vit(loaded.module, images, 3),
                                   rtol=1e-4, atol=2e-5)


@torch.no_grad()
def reference_bert_with_padding(wrapper, input_ids, mask, merge):
    """A post-norm BERT run per sample with sizes = mask: pads get no attention and no weight; mean pooling."""
    bert = wrapper.model
    heads = bert.config.num_attention_heads
    outputs = []
    for ids, real in zip(input_ids, mask):
        x = bert.embeddings(input_ids=ids[None])[0]
        size = real[:, None].float()
        for index, layer in enumerate(bert.encoder.layer):
            attn = layer.attention.self
            n, c = x.shape
            q, k, v = (p(x).view(n, heads, c // heads).transpose(0, 1) for p in (attn.query, attn.key, attn.value))
            logits = q @ k.transpose(-1, -2) / math.sqrt(c // heads) + size[:, 0].log()
            context = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c)
            x = layer.attention.output.LayerNorm(x + layer.attention.output.dense(context))
            x, size = merge(index, x, k.mean(0), size)
            x = layer.output.LayerNorm(x + layer.output.dense(layer.intermediate.intermediate_act_fn(
                layer.intermediate.dense(x))))
        pooled = (x * size).sum(0) / size.sum()
        outputs.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.stack(outputs)


def _padded_batch(lengths, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, 60, (len(lengths), length), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("method", ["tome", "adjacent"])
def test_bert_padding_matches_reference(method):
    """Sentences of 24, 17, 9 and 4 real tokens: pads merge among themselves first, never into real tokens."""
    loaded = tiny("bert")
    batch = _padded_batch([24, 17, 9, 4])
    config, r = (ToMeConfig(r=4), 4) if method == "tome" else (AdjacentConfig(r=3), 3)
    compressed = compress(loaded, config, batch)

    def merge(index, x, keys, size):
        if method == "tome":
            return reference_merge(x, keys, size, r, protected=0, padded=True)
        return reference_adjacent(x, keys, size, r, protected=0, padded=True)

    want = reference_bert_with_padding(loaded.module, batch["input_ids"], batch["attention_mask"], merge)
    with torch.no_grad():
        torch.testing.assert_close(compressed(**batch), want, rtol=1e-4, atol=2e-5)


def test_padding_absorbs_merges_and_never_changes_real_tokens():
    """A short sentence: every merge is spent on padding, so the embedding equals the uncompressed model's,
    whatever the padded positions hold."""
    loaded = tiny("bert")
    batch = _padded_batch([5, 8])
    compressed = compress(loaded, ToMeConfig(r=4), batch)
    noisy = dict(batch, input_ids=batch["input_ids"] + (1 - batch["attention_mask"]) * 37)
    with torch.no_grad():
        original = loaded.module(**batch)
        torch.testing.assert_close(compressed(**batch), original, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compressed(**noisy), original, rtol=1e-5, atol=1e-6)


def test_local_directory_via_cli(tmp_path, capsys):
    """hf:PATH builds from config.json, and loads the weights when the directory has them."""
    import transformers

    from .test_cli import run_cli

    config = transformers.ViTConfig(image_size=32, patch_size=16, num_labels=5, **SMALL)
    (tmp_path / "cfg").mkdir()
    config.save_pretrained(tmp_path / "cfg")
    code, out, err = run_cli([f"hf:{tmp_path / 'cfg'}", "--method", "tome", "--r", "1", "-o", tmp_path / "a.onnx"], capsys)
    assert code == 0, err
    assert "random weights" in out and "tokens per layer: 5 4 3 2" in out and "passed" in out

    torch.manual_seed(3)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "full")
    code, out, err = run_cli([f"hf:{tmp_path / 'full'}", "--method", "adjacent", "--r", "1", "-o", tmp_path / "b.onnx"],
                             capsys)
    assert code == 0, err
    assert "random weights" not in out and "passed" in out

    code, _, err = run_cli([f"hf:{tmp_path / 'nothing'}", "-o", tmp_path / "c.onnx"], capsys)
    assert code == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1


def test_minilm_is_the_real_model_and_survives_compression():
    """minilm loads all-MiniLM-L6-v2 offline; its embeddings equal sentence-transformers' own; ToMe at 1.5x fewer
    MACs stays close on real sentences."""
    from sentence_transformers import SentenceTransformer

    from tc_export.data import sentences
    from tc_export.models import load_model
    from tc_export.models.hf_models import minilm_directory, tokenize

    loaded = load_model("minilm")
    assert not loaded.random_init
    texts = list(sentences()[:48])
    batch = tokenize(loaded.tokenizer, texts)
    with torch.no_grad():
        ours = loaded.module(**batch)
    theirs = SentenceTransformer(str(minilm_directory()), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    compressed = compress(loaded, ToMeConfig(r=14), batch)
    assert compressed.token_counts() == [128, 114, 100, 86, 72, 58, 44]
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(compressed(**batch), ours, dim=1)
    short = batch["attention_mask"].sum(1) <= 44  # pads absorb every merge: unchanged
    torch.testing.assert_close(cosine[short], torch.ones(int(short.sum())), rtol=0, atol=1e-5)
    assert float(cosine.mean()) > 0.99
