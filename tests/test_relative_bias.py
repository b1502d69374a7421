"""Relative position biases (BEiT, timm relpos ViTs, Data2VecVision, T5's encoder) follow the tokens: found at every
attention, rewired to look the model's own bias up at the carried positions, and checked against the per-sample
forwards of tests/reference_relbias.py, which read the bias tables from the weights with the published formulas."""

import pytest
import torch

from tc_export.passes.graph import stable_toposort
from tc_export.passes.position_tables import find_position_tables
from tc_export.passes.relative_bias import RelativeBiasTable, relative_bias_at
from tc_export.passes.structure import find_structure
from tc_export.passes.trace import propagate_shapes, trace

from . import reference_relbias as rel
from .reference_encoders import Hooks

TINY = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0)  # features: O(1), not a
# head initialised near zero (BEiT scales its head by 0.001), which any atol would let through
TIMM = {
    "beit": ("beit_base_patch16_224", rel.timm_beit),
    "relpos": ("vit_relpos_base_patch16_224", rel.timm_relpos),
    "relpos-cls": ("vit_relpos_base_patch16_cls_224", rel.timm_relpos),
    "relpos-clsgap": ("vit_relpos_base_patch16_clsgap_224", rel.timm_relpos),
    "relpos-rpn": ("vit_relpos_base_patch16_rpn_224", rel.timm_relpos),
}


def timm_model(arch: str, **overrides) -> torch.nn.Module:
    """A tiny timm model whose bias tables are far from their zero initialisation (so a wrong lookup shows)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, **{**TINY, **overrides}).eval()
    for name, parameter in model.named_parameters():
        if "relative_position" in name:
            parameter.data.normal_()
        elif "rel_pos" in name:
            parameter.data.normal_(std=0.3)
        elif "gamma" in name:  # layer scale starts near 0 (relpos ViTs: 1e-6): the attention branch would not count
            parameter.data.fill_(1.0)
    return model


def data2vec_model(**overrides) -> torch.nn.Module:
    import transformers

    from tc_export.models.hf_auto import ImageEncoder

    torch.manual_seed(0)
    settings = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64,
                    use_relative_position_bias=True)
    config = transformers.Data2VecVisionConfig(**{**settings, **overrides})
    model = transformers.Data2VecVisionModel(config)
    for name, parameter in model.named_parameters():
        if "relative_position" in name:
            parameter.data.normal_()
    return ImageEncoder(model.eval(), "mean").eval()


def t5_encoder(tmp_path):
    """A tiny T5 encoder from a local directory (hf:DIR: mean pooled over the padding mask), its bias table drawn
    far from zero."""
    import transformers

    from tc_export.models import load_model

    torch.manual_seed(0)
    config = transformers.T5Config(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, vocab_size=500)
    model = transformers.T5EncoderModel(config)
    model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.data.normal_()
    model.save_pretrained(tmp_path)
    return load_model(f"hf:{tmp_path}", warn_random=False)


def identity_positions(x: torch.Tensor, prefix: int, grid: tuple[int, ...]) -> torch.Tensor:
    """The positions of the uncompressed tokens, as the carry starts them: -1 rows for the protected prefix."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij"), -1)
    rows = torch.cat([torch.full((prefix, len(grid)), -1.0), coords.reshape(-1, len(grid))])
    return rows.expand(x.shape[0], -1, -1)


def rewired(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.fx.GraphModule, int]:
    """``model`` with every relative bias looked up at the uncompressed tokens' positions; the number of tables."""
    gm = trace(model, inputs)
    propagate_shapes(gm, inputs)
    structure = find_structure(gm)
    tables = [t for t in find_position_tables(gm, structure) if isinstance(t, RelativeBiasTable)]
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    grid = structure.grid or (structure.sites[0].num_tokens() - structure.prefix,)
    with gm.graph.inserting_after(placeholder):
        positions = gm.graph.call_function(identity_positions, (placeholder, structure.prefix, grid))
    for table in tables:
        table.rewire(gm, positions, structure.prefix, 0)
    stable_toposort(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm, len(tables)


@pytest.mark.parametrize("name", [*TIMM, "data2vec"])
def test_bias_looked_up_at_the_uncompressed_positions_is_the_models_own(name):
    """At every attention a table is found, and reading it at the uncompressed positions changes nothing (to float
    rounding: the attention now runs written out): the index the rewired graph computes is the model's own."""
    model = data2vec_model() if name == "data2vec" else timm_model(TIMM[name][0])
    key = "pixel_values" if name == "data2vec" else "x"
    inputs = {key: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    gm, tables = rewired(model, inputs)
    assert tables == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)


def test_t5_bias_shared_by_every_layer_is_looked_up_per_layer(tmp_path):
    """T5 computes its bucketed bias once, inside the padding mask, and every layer reads it: each layer gets a
    table of its own (1-D positions), and the uncompressed lookup is the model's own bias."""
    loaded = t5_encoder(tmp_path)
    inputs = loaded.example_inputs(batch=2)
    gm, tables = rewired(loaded.module, inputs)
    assert tables == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs), loaded.module(**inputs), rtol=1e-5, atol=1e-6)


def test_padding_keeps_the_t5_bias_it_was_added_into(tmp_path):
    """The padding logic replaces T5's mask by the size bias and keeps the relative bias that was built into it
    (it used to clear both, silently exporting T5 without its bias)."""
    from tc_export.ops.attention import presence_bias
    from tc_export.passes.padding import find_initial_sizes
    from tc_export.passes.rewrite import add_attention_bias

    loaded = t5_encoder(tmp_path)
    inputs = loaded.example_inputs(batch=2)
    assert (inputs["attention_mask"] == 0).any()
    gm = trace(loaded.module, inputs)
    propagate_shapes(gm, inputs)
    sites = find_structure(gm).sites
    sizes = find_initial_sizes(gm, sites, inputs)
    for site in sites:
        with gm.graph.inserting_before(site.attention):
            add_attention_bias(site, gm.graph.call_function(presence_bias, (sizes,)))
    gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs), loaded.module(**inputs), rtol=1e-5, atol=1e-6)


