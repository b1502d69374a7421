"""The support matrix: small versions of the ViT-family architectures in timm and of transformers encoders, each
method on each, with what happened: parity (and agreement with the independent reference where one applies) or a
refusal whose message names the cause. ToMe on each family runs through the command-line job (passes, MACs,
export, parity, fidelity), the other methods through ``compress`` and ONNX Runtime, to keep the matrix cheap.
``tests/test_support_matrix.py`` checks every cell and that docs/methods.md shows exactly this table;
``python -m tests.support_matrix`` prints it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tc_export import ExportConfig, compress, export_onnx
from tc_export.errors import ParityError, TCExportError
from tc_export.models.base import InputSpec, LoadedModel
from tc_export.passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig

from . import reference_encoders as encoders
from . import reference_relbias as relbias
from . import reference_rotary as rotary
from . import reference_towers as towers
from .reference import prumerge_plan, reference_adjacent, reference_merge, reference_prumerge, reference_topk

METHODS = {
    "tome": lambda: ToMeConfig(r=2),
    "topk": lambda: TopKConfig(keep=0.7, layers=(1,), fuse=True),
    "prumerge": lambda: PruMergeConfig(tokens=8),
    "adjacent": lambda: AdjacentConfig(r=2),
}

# Causes a refusal may name, by the words its message must contain.
CAUSES = {
    "windowed": "windowed attention",
    "spatial-reduction": "spatial-reduction attention",
    "cross-covariance": "cross-covariance attention",
    "rotary": "rotary position embedding",
    "relative position": "relative position bias",
    "talking-heads": "talking-heads attention",
    "parallel": "parallel attention branches",
    "differential": "differential attention",
    "two streams": "two token streams",
    "no class token": "no class token",
}


@dataclass(frozen=True)
class Family:
    """One architecture: how to build a small one, its example input, and the causes expected per method."""

    label: str
    build: Callable[[], LoadedModel]
    refused: dict[str, str]  # method -> cause key of CAUSES; methods not named here must work
    # its per-sample forward: an Encoder for reference_encoders.run, or an object with its own run (relbias)
    reference: Callable[[torch.nn.Module], encoders.Encoder | relbias.RelEncoder] | None = None
    # a per-sample forward carrying positions (tests/reference_rotary.py): (model, x, step, prop_attn, before)
    positional: Callable[..., tuple[torch.Tensor, list[int]]] | None = None
    unreferenced: frozenset[str] = frozenset()  # methods checked for parity only (no reference of their positions)
    score: str = "class"  # Top-K / PruMerge rank by: class (the published default) or received (no class token)


def _timm(arch: str, size: int | None = None, **overrides):
    size = size or overrides.get("img_size", 224)

    def build():
        import timm

        torch.manual_seed(0)
        model = timm.create_model(arch, **overrides).eval()
        return LoadedModel(f"timm:{arch}", model, [InputSpec("x", (3, size, size), onnx_name="pixel_values")])

    return build


def _hf_directory(config_class: str, model_class: str, pooling: str | None = None, **settings):
    """A transformers model saved to a directory and loaded as ``hf:DIR`` (its own wrapper and example inputs)."""
    def build():
        import transformers

        from tc_export.models import ModelOptions, load_model

        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings))
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            loaded = load_model(f"hf:{folder}", ModelOptions(pooling=pooling), warn_random=False)
        return loaded

    return build


def _hf(builder: str, **overrides):
    def build():
        from tc_export.models import ModelOptions
        from tc_export.models import hf_models

        torch.manual_seed(0)
        return getattr(hf_models, builder)(ModelOptions(), **overrides)

    return build


ALL = {"tome", "topk", "prumerge", "adjacent"}
SMALL = {"embed_dim": 64, "num_heads": 2}
TIMM = encoders.timm_vit
FAMILIES = [
    Family("ViT (class token)", _timm("vit_tiny_patch16_224", img_size=64, depth=3), {}, TIMM),
    Family("DeiT distilled (class + distillation)", _timm("deit_tiny_distilled_patch16_224", img_size=64, depth=3),
           {}, TIMM),
    Family("ViT, 4 registers, GAP", _timm("vit_little_patch16_reg4_gap_256", img_size=64, depth=3, **SMALL),
           {"topk": "no class token", "prumerge": "no class token"}, TIMM),
    Family("ViT, class + 4 registers (DINOv2)", _timm("vit_small_patch14_reg4_dinov2", 56, img_size=56, depth=3,
                                                      **SMALL), {}, TIMM),
    Family("ViT, no class token, GAP", _timm("vit_base_patch16_gap_224", img_size=64, depth=3, **SMALL),
           {"topk": "no class token", "prumerge": "no class token"}, TIMM),
    Family("SigLIP (attention-pooling head)", _timm("vit_base_patch16_siglip_224", img_size=64, depth=3, **SMALL),
           {"topk": "no class token", "prumerge": "no class token"}, TIMM),
    Family("ViT, class token + MAP head", _timm("vit_tiny_patch16_224", img_size=64, depth=3, global_pool="map"),
           {"topk": "no class token", "prumerge": "no class token"}, TIMM),  # the head pools x[:, 1:]
    Family("ViT, residual post-norm blocks, GAP", _timm("vit_base_patch16_rpn_224", img_size=64, depth=3, **SMALL),
           {"topk": "no class token", "prumerge": "no class token"}, TIMM),
    Family("NaFlexViT (4 registers, GAP)", _timm("naflexvit_base_patch16_gap", img_size=64, depth=3, **SMALL),
           {"topk": "no class token", "prumerge": "no class token"}, TIMM),
    Family("hybrid CNN stem (ResNet stem + ViT)", _timm("vit_tiny_r_s16_p8_224", img_size=128, depth=3), {}, TIMM),
    Family("BEiT (relative position bias)", _timm("beit_base_patch16_224", img_size=64, depth=3, num_classes=0,
                                                  **SMALL),
           {"topk": "no class token", "prumerge": "no class token"},  # its head pools the patches
           relbias.timm_beit),
    Family("ViT relpos", _timm("vit_relpos_small_patch16_224", img_size=64, depth=3, num_classes=0, **SMALL),
           {"topk": "no class token", "prumerge": "no class token"}, relbias.timm_relpos),
    Family("ViT relpos, class token", _timm("vit_relpos_base_patch16_cls_224", img_size=64, depth=3, num_classes=0,
                                            **SMALL), {}, relbias.timm_relpos),
    Family("EVA-02 (rotary)", _timm("eva02_tiny_patch14_224", 112, img_size=112, depth=3),
           {"topk": "no class token", "prumerge": "no class token"}, positional=rotary.run_timm_eva),
    Family("ViT RoPE (axial)", _timm("vit_small_patch16_rope_224", img_size=80, depth=3, **SMALL),
           {}, positional=rotary.run_timm_eva, unreferenced=frozenset({"prumerge"})),
    Family("ViT RoPE-Mixed (learned frequencies)", _timm("vit_small_patch16_rope_mixed_224", img_size=80, depth=3,
                                                         **SMALL),
           {}, positional=rotary.run_timm_eva, unreferenced=frozenset({"prumerge"})),
    Family("ViT RoPE, 1 register, GAP", _timm("vit_medium_patch16_rope_reg1_gap_256", img_size=128, depth=3,
                                              **SMALL),
           {"topk": "no class token", "prumerge": "no class token"}, positional=rotary.run_timm_eva),
    Family("DINOv3 (rotary, class + 4 registers)", _timm("vit_small_patch16_dinov3", img_size=80, depth=3,
                                                         global_pool="token", **SMALL),
           {}, positional=rotary.run_timm_eva, unreferenced=frozenset({"prumerge"})),
    Family("Perception Encoder (rotary, MAP head)", _timm("vit_pe_core_tiny_patch16_384", img_size=80, depth=3),
           {"topk": "no class token", "prumerge": "no class token"}, positional=rotary.run_timm_eva),
    Family("parallel blocks", _timm("vit_small_patch16_18x2_224", img_size=64, depth=2, **SMALL),
           {m: "parallel" for m in ALL}),
    Family("parallel-scaling blocks (ViT-22B style)", _timm("vit_base_patch16_xp_224", img_size=64, depth=2, **SMALL),
           {m: "parallel" for m in ALL}),
    Family("differential attention", _timm("vit_dlittle_patch16_reg1_gap_256", img_size=64, depth=2, **SMALL),
           {m: "differential" for m in ALL}),
    Family("TNT (transformer in transformer)", _timm("tnt_s_patch16_224", img_size=224, depth=2),
           {m: "two streams" for m in ALL}),
    Family("CaiT (talking heads, class attention)", _timm("cait_xxs24_224", img_size=64, depth=2, depth_token_only=1),
           {m: "talking-heads" for m in ALL}),
    # two blocks in the first stage: the second shifts its windows and adds a mask to the logits
    Family("Swin (windowed)", _timm("swin_tiny_patch4_window7_224", img_size=224, depths=(2, 1, 1, 1)),
           {m: "windowed" for m in ALL}),
    Family("PVT v2 (spatial reduction)", _timm("pvt_v2_b0", 64), {m: "spatial-reduction" for m in ALL}),
    Family("XCiT (cross-covariance)", _timm("xcit_nano_12_p16_224", img_size=64, depth=2),
           {m: "cross-covariance" for m in ALL}),
    Family("transformers ViT", _hf("build_vit", hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                   intermediate_size=128, image_size=64), {}, encoders.hf_vit),
    Family("transformers CLIP vision", _hf("build_clip_vision", hidden_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, intermediate_size=128, image_size=64), {},
           encoders.hf_clip_vision),
    Family("transformers DINOv2", _hf("build_dinov2", hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                      image_size=56), {}, encoders.hf_dinov2),
    Family("transformers Whisper encoder", _hf("build_whisper_encoder", d_model=64, encoder_layers=3,
                                               encoder_attention_heads=2, encoder_ffn_dim=128,
                                               max_source_positions=40),
           {"topk": "no class token", "prumerge": "no class token"}, encoders.hf_whisper_encoder),
    Family("transformers BERT (padded text)", _hf("build_bert", hidden_size=64, num_hidden_layers=3,
                                                  num_attention_heads=2, intermediate_size=128, vocab_size=500),
           {"topk": "no class token", "prumerge": "no class token"}, encoders.hf_bert_sentence),
    # rotary with a global and a local theta; the middle layer's sliding window (|i - j| <= 4) follows the carried
    # positions; sizes from the padding mask
    Family("transformers ModernBERT (padded text, rotary, sliding window)",
           _hf_directory("ModernBertConfig", "ModernBertModel", hidden_size=64, num_hidden_layers=3,
                         num_attention_heads=2, intermediate_size=128, vocab_size=500, max_position_embeddings=64,
                         local_attention=8, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, cls_token_id=1, sep_token_id=2),
           {"topk": "no class token", "prumerge": "no class token"}, positional=rotary.run_modernbert),
    Family("transformers DINOv3ViT (rotary, class + 4 registers)",
           _hf_directory("DINOv3ViTConfig", "DINOv3ViTModel", hidden_size=64, num_hidden_layers=3,
                         num_attention_heads=2, intermediate_size=128, image_size=80, num_register_tokens=4),
           {}, positional=rotary.run_hf_dinov3, unreferenced=frozenset({"prumerge"})),
    Family("transformers Data2VecVision (relative bias)",
           _hf_directory("Data2VecVisionConfig", "Data2VecVisionModel", hidden_size=64, num_hidden_layers=3,
                         num_attention_heads=2, intermediate_size=128, image_size=64,
                         use_relative_position_bias=True),
           {"topk": "no class token", "prumerge": "no class token"}, relbias.hf_data2vec_vision),
    Family("transformers T5 encoder (padded text, bucketed bias)",
           _hf_directory("T5Config", "T5EncoderModel", d_model=64, d_kv=32, d_ff=128, num_layers=3, num_heads=2,
                         vocab_size=500),
           {"topk": "no class token", "prumerge": "no class token"}, relbias.hf_t5_encoder),
]


TOWER = {"image_size": 64, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
         "num_attention_heads": 4}
# The vision towers of deployed VLMs (docs/vlm-towers.md shows their table), each through its adapter with its
# per-sample reference (tests/reference_towers.py). Without a class token, Top-K and PruMerge rank by the attention
# each token receives (--score received); PruMerge's reference enters where the stream enters the last layer, with
# that layer's rotated full-width queries and keys (Llama 4's class token last: parity only for PruMerge).
RECEIVED = {"score": "received"}
TOWERS = [
    Family("Pixtral vision (2-D rotary; topk, prumerge: --score received)",
           _hf_directory("PixtralVisionConfig", "PixtralVisionModel", **TOWER), {}, positional=towers.run_pixtral,
           **RECEIVED),
    Family("Idefics3 / SmolVLM vision (topk, prumerge: --score received)",
           _hf_directory("Idefics3VisionConfig", "Idefics3VisionTransformer", **TOWER), {},
           positional=towers.run_idefics3, **RECEIVED),
    Family("SigLIP2 NaFlex, fixed size (MAP head; topk, prumerge: --score received)",
           _hf_directory("Siglip2VisionConfig", "Siglip2VisionModel", num_patches=64, patch_size=8, hidden_size=48,
                         intermediate_size=96, num_hidden_layers=3, num_attention_heads=4),
           {}, positional=towers.run_siglip2, **RECEIVED),
    Family("Llama 4 vision (complex rotary, class token last; topk, prumerge: --score received)",
           _hf_directory("Llama4VisionConfig", "Llama4VisionModel", pooling="tokens", **TOWER | {
               "intermediate_size": 256, "vision_output_dim": 64, "projector_input_dim": 64,
               "projector_output_dim": 64}), {}, positional=towers.run_llama4, unreferenced=frozenset({"prumerge"}),
           **RECEIVED),
    Family("MLCD vision (rotary, class_pos_emb)", _hf_directory("MLCDVisionConfig", "MLCDVisionModel", **TOWER),
           {}, positional=towers.run_mlcd),
]


@dataclass(frozen=True)
class Cell:
    family: str
    method: str
    outcome: str  # "works", "works, matches reference", or "refused: <cause>"
    detail: str  # the refusal message, or the parity error


def method_config(method: str, family: Family):
    """The matrix's settings of ``method`` (METHODS), Top-K and PruMerge ranking by the family's ``score``."""
    config = METHODS[method]()
    return dataclasses.replace(config, score=family.score) if method in ("topk", "prumerge") else config


def reference_hooks(method: str, protected: int, layers: int, padded: bool = False,
                    received: bool = False) -> encoders.Hooks:
    """The matrix's settings of ``method`` (METHODS) as the independent implementation of the published code;
    ``padded``: size-0 tokens follow the padding rule (tests/reference.pair_score); ``received``: Top-K ranks by
    the attention each token receives (mean over heads and queries) instead of the class token's."""
    if method == "tome":
        return encoders.Hooks(lambda i, x, s, k, p: reference_merge(x, k.mean(0), s, 2, protected, padded))
    if method == "adjacent":
        return encoders.Hooks(lambda i, x, s, k, p: reference_adjacent(x, k.mean(0), s, 2, protected, padded))
    if method == "topk":
        def score(p):
            return p.mean(dim=(0, 1)) if received else p[:, 0].mean(0)

        return encoders.Hooks(lambda i, x, s, k, p: reference_topk(x, s, score(p), 0.7, protected, True, False)
                              if i == 1 else (x, s), prop_attn=False)
    # PruMerge where the stream enters the last layer, scored by that layer's full-width q and k
    return encoders.Hooks(before_layer=lambda i, x, s, q, k: reference_prumerge(x, s, q, k, 8, protected, True)
                          if i == layers - 1 else (x, s), prop_attn=False)


