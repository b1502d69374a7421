"""Any transformers encoder from its config: the Auto classes pick the model, its forward signature the inputs.

``hf:PATH`` reads ``PATH/config.json`` and builds the architecture it names (``ViTForImageClassification``,
``RobertaModel``, ...), else the base model (``AutoModel``); a composite config (CLIP, SigLIP) gives its vision
tower, an encoder-decoder (Whisper) its encoder. A per-token head (masked LM, token classification, ...) cannot
survive token compression, so such an architecture falls back to its base model. The output is chosen by
``pooling``: ``logits`` (the head), ``pooler`` (the model's pooler output), ``cls`` (the first token), ``mean``
(the mean of the last hidden state over all tokens, or over the real ones where there is a padding mask; the
token pass makes it size-weighted after compression) or
``tokens`` (the whole last hidden state); by default logits if there is a head, else the pooler output if the
model has one, else the mean.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackendUnavailableError, ConfigError
from ..ops.tokens import pool_mean
from .base import InputSpec, LoadedModel
from .registry import ModelOptions
from .weights import check_finite, first_line, load_weights, read_state_dict

TEXT_LENGTH = 128  # fixed sequence length of the text encoders (static shapes)
OUTPUT_NAMES = {"logits": "logits", "pooler": "pooler_output", "cls": "cls_embedding", "mean": "mean_embedding",
                "tokens": "last_hidden_state"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Heads that read one vector per input; anything else (masked LM, token classification, CTC, ...) is per token.
SEQUENCE_HEADS = ("ForImageClassification", "ForSequenceClassification", "ForAudioClassification")


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError:
        raise BackendUnavailableError(
            'Hugging Face models need transformers: pip install "tc-export[hf]"'
        ) from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers logs config and loading notes to stderr; the CLI's output stays ours (errors are raised)."""
    tf = transformers_module()
    verbosity = tf.utils.logging.get_verbosity()
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        tf.utils.logging.set_verbosity(verbosity)
        tf.utils.logging.enable_progress_bar()


def select_output(outputs: Any, pooling: str, weights: torch.Tensor | None) -> torch.Tensor:
    """The tensor ``pooling`` names from a transformers output object."""
    if pooling == "logits":
        return outputs.logits
    if pooling == "pooler":
        return outputs.pooler_output
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "tokens":
        return hidden
    if weights is None:  # no padding: a plain mean, which the token pass makes size-weighted after compression
        return hidden.mean(dim=1)
    return pool_mean(hidden, weights)  # the padding mask, which the token pass re-points to the final sizes


class NoPooler(nn.Module):
    """Stands in for a pooler whose output is not exported (transformers models skip a None pooler)."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        return None


class ImageEncoder(nn.Module):
    """pixel_values -> one output of a transformers vision model (see ``select_output``)."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(pixel_values=pixel_values), self.pooling, None)


class AudioEncoder(nn.Module):
    """input_features (log-mel) -> the encoder's last hidden state (``tokens``) or a pooled vector."""

    def __init__(self, encoder: nn.Module, pooling: str = "tokens") -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return select_output(self.encoder(input_features=input_features), self.pooling, None)


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) -> one output of a transformers text model; ``mean`` skips the pads."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return select_output(outputs, self.pooling, attention_mask)


def image_inputs(config: Any, size: int | None = None) -> list[InputSpec]:
    size = size or config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return [InputSpec("pixel_values", (getattr(config, "num_channels", 3), height, width))]


def text_inputs(vocab: int, length: int, pad_id: int = 0, special: tuple[int | None, ...] = ()
                ) -> tuple[list[InputSpec], Callable[[int, int], dict[str, torch.Tensor]]]:
    """Seeded token ids (no special ids among the real tokens), padded with ``pad_id`` to random lengths."""
    known = [i for i in (pad_id, *special) if isinstance(i, int)]
    low = 1000 if vocab > 2000 else max(known, default=0) + 1
    low = low if low < vocab else 1

    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(low, vocab, (batch, length), generator=generator)
        lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return {"input_ids": torch.where(mask.bool(), ids, pad_id), "attention_mask": mask}

    specs = [
        InputSpec("input_ids", (length,), torch.int64, low=low, high=vocab),
        InputSpec("attention_mask", (length,), torch.int64, high=2),
    ]
    return specs, make


