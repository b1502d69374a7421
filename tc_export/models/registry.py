"""The model registry: short names -> builders, plus ``timm:NAME`` and (with transformers) ``hf:PATH``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..registry import Registry
from .base import LoadedModel
from .seeding import DEFAULT_WEIGHTS_SEED, MAX_WEIGHTS_SEED, seeded_weights
from .weights import check_finite


# What a transformers model outputs (``--pooling``); timm models keep their own head.
POOLINGS = ("logits", "pooler", "cls", "mean", "tokens")


@dataclass(frozen=True)
class ModelOptions:
    """How to build a model: image size override, a weights file or the library's pretrained weights, and
    (transformers models) which output to export: ``pooling`` (None: logits, else pooler, else mean).
    ``weights_seed``: the seed of every random weight (the model's without weights, a projector's), so the same
    options build the same model in every run."""

    img_size: int | None = None
    weights: Path | None = None
    pretrained: bool = False
    pooling: str | None = None
    frames: int | None = None  # video: the model runs on each of this many frames of a (B, T, C, H, W) clip
    weights_seed: int = DEFAULT_WEIGHTS_SEED

    def __post_init__(self) -> None:
        if not 0 <= self.weights_seed <= MAX_WEIGHTS_SEED:
            raise ConfigError(f"--weights-seed must be in 0..2**63-1, got {self.weights_seed}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.img_size is not None and (self.img_size <= 0 or self.img_size % 2):
            raise ConfigError(f"--img-size must be a positive even number of pixels, got {self.img_size}")
        if self.weights is not None and self.pretrained:
            raise ConfigError("give either --weights FILE or --pretrained, not both")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[ModelOptions], LoadedModel]


MODELS: Registry[ModelSpec] = Registry("model")
# Prefix -> builder for open-ended names such as "timm:vit_base_patch16_384".
PREFIXES: dict[str, tuple[str, Callable[[str, ModelOptions], LoadedModel]]] = {}
# Registered names and prefixes whose builders honour ModelOptions.pooling (the transformers models).
POOLING_MODELS: set[str] = set()


def register_model(name: str, description: str) -> Callable[[Callable[[ModelOptions], LoadedModel]], Callable[[ModelOptions], LoadedModel]]:
    def wrap(build: Callable[[ModelOptions], LoadedModel]) -> Callable[[ModelOptions], LoadedModel]:
        MODELS.register(name, ModelSpec(name, description, build))
        return build

    return wrap


def load_model(name: str, options: ModelOptions | None = None, *, warn_random: bool = True) -> LoadedModel:
    """Build a registered model (``vit_b``), a prefixed one (``timm:NAME``, ``hf:PATH``) in eval mode; any random
    weights are drawn from ``options.weights_seed`` (``seeding.py``)."""
    options = options or ModelOptions()
    prefix, sep, rest = name.partition(":")
    if options.pooling is not None and (prefix if sep else name) not in POOLING_MODELS:
        presets = ", ".join(sorted(POOLING_MODELS - {"hf"}))
        raise ConfigError(f"--pooling applies to transformers models (hf:PATH, {presets}); {name} keeps its own head")
    if sep and prefix in PREFIXES:
        if not rest:
            raise ConfigError(f"model {name!r} names no {prefix} model: use {PREFIXES[prefix][0]}")
        build = lambda: PREFIXES[prefix][1](rest, options)  # noqa: E731
    else:
        if name not in MODELS:
            hint = ", or " + ", ".join(p for p, _ in PREFIXES.values()) if PREFIXES else ""
            raise ConfigError(MODELS.unknown_message(name) + hint)
        build = lambda: MODELS.get(name).build(options)  # noqa: E731
    with seeded_weights(options.weights_seed):  # the one place every model is built: its random weights
        loaded = build()
    loaded.weights_seed = options.weights_seed
    if options.frames is not None:
        from .video import video_model

        loaded = video_model(loaded, options.frames)
    loaded.module.eval()
    if options.pretrained:
        check_finite(loaded.module.state_dict().items(), f"pretrained weights of {loaded.name}")
    if loaded.random_init and warn_random:
        warnings.warn(random_weights_message(loaded), RandomWeightsWarning, stacklevel=2)
    return loaded


def random_weights_message(loaded: LoadedModel, consequence: str = "outputs are meaningless, parity and speed are "
                           "still real") -> str:
    """The warning every command prints for a model with random weights: which seed drew them, and what follows."""
    return (f"{loaded.name} has random weights (seed {loaded.weights_seed}: --weights-seed N draws others; "
            f"--weights FILE or --pretrained loads real ones): {consequence}")


class RandomWeightsWarning(UserWarning):
    """The model was built with random initialisation."""
