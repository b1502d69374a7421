"""Per-sample forwards of the transformers families whose inputs are more than pixels or padded ids: LayoutLM
(ids, segments and layout boxes), wav2vec2 / HuBERT (raw waveforms), AST (spectrograms, class and distillation
tokens), VideoMAE (clips), BLIP's vision tower, DPT-hybrid (its BiT backbone as the stem) and Perceiver for text
(latents that cross-attend to the text, a decoder query that cross-attends to the latents).

Like tests/reference_encoders.py (whose ``Encoder``/``Layer``/``run`` they reuse), they read the models' weights
and small sub-modules (embedding stems, linear layers, norms), never the models' attention or block code, and
import nothing from tc_export. The wrapper tc-export builds is passed in only to reach the transformers model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .reference_encoders import Encoder, Layer, attend, size_weighted_mean


def _ones(x: Tensor) -> tuple[Tensor, Tensor]:
    return x, torch.ones(x.shape[0], 1)


def _post_norm_bert(block, heads: int) -> Layer:
    """A BERT-layout post-norm layer (attention.self.query/key/value, output.dense, intermediate)."""
    s, out, inter = block.attention.self, block.attention.output, block.intermediate
    return Layer(heads, lambda y: (s.query(y), s.key(y), s.value(y)), out.dense,
                 lambda t: block.output.dense(inter.intermediate_act_fn(inter.dense(t))),
                 out.LayerNorm, block.output.LayerNorm, post_norm=True)


def layoutlm_mean(wrapper: torch.nn.Module) -> Encoder:
    """LayoutLMModel, mean pooled: word + 1-D position + box (x0, y0, x1, y1, height, width) + segment embeddings,
    written out from the embedding tables; sizes start from the attention mask (pads: size 0)."""
    model = wrapper.model
    e = model.embeddings

    def embed(sample):
        ids, box = sample["input_ids"][0], sample["bbox"][0]
        segments = sample.get("token_type_ids", torch.zeros_like(sample["input_ids"]))[0]
        positions = torch.arange(ids.shape[0])
        x = (e.word_embeddings(ids) + e.position_embeddings(positions)
             + e.x_position_embeddings(box[:, 0]) + e.y_position_embeddings(box[:, 1])
             + e.x_position_embeddings(box[:, 2]) + e.y_position_embeddings(box[:, 3])
             + e.h_position_embeddings(box[:, 3] - box[:, 1]) + e.w_position_embeddings(box[:, 2] - box[:, 0])
             + e.token_type_embeddings(segments))
        return e.LayerNorm(x), sample["attention_mask"][0][:, None].float()

    heads = model.config.num_attention_heads
    return Encoder(embed, [_post_norm_bert(b, heads) for b in model.encoder.layer],
                   lambda x, s, p: size_weighted_mean(x, s))


def wav2vec2_mean(wrapper: torch.nn.Module) -> Encoder:
    """Wav2Vec2Model / HubertModel (post-norm layout), mean pooled: the convolutional feature encoder and the
    feature projection as stems, the convolutional position embedding added and normed before the layers."""
    model = wrapper.model
    enc = model.encoder

    def embed(sample):
        h = model.feature_extractor(sample["input_values"]).transpose(1, 2)
        projected = model.feature_projection(h)
        h = projected[0] if isinstance(projected, tuple) else projected
        return _ones(enc.layer_norm(h + enc.pos_conv_embed(h))[0])

    def layer(block) -> Layer:
        a = block.attention
        return Layer(a.num_heads, lambda y: (a.q_proj(y), a.k_proj(y), a.v_proj(y)), a.out_proj,
                     block.feed_forward, block.layer_norm, block.final_layer_norm, post_norm=True)

    return Encoder(embed, [layer(b) for b in enc.layers], lambda x, s, p: size_weighted_mean(x, s))


def _pre_norm_vit(block, heads: int) -> Layer:
    """transformers' ViT layout: attention.q_proj/k_proj/v_proj/o_proj, mlp.fc1/fc2, layernorm_before/after."""
    a, mlp = block.attention, block.mlp
    return Layer(heads, lambda y: (a.q_proj(y), a.k_proj(y), a.v_proj(y)), a.o_proj,
                 lambda t: mlp.fc2(mlp.activation_fn(mlp.fc1(t))), block.layernorm_before, block.layernorm_after)