@dataclass(frozen=True)
class Choice:
    """Which transformers class to build from which config, and what to take from the built model."""

    cls: Any
    config: Any
    take: str = ""  # "" the model itself; "encoder": model.get_encoder(); "base": model.base_model
    label: str = ""


def read_config(folder: Path, name: str) -> Any:
    """config.json -> a transformers config, every failure one line naming the file."""
    tf = transformers_module()
    path = folder / "config.json"
    if folder.is_file():
        raise ConfigError(f"{name}: {folder} is a file; hf:PATH takes a model directory holding config.json")
    if not path.is_file():
        raise ConfigError(f"{name}: no config.json in {folder} (a Hugging Face model directory is expected)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{name}: {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{name}: {path} is not valid JSON: {error.msg} at line {error.lineno}, "
                          f"column {error.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: {path} holds a JSON {type(data).__name__}, not an object of settings")
    kind = data.get("model_type")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{name}: {path} has no \"model_type\" (e.g. \"vit\", \"bert\"); transformers needs it "
                          "to know the model family")
    if kind not in tf.CONFIG_MAPPING:
        raise ConfigError(f"{name}: {path} names model_type {kind!r}, which transformers {tf.__version__} does not "
                          "know (a newer transformers, or a model with custom code, which tc-export does not run)")
    try:
        with quiet_transformers():
            return tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any config failure is a bad config.json
        raise ConfigError(f"{name}: {path} is not a valid {kind} config ({first_line(error)})") from None


