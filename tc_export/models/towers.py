"""Vision towers of vision-language models, built from their configs (random weights unless ``--weights``).

``clip_vit_l_336`` is LLaVA-1.5's tower (CLIP ViT-L/14 at 336 px: a 24 x 24 grid + class token = 577 tokens);
``siglip_b`` is the transformers SigLIP base vision tower (16 x 16 patches at 224 px, attention-pooling head);
``siglip_so400m_384`` is SigLIP so400m/14 at 384 px (27 x 27 = 729 tokens, no class token, 27 layers), the tower of
LLaVA-OneVision (which drops its last layer: ``--features -2``).
Use them with ``--features -2`` (LLaVA takes the second-to-last layer) and a projector.
"""

from __future__ import annotations

from typing import Any

from .base import LoadedModel
from .hf_models import _preset, _sized, _transformers, build_clip_vision
from .registry import ModelOptions, register_model


@register_model("clip_vit_l_336", "transformers CLIP ViT-L/14 vision tower, 336 px, 577 tokens (LLaVA-1.5)")
def build_clip_vit_l_336(options: ModelOptions, **overrides: Any) -> LoadedModel:
    settings = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 336} | overrides
    return build_clip_vision(options, name="clip_vit_l_336", **settings)


@register_model("siglip_b", "transformers SigLIP-B/16 vision tower, 224 px (attention-pooling head)")
def build_siglip_b(options: ModelOptions, name: str = "siglip_b", **overrides: Any) -> LoadedModel:
    tf = _transformers()
    size, options = _sized(options, overrides)
    settings = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "patch_size": 16} | overrides
    config = tf.SiglipVisionConfig(image_size=size, **settings)
    return _preset(name, tf.SiglipVisionModel, config, options, "pooler")


@register_model("siglip_so400m_384", "transformers SigLIP so400m/14 vision tower, 384 px, 729 tokens (LLaVA-OneVision)")
def build_siglip_so400m_384(options: ModelOptions, **overrides: Any) -> LoadedModel:
    settings = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 384} | overrides
    return build_siglip_b(options, name="siglip_so400m_384", **settings)


def _adapted(name: str, config_class: str, model_class: str, options: ModelOptions, pooling: str | None,
             settings: dict[str, Any]) -> LoadedModel:
    """A tower built through its adapter (``hf_auto.ADAPTED_TOWERS``) from its config, random weights unless
    ``--weights``; ``pooling``: the preset's output unless --pooling says otherwise."""
    import dataclasses

    tf = _transformers()
    if pooling is not None and options.pooling is None:
        options = dataclasses.replace(options, pooling=pooling)
    config = getattr(tf, config_class)(**settings)
    return _preset(name, getattr(tf, model_class), config, options, pooling or "tokens")


@register_model("idefics3_vision", "transformers Idefics3 vision tower: SigLIP so400m/14 at 364 px, 26 x 26 tokens")
def build_idefics3_vision(options: ModelOptions, **overrides: Any) -> LoadedModel:
    settings = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 364} | overrides
    return _adapted("idefics3_vision", "Idefics3VisionConfig", "Idefics3VisionTransformer", options, None, settings)


@register_model("smolvlm_vision", "transformers SmolVLM vision tower: SigLIP B/16 at 512 px, 32 x 32 tokens")
def build_smolvlm_vision(options: ModelOptions, **overrides: Any) -> LoadedModel:
    settings = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "patch_size": 16, "image_size": 512} | overrides
    return _adapted("smolvlm_vision", "SmolVLMVisionConfig", "SmolVLMVisionTransformer", options, None, settings)


@register_model("llama4_vision", "transformers Llama 4 vision encoder, 336 px, 24 x 24 tokens + class (before its "
                                 "pixel shuffle)")
def build_llama4_vision(options: ModelOptions, **overrides: Any) -> LoadedModel:
    settings = {"hidden_size": 1408, "intermediate_size": 5632, "num_hidden_layers": 34, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 336, "vision_output_dim": 4096, "projector_input_dim": 4096,
                "projector_output_dim": 4096} | overrides
    return _adapted("llama4_vision", "Llama4VisionConfig", "Llama4VisionModel", options, "tokens", settings)


@register_model("gemma3_siglip_896", "transformers SigLIP so400m/14 vision tower at 896 px, 64 x 64 tokens (Gemma 3)")
def build_gemma3_siglip_896(options: ModelOptions, **overrides: Any) -> LoadedModel:
    tf = _transformers()
    size, options = _sized(options, {"image_size": 896} | overrides)
    import dataclasses

    settings = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                "patch_size": 14} | {k: v for k, v in overrides.items() if k != "image_size"}
    if options.pooling is None:
        options = dataclasses.replace(options, pooling="tokens")  # Gemma 3 reads the post-layernormed tokens
    return _preset("gemma3_siglip_896", tf.SiglipVisionModel, tf.SiglipVisionConfig(image_size=size, **settings),
                   options, "tokens")
