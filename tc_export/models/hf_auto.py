"""Any transformers encoder from its config: the Auto classes pick the model, its forward signature the inputs
(``hf_inputs``: each argument it reads is built from the config or refused by name).

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
import importlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackendUnavailableError, ConfigError
from ..ops.tokens import pool_mean
from .base import LoadedModel
from .hf_inputs import TEXT_LENGTH, ModelInputs, model_inputs, text_inputs
from .random_ops import refuse_random_ops
from .registry import ModelOptions
from .weights import check_finite, first_line, load_weights, read_state_dict

__all__ = ["TEXT_LENGTH", "text_inputs"]  # re-exported for the presets
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


def given(**inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The optional inputs a wrapper was called with (an argument that is not a model input stays None)."""
    return {name: value for name, value in inputs.items() if value is not None}


class ImageEncoder(nn.Module):
    """pixel_values (an image or, for a video encoder, a clip) and a pixel_mask where the model reads one ->
    one output of a transformers vision model (see ``select_output``)."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        outputs = self.model(pixel_values=pixel_values, **given(pixel_mask=pixel_mask))
        return select_output(outputs, self.pooling, None)


class AudioEncoder(nn.Module):
    """input_features (log-mel) -> the encoder's last hidden state (``tokens``) or a pooled vector."""

    def __init__(self, encoder: nn.Module, pooling: str = "tokens") -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return select_output(self.encoder(input_features=input_features), self.pooling, None)


class AudioValuesEncoder(nn.Module):
    """input_values (a raw waveform, or an AST-style spectrogram) -> one output of a transformers audio model."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(input_values=input_values), self.pooling, None)


class TextEncoder(nn.Module):
    """(input_ids, attention_mask, and token_type_ids / bbox where the model reads them) -> one output of a
    transformers text or layout model; ``mean`` skips the pads."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                bbox: torch.Tensor | None = None) -> torch.Tensor:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             **given(token_type_ids=token_type_ids, bbox=bbox))
        return select_output(outputs, self.pooling, attention_mask)


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
    if type(config).__name__ in ADAPTED_TOWERS:  # a tower saved alone names a class transformers does not export
        cls = _auto_class(tf, config, name)
        return Choice(cls, config, label=cls.__name__)
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
        base = _auto_class(tf, config, name, per_token_head=arch)
        return Choice(base, config, label=f"{base.__name__} ({arch}'s head is per token, so its base model)")
    cls = _auto_class(tf, config, name)
    return Choice(cls, config, label=cls.__name__)


# Vision towers that load but cannot be compressed, with the cause (refused before building).
UNSUPPORTED_TOWERS: dict[str, str] = {}
# Vision towers built through an adapter of their own (config class name -> builder module, function).
ADAPTED_TOWERS = {"Qwen2VLVisionConfig": ("qwen2_vl", "build_qwen2_vl_tower"),
                  "Qwen2_5_VLVisionConfig": ("qwen2_vl", "build_qwen2_vl_tower"),
                  "Qwen3VLVisionConfig": ("qwen2_vl", "build_qwen2_vl_tower"),
                  "Llama4VisionConfig": ("llama4_vision", "build_llama4_vision"),
                  "PixtralVisionConfig": ("pixtral", "build_pixtral"),
                  "Idefics3VisionConfig": ("idefics3", "build_idefics3"),
                  "SmolVLMVisionConfig": ("idefics3", "build_idefics3"),
                  "Siglip2VisionConfig": ("siglip2", "build_siglip2")}


def _auto_class(tf: Any, config: Any, name: str, per_token_head: str | None = None) -> Any:
    """AutoModel's class for ``config``, else the model class its own modeling module declares for it (a
    vision tower such as BLIP's, which AutoModel does not map), never the abstract ``...PreTrainedModel``.
    ``per_token_head``: the architecture the config names, whose per-token head sent us to the base model."""
    if type(config).__name__ in UNSUPPORTED_TOWERS:
        raise ConfigError(f"{name}: {UNSUPPORTED_TOWERS[type(config).__name__]}")
    with contextlib.suppress(KeyError):
        return tf.AutoModel._model_mapping[type(config)]
    module = sys.modules.get(type(config).__module__.replace(".configuration_", ".modeling_"))
    if module is None:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    own = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, nn.Module)
           and getattr(c, "config_class", None) is type(config) and c.__name__.endswith("Model")
           and not c.__name__.endswith("PreTrainedModel")] if module else []
    if len(own) == 1:
        return own[0]
    if per_token_head:
        raise ConfigError(f"{name}: {per_token_head} predicts per token (its head reads every patch token, which "
                          f"token compression removes), and transformers has no base model for "
                          f"{type(config).__name__} to build instead")
    raise ConfigError(f"{name}: transformers has no base model for {type(config).__name__}")


def weight_files(folder: Path) -> list[Path]:
    return [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]


