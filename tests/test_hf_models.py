"""Hugging Face transformers models: the same passes as for timm, export with parity, and the padding rule."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export import ExportConfig, compress, export_onnx
from tc_export.errors import ConfigError
from tc_export.models import ModelOptions
from tc_export.models.hf_models import build_bert, build_clip_vision, build_dinov2, build_vit, build_whisper_encoder
from tc_export.passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig

from . import reference_encoders as encoders
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


# Batch 2 and the token counts; each family x method at batch 1 is also in the support matrix.
CASES = [
    ("vit", PruMergeConfig(tokens=6, layers=(1,), extra=True), [17, 8, 8, 8]),
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

    def merge(index, x, size, keys, probs):
        if method == "tome":
            return reference_merge(x, keys.mean(0), size, r, protected=0, padded=True)
        return reference_adjacent(x, keys.mean(0), size, r, protected=0, padded=True)

    want, _ = encoders.run(encoders.hf_bert_sentence(loaded.module), batch, encoders.Hooks(merge))
    with torch.no_grad():
        torch.testing.assert_close(compressed(**batch), want, rtol=1e-4, atol=2e-5)


def test_truncation_of_padded_text_cuts_its_sizes():
    """The latency table's truncated models on a padded text model: the padding sizes are cut with the tokens
    (they were dropped, and the next layer's mask read None)."""
    from tc_export.measure.tune.truncate import TruncateAt

    loaded = tiny("bert")
    batch = _padded_batch([24, 5])
    compressed = compress(loaded, TruncateAt(keep=8), batch)
    counts = compressed.token_counts()
    assert counts[0] == 24 and set(counts[1:]) == {8}

    def cut(index, x, size, keys, probs):
        return (x[:8], size[:8]) if index == 0 else (x, size)  # per sample: (N, C)

    want, _ = encoders.run(encoders.hf_bert_sentence(loaded.module), batch, encoders.Hooks(cut, prop_attn=False))
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


# --- hf:PATH for any transformers encoder (Auto classes) ---------------------------------------------------------

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 100, "max_position_embeddings": 40}
TINY_IMAGE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 32, "patch_size": 8}


def _family(kind: str):
    """(config, class saved with weights (None: config only), reference output fn(model_dir, inputs))."""
    import transformers as tf

    if kind == "roberta":
        config = tf.RobertaConfig(**TINY_TEXT, architectures=["RobertaModel"])
        return config, tf.RobertaModel, lambda d, x: tf.RobertaModel.from_pretrained(d)(**x).pooler_output
    if kind == "bert":
        config = tf.BertConfig(**TINY_TEXT, architectures=["BertModel"])
        return config, None, None
    if kind == "deit":
        config = tf.DeiTConfig(**TINY_IMAGE, num_labels=5, architectures=["DeiTForImageClassificationWithTeacher"])
        cls = tf.DeiTForImageClassificationWithTeacher
        return config, cls, lambda d, x: cls.from_pretrained(d)(**x).logits
    if kind == "vit":
        config = tf.ViTConfig(**TINY_IMAGE, num_labels=5, architectures=["ViTForImageClassification"])
        cls = tf.ViTForImageClassification
        return config, cls, lambda d, x: cls.from_pretrained(d)(**x).logits
    if kind == "siglip":  # the composite image-text config: its vision tower, MAP-head pooled
        config = tf.SiglipConfig(vision_config=TINY_IMAGE, text_config={**TINY_TEXT, "max_position_embeddings": 16})
        return config, tf.SiglipModel, lambda d, x: tf.SiglipModel.from_pretrained(d).vision_model(**x).pooler_output
    if kind == "dinov2_registers":
        config = tf.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              image_size=28, patch_size=7, num_register_tokens=2,
                                              architectures=["Dinov2WithRegistersModel"])
        cls = tf.Dinov2WithRegistersModel
        return config, cls, lambda d, x: cls.from_pretrained(d)(**x).pooler_output
    if kind == "whisper":  # encoder only, mean over frames (no pooler, no head)
        config = tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                                  max_source_positions=24, vocab_size=100, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=1,
                                  architectures=["WhisperForConditionalGeneration"])
        cls = tf.WhisperForConditionalGeneration
        return config, cls, lambda d, x: cls.from_pretrained(d).model.encoder(**x).last_hidden_state.mean(1)
    if kind == "data2vec_vision":  # BEiT layout, mean pooled
        config = tf.Data2VecVisionConfig(**TINY_IMAGE, architectures=["Data2VecVisionModel"])
        cls = tf.Data2VecVisionModel
        return config, cls, lambda d, x: cls.from_pretrained(d)(**x).last_hidden_state.mean(1)
    if kind == "aimv2":  # float32 RMS norms (casts in the stream), an attention-pooling head
        config = tf.Aimv2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=32, patch_size=8, architectures=["Aimv2VisionModel"])
        cls = tf.Aimv2VisionModel
        return config, cls, lambda d, x: cls.from_pretrained(d)(**x).pooler_output
    if kind == "t5":  # encoder only: casts in the stream, a relative position bias in the padding mask
        config = tf.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=100,
                             architectures=["T5EncoderModel"])
        return config, tf.T5EncoderModel, None
    if kind == "mobilebert":  # bottleneck blocks
        config = tf.MobileBertConfig(hidden_size=32, embedding_size=16, intermediate_size=64, intra_bottleneck_size=16,
                                     num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
                                     max_position_embeddings=40, architectures=["MobileBertModel"])
        return config, tf.MobileBertModel, None
    raise KeyError(kind)


