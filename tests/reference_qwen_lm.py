"""The language-model check for Qwen-VL exports (issue 23, point 5): a small Qwen2-VL model built from a config with
random weights, its language model run on [text, visual tokens, text] with 3-D positions.

Nothing here imports tc_export. Two paths, each one image per call:

- ``reference_path``: the published pipeline: the tower's own forward on the image processor's patches (tower +
  merger, uncompressed), ``get_rope_index`` on [text, every merged token, text], then the merged tokens at ``kept``
  and their columns of the positions selected the same way (the text keeps all of its), as vLLM's EVS prunes after
  the merger and keeps each kept token's original (t, h, w);
- ``export_path``: the tokens an export hands over with the (t, h, w) it emits relative to the image start, placed
  after the text as a consumer does: start + (t, h, w), the text after at start + max(H', W') (the rule of
  ``get_rope_index``, which the uncompressed merged grid fixes).

The check: both give the same language-model hidden states. Positions off by one unit, or tokens of other windows,
change them.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMAGE_TOKEN, VISION_START = 99, 98
BEFORE, AFTER = (5, 6, 7), (8, 9)  # text token ids around the image
TEXT = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 64, "vocab_size": 100,
        "rope_parameters": {"rope_type": "default", "mrope_section": [4, 4, 4], "rope_theta": 10.0},
        "bos_token_id": None, "eos_token_id": None}


def qwen2_vl_model(vision: dict, seed: int = 0, qk_std: float = 0.5):
    """A whole Qwen2-VL model (tower, merger, language model) from a config with random weights; the queries
    and keys of the tower and the language model large enough (and rope_theta small enough: 10) that attention
    and every position axis matter. ``vision["hidden_size"]`` must be TEXT's width."""
    import transformers as tf

    config = tf.Qwen2VLConfig(vision_config=vision, text_config=dict(TEXT), image_token_id=IMAGE_TOKEN,
                              vision_start_token_id=VISION_START)
    torch.manual_seed(seed)
    model = tf.Qwen2VLModel(config).eval()
    for name, parameter in model.named_parameters():
        if name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight")):
            parameter.data.normal_(0, qk_std)
    return model


def merged_tokens(model, pixels: Tensor) -> tuple[Tensor, int, int]:
    """The tower's own merger output (N', D) for one image (1, 3, H, W) on the processor's patches, and the merged
    grid (H', W')."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    config = model.visual.config
    patches, rows, cols = Qwen2VLImageProcessor().patchify(
        pixels, patch_size=config.patch_size, merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size)
    with torch.no_grad():
        out = model.visual(patches.reshape(-1, patches.shape[-1]), torch.tensor([[1, rows, cols]]))
    merge = config.spatial_merge_size
    return out.pooler_output, rows // merge, cols // merge


def rope_index(model, height: int, width: int) -> Tensor:
    """``get_rope_index`` for [BEFORE, height x width image tokens, AFTER]: (3, L) positions."""
    ids = torch.tensor([[*BEFORE, *[IMAGE_TOKEN] * (height * width), *AFTER]])
    types = (ids == IMAGE_TOKEN).int()
    positions, _ = model.get_rope_index(ids, types, image_grid_thw=torch.tensor([[1, height * 2, width * 2]]))
    return positions[:, 0]


def language_model(model, visual: Tensor, positions: Tensor) -> Tensor:
    """The language model's last hidden state on [BEFORE, visual (N, D), AFTER] at ``positions`` (3, L)."""
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(BEFORE)), visual, embed(torch.tensor(AFTER))])
    with torch.no_grad():
        return model.language_model(inputs_embeds=embeds[None], position_ids=positions[:, None]).last_hidden_state[0]


def reference_path(model, pixels: Tensor, kept: Tensor | None = None) -> Tensor:
    """Uncompressed tower + merger, the merged tokens at ``kept`` (indices on the merged grid, row-major; None: all),
    get_rope_index's positions selected the same way."""
    merged, height, width = merged_tokens(model, pixels)
    kept = torch.arange(height * width) if kept is None else kept
    positions = rope_index(model, height, width)
    columns = torch.cat([torch.arange(len(BEFORE)), len(BEFORE) + kept,
                         len(BEFORE) + height * width + torch.arange(len(AFTER))])
    return language_model(model, merged[kept], positions[:, columns])


def export_path(model, tokens: Tensor, positions: Tensor, height: int, width: int) -> Tensor:
    """Exported tokens (N, D) with their emitted (t, h, w) (N, 3) relative to the image start, on a merged grid of
    height x width."""
    start = len(BEFORE)
    text = torch.arange(start, dtype=torch.float32).expand(3, -1)
    after = (start + max(height, width) + torch.arange(len(AFTER), dtype=torch.float32)).expand(3, -1)
    placed = torch.cat([text, start + positions.T.float(), after], dim=1)
    return language_model(model, tokens, placed)