def test_shared_bias_of_data2vec_gets_a_lookup_per_layer():
    """Data2VecVision's shared bias (computed once, read by every layer) is looked up at each layer's tokens."""
    model = data2vec_model(use_relative_position_bias=False, use_shared_relative_position_bias=True)
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64)}
    gm, tables = rewired(model, inputs)
    assert tables == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)


def test_uncompressed_positions_read_the_bias_exactly():
    tokens = 1 + 4 * 4
    bias = torch.randn(1, 2, tokens, tokens)
    positions = identity_positions(torch.zeros(3), 1, (4, 4))
    assert torch.equal(relative_bias_at(bias, positions, 1, 0, (4, 4)), bias.expand(3, -1, -1, -1))


def test_merged_tokens_read_the_bias_at_their_rounded_mean_position():
    """The documented rule, on a hand-made case: a token at (0.5, 1.4) reads row/column (1, 1) half up; the class
    row reads its own entries; positions that are not numbers (a size-0 merge) read a valid entry."""
    tokens, grid = 1 + 3 * 3, (3, 3)
    bias = torch.randn(2, tokens, tokens)
    positions = torch.tensor([[[-1.0, -1.0], [0.5, 1.4], [2.0, 0.0], [float("nan"), 0.0]]])
    got = relative_bias_at(bias, positions, 1, 0, grid)
    index = torch.tensor([0, 1 + 1 * 3 + 1, 1 + 2 * 3 + 0, 1 + 0 * 3 + 0])
    torch.testing.assert_close(got[0], bias[:, index][:, :, index], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_references_reproduce_the_uncompressed_models(name):
    """The yardstick: with no method the per-sample forwards equal the models (their bias formulas are right)."""
    arch, reference = TIMM[name]
    model = timm_model(arch)
    inputs = {"x": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))}
    want, _ = rel.run(reference(model), inputs, Hooks())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), want, rtol=1e-4, atol=2e-5)


def _compressed_and_reference(name: str, method: str, tmp_path):
    """(compressed output, reference output, token counts of both) of a family under the matrix's ``method``."""
    from tc_export import compress

    from .support_matrix import METHODS, reference_hooks

    if name == "t5":
        loaded = t5_encoder(tmp_path)
        model, inputs = loaded.module, loaded.example_inputs(batch=2)
        reference = rel.hf_t5_encoder(model)
    elif name == "data2vec":
        model, inputs = data2vec_model(num_hidden_layers=3), {"pixel_values": torch.randn(2, 3, 64, 64)}
        reference = rel.hf_data2vec_vision(model)
    else:
        arch, build = TIMM[name.removesuffix("-token")]
        model = timm_model(arch, depth=3, **({"global_pool": "token"} if name.endswith("-token") else {}))
        inputs = {"x": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
        reference = build(model)
    if method == "topk-first":  # Top-K after the first layer: the later layers all run on the kept tokens
        from tc_export.passes import TopKConfig

        from .reference import reference_topk

        compressed = compress(model, TopKConfig(keep=0.7, layers=(0,), fuse=True), inputs)
        hooks = Hooks(lambda i, x, s, k, p: reference_topk(x, s, p[:, 0].mean(0), 0.7, compressed.protected, True,
                                                           False) if i == 0 else (x, s), prop_attn=False)
    else:
        compressed = compress(model, METHODS[method](), inputs)
        hooks = reference_hooks(method, compressed.protected, len(reference.layers), padded="attention_mask" in inputs)
    want, counts = rel.run(reference, inputs, hooks, fused=method.startswith("topk"))
    assert counts == compressed.token_counts()
    assert compressed.report.rewired, "no position table was rewired: the bias did not meet compressed tokens"
    with torch.no_grad():
        return compressed(**inputs), want


CASES = [("beit", "tome"), ("beit", "adjacent"), ("beit-token", "topk-first"), ("relpos", "tome"),
         ("relpos-cls", "tome"), ("relpos-cls", "topk-first"), ("relpos-rpn", "tome"), ("data2vec", "tome"),
         ("t5", "tome")]


@pytest.mark.parametrize("name,method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_compressed_model_matches_the_reference_lookup(name, method, tmp_path):
    """ToMe (merged tokens at their rounded mean position) and Top-K (kept tokens at their exact positions; the
    class token by its own entries) against the per-sample forwards that read the tables from the weights."""
    got, want = _compressed_and_reference(name, method, tmp_path)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name,method", [("beit", "tome"), ("beit-token", "topk-first"), ("relpos", "tome"),
                                         ("data2vec", "tome"), ("t5", "tome")])
def test_mutation_bias_read_at_the_original_rows_is_caught(name, method, tmp_path, monkeypatch):
    """If the lookup ignored the carried positions (row i read as original token i, as a table that does not
    follow the tokens would), the reference comparison fails."""
    from tc_export.passes import relative_bias

    def not_carried(positions, prefix, suffix, layout, tokens):
        return torch.arange(positions.shape[1]).expand(positions.shape[0], -1)

    monkeypatch.setattr(relative_bias, "original_index", not_carried)
    got, want = _compressed_and_reference(name, method, tmp_path)
    assert not torch.allclose(got, want, rtol=1e-4, atol=2e-5)