def _save_family(kind: str, folder):
    config, cls, reference = _family(kind)
    torch.manual_seed(0)
    if cls is None:
        config.save_pretrained(folder)
    else:
        cls(config).save_pretrained(folder)
    return reference


FAMILIES = {  # kind -> (class built, output name, tokens the first attention sees, words of the expected refusal)
    # the pooler reads token 0, a [CLS] from the input ids, not a learned prefix the passes can protect
    "roberta": ("RobertaModel", "pooler_output", 38, "pooling by position"),
    "bert": ("BertModel", "pooler_output", 40, "pooling by position"),
    "deit": ("DeiTForImageClassificationWithTeacher", "logits", 18, None),
    "vit": ("ViTForImageClassification", "logits", 17, None),
    "siglip": ("SiglipVisionModel", "pooler_output", 16, None),
    "dinov2_registers": ("Dinov2WithRegistersModel", "pooler_output", 19, None),
    "whisper": ("WhisperEncoder", "mean_embedding", 24, None),
    "data2vec_vision": ("Data2VecVisionModel", "mean_embedding", 17, None),
    "aimv2": ("Aimv2VisionModel", "pooler_output", 16, None),
    "t5": ("T5EncoderModel", "mean_embedding", 128, None),  # its relative bias read at the carried positions
    "mobilebert": ("MobileBertModel", "pooler_output", 40, "bottleneck block"),
}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_any_encoder_directory_loads_runs_and_exports_or_refuses(kind, tmp_path, capsys):
    """hf:DIR builds the architecture config.json names (or its base model / vision tower / encoder) with the
    directory's weights and equals transformers' own output; the command-line job (ToMe r=2: passes, MACs, export,
    parity, fidelity) either exports with parity or is refused in one line naming the cause."""
    from tc_export.models import load_model

    from .test_cli import run_cli

    folder = tmp_path / kind
    reference = _save_family(kind, folder)
    loaded = load_model(f"hf:{folder}", warn_random=False)
    cls_name, output, tokens, refusal = FAMILIES[kind]
    inner = getattr(loaded.module, "model", None) or loaded.module.encoder
    assert type(inner).__name__ == cls_name
    assert loaded.output_names == [output]
    assert loaded.random_init == (_family(kind)[1] is None)
    inputs = loaded.example_inputs(batch=2)
    with torch.no_grad():
        ours = loaded.module(**inputs)
        if reference is not None:
            torch.testing.assert_close(ours, reference(str(folder), inputs), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ours).all()

    capsys.readouterr()  # saving printed progress bars
    job = [f"hf:{folder}", "--method", "tome", "--r", "2", "-o", tmp_path / "m.onnx"]
    code, out, err = run_cli(job, capsys)
    if refusal is not None:
        assert code == 2 and refusal in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "m.onnx").exists()
        if "--protected 1" not in err:
            return
        code, out, err = run_cli([*job, "--protected", "1"], capsys)  # the hint works: [CLS] stays first
        assert "protected tokens: 1 (given with --protected)" in out
    assert code == 0, err
    assert f"tokens per layer: {tokens} {tokens - 2}" in out
    assert "MACs per image" in out and "fidelity vs uncompressed" in out
    assert "parity PyTorch vs ONNX Runtime" in out and "passed" in out and (tmp_path / "m.onnx").is_file()