def choose_class(config: Any, name: str) -> Choice:
    """The class to build: the named architecture (a sequence-level head or a base model), else ``AutoModel``."""
    tf = transformers_module()
    if "vision_config" in (getattr(config, "sub_configs", None) or {}):
        vision = config.vision_config
        cls = _auto_class(tf, vision, name)
        return Choice(cls, vision, label=f"{cls.__name__} (vision tower of {config.model_type})")
    if getattr(config, "is_encoder_decoder", False):
        cls = _auto_class(tf, config, name)
        return Choice(cls, config, "encoder", f"the encoder of {cls.__name__}")
    names = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if names:
        arch = names[0]
        cls = getattr(tf, arch, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
            raise ConfigError(f"{name}: config.json names architecture {arch!r}, which transformers "
                              f"{tf.__version__} does not have; remove \"architectures\" to build the base "
                              f"{config.model_type} model")
        if any(head in arch for head in SEQUENCE_HEADS) or arch.endswith("Model"):
            return Choice(cls, config, label=arch)
        base = _auto_class(tf, config, name)
        return Choice(base, config, label=f"{base.__name__} ({arch}'s head is per token, so its base model)")
    cls = _auto_class(tf, config, name)
    return Choice(cls, config, label=cls.__name__)


# Vision towers that load but cannot be compressed, with the cause (refused before building).
UNSUPPORTED_TOWERS = {
    "Qwen2VLVisionConfig": "Qwen2-VL's vision tower is not supported yet: it takes flattened patches and grid_thw "
                           "(not pixel values), orders its tokens by 2x2 merge windows and ends in a PatchMerger "
                           "that reads 4 consecutive tokens, so merged or pruned tokens inside it break its windows; "
                           "compress after the tower (a projector recipe on its output) instead",
}


def _auto_class(tf: Any, config: Any, name: str) -> Any:
    if type(config).__name__ in UNSUPPORTED_TOWERS:
        raise ConfigError(f"{name}: {UNSUPPORTED_TOWERS[type(config).__name__]}")
    try:
        return tf.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(f"{name}: transformers has no base model for {type(config).__name__}") from None


def weight_files(folder: Path) -> list[Path]:
    return [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]


def instantiate(choice: Choice, folder: Path | None, name: str, hint_size: bool = False) -> tuple[nn.Module, bool]:
    """Build ``choice`` with the directory's weights if it has any (else random); returns (model, random_init)."""
    tf = transformers_module()
    choice.config._attn_implementation = "sdpa"
    files = weight_files(folder) if folder is not None else []
    for path in files:
        if path.stat().st_size == 0:
            raise ConfigError(f"{name}: weights file {path} is empty; remove it (random weights) or replace it")
    try:
        with quiet_transformers():
            if files:
                model, info = choice.cls.from_pretrained(
                    str(folder), config=choice.config, local_files_only=True, attn_implementation="sdpa",
                    output_loading_info=True, ignore_mismatched_sizes=True)  # mismatches: our message below
            else:
                model, info = choice.cls(choice.config), {}
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - unreadable, mismatched or missing weights all end here
        for path in files:  # our reader names what is wrong with a single file (not a state dict, unreadable)
            if not path.name.endswith(".index.json"):
                read_state_dict(path)
        what = f"weights in {folder}" if files else f"{choice.label or choice.cls.__name__} from config.json"
        raise ConfigError(f"{name}: cannot build {what}: {first_line(error)[:300]}") from None
    model = _take(model, choice.take)
    if files:
        missing = sorted(k for k in info.get("missing_keys", ()) if k)
        mismatched = sorted(info.get("mismatched_keys", ()), key=str)
        if mismatched:
            key, *shapes = (list(mismatched[0]) + ["?", "?"])[:3]
            raise ConfigError(f"{name}: weights in {folder} do not fit the config: {len(mismatched)} tensors of "
                              f"another shape (e.g. {key}: {tuple(shapes[0])} in the file, {tuple(shapes[1])} in "
                              f"the model{'; --img-size changes position embeddings' if hint_size else ''})")
        unfilled = [k for k in missing if "pooler" not in k]  # a task checkpoint often has no pooler: see pooling
        if unfilled:
            raise ConfigError(f"{name}: weights in {folder} do not fill {choice.label or choice.cls.__name__}: "
                              f"{len(unfilled)} tensors missing (e.g. {unfilled[0]}); they would be random")
        model._tc_missing = missing  # type: ignore[attr-defined] - read by build_auto (a missing pooler is fine)
        check_finite(model.named_parameters(), f"{name}: weights in {folder}")
        check_finite(model.named_buffers(), f"{name}: weights in {folder}")
    return model.eval(), not files


def _take(model: nn.Module, take: str) -> nn.Module:
    if take == "encoder":
        return model.get_encoder()
    if take == "base":
        return model.base_model
    return model


def forward_arguments(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def model_inputs(model: nn.Module, config: Any, options: ModelOptions, name: str
                 ) -> tuple[str, list[InputSpec], Callable[[int, int], dict[str, torch.Tensor]] | None]:
    """What the forward takes: ``image`` (pixel_values), ``audio`` (input_features) or ``text`` (input_ids)."""
    arguments = forward_arguments(model)
    if "pixel_values" in arguments:
        if not hasattr(config, "image_size"):
            raise ConfigError(f"{name}: {type(model).__name__} takes pixel_values but its config has no image_size")
        return "image", image_inputs(config, options.img_size), None
    if options.img_size is not None:
        raise ConfigError(f"{name}: --img-size applies to image models; {type(model).__name__} takes "
                          f"{', '.join(arguments[:3])}")
    if "input_features" in arguments:
        mels, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
        if mels is None or positions is None:
            raise ConfigError(f"{name}: cannot tell the input_features shape of {type(model).__name__} (Whisper-"
                              "style num_mel_bins and max_source_positions expected)")
        return "audio", [InputSpec("input_features", (mels, 2 * positions))], None  # two stride-2 convolutions
    if "input_ids" in arguments:
        length = min(TEXT_LENGTH, _max_length(model, config))
        specs, make = text_inputs(config.vocab_size, length, getattr(config, "pad_token_id", None) or 0,
                                  tuple(getattr(config, f"{t}_token_id", None) for t in ("bos", "eos", "sep", "cls")))
        return "text", specs, make
    raise ConfigError(f"{name}: {type(model).__name__} takes {', '.join(arguments[:4])}; tc-export builds inputs for "
                      "pixel_values (vision), input_ids (text) and Whisper-style input_features (audio)")


def _max_length(model: nn.Module, config: Any) -> int:
    """Positions the model can embed; RoBERTa-style embeddings start counting after the padding id."""
    limit = getattr(config, "max_position_embeddings", None) or TEXT_LENGTH
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return limit - (padding_idx + 1 if isinstance(padding_idx, int) else 0)


def wrap(model: nn.Module, kind: str, pooling: str) -> nn.Module:
    if kind == "image":
        return ImageEncoder(model, pooling)
    if kind == "audio":
        return AudioEncoder(model, pooling)
    return TextEncoder(model, pooling)


def available_outputs(model: nn.Module, kind: str, example: dict[str, torch.Tensor], name: str) -> set[str]:
    """Run the model once (it must run) and see which of logits / pooler_output / last_hidden_state it returns."""
    try:
        with torch.no_grad():
            outputs = model(**example)
    except Exception as error:  # noqa: BLE001 - a model that does not run on its own inputs is a bad config
        raise ConfigError(f"{name}: {type(model).__name__} does not run on {kind} inputs "
                          f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in example.items())}): "
                          f"{first_line(error)[:200]}") from None
    found = {"logits": "logits", "pooler_output": "pooler", "last_hidden_state": "tokens"}
    have = {pooling for field, pooling in found.items() if getattr(outputs, field, None) is not None}
    if "tokens" in have:
        have |= {"cls", "mean"}
    return have