JOB_METHOD = "tome"  # the method each family runs through the command-line job


def run_cell(family: Family, method: str) -> Cell:
    loaded = family.build()
    inputs = loaded.example_inputs(batch=1)
    try:
        if method == JOB_METHOD:
            compressed, error = _through_job(loaded, method, family)
        else:
            compressed, error = _through_compress(loaded, inputs, method, family)
    except ParityError as failure:
        return Cell(family.label, method, "parity failed", failure.failure)
    except TCExportError as failure:
        message = str(failure)
        cause = next((key for key, words in CAUSES.items() if words in message), "other")
        return Cell(family.label, method, f"refused: {cause}", message)
    outcome = "works"
    if (family.reference or family.positional) and method not in family.unreferenced:
        outcome = _against_reference(family, loaded.module, inputs, compressed, method)
    return Cell(family.label, method, outcome, f"parity max abs {error:.1e}")


def _through_job(loaded: LoadedModel, method: str, family: Family):
    """The command-line job without its argument parsing (``run_job``): passes, MACs, export, parity, fidelity."""
    from tc_export.job.pipeline import JobConfig, run_job

    with tempfile.TemporaryDirectory() as folder:
        config = JobConfig(model=loaded.name, output=Path(folder) / "m.onnx", methods=(method_config(method, family),),
                           fidelity_samples=2)
        result = run_job(config, say=lambda line: None, loaded=loaded)
    assert 0 < result.macs_compressed <= result.macs_original and result.fidelity is not None
    return result.compressed, max(output.max_abs for output in result.parity.outputs)


