"""The inputs of a transformers model, one per forward argument it reads, built from its config.

Each forward argument is either built (an example input and an ONNX input: pixels, video clips, token ids with
their padding mask, segment ids and layout boxes, audio features or waveforms), or left at a default that is the
inference setting (``INFERENCE_DEFAULTS`` says why for each), or refused by name: nothing the model reads is
silently left at its default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import InputSpec
from .registry import ModelOptions

TEXT_LENGTH = 128  # fixed sequence length of the text encoders (static shapes)
WAVEFORM_SAMPLES = 16000  # raw audio: one second at 16 kHz when the config does not say
BOX_LIMIT = 1000  # layout boxes are normalised to 0..1000 (LayoutLM)
MakeInputs = Callable[[int, int], dict[str, torch.Tensor]]

# Forward arguments whose default is what inference uses; the reason is part of the README's promise.
INFERENCE_DEFAULTS = {
    "position_ids": "positions 0..N-1",
    "inputs_embeds": "the embeddings come from the ids",
    "head_mask": "every head kept",
    "labels": "a training loss",
    "return_loss": "a training loss",
    "output_attentions": "an output switch",
    "output_hidden_states": "an output switch",
    "return_dict": "an output switch",
    "interpolate_pos_encoding": "the config's image size is the exported size",
    "bool_masked_pos": "masked-image-modelling corruption (pretraining): no patch is masked",
    "mask_time_indices": "SpecAugment masking (training): no frame is masked",
    "noise": "masking noise (pretraining): the forward draws its own, and random ops are refused",
    "encoder_hidden_states": "cross-attention inputs of a decoder: the model runs as an encoder",
    "encoder_attention_mask": "cross-attention inputs of a decoder: the model runs as an encoder",
    "use_cache": "no decoding cache",
    "cache": "no decoding cache",
    "past_key_values": "no decoding cache",
    "cache_position": "no decoding cache",
}
# Perceiver's name for whichever data argument is given (input_ids, pixel_values): built under that name.
ALIASES = {"inputs"}
# The padding mask of a non-text input: a fixed-size image, clip or waveform has no padding.
UNPADDED = {"attention_mask"}


@dataclass(frozen=True)
class ModelInputs:
    """What the forward takes: ``kind`` (image, video, audio, waveform, spectrogram, text), the specs and, for
    inputs that are not independent random tensors (padded ids, boxes), how to make a seeded batch."""

    kind: str
    specs: list[InputSpec]
    make: MakeInputs | None = None


def forward_arguments(model: nn.Module) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(model.forward).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def image_inputs(config: Any, size: int | None = None) -> list[InputSpec]:
    size = size or config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return [InputSpec("pixel_values", (getattr(config, "num_channels", 3), height, width))]


def text_inputs(vocab: int, length: int, pad_id: int = 0, special: tuple[int | None, ...] = (),
                segments: int = 0, boxes: bool = False) -> tuple[list[InputSpec], MakeInputs]:
    """Seeded token ids (no special ids among the real tokens), padded with ``pad_id`` to random lengths; with
    ``segments`` > 1 token_type_ids (a second segment from a random point on; 0 where only one segment type
    exists, 0 on the pads), with ``boxes`` valid layout boxes (x0 <= x1, y0 <= y1 in 0..1000; zero on the pads)."""
    known = [i for i in (pad_id, *special) if isinstance(i, int)]
    low = 1000 if vocab > 2000 else max(known, default=0) + 1
    low = low if low < vocab else 1

    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(low, vocab, (batch, length), generator=generator)
        lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        inputs = {"input_ids": torch.where(mask.bool(), ids, pad_id), "attention_mask": mask}
        if segments:
            split = torch.randint(0, length, (batch, 1), generator=generator)
            second = (torch.arange(length)[None, :] >= split).long() if segments > 1 else torch.zeros_like(mask)
            inputs["token_type_ids"] = second * mask
        if boxes:
            corners = torch.randint(0, BOX_LIMIT + 1, (batch, length, 2, 2), generator=generator)
            corner = corners.sort(dim=2).values  # corner[..., 0, :] = (x0, y0) <= corner[..., 1, :] = (x1, y1)
            inputs["bbox"] = corner.flatten(2) * mask[..., None]  # (x0, y0, x1, y1)
        return inputs

    specs = [
        InputSpec("input_ids", (length,), torch.int64, low=low, high=vocab),
        InputSpec("attention_mask", (length,), torch.int64, high=2),
    ]
    if segments:
        specs.append(InputSpec("token_type_ids", (length,), torch.int64, high=max(segments, 1)))
    if boxes:
        specs.append(InputSpec("bbox", (length, 4), torch.int64, high=BOX_LIMIT + 1))
    return specs, make


def model_inputs(model: nn.Module, config: Any, options: ModelOptions, name: str) -> ModelInputs:
    """The inputs of ``model``'s forward, from its config; every argument it reads is built or refused by name."""
    arguments = forward_arguments(model)
    cls = type(model).__name__
    data = [a for a in ("pixel_values", "input_features", "input_values", "input_ids") if a in arguments]
    if len(data) > 1:
        raise ConfigError(f"{name}: {cls} takes {' and '.join(data)}; tc-export exports encoders of one modality")
    if not data and "inputs" in arguments:  # Perceiver: the preprocessor that reads ids or pixels is the task class's
        raise ConfigError(f"{name}: {cls} takes inputs already embedded to d_model: it has no input preprocessor (a "
                          "per-token head such as PerceiverForMaskedLM exports its base model, which keeps none), so "
                          "tc-export cannot tell what they are; a PerceiverForSequenceClassification checkpoint "
                          "exports with its text preprocessor")
    if not data:
        listed = ", ".join(list(arguments)[:4])
        raise ConfigError(f"{name}: {cls} takes {listed}; tc-export builds inputs for pixel_values (images, video), "
                          "input_ids (text, layout), input_features and input_values (audio)")
    if options.img_size is not None and data[0] != "pixel_values":
        raise ConfigError(f"{name}: --img-size applies to image models; {cls} takes {', '.join(list(arguments)[:3])}")
    inputs = {"pixel_values": _pixel_inputs, "input_features": _feature_inputs, "input_values": _value_inputs,
              "input_ids": _text_inputs}[data[0]](model, config, options, name, arguments)
    built = {spec.name for spec in inputs.specs}
    for argument, parameter in arguments.items():
        if argument in built or argument in INFERENCE_DEFAULTS or argument in ALIASES \
                or (argument in UNPADDED and inputs.kind != "text"):
            continue
        default = "no default" if parameter.default is inspect.Parameter.empty else f"default {parameter.default!r}"
        raise ConfigError(f"{name}: {cls} takes forward argument {argument!r} ({default}), for which tc-export builds "
                          f"no input from the config; exporting it at its default could compute something else")
    return inputs


