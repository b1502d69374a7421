"""Attention the passes leave uncompressed but that reads the compressed tokens (pooling heads, class attention):
it attends with the tokens' sizes, or the model is refused. Without the sizes a merged token would count as one
token there, which parity cannot see."""

import pytest
import torch
from torch import nn

from tc_export import ToMeConfig, compress
from tc_export.errors import StructureNotFoundError

from .tiny_vit import TinyViT


class ClassAttentionHead(TinyViT):
    """TinyViT without a class token in its blocks; a class token joins the final tokens only in a class-attention
    head (one query over [class, tokens], as CaiT's class-attention blocks): written out, or ``nn.MultiheadAttention``."""

    def __init__(self, opaque: bool) -> None:
        super().__init__(class_token=False, depth=2)
        width = self.classifier.in_features
        self.late_class = nn.Parameter(torch.randn(1, 1, width))
        self.opaque = opaque
        self.attend = nn.MultiheadAttention(width, 3, batch_first=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.embedder(images).flatten(2).transpose(1, 2) + self.positions
        for layer in self.layers:
            h = layer(h)
        h = self.final_ln(h)
        query = self.late_class.expand(h.shape[0], -1, -1)
        keys = torch.cat([query, h], dim=1)
        if self.opaque:
            pooled, _ = self.attend(query, keys, keys, need_weights=False)
        else:
            weights = (query @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5).softmax(dim=-1)
            pooled = weights @ keys
        return self.classifier(pooled[:, 0])


def test_attention_over_compressed_tokens_joined_with_others_is_refused():
    torch.manual_seed(0)
    model = ClassAttentionHead(opaque=False).eval()
    with pytest.raises(StructureNotFoundError, match="attends over 65 keys where the stream has 64 tokens"):
        compress(model, ToMeConfig(r=4), {"images": torch.randn(2, 3, 32, 32)})


def test_opaque_attention_layer_after_the_ops_is_refused():
    torch.manual_seed(0)
    model = ClassAttentionHead(opaque=True).eval()
    with pytest.raises(StructureNotFoundError, match="attend.*MultiheadAttention.*opaque layer"):
        compress(model, ToMeConfig(r=4), {"images": torch.randn(2, 3, 32, 32)})