def ast_logits(wrapper: torch.nn.Module) -> Encoder:
    """ASTForAudioClassification: class and distillation tokens before the spectrogram patches; the logits read
    the mean of the two (after the final norm) through the MLP head."""
    model = wrapper.model
    ast = model.audio_spectrogram_transformer
    heads = ast.config.num_attention_heads

    def head(x, size, prop_attn):
        x = ast.layernorm(x)
        return model.classifier((x[0] + x[1]) / 2)

    return Encoder(lambda sample: _ones(ast.embeddings(sample["input_values"])[0]),
                   [_pre_norm_vit(b, heads) for b in ast.layers], head)


def videomae_mean(wrapper: torch.nn.Module) -> Encoder:
    """VideoMAEModel (mean-pooling config: no final norm), mean pooled: tubelet embeddings of the whole clip plus
    the fixed sinusoidal positions, pre-norm layers with the key unbiased."""
    model = wrapper.model
    heads = model.config.num_attention_heads

    def layer(block) -> Layer:
        a, out, inter = block.attention.attention, block.attention.output, block.intermediate
        return Layer(heads, lambda y: (a.query(y), a.key(y), a.value(y)), out.dense,
                     lambda t: block.output.dense(inter.intermediate_act_fn(inter.dense(t))),
                     block.layernorm_before, block.layernorm_after)

    def embed(sample):
        patches = model.embeddings.patch_embeddings(sample["pixel_values"])[0]
        return _ones(patches + model.embeddings.position_embeddings[0])

    assert model.layernorm is None, "the reference covers the mean-pooling VideoMAE layout"
    return Encoder(embed, [layer(b) for b in model.encoder.layer], lambda x, s, p: size_weighted_mean(x, s))


def blip_vision_pooler(wrapper: torch.nn.Module) -> Encoder:
    """BlipVisionModel (pooler output: the class token post-normed twice, as transformers' BLIP does: once with
    the last hidden state, once as the pooler); one fused qkv projection per layer."""
    model = wrapper.model
    heads = model.config.num_attention_heads

    def layer(block) -> Layer:
        a = block.self_attn
        return Layer(heads, lambda y: a.qkv(y).chunk(3, dim=-1), a.projection, block.mlp, block.layer_norm1,
                     block.layer_norm2)

    return Encoder(lambda sample: _ones(model.embeddings(sample["pixel_values"])[0]),
                   [layer(b) for b in model.encoder.layers],
                   lambda x, s, p: model.post_layernorm(model.post_layernorm(x[0])))



