"""Every encoder family tc-export compresses, rewritten one sample at a time from the models' weights.

The forwards here read only the modules' parameters and small sub-modules (linear layers, norms, MLPs); they do not
call the models' own attention or block code and import nothing from tc_export. A method enters through
``Hooks``: ``before_layer`` sees the tokens entering a layer with that layer's full-width q and k (PruMerge),
``after_attention`` sees the stream after each attention residual add with the keys and attention probabilities
(ToMe, Top-K, adjacent merging). Proportional attention adds log(size) of each key; a size of 0 (padding) gets no
attention whatever ``prop_attn`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Step = Callable[[int, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _same(t: Tensor) -> Tensor:
    return t


def _unchanged(index: int, x: Tensor, size: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return x, size


@dataclass(frozen=True)
class Hooks:
    """A method inside the reference: ``after_attention(layer, x (N,C), size (N,1), keys (H,N,d), probs (H,N,N))``
    and ``before_layer(layer, x, size, q (N,C), k (N,C))``, each returning the new ``(x, size)``."""

    after_attention: Step = _unchanged
    before_layer: Step = _unchanged
    prop_attn: bool = True


@dataclass(frozen=True)
class Layer:
    """One transformer layer: projections to heads, the attention output branch, the MLP branch and its norms."""

    heads: int
    project: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # normed x (N, C) -> q, k, v (N, C) each
    attention_out: Callable[[Tensor], Tensor]  # attended (N, C) -> the residual branch
    mlp: Callable[[Tensor], Tensor]  # (N, C) -> the residual branch (before any post-norm)
    norm1: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    post_norm: bool = False  # BERT: norms after each residual add instead of before each branch
    q_norm: Callable[[Tensor], Tensor] = _same  # on (H, N, d), as timm's qk-norm
    k_norm: Callable[[Tensor], Tensor] = _same


@dataclass(frozen=True)
class Encoder:
    """A model seen per sample: ``embed(inputs of one sample) -> (x, size)``, its layers, and
    ``head(x, size, prop_attn)`` (an attention-pooling head attends over the sized tokens too)."""

    embed: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]
    layers: list[Layer]
    head: Callable[[Tensor, Tensor, bool], Tensor]


def _heads(t: Tensor, heads: int) -> Tensor:
    n, c = t.shape
    return t.view(n, heads, c // heads).transpose(0, 1)


def attend(q: Tensor, k: Tensor, v: Tensor, size: Tensor, prop_attn: bool) -> tuple[Tensor, Tensor]:
    """Softmax attention of (H, M, d) queries over (H, N, d) keys; returns (M, H*d) and the probabilities."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    bias = size[:, 0].log() if prop_attn else torch.where(size[:, 0] > 0, 0.0, float("-inf"))
    probs = (logits + bias).softmax(dim=-1)
    return (probs @ v).transpose(0, 1).reshape(q.shape[1], -1), probs


@torch.no_grad()
def run(encoder: Encoder, inputs: dict[str, Tensor], hooks: Hooks) -> tuple[Tensor, list[int]]:
    """The encoder on each sample of ``inputs`` in turn; returns the stacked outputs and the token counts seen by
    each layer and the head (of the last sample)."""
    batch = next(iter(inputs.values())).shape[0]
    outputs: list[Tensor] = []
    counts: list[int] = []
    for i in range(batch):
        x, size = encoder.embed({name: value[i:i + 1] for name, value in inputs.items()})
        counts = []
        for index, layer in enumerate(encoder.layers):
            y = x if layer.post_norm else layer.norm1(x)
            x, size = hooks.before_layer(index, x, size, *layer.project(y)[:2])
            counts.append(x.shape[0])
            y = x if layer.post_norm else layer.norm1(x)
            q, k, v = (_heads(t, layer.heads) for t in layer.project(y))
            q, k = layer.q_norm(q), layer.k_norm(k)
            attended, probs = attend(q, k, v, size, hooks.prop_attn)
            x = x + layer.attention_out(attended)
            if layer.post_norm:
                x = layer.norm1(x)
            x, size = hooks.after_attention(index, x, size, k, probs)
            x = layer.norm2(x + layer.mlp(x)) if layer.post_norm else x + layer.mlp(layer.norm2(x))
        counts.append(x.shape[0])
        outputs.append(encoder.head(x, size, hooks.prop_attn))
    return torch.stack(outputs), counts