def _through_compress(loaded: LoadedModel, inputs: dict, method: str, family: Family):
    compressed = compress(loaded.module, method_config(method, family), inputs)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        import onnxruntime as ort

        export_onnx(compressed.module, inputs, path, ExportConfig(), input_names=list(inputs))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        want = compressed(**inputs).numpy()
    error = float(np.abs(got - want).max())
    if not np.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise ParityError(f"max abs {error:.2e}")
    return compressed, error


def _against_reference(family: Family, model, inputs, compressed, method: str) -> str:
    if "x" in inputs:  # timm graphs take any batch: two samples
        inputs = {"x": torch.cat([inputs["x"], torch.randn_like(inputs["x"])])}
    if family.positional is not None:
        want = _positional_reference(family, model, inputs, compressed, method)
    else:
        encoder = family.reference(model)
        hooks = reference_hooks(method, compressed.protected, len(encoder.layers), padded="attention_mask" in inputs,
                                received=family.score == "received")
        runner = getattr(encoder, "run", None)  # relbias: fused Top-K tokens sit at their size-weighted mean position
        want, _ = runner(inputs, hooks, fused=method == "topk") if runner else encoders.run(encoder, inputs, hooks)
    with torch.no_grad():
        got = compressed(**inputs)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=2e-5):
        gap = float((got - want).abs().max()) if got.shape == want.shape else f"shape {tuple(got.shape)}"
        return f"DIFFERS from reference by {gap}"
    return "works, matches reference"