def _dpt_hybrid(wrapper: torch.nn.Module, head: Callable[[Tensor, Tensor], Tensor]) -> Encoder:
    """DPTModel with a BiT backbone (DPT-hybrid): the backbone's last feature map as a stem, its 1x1 projection
    flattened to tokens after the class token, plus the stored position table (the grid of the configured image
    size, so no resize); pre-norm layers in the VideoMAE layout; ``head(post-normed x, size)``. The neck that
    reassembles intermediate layers into grids by token position belongs to DPTForDepthEstimation and
    DPTForSemanticSegmentation, not to DPTModel."""
    model = wrapper.model
    e = model.embeddings
    heads = model.config.num_attention_heads

    def layer(block: torch.nn.Module) -> Layer:
        a, out, inter = block.attention.attention, block.attention.output, block.intermediate
        return Layer(heads, lambda y: (a.query(y), a.key(y), a.value(y)), out.dense,
                     lambda t: block.output.dense(inter.intermediate_act_fn(inter.dense(t))),
                     block.layernorm_before, block.layernorm_after)

    def embed(sample: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        features = e.backbone(sample["pixel_values"]).feature_maps[-1]
        patches = e.projection(features)[0].flatten(1).T  # (grid cells, C), row-major as the model's flatten
        positions = e.position_embeddings[0]
        assert positions.shape[0] == patches.shape[0] + 1, "the reference covers the configured image size"
        return _ones(torch.cat([e.cls_token[0], patches]) + positions)

    assert model.config.is_hybrid, "the reference covers DPT-hybrid (BiT backbone)"
    return Encoder(embed, [layer(b) for b in model.encoder.layer],
                   lambda x, s, p: head(model.layernorm(x), s))


def dpt_hybrid_pooler(wrapper: torch.nn.Module) -> Encoder:
    """DPT-hybrid's DPTModel, pooler output: the post-normed class token through the pooler's dense + tanh."""
    pooler = wrapper.model.pooler
    return _dpt_hybrid(wrapper, lambda x, size: pooler.activation(pooler.dense(x[0])))


def dpt_hybrid_mean(wrapper: torch.nn.Module) -> Encoder:
    """DPT-hybrid's DPTModel, mean pooled (a depth-estimation checkpoint has no pooler): the size-weighted mean of
    every post-normed token, class token included, as the uncompressed mean over all tokens."""
    return _dpt_hybrid(wrapper, size_weighted_mean)


def _perceiver_cross(layer: torch.nn.Module, queries: Tensor, inputs: Tensor, size: Tensor, sized: bool) -> Tensor:
    """One Perceiver cross-attention layer per sample: ``queries`` (M, C) attend to ``inputs`` (N, D) (each normed
    by its own LayerNorm), the output projection plus the query residual where the layer has one, then the pre-norm
    MLP with its residual. ``size`` (N, 1) weighs the keys: 0 masks a pad, a merged latent counts its size; with
    ``sized`` False every non-pad key counts once (the mutation that reads merged latents as single tokens)."""
    a, s, mlp = layer.attention, layer.attention.self, layer.mlp
    q, kv = s.layernorm1(queries), s.layernorm2(inputs)
    heads = s.num_heads
    split = [t.view(t.shape[0], heads, -1).transpose(0, 1) for t in (s.query(q), s.key(kv), s.value(kv))]
    weights = size if sized else (size > 0).float()
    attended, _ = attend(*split, weights, prop_attn=True)
    x = a.output.dense(attended) + (queries if a.use_query_residual else 0)
    return x + mlp.dense2(mlp.intermediate_act_fn(mlp.dense1(layer.layernorm(x))))


def perceiver_text_logits(wrapper: torch.nn.Module, sized_decoder: bool = True) -> Encoder:
    """PerceiverForSequenceClassification (PerceiverTextPreprocessor, PerceiverClassificationDecoder): token plus
    position embeddings of the padded ids; the learned latent array cross-attends once to them (pads masked),
    which makes the per-sample latents the token stream (sizes 1); the self-attention layers (pre-norm,
    num_blocks times over the shared block) run over the latents; the classification decoder's one learned query
    cross-attends to the final latents (proportional attention: log size per key) and the final linear layer
    reads its output. ``sized_decoder`` False drops the sizes in the decoder (a mutated reference)."""
    model = wrapper.model
    perceiver = model.perceiver
    preprocess, encoder = perceiver.input_preprocessor, perceiver.encoder
    decoder = perceiver.decoder.decoder
    heads = perceiver.config.num_self_attention_heads

    def layer(block: torch.nn.Module) -> Layer:
        s, mlp = block.attention.self, block.mlp
        assert block.attention.use_query_residual, "the reference covers residual self-attention"
        return Layer(heads, lambda y: (s.query(y), s.key(y), s.value(y)), block.attention.output.dense,
                     lambda t: mlp.dense2(mlp.intermediate_act_fn(mlp.dense1(t))), s.layernorm1, block.layernorm)

    def embed(sample: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        ids = sample["input_ids"][0]
        tokens = preprocess.embeddings(ids) + preprocess.position_embeddings(torch.arange(ids.shape[0]))
        mask = sample["attention_mask"][0][:, None].float()
        return _ones(_perceiver_cross(encoder.cross_attention, perceiver.embeddings.latents, tokens, mask, True))

    def head(x: Tensor, size: Tensor, prop_attn: bool) -> Tensor:
        query = decoder.positions_projection(decoder.output_position_encodings.position_embeddings)
        out = _perceiver_cross(decoder.decoding_cross_attention, query, x, size, sized_decoder and prop_attn)
        return decoder.final_layer(out)[0]

    assert type(preprocess).__name__ == "PerceiverTextPreprocessor" and not decoder.concat_preprocessed_input
    layers = [layer(b) for _ in range(perceiver.config.num_blocks) for b in encoder.self_attends]
    return Encoder(embed, layers, head)