def _pixel_inputs(model: nn.Module, config: Any, options: ModelOptions, name: str,
                  arguments: dict[str, inspect.Parameter]) -> ModelInputs:
    cls = type(model).__name__
    if "spatial_shapes" in arguments:  # NaFlex (SigLIP2): flattened patches of a grid given per image at run time
        raise ConfigError(f"{name}: {cls} is a NaFlex tower: its pixel_values are flattened patches (max_num_patches x "
                          "channels*patch_size^2) with a pixel_attention_mask and each image's spatial_shapes, and it "
                          "resizes its position embeddings to each image's grid at run time; tc-export builds "
                          "fixed-size images and does not build NaFlex inputs (timm's NaFlexViT at a fixed image "
                          "size does export)")
    if not hasattr(config, "image_size"):
        raise ConfigError(f"{name}: {cls} takes pixel_values but its config has no image_size")
    (pixels,) = image_inputs(config, options.img_size)
    frames = getattr(config, "num_frames", None)
    specs = []
    if isinstance(frames, int) and frames > 0:  # a video encoder: (frames, C, H, W) clips
        pixels = InputSpec("pixel_values", (frames, *pixels.shape))
        specs.append(pixels)
    else:
        specs.append(pixels)
    if "pixel_mask" in arguments:  # every pixel real: the image is exported at its full size
        specs.append(InputSpec("pixel_mask", pixels.shape[-2:], torch.int64, low=1, high=2))
    return ModelInputs("video" if len(pixels.shape) == 4 else "image", specs)


def _feature_inputs(model: nn.Module, config: Any, options: ModelOptions, name: str,
                    arguments: dict[str, inspect.Parameter]) -> ModelInputs:
    mels, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if mels is None or positions is None:
        raise ConfigError(f"{name}: cannot tell the input_features shape of {type(model).__name__} (Whisper-"
                          "style num_mel_bins and max_source_positions expected)")
    return ModelInputs("audio", [InputSpec("input_features", (mels, 2 * positions))])  # two stride-2 convolutions


def _value_inputs(model: nn.Module, config: Any, options: ModelOptions, name: str,
                  arguments: dict[str, inspect.Parameter]) -> ModelInputs:
    """input_values: an AST-style spectrogram (max_length frames x num_mel_bins) or a raw waveform (wav2vec2,
    HuBERT: the config's conv feature encoder reads samples; one second at 16 kHz)."""
    frames, mels = getattr(config, "max_length", None), getattr(config, "num_mel_bins", None)
    if isinstance(frames, int) and isinstance(mels, int):
        return ModelInputs("spectrogram", [InputSpec("input_values", (frames, mels))])
    if getattr(config, "conv_stride", None) is not None:
        samples = int(getattr(config, "sampling_rate", None) or WAVEFORM_SAMPLES)
        return ModelInputs("waveform", [InputSpec("input_values", (samples,))])
    raise ConfigError(f"{name}: cannot tell the input_values shape of {type(model).__name__} (a spectrogram's "
                      "max_length and num_mel_bins, or a waveform encoder's conv_stride, expected)")


def _text_inputs(model: nn.Module, config: Any, options: ModelOptions, name: str,
                 arguments: dict[str, inspect.Parameter]) -> ModelInputs:
    if "attention_mask" not in arguments:
        raise ConfigError(f"{name}: {type(model).__name__} takes input_ids without an attention_mask; tc-export "
                          "pads text to a fixed length and needs the mask")
    length = min(TEXT_LENGTH, _max_length(model, config))
    segments = max(int(getattr(config, "type_vocab_size", 1) or 1), 1) if "token_type_ids" in arguments else 0
    specs, make = text_inputs(config.vocab_size, length, getattr(config, "pad_token_id", None) or 0,
                              tuple(getattr(config, f"{t}_token_id", None) for t in ("bos", "eos", "sep", "cls")),
                              segments=segments, boxes="bbox" in arguments)
    return ModelInputs("text", specs, make)


def _max_length(model: nn.Module, config: Any) -> int:
    """Positions the model can embed; RoBERTa-style embeddings start counting after the padding id."""
    limit = getattr(config, "max_position_embeddings", None) or TEXT_LENGTH
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return limit - (padding_idx + 1 if isinstance(padding_idx, int) else 0)