def test_text_encoder_mean_pooling_exports_through_the_cli(tmp_path, capsys):
    """RoBERTa's pooler reads [CLS] by position; --pooling mean is the padding-aware mean, and exports with parity."""
    from .test_cli import run_cli

    _save_family("roberta", tmp_path / "roberta")
    code, out, err = run_cli([f"hf:{tmp_path / 'roberta'}", "--pooling", "mean", "--method", "tome", "--r", "2",
                              "-o", tmp_path / "x.onnx"], capsys)
    assert code == 0, err
    assert "tokens per layer: 38 36 34" in out and "passed" in out and "random weights" not in out


def test_pooling_choices_and_fallbacks(tmp_path):
    """--pooling cls/mean on a classifier uses its base model; a pooling the model lacks is one clear error; a
    per-token head (masked LM) falls back to its base model, whose untrained pooler is not the default."""
    import transformers as tf

    from tc_export.models import load_model

    _save_family("vit", tmp_path / "vit")
    images = {"pixel_values": torch.randn(2, 3, 32, 32)}
    reference = tf.ViTForImageClassification.from_pretrained(str(tmp_path / "vit")).vit(**images).last_hidden_state
    for pooling, want in (("cls", reference[:, 0]), ("mean", reference.mean(1))):
        loaded = load_model(f"hf:{tmp_path / 'vit'}", ModelOptions(pooling=pooling), warn_random=False)
        assert loaded.output_names == [{"cls": "cls_embedding", "mean": "mean_embedding"}[pooling]]
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(**images), want.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="--pooling pooler does not apply to ViTModel"):
        load_model(f"hf:{tmp_path / 'vit'}", ModelOptions(pooling="pooler"), warn_random=False)

    torch.manual_seed(1)
    tf.BertForMaskedLM(tf.BertConfig(**TINY_TEXT, architectures=["BertForMaskedLM"])).save_pretrained(tmp_path / "mlm")
    loaded = load_model(f"hf:{tmp_path / 'mlm'}", warn_random=False)
    assert type(loaded.module.model).__name__ == "BertModel" and not loaded.random_init
    assert loaded.output_names == ["mean_embedding"]
    batch = loaded.example_inputs(batch=2)
    hidden = tf.BertForMaskedLM.from_pretrained(str(tmp_path / "mlm")).bert(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(**batch), ((hidden * mask).sum(1) / mask.sum(1)).detach(),
                                   rtol=1e-5, atol=1e-6)


def test_presets_take_pooling_and_refuse_it_for_timm():
    from tc_export.models import load_model

    torch.manual_seed(0)
    loaded = build_dinov2(ModelOptions(img_size=28, pooling="mean"), hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2)
    assert loaded.output_names == ["mean_embedding"]
    with pytest.raises(ConfigError, match="--pooling applies to transformers models"):
        load_model("timm:vit_tiny_patch16_224", ModelOptions(pooling="cls"))


def test_weights_file_fills_a_config_directory(tmp_path):
    """hf:DIR (config only) + --weights FILE: the file's keys are the transformers model's own."""
    import transformers as tf
    from safetensors.torch import save_file

    from tc_export.models import load_model

    config, _, _ = _family("vit")
    config.save_pretrained(tmp_path / "cfg")
    torch.manual_seed(5)
    model = tf.ViTForImageClassification(config).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_model(f"hf:{tmp_path / 'cfg'}", ModelOptions(weights=tmp_path / "w.safetensors"), warn_random=False)
    assert not loaded.random_init
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(pixel_values=images), model(pixel_values=images).logits)