def size_weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    return (x * size).sum(0) / size.sum()


# --- timm -------------------------------------------------------------------------------------------------------

def timm_vit(model: torch.nn.Module) -> Encoder:
    """A timm VisionTransformer: class/distillation/register tokens, hybrid stems, pre-norm or residual-post-norm
    blocks; token, average (size-weighted, as the published ToMe pools its MAE models), distilled or
    attention-pooling (MAP) heads."""
    prefix = model.num_prefix_tokens

    def embed(sample: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if hasattr(model, "_forward_embeds"):  # NaFlexVit (fixed-size images: no patch coordinates)
            x = model._forward_embeds(sample["x"], None, None, None)["patches"][0]
        else:
            x = model.norm_pre(model._pos_embed(model.patch_embed(sample["x"])))[0]
        return x, torch.ones(x.shape[0], 1)

    def layer(block) -> Layer:
        attn = block.attn

        def project(y: Tensor):
            return attn.qkv(y).chunk(3, dim=-1)

        if type(block).__name__ == "ResPostBlock":  # x + norm1(attn(x)), then x + norm2(mlp(x))
            return Layer(attn.num_heads, project, lambda a: block.norm1(attn.proj(attn.norm(a))),
                         lambda t: block.norm2(block.mlp(t)), _same, _same, q_norm=attn.q_norm, k_norm=attn.k_norm)
        return Layer(attn.num_heads, project, lambda a: block.ls1(attn.proj(attn.norm(a))),
                     lambda t: block.ls2(block.mlp(t)), block.norm1, block.norm2,
                     q_norm=attn.q_norm, k_norm=attn.k_norm)

    def head(x: Tensor, size: Tensor, prop_attn: bool) -> Tensor:
        x = model.norm(x)
        if getattr(model, "head_dist", None) is not None:
            return (model.head(x[0]) + model.head_dist(x[1])) / 2
        if getattr(model, "attn_pool", None) is not None:
            tokens, sizes = (x, size) if model.pool_include_prefix else (x[prefix:], size[prefix:])
            return model.head(model.fc_norm(attention_pool(model.attn_pool, tokens, sizes, prop_attn)))
        if model.global_pool == "avg":
            return model.head(model.fc_norm(size_weighted_mean(x[prefix:], size[prefix:])))
        return model.head(model.fc_norm(x[0]))

    return Encoder(embed, [layer(block) for block in model.blocks], head)


def attention_pool(pool: torch.nn.Module, x: Tensor, size: Tensor, prop_attn: bool) -> Tensor:
    """timm's attention-pooling (MAP) head over sized tokens: the learned latent queries attend with the size bias."""
    assert pool.pos_embed is None, "a MAP head with position embeddings is laid out by token count"
    heads = pool.num_heads
    q = pool.q_norm(_heads(pool.q(pool.latent[0]), heads))
    k, v = (_heads(t, heads) for t in pool.kv(x).chunk(2, dim=-1))
    attended, _ = attend(q, pool.k_norm(k), v, size, prop_attn)
    out = pool.proj(attended)
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out[0] if pool.pool == "token" else out.mean(0)


# --- Hugging Face transformers ----------------------------------------------------------------------------------

def _pre_norm(heads: int, attention, q: str, k: str, v: str, out: Callable[[Tensor], Tensor],
              mlp: Callable[[Tensor], Tensor], norm1, norm2) -> Layer:
    def project(y: Tensor):
        return getattr(attention, q)(y), getattr(attention, k)(y), getattr(attention, v)(y)

    return Layer(heads, project, out, mlp, norm1, norm2)


def hf_vit(wrapper: torch.nn.Module) -> Encoder:
    """transformers ViTForImageClassification (logits of the class token)."""
    model = wrapper.model
    vit, heads = model.vit, model.config.num_attention_heads

    def layer(block) -> Layer:
        a = block.attention
        return _pre_norm(heads, a, "q_proj", "k_proj", "v_proj", a.o_proj,
                         lambda t: block.mlp.fc2(block.mlp.activation_fn(block.mlp.fc1(t))),
                         block.layernorm_before, block.layernorm_after)

    def embed(sample):
        x = vit.embeddings(sample["pixel_values"])[0]
        return x, torch.ones(x.shape[0], 1)

    return Encoder(embed, [layer(b) for b in vit.layers], lambda x, s, p: model.classifier(vit.layernorm(x)[0]))


def hf_clip_vision(wrapper: torch.nn.Module) -> Encoder:
    """transformers CLIPVisionModel (pooler output: the post-normed class token)."""
    model = getattr(wrapper.model, "vision_model", wrapper.model)
    heads = model.config.num_attention_heads

    def layer(block) -> Layer:
        a = block.self_attn
        return _pre_norm(heads, a, "q_proj", "k_proj", "v_proj", a.out_proj, block.mlp, block.layer_norm1,
                         block.layer_norm2)

    def embed(sample):
        x = model.pre_layrnorm(model.embeddings(sample["pixel_values"]))[0]
        return x, torch.ones(x.shape[0], 1)

    return Encoder(embed, [layer(b) for b in model.encoder.layers], lambda x, s, p: model.post_layernorm(x[0]))


def hf_dinov2(wrapper: torch.nn.Module) -> Encoder:
    """transformers Dinov2Model (pooler output: the normed class token); layer scale on both branches."""
    model = wrapper.model
    heads = model.config.num_attention_heads

    def layer(block) -> Layer:
        a = block.attention
        return _pre_norm(heads, a, "q_proj", "k_proj", "v_proj", lambda t: block.layer_scale1(a.o_proj(t)),
                         lambda t: block.layer_scale2(block.mlp(t)), block.norm1, block.norm2)

    def embed(sample):
        x = model.embeddings(sample["pixel_values"])[0]
        return x, torch.ones(x.shape[0], 1)

    return Encoder(embed, [layer(b) for b in model.encoder.layer], lambda x, s, p: model.layernorm(x)[0])


def hf_whisper_encoder(wrapper: torch.nn.Module) -> Encoder:
    """transformers WhisperEncoder (all frames out, normed): two GELU convolutions, sinusoidal positions."""
    enc = wrapper.encoder
    heads = enc.config.encoder_attention_heads

    def layer(block) -> Layer:
        a = block.self_attn
        return _pre_norm(heads, a, "q_proj", "k_proj", "v_proj", a.out_proj,
                         lambda t: block.fc2(block.activation_fn(block.fc1(t))), block.self_attn_layer_norm,
                         block.final_layer_norm)

    def embed(sample):
        h = torch.nn.functional.gelu(enc.conv1(sample["input_features"]))
        h = torch.nn.functional.gelu(enc.conv2(h))[0].T
        x = h + enc.embed_positions.weight[: h.shape[0]]
        return x, torch.ones(x.shape[0], 1)

    return Encoder(embed, [layer(b) for b in enc.layers], lambda x, s, p: enc.layer_norm(x))


def hf_bert_sentence(wrapper: torch.nn.Module) -> Encoder:
    """A post-norm BERT sentence encoder: sizes start from the attention mask (pads: size 0, no attention, no
    weight), the embedding is the size-weighted mean of the final tokens, normalised if the wrapper does."""
    bert = wrapper.model
    heads = bert.config.num_attention_heads

    def layer(block) -> Layer:
        s, out = block.attention.self, block.attention.output
        inter = block.intermediate

        def project(y):
            return s.query(y), s.key(y), s.value(y)

        return Layer(heads, project, out.dense,
                     lambda t: block.output.dense(inter.intermediate_act_fn(inter.dense(t))),
                     out.LayerNorm, block.output.LayerNorm, post_norm=True)

    def embed(sample):
        x = bert.embeddings(input_ids=sample["input_ids"])[0]
        return x, sample["attention_mask"][0][:, None].float()

    def head(x, size, prop_attn):
        pooled = size_weighted_mean(x, size)
        return torch.nn.functional.normalize(pooled, dim=-1) if getattr(wrapper, "normalize", True) else pooled

    return Encoder(embed, [layer(b) for b in bert.encoder.layer], head)


def hf_data2vec_vision(wrapper: torch.nn.Module) -> Encoder:
    """transformers Data2VecVisionModel (BEiT layout without relative positions: layer scale lambda_1/lambda_2),
    output chosen by the wrapper's pooling: the class token (``cls``) or the size-weighted mean of all tokens."""
    model = wrapper.model
    heads = model.config.num_attention_heads

    def layer(block) -> Layer:
        a = block.attention.attention
        scale1 = block.lambda_1 if block.lambda_1 is not None else 1.0
        scale2 = block.lambda_2 if block.lambda_2 is not None else 1.0
        return _pre_norm(heads, a, "query", "key", "value", lambda t: scale1 * block.attention.output.dense(t),
                         lambda t: scale2 * block.output.dense(block.intermediate.intermediate_act_fn(
                             block.intermediate.dense(t))), block.layernorm_before, block.layernorm_after)

    def embed(sample):
        x = model.embeddings(sample["pixel_values"])[0][0]
        return x, torch.ones(x.shape[0], 1)

    def head(x, size, prop_attn):
        x = model.layernorm(x)
        return x[0] if wrapper.pooling == "cls" else size_weighted_mean(x, size)

    return Encoder(embed, [layer(b) for b in model.encoder.layer], head)


def hf_distilbert_mean(wrapper: torch.nn.Module) -> Encoder:
    """transformers DistilBertModel from hf:DIR, mean pooled: post-norm layers, sizes from the attention mask."""
    model = wrapper.model
    heads = model.config.n_heads

    def layer(block) -> Layer:
        a, ffn = block.attention, block.ffn
        return Layer(heads, lambda y: (a.q_lin(y), a.k_lin(y), a.v_lin(y)), a.out_lin,
                     lambda t: ffn.lin2(ffn.activation(ffn.lin1(t))), block.sa_layer_norm, block.output_layer_norm,
                     post_norm=True)

    def embed(sample):
        x = model.embeddings(sample["input_ids"])[0]
        return x, sample["attention_mask"][0][:, None].float()

    assert wrapper.pooling == "mean"
    return Encoder(embed, [layer(b) for b in model.transformer.layer], lambda x, s, p: size_weighted_mean(x, s))


def hf_aimv2_vision(wrapper: torch.nn.Module) -> Encoder:
    """transformers Aimv2VisionModel (pooler output): RMS norms (in float32), SwiGLU MLPs, a learned position table
    added before the blocks, and an attention-pooling head whose one learned query attends over the sized tokens."""
    model = wrapper.model
    heads = model.config.num_attention_heads

    def layer(block) -> Layer:
        a, ffn = block.attention, block.ffn
        return _pre_norm(heads, a, "q_proj", "k_proj", "v_proj", a.out_proj,
                         lambda t: ffn.down_proj(torch.nn.functional.silu(ffn.gate_proj(t)) * ffn.up_proj(t)),
                         block.rms_norm1, block.rms_norm2)

    def embed(sample):
        emb = model.embeddings
        x = emb.rms_norm(emb.patch_embed(sample["pixel_values"]).flatten(2)[0].T)
        x = x + emb.position_embedding.weight[: x.shape[0]]
        return x, torch.ones(x.shape[0], 1)

    def head(x, size, prop_attn):
        pool = model.head
        x = model.rms_norm(x)
        q = _heads(pool.cls_token[0], heads)
        k, v = _heads(pool.k_proj(x), heads), _heads(pool.v_proj(x), heads)
        attended, _ = attend(q, k, v, size, prop_attn)
        return pool.output_proj(attended.mean(0))

    return Encoder(embed, [layer(b) for b in model.encoder.layers], head)