def _positional_reference(family: Family, model, inputs, compressed, method: str) -> torch.Tensor:
    """The matrix's method settings in a reference that carries each token's position (merged: size-weighted
    mean; kept: its own; EViT's fused token and PruMerge's extra token: the size-weighted mean of the pruned ones)."""
    layers = len(compressed.token_counts()) - 1
    received = family.score == "received"
    hooks = reference_hooks(method, compressed.protected, layers, padded="attention_mask" in inputs, received=received)

    def step(i, x, size, pos, keys, probs):
        fused = method == "topk" and i == 1
        return rotary.with_positions(lambda t, s: hooks.after_attention(i, t, s, keys, probs), x, size, pos, fused)

    extra = (_prumerge_with_positions(compressed.protected, layers, received),) if method == "prumerge" else ()
    want, _ = family.positional(model, *inputs.values(), step, hooks.prop_attn, *extra)
    return want


def _prumerge_with_positions(protected: int, layers: int, received: bool):
    """The matrix's PruMerge (8 tokens, the extra token) where the stream enters the last layer, positions carried:
    a kept token keeps its own, the extra token gets the pruned ones' size-weighted mean."""

    def before(i, x, size, pos, query, key):
        if i != layers - 1:
            return x, size, pos
        rows, sizes = reference_prumerge(x, size, query, key, 8, protected, True, received=received)
        _, kept, pruned = prumerge_plan(query, key, 8, protected, received)
        pruned_at = [protected + j for j in pruned]
        extra = (pos[pruned_at] * size[pruned_at]).sum(0, keepdim=True) / size[pruned_at].sum()
        return rows, sizes, torch.cat([pos[:protected], pos[[protected + j for j in kept]], extra])

    return before


def matrix() -> list[Cell]:
    return [run_cell(family, method) for family in FAMILIES for method in METHODS]


def markdown(cells: list[Cell], families: list[Family] | None = None) -> str:
    methods = list(METHODS)
    lines = ["| family | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    by = {(c.family, c.method): c.outcome for c in cells}
    for family in FAMILIES if families is None else families:
        row = [by[(family.label, m)].replace("works, matches reference", "works, = reference") for m in methods]
        lines.append(f"| {family.label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["towers"]:  # the table of docs/vlm-towers.md
        print(markdown([run_cell(family, method) for family in TOWERS for method in METHODS], TOWERS))
    else:
        print(markdown(matrix()))
