"""MAC counts against the closed-form count of a ViT (what the CLI's "MACs per image" line reports)."""

import pytest
import timm
import torch

from tc_export.export.macs import count_macs

C, N_PATCHES, CLASSES = 64, 16, 10  # 64 px images, 16 px patches


def vit_macs(tokens: int, depth: int, map_head: bool) -> int:
    patch_embed = N_PATCHES * C * 3 * 16 * 16
    block = 12 * tokens * C * C + 2 * tokens * tokens * C  # qkv, proj, 4x MLP; q k^T and probs @ v
    head = C * CLASSES
    if map_head:  # one latent query: q, k and v of the tokens, its attention, proj and a 4x MLP
        head += C * C + 2 * tokens * C * C + 2 * tokens * C + C * C + 8 * C * C
    return patch_embed + depth * block + head


@pytest.mark.parametrize("arch,tokens,map_head", [("vit_tiny_patch16_224", 17, False),
                                                   ("vit_base_patch16_siglip_224", 16, True)])
def test_vit_macs_match_the_closed_form(arch, tokens, map_head):
    model = timm.create_model(arch, img_size=64, depth=2, embed_dim=C, num_heads=2, num_classes=CLASSES).eval()
    assert count_macs(model, {"x": torch.randn(1, 3, 64, 64)}) == vit_macs(tokens, 2, map_head)
    assert all(p.requires_grad for p in model.parameters())  # counting leaves the parameters as they were