def attention_implementation(cls: Any) -> str:
    """SDPA where the class has it (the graph passes see one attention op), else the eager matmul-softmax."""
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def checkpoint_prefix(choice: Choice, files: list[Path]) -> str:
    """The prefix under which a composite checkpoint holds ``choice``'s weights (AIMv2's ``vision_model.``, where
    the tower's own keys have none); "" when the keys already match or cannot be read without loading."""
    stored = set()
    for path in files:
        if path.name.endswith(".index.json"):
            stored |= set(json.loads(path.read_text(encoding="utf-8")).get("weight_map", {}))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                stored |= set(handle.keys())
    if not stored:
        return ""
    try:
        with torch.device("meta"):  # called inside quiet_transformers
            own = list(choice.cls(choice.config).state_dict())
    except Exception:  # noqa: BLE001 - a class that cannot be built on the meta device: load as saved
        return ""
    if not own or own[0] in stored:
        return ""
    prefixes = {key[: -len(own[0])] for key in stored if key.endswith("." + own[0])}
    for prefix in sorted(prefixes, key=len):
        if all(prefix + key in stored for key in own if "pooler" not in key):
            return prefix
    return ""


def _build(choice: Choice, folder: Path | None, files: list[Path], attention: str) -> tuple[nn.Module, dict]:
    choice.config._attn_implementation = attention
    with quiet_transformers():
        if not files:
            return choice.cls(choice.config), {}
        prefix = checkpoint_prefix(choice, files)
        mapping = {"key_mapping": {f"^{re.escape(prefix)}": ""}} if prefix else {}
        return choice.cls.from_pretrained(
            str(folder), config=choice.config, local_files_only=True, attn_implementation=attention,
            output_loading_info=True, ignore_mismatched_sizes=True, **mapping)  # mismatches: our message below


def instantiate(choice: Choice, folder: Path | None, name: str, hint_size: bool = False) -> tuple[nn.Module, bool]:
    """Build ``choice`` with the directory's weights if it has any (else random); returns (model, random_init)."""
    attention = attention_implementation(choice.cls)
    files = weight_files(folder) if folder is not None else []
    for path in files:
        if path.stat().st_size == 0:
            raise ConfigError(f"{name}: weights file {path} is empty; remove it (random weights) or replace it")
    try:
        try:
            model, info = _build(choice, folder, files, attention)
        except ValueError as error:
            if attention != "sdpa" or "does not support an attention implementation" not in str(error):
                raise
            model, info = _build(choice, folder, files, "eager")  # a sub-model (DPT-hybrid's BiT) has no SDPA
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


WRAPPERS: dict[str, type[nn.Module]] = {"image": ImageEncoder, "video": ImageEncoder, "audio": AudioEncoder,
                                         "waveform": AudioValuesEncoder, "spectrogram": AudioValuesEncoder,
                                         "text": TextEncoder}


def wrap(model: nn.Module, inputs: ModelInputs, pooling: str) -> nn.Module:
    return WRAPPERS[inputs.kind](model, pooling)


def available_outputs(model: nn.Module, inputs: ModelInputs, example: dict[str, torch.Tensor], name: str) -> set[str]:
    """Run the model once (it must run, drawing no random numbers) and see which of logits / pooler_output /
    last_hidden_state it returns."""
    kind = inputs.kind
    try:
        with torch.no_grad(), refuse_random_ops(model, name):
            outputs = model(**example)
    except ConfigError:
        raise
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
    if type(choice.config).__name__ in ADAPTED_TOWERS:
        module, function = ADAPTED_TOWERS[type(choice.config).__name__]
        builder = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        return builder(name, choice, folder, options)
    if options.img_size is not None and hasattr(choice.config, "image_size"):
        choice.config.image_size = options.img_size  # new position embeddings (random) or a clear mismatch
    model, random_init = instantiate(choice, folder, name, hint_size=options.img_size is not None)
    missing = list(getattr(model, "_tc_missing", []))
    with contextlib.suppress(AttributeError):
        del model._tc_missing
    inputs = model_inputs(model, choice.config, options, name)
    kind, specs, make = inputs.kind, inputs.specs, inputs.make
    loaded = LoadedModel(name, model, specs, [], random_init, make)
    example = loaded.example_inputs(batch=1)
    have = available_outputs(model, inputs, example, name)
    requested = options.pooling or default_pooling
    pooling, use_base = choose_pooling(requested, have, model, missing, name, getattr(model, "base_model", None))
    if use_base:
        model = model.base_model
        pooling, _ = choose_pooling(requested, available_outputs(model, inputs, example, name), model, missing, name,
                                    None)
    if load_given_weights(model, options, name):
        random_init = False
    if pooling not in ("pooler", "logits") and isinstance(getattr(model, "pooler", None), nn.Module):
        # an unused pooler still reads token 0 in the traced graph; a head's own pooler (DeBERTa-v2's
        # ContextPooler feeds its classifier) is what the logits read, so it stays
        model.pooler = NoPooler()
    wrapper = wrap(model, inputs, pooling).eval()
    return LoadedModel(name, wrapper, specs, [OUTPUT_NAMES[pooling]], random_init, make)


def refuse_pretrained(options: ModelOptions, name: str) -> None:
    """A model built from a transformers config has no library weights to fetch: ``--pretrained`` is timm's."""
    if options.pretrained:
        raise ConfigError(f"{name} is built from its config; --pretrained is for timm models: use --weights FILE")


def load_given_weights(model: nn.Module, options: ModelOptions, name: str) -> bool:
    """Load ``--weights`` into ``model`` (True when it did); ``--pretrained`` is refused."""
    refuse_pretrained(options, name)
    if options.weights is None:
        return False
    load_weights(model, options.weights, strip_wrapper_prefix)
    return True


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