def choose_pooling(requested: str | None, have: set[str], model: nn.Module, missing: list[str], name: str,
                   fallback: nn.Module | None) -> tuple[str, bool]:
    """The pooling to use and whether to use the base model instead (a head model asked for an embedding)."""
    pooler_trained = not any("pooler" in k for k in missing)
    if requested is None:
        if "logits" in have:
            return "logits", False
        if "pooler" in have and pooler_trained:
            return "pooler", False
        return "mean", False
    if requested in have and (requested != "pooler" or pooler_trained):
        return requested, False
    if requested != "logits" and "logits" in have and fallback is not None:
        return requested, True  # checked again on the base model
    if requested == "pooler" and "pooler" in have:
        raise ConfigError(f"{name}: the weights have no pooler ({missing[0]} is missing): use --pooling cls or mean")
    options = sorted(have)
    raise ConfigError(f"{name}: --pooling {requested} does not apply to {type(model).__name__} "
                      f"(it gives {', '.join(options) or 'nothing usable'})")


def build_auto(name: str, choice: Choice, folder: Path | None, options: ModelOptions,
               default_pooling: str | None = None) -> LoadedModel:
    """Build ``choice`` (weights from ``folder`` if it has them), find its inputs, wrap it with a pooling."""
    if options.img_size is not None and hasattr(choice.config, "image_size"):
        choice.config.image_size = options.img_size  # new position embeddings (random) or a clear mismatch
    model, random_init = instantiate(choice, folder, name, hint_size=options.img_size is not None)
    missing = list(getattr(model, "_tc_missing", []))
    with contextlib.suppress(AttributeError):
        del model._tc_missing
    kind, specs, make = model_inputs(model, choice.config, options, name)
    loaded = LoadedModel(name, model, specs, [], random_init, make)
    example = loaded.example_inputs(batch=1)
    have = available_outputs(model, kind, example, name)
    requested = options.pooling or default_pooling
    pooling, use_base = choose_pooling(requested, have, model, missing, name, getattr(model, "base_model", None))
    if use_base:
        model = model.base_model
        pooling, _ = choose_pooling(requested, available_outputs(model, kind, example, name), model, missing, name,
                                    None)
    if options.weights is not None:
        if options.pretrained:
            raise ConfigError(f"{name} is built from its config; --pretrained is for timm models: use --weights FILE")
        load_weights(model, options.weights, strip_wrapper_prefix)
        random_init = False
    elif options.pretrained:
        raise ConfigError(f"{name} is built from its config; --pretrained is for timm models: use --weights FILE")
    if pooling != "pooler" and isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = NoPooler()  # an unused pooler still reads token 0 in the traced graph
    wrapper = wrap(model, kind, pooling).eval()
    return LoadedModel(name, wrapper, specs, [OUTPUT_NAMES[pooling]], random_init, make)


def strip_wrapper_prefix(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict saved from tc-export's wrapper (keys ``model.*``/``encoder.*``) fits the model inside it."""
    own = set(model.state_dict())
    for prefix in ("model.", "encoder."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def build_local(path: str, options: ModelOptions) -> LoadedModel:
    """``hf:PATH``: a local directory with config.json (and weights, if any)."""
    name = f"hf:{path}"
    folder = Path(path)
    config = read_config(folder, name)
    return build_auto(name, choose_class(config, name), folder, options)
