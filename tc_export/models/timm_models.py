"""timm models: the short names (vit_t ... deit_b) and ``timm:ARCH`` for any timm architecture."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..errors import BackendUnavailableError, ConfigError
from .base import InputSpec, LoadedModel
from .registry import PREFIXES, ModelOptions, register_model
from .weights import load_weights, timm_checkpoint_filter

SHORT_NAMES = {
    "vit_t": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
}


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def build_timm(arch: str, options: ModelOptions, display_name: str | None = None) -> LoadedModel:
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise ConfigError(f"timm has no architecture {arch!r}{hint}: see timm.list_models()")
    kwargs = {"img_size": options.img_size} if options.img_size else {}
    if options.pretrained:
        try:
            with _offline_hub():
                module = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as error:  # noqa: BLE001 - hub/cache failures all mean: no weights here
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BackendUnavailableError(
                f"no pretrained weights for {arch} in timm's cache and no network ({reason[:120]}): fetch them on a "
                f"connected machine with timm.create_model('{arch}', pretrained=True) and copy the Hugging Face "
                "cache (HF_HOME), or pass --weights FILE"
            ) from None
    else:
        try:
            module = timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as error:
            raise ConfigError(f"timm model {arch} does not take these options ({error})") from None
        if options.weights is not None:
            load_weights(module, options.weights, timm_checkpoint_filter(module))
    size = module.pretrained_cfg.get("input_size", (3, 224, 224)) if hasattr(module, "pretrained_cfg") else (3, 224, 224)
    if options.img_size:
        size = (size[0], options.img_size, options.img_size)
    return LoadedModel(
        name=display_name or f"timm:{arch}",
        module=module.eval(),
        inputs=[InputSpec("x", tuple(size), onnx_name="pixel_values")],
        output_names=["logits"],
        random_init=not (options.pretrained or options.weights),
    )


def _register_short_names() -> None:
    for short, arch in SHORT_NAMES.items():
        register_model(short, f"timm {arch}")(lambda options, arch=arch, short=short: build_timm(arch, options, short))


_register_short_names()
PREFIXES["timm"] = ("timm:ARCH (any timm architecture, e.g. timm:vit_base_patch16_384)", build_timm)
