"""The token pass: one walk over the model's layers that puts every configured method at its insertion point.

Methods differ only in the op they put at a site (``Site``: tokens, protected prefix, channels, heads, grid,
padding) and the signals it needs. What they share lives here: the token state threaded from op to op (sizes, from
a padding mask when the model has one, and each token's position when a position table or --emit-positions needs
it: ``ops.state``), the protected trailing tokens no op sees, the attention bias the sizes imply at every later
site, the position tables rewired to the carried positions, the layer plan of a multi-stage recipe (one method per
place), the pooling that must follow the sizes, and the checks that the result still computes what the methods
claim.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import fx, nn

from ..errors import ConfigError, StructureNotFoundError
from ..ops.attention import presence_bias, proportional_bias, window_bias
from ..ops.base import TokenOp
from ..ops.projectors.windows import UnitWindows
from ..ops.state import (
    carried_mass,
    carried_windows,
    expand_units,
    grid_state,
    initial_state,
    initial_unit_state,
    join_columns,
    leading_tokens,
    positions_of,
    project_unit_state,
    raster_units,
    rejoin_suffix,
    size_column,
    split_columns,
    to_unit_order,
    unit_grid,
)
from ..ops.mrope import lm_positions
from ..ops.temporal import frame_mask
from ..ops.units import UnitOp
from .base import PassResult
from .graph import ancestors, copy_subgraph, descendants_of_all, stable_toposort, tensor_meta_shape
from .layers import layer_plan
from .opaque import check_marked_readers, check_opaque_token_mixers, marked_grid
from .outputs import append_outputs, block_output, cut_output, encoder_output, frames_to_sequence
from .padding import find_initial_sizes, repoint_pooling
from .pooling import follow_pooling
from .position_tables import PositionTable, find_position_tables
from .projectors import ProjectorConfig
from .positions import check_foreign_token_tensors
from .rewrite import add_attention_bias, full_width, insert_class_attention, insert_key_metric
from .shapes import WINDOW_FOLD
from .site import Point, Site
from .structure import AttentionSite, Structure, find_structure, reads_first_token


class TokenMethod(Protocol):
    """A method config: where it acts and the op it puts there."""

    method: ClassVar[str]
    needs_class_token: ClassVar[bool]
    prop_attn: bool
    protected: int | None
    protected_suffix: int | None
    layers: tuple[int, ...] | None

    def insertion_point(self) -> Point: ...

    def default_layers(self, num_layers: int) -> list[int]: ...

    def check(self, site: Site) -> None: ...

    def make_op(self, site: Site) -> nn.Module | None: ...


@dataclass
class PassReport:
    """What the token pass found and did, for the command line and ``CompressedModel``."""

    protected: int = 0
    protected_source: str = "found in the graph"
    suffix: int = 0
    suffix_source: str = "found in the graph"
    positions: int | None = None  # coordinates carried per token (None: positions not carried)
    rewired: list[str] = field(default_factory=list)  # position tables now computed from the carried positions
    emitted_after: int | None = None  # with --emit-positions: the model's own outputs, before positions and sizes
    emitted_grid: str = "the original patch grid"  # the grid whose coordinates the emitted positions are in
    axes: str | None = None  # the emitted coordinates' names when not the grid's own (Qwen-VL: t, h, w)
    skipped: list[str] = field(default_factory=list)
    grid: tuple[int, ...] | None = None
    extra_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> shape without batch
    output_is_tokens: bool = False
    notes: list[str] = field(default_factory=list)
    unit: int | None = None  # merge units of unit x unit patches (docs/merge-units.md)
    extra_outputs: list[str] = field(default_factory=list)  # outputs after the tokens (Qwen3-VL: deepstack_<layer>)

    def emitted_positions(self) -> dict[str, object] | None:
        """What --emit-positions added, for the ONNX metadata and a bundle's manifest (None: nothing)."""
        if self.emitted_after is None or self.positions is None:
            return None
        axes = self.axes or {1: "index", 2: "row, column", 3: "frame, row, column"}[self.positions]
        return {"outputs": {"positions": "(B, N, P) float32", "sizes": "(B, N, 1) float32"},
                "coordinates": f"{axes} in {self.emitted_grid}; protected tokens -1",
                "merged_tokens": "size-weighted mean of their members' positions (pruned tokens: exact)"}


class TokenPass:
    """Insert each method's op at its place; thread sizes and biases; keep pooling and positions honest."""

    name = "tokens"

    def __init__(self, configs: Sequence[TokenMethod], features: int | None = None, frames: int | None = None,
                 emit_positions: bool = False, unit: int | None = None) -> None:
        if not configs and features is None and not emit_positions and unit is None:
            raise ConfigError("no compression method given")
        self.configs = list(configs)
        self._merged_by = ""  # the first method whose op gave tokens a merged (fractional) position
        self.features, self.frames = features, frames
        self.emit_positions = emit_positions
        self.unit = resolve_unit(self.configs, unit)
        # attention windows of this many units a side (a windowed tower's own merger says so): the units run window
        # after window and every op keeps the same count in each window (docs/qwen-vl.md)
        self.unit_window: int | None = next((c.window_units for c in self.configs
                                             if getattr(c, "window_units", None)), None)
        self._windows = 1  # windows of units in the stream (set with the unit order)
        if self.unit_window is not None and self.unit is None:  # the windowed blocks need the units, compressed or not
            self.unit = next(c.window() for c in self.configs if getattr(c, "window_units", None))
        self._unit_live = self.unit is not None  # until a window projector turns each unit into one token
        # streams of earlier layers that leave through projectors of their own, one token per final unit (Qwen3-VL's
        # deepstack: layer -> a module on (B, U, s^2, C) windows); from their layer on carried in the state's columns
        self.taps: dict[int, nn.Module] = dict(next((c.deepstack for c in self.configs
                                                     if getattr(c, "deepstack", ())), ()))
        if self.taps and self.unit is None:  # the carried streams are laid out by unit, compressed or not
            self.unit = next(c.window() for c in self.configs if getattr(c, "deepstack", ()))
            self._unit_live = True
        self._carried: list[tuple[int, fx.Node, int]] = []  # (layer, its carried mass, its columns), layer order
        self._carried_outputs: list[fx.Node] = []  # each carried stream through its projector, in layer order
        self._token_states: set[fx.Node] = set()  # states with one row per token although units are on
        self._unit_prefix: int | None = None  # protected rows of the unit state once an op at the output drops them
        self.name = "+".join(config.method for config in self.configs) or "features"
        self.report = PassReport()
        self._pinned: set[fx.Node] = set()  # readers of the uncompressed stream that must keep reading it
        self._views: dict[tuple[object, fx.Node], fx.Node] = {}  # (view, state) -> its node: sizes or positions
        self._joined = False  # an op joined each clip's frames into one sequence (``joins_frames``)
        self._masks_frames = False  # ... and later attention must stay within each frame (``masks_frames``)

    @property
    def _frames_now(self) -> int | None:
        """Frames per clip still spread over the batch rows (None once an op joined them, or without a clip)."""
        return None if self._joined else self.frames

    def __call__(self, gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> PassResult:
        structure = find_structure(gm)
        sites, num_layers = structure.sites, len(structure.sites)
        self._check_sequences_per_sample(sites[0], example_inputs)
        plan = layer_plan(self.configs, num_layers)
        last_layer = self._last_layer(num_layers)
        at_output = [key for key, config in plan.items()
                     if key[1] == last_layer + 1 and key[0] != "encoder" and getattr(config, "acts_at_output", False)]
        if len(at_output) > 1:
            raise ConfigError(f"{' and '.join(plan[k].method for k in at_output)} both act on the tower output (layer "
                              f"{last_layer + 1} scoring the --features output): give one")
        for (point, layer), config in plan.items():
            if (point, layer) in at_output:
                continue  # scores the --features output with the next layer's q/k: a tower-output method
            if point != "encoder" and layer > last_layer:
                hint = (f"; {config.method} can score that output with the next layer: --layers {last_layer + 1}"
                        if getattr(config, "acts_at_output", False) else "")
                raise ConfigError(
                    f"{config.method}: layer {layer} comes after the --features layer {last_layer}, whose output "
                    f"the model now ends with{hint}"
                )
        self.report.skipped, self.report.grid = structure.skipped, structure.grid
        protected = self._protected(structure)
        suffix = self._suffix(structure, protected)
        total = sites[0].num_tokens()
        if self.unit is not None:
            self._to_units(gm, structure, total, protected, suffix)
        check_windows(structure, self._windows if self.unit_window is not None else None)
        # Found before any op goes in: the finders read the uncompressed graph.
        tables: dict[int, list[PositionTable]] = {}
        for table in find_position_tables(gm, structure):
            tables.setdefault(table.site, []).append(table)
        windows: list[PositionTable] = []  # sliding windows kept from padding masks (``padding.SlidingWindow``)
        initial = find_initial_sizes(gm, sites, example_inputs, windows)
        for window in windows:
            tables.setdefault(window.site, []).append(window)
        padded = initial is not None
        if padded and self.unit is not None:
            raise ConfigError(f"merge units (--unit {self.unit}) on a model with a padding mask are not supported: "
                              "units are windows of a patch grid, which padded sequences do not have")
        state = initial
        frame_coordinate = any(getattr(config, "needs_frame_coordinate", False) for config in self.configs)
        if frame_coordinate and not self.frames:
            raise ConfigError(f"{self.name} compares consecutive frames: give a clip with --frames T")
        if self.taps:
            self._check_taps(structure, protected, suffix, last_layer)
        if tables or self.emit_positions or frame_coordinate or self.taps:
            state = self._initial_state(gm, structure, initial, total, protected, suffix)
            for window in windows:
                window.dims = self.report.positions  # type: ignore[attr-defined]
        first = self._site(structure, sites[0], "attention", total, protected, padded, structure.grid, suffix)
        for config in self.configs:
            if config.needs_class_token and protected == 0:
                raise ConfigError(
                    f"{config.method} ranks tokens by class-token attention, and this model has no class token "
                    "(no learned token in front of the sequence); score by the attention each token receives "
                    "(--score received, score: received in a recipe, as HiPrune and QuietPrune do), or use tome or "
                    "adjacent"
                )
            if config.needs_class_token and self.report.protected_source != "given with --protected" \
                    and not reads_first_token(gm, structure):
                raise ConfigError(
                    f"{config.method} ranks tokens by class-token attention, and this model has no class token: its "
                    f"{protected} learned leading tokens are not read by the head (register tokens, pooling over "
                    "the patches); score by the attention each token receives (--score received; score: received in "
                    "a recipe), use tome or adjacent, or --protected N if token 0 is a class token"
                )
            config.check(self._method_site(config, first))

        graph = gm.graph
        # Found before any op goes in (an op takes over its anchor's uses, which these searches follow).
        end = self._output_node(gm, structure, last_layer)
        block_ends = {layer: block_output(gm, structure, layer) for point, layer in plan if point == "block"}
        taps = {layer: block_output(gm, structure, layer) for layer in self.taps}
        prop_attn = any(getattr(config, "prop_attn", False) for config in self.configs)
        bias_fn = proportional_bias if prop_attn else presence_bias
        tokens, grid = total, structure.grid
        ops: list[fx.Node] = []
        rewired: set[fx.Node] = set()
        for site in sites[: last_layer + 1]:
            config = plan.get(("block_input", site.index))
            if config is not None:
                refuse_windowed(site, config)
                op = self._make_op(config, self._site(structure, site, "block_input", tokens, protected, padded, grid,
                                                      suffix))
                if op is not None:
                    moved = (ops or self.unit is not None) and state is not None  # tokens no longer where the
                    incoming = self._view(graph, positions_of, state) if moved else None  # tables have them
                    state, call = self._insert_block_input_op(gm, site, op, state, suffix,
                                                              tables.get(site.index, []) if moved else [], incoming,
                                                              protected)
                    tokens, grid = self._after(op, tokens, grid, call, ops, config, site.index, suffix)
                    if hasattr(op, "joined_prefix"):  # every frame's protected rows now lead the clip's sequence
                        protected = op.joined_prefix()
                        if self.unit is not None:
                            self._unit_prefix = protected
            if (ops or self.unit is not None) and site.index in tables:  # compressed (or unit-ordered) tokens
                if state is None:
                    raise StructureNotFoundError(
                        f"{tables[site.index][0].kind} at attention layer {site.index}: the tokens come from a "
                        "projector inside the tower, which leaves no original positions to compute it from; place "
                        "the projector after the last layer that uses it"
                    )
                positions = self._view(graph, positions_of, state)
                for table in tables[site.index]:
                    if table.exact_positions_only and self._merged_by:
                        raise ConfigError(
                            f"{table.kind} at attention layer {site.index}: {table.why_exact}, so it follows pruned "
                            f"tokens (its rows gathered by their positions) but not tokens merged by "
                            f"{self._merged_by}; use topk (without --fuse) or compress only layers after it")
                    table.rewire(gm, positions, protected, suffix)
                    rewired |= set(table.nodes)
                    self.report.rewired.append(f"layer {site.index}: {table.kind}")
            if self._masks_frames:  # one sequence per clip now: attention stays within each frame
                with graph.inserting_before(site.attention if site.softmax is None else site.softmax):
                    mask = graph.call_function(frame_mask, (self._view(graph, positions_of, state),))
                add_attention_bias(site, mask)
            if state is not None and (padded or (prop_attn and ops)):  # all sizes are 1 before the first op
                size = self._view(graph, size_column, state)
                with graph.inserting_before(site.attention if site.softmax is None else site.softmax):
                    bias = graph.call_function(bias_fn, (size,))
                    if site.windows > 1:  # the keys' bias folded into the windows as the queries and keys are
                        bias = graph.call_function(window_bias, (bias, site.windows, _folded_heads(site)))
                add_attention_bias(site, bias)
            config = plan.get(("attention", site.index))
            if config is not None:
                refuse_windowed(site, config)
                op = self._make_op(config, self._site(structure, site, "attention", tokens, protected, padded, grid,
                                                      suffix))
                if op is not None:
                    state, call = self._insert_op(gm, site.stream, op, state, self._signals(graph, site, op),
                                                  site.index, suffix=suffix)
                    tokens, grid = self._after(op, tokens, grid, call, ops, config, site.index, suffix)
            if site.index in taps:  # the layer's output (before an op at its block end) joins the state's columns
                with graph.inserting_after(taps[site.index]):
                    mass = graph.call_function(carried_mass, (taps[site.index], state, self.unit))
                self._pinned.add(mass)
                self._carried.append((site.index, mass, _channels(taps[site.index]) * (self.unit or 1) ** 2))
            config = plan.get(("block", site.index))
            if config is not None:
                refuse_windowed(site, config)
                anchor = block_ends[site.index]
                op = self._make_op(config, self._site(structure, site, "block", tokens, protected, padded, grid,
                                                      suffix))
                if op is not None and not isinstance(op, TokenOp):
                    _check_keeps_stream(op, config, site.index, protected, _channels(anchor))
                if op is not None:
                    state, call = self._insert_op(gm, anchor, op, state, self._signals(graph, site, op), site.index,
                                                  suffix=suffix)
                    tokens, grid = self._after(op, tokens, grid, call, ops, config, site.index, suffix)

        channels = _channels(end)  # a tower-output op keeps the width
        if at_output:  # the op's tokens are the output; the layer scoring them is cut, but for its norm and q/k
            config, site = plan[at_output[0]], sites[last_layer + 1]
            if site.block_input is not end:
                raise StructureNotFoundError(
                    f"layer {site.index}'s input is not the --features layer {last_layer}'s output, so "
                    f"{config.method} cannot score that output with layer {site.index}'s queries and keys"
                )
            op = self._make_op(config, self._site(structure, site, "block_input", tokens, protected, padded, grid,
                                                  suffix, at_output=True))
            state, call = self._insert_block_input_op(gm, site, op, state, suffix)
            tokens, grid = self._after(op, tokens, grid, call, ops, config, site.index, suffix,
                                       f"the tower output (scored by layer {site.index})")
            end = self._tokens_after(call)
            protected = op.prefix_out() if hasattr(op, "prefix_out") else protected
            self._unit_prefix = protected  # the unit state's protected rows from here on
        if state is not None and (padded or (prop_attn and ops)):
            size = self._view(graph, size_column, state)
            self._bias_other_attention(gm, structure, ops, size, total, protected, bias_fn)
        encoder_stages = [plan[key] for key in sorted(key for key in plan if key[0] == "encoder")]
        if encoder_stages and self.features is None and getattr(encoder_stages[0], "reads_model_output", False):
            marked = self._marked_output(gm)
            if marked is not None:  # the tower's own projector ends the model: the method reads its tokens
                end, grid = marked
                tokens, protected, channels, state = math.prod(grid), 0, _channels(end), None
        for config in encoder_stages:  # in recipe order: e.g. pool, then mlp
            site = Site("encoder", None, num_layers, tokens - suffix, protected, channels, None, grid, padded,
                        unit=self.unit if self._unit_live else None, patch_grid=structure.grid,
                        frames=self._frames_now)
            op = self._make_op(config, site)
            if op is None:
                continue
            before = state
            # The chain only feeds the new output: whatever else read ``end`` (the rest of a tower cut at
            # --features) keeps reading the tokens it read, and is dead code once the output moves.
            state, call = self._insert_op(gm, end, op, state, self._signals(graph, None, op), None,
                                          take_uses=False, suffix=suffix)
            tokens, grid = self._after(op, tokens, grid, call, ops, config, None, suffix)
            protected = op.prefix_out() if hasattr(op, "prefix_out") else protected
            suffix = suffix if isinstance(op, TokenOp) or keeps_prefix(op) else 0
            channels = op.channels_out() if hasattr(op, "channels_out") else channels
            end = call if not isinstance(op, TokenOp) else self._tokens_after(call)
            if not isinstance(op, TokenOp) and self._unit_live:  # a projector: one token per unit from here on
                self._unit_live = False
                if self.unit_window is not None and (before is None or not isinstance(op, UnitWindows)):
                    raise StructureNotFoundError(f"{config.method} after attention windows: no unit state to put "
                                                 "its output back in raster order")
                if isinstance(op, UnitWindows) and before is not None:
                    with graph.inserting_after(call):
                        state = graph.call_function(project_unit_state, (before, op.projector.prefix,
                                                                         bool(op.prefix_out()), op.unit,
                                                                         op.transposed))
                    self._project_taps(gm, call, before)
                    if self.unit_window is not None:  # back to raster order: the tower's reverse window order
                        with graph.inserting_after(state):
                            both = graph.call_function(raster_units, (call, state))
                        with graph.inserting_after(both):
                            end = graph.call_function(operator.getitem, (both, 0))
                        with graph.inserting_after(end):
                            state = graph.call_function(operator.getitem, (both, 1))
                    self._token_states.add(state)
        if self._masks_frames and self.features is None and not encoder_stages:
            raise ConfigError(f"{self.name} joins each clip's frames into one sequence, which the model's own head "
                              "or pooling (per frame) cannot read: end the model at tokens (--features N or a recipe "
                              "whose last stage is at the encoder output)")
        if self.features is not None or encoder_stages:
            deep = [node for node in self._carried_outputs if isinstance(node, fx.Node)]
            keep = {state} if self.emit_positions and state is not None else set()
            cut_output(gm, end, self._frames_now, frozenset(keep | set(deep)))
            self.report.output_is_tokens = True
            if deep:  # each carried stream through its own projector: outputs after the tokens
                append_outputs(gm, deep)
        if ops or self.emit_positions:
            output = next(n for n in graph.nodes if n.op == "output")
            readers = ancestors(output)
            if ops:  # a marked module before every op reads uncompressed tokens (EVS after Qwen2-VL's merger)
                below = descendants_of_all(ops)
                readers &= below | {arg for node in below for arg in node.all_input_nodes if arg.op == "get_attr"}
            check_marked_readers(gm, readers, compressed=bool(ops))
        if self.emit_positions:
            self._emit_positions(gm, state, end, encoder_stages, ops, protected)

        if state is not None and getattr(state, "_erased", False):
            state = None  # a projector's output state that the cut dropped (nothing reads it without --emit-positions)
        size = self._view(graph, size_column, state) if (ops or padded) and state is not None else None
        if padded and size is not initial:
            repoint_pooling(gm, initial, size)
        stable_toposort(graph)
        if ops:
            below = descendants_of_all(ops)
            check_foreign_token_tensors(gm, below, structure, total, allowed=rewired)
            check_opaque_token_mixers(gm, below)
            if size is not None and not self.report.output_is_tokens:
                follow_pooling(gm, ops[-1], size, protected, initial, total, suffix)
        if self.report.extra_inputs:
            self.add_to_input_spec(gm, list(self.report.extra_inputs))
        batch = next(iter(example_inputs.values())).shape[0]
        new_inputs = {name: seeded_input(batch, shape) for name, shape in self.report.extra_inputs.items()}
        changed = bool(ops) or self.report.output_is_tokens or self.emit_positions
        return PassResult(gm, changed, self.report.notes, new_inputs)

    def _emit_positions(self, gm: fx.GraphModule, state: fx.Node | None, end: fx.Node, stages: list[TokenMethod],
                        ops: list[fx.Node], protected: int) -> None:
        """Add two model outputs: the position (B, N, P) and size (B, N, 1) of each token leaving the last op (or
        the tower). A projector that builds a new grid (pool, unshuffle, patchmerger) gives its output grid's
        coordinates, with the number of patches each output token covers as its size."""
        graph = gm.graph
        projector = ops[-1] if ops and stages and not isinstance(gm.get_submodule(str(ops[-1].target)), TokenOp) \
            else None
        last = gm.get_submodule(str(projector.target)) if projector is not None else None
        in_lm = getattr(getattr(last, "projector", last), "lm_positions", False)  # a Qwen-VL tower's own merger
        if projector is not None and isinstance(gm.get_submodule(str(projector.target)), UnitWindows):
            module = gm.get_submodule(str(projector.target))
            if module.raster:  # uncompressed: the projector's own output grid, as without units
                state = self._grid_state(gm, module, end)
            else:
                grid = unit_grid(self.report.grid, module.unit)
                self.report.emitted_grid = (f"{type(module.projector).__name__}'s output grid "
                                            f"{'x'.join(map(str, grid[::-1] if module.transposed else grid))} (each "
                                            "token at its merge unit's position)")
            projector = None
        if projector is not None:
            module = gm.get_submodule(str(projector.target))
            grid = module.output_grid()
            if grid is None:
                raise ConfigError(
                    f"--emit-positions: {type(module).__name__} outputs {module.tokens_out()} tokens that are not on "
                    "a grid, so they have no positions; drop --emit-positions or use a grid projector (pool, "
                    "unshuffle, patchmerger)"
                )
            covered = math.prod(module.grid) / math.prod(grid)
            with graph.inserting_after(end):
                state = graph.call_function(grid_state, (end, module.prefix_out(), grid, covered, self._frames_now))
            self.report.positions = (len(grid) if len(grid) >= 2 else 1) + (1 if self._frames_now else 0)
            self.report.emitted_grid = f"{type(module).__name__}'s output grid {'x'.join(map(str, grid))}"
        positions = self._view(graph, positions_of, state)
        sizes = self._view(graph, size_column, state)
        output = next(n for n in graph.nodes if n.op == "output")
        if in_lm:  # get_rope_index's (t, h, w) relative to the image start (ops/mrope.py)
            with graph.inserting_before(output):
                positions = graph.call_function(lm_positions, (positions, 1))
            self.report.positions, self.report.axes = 3, "t, h, w (get_rope_index's, relative to the image start)"
        if self._frames_now:
            with graph.inserting_before(output):
                positions = graph.call_function(frames_to_sequence, (positions, self.frames))
                sizes = graph.call_function(frames_to_sequence, (sizes, self.frames))
        self.report.emitted_after = append_outputs(gm, [positions, sizes])

    def _grid_state(self, gm: fx.GraphModule, module: UnitWindows, end: fx.Node) -> fx.Node:
        """The state of an uncompressed window projector's output: its output grid's coordinates."""
        grid = module.output_grid()
        assert grid is not None
        with gm.graph.inserting_after(end):
            state = gm.graph.call_function(grid_state, (end, module.prefix_out(), grid, float(module.unit ** 2),
                                                        self.frames))
        self._token_states.add(state)
        self.report.emitted_grid = f"{type(module.projector).__name__}'s output grid {'x'.join(map(str, grid))}"
        return state

    def _to_units(self, gm: fx.GraphModule, structure: Structure, tokens: int, protected: int, suffix: int) -> None:
        """Put the patch tokens in unit-window order where the stream enters the first block (one constant
        Gather), so that every later layer, op and projector finds each unit's tokens consecutive."""
        assert self.unit is not None
        grid = unit_grid(structure.grid, self.unit)
        patches = tokens - protected - suffix
        if math.prod(structure.grid or ()) != patches:
            raise StructureNotFoundError(
                f"--unit {self.unit}: the model has {patches} tokens besides its {protected + suffix} protected ones, "
                f"not the {'x'.join(map(str, structure.grid or ()))} patch grid, so they cannot be grouped into units"
            )
        first = structure.sites[0]
        if first.block_input is None:
            raise StructureNotFoundError(f"--unit {self.unit}: no block input found for attention {first.name}, "
                                         "where the tokens would be put in unit order")
        source = first.block_input
        with gm.graph.inserting_after(source):
            window = () if self.unit_window is None else (self.unit_window,)
            ordered = gm.graph.call_function(to_unit_order, (source, protected, structure.grid, self.unit, *window))
        source.replace_all_uses_with(ordered, delete_user_cb=lambda user: user is not ordered)
        for site in structure.sites:
            if site.block_input is source:
                site.block_input = ordered
            if site.stream is source:
                site.stream = ordered
        self.report.unit = self.unit
        if self.unit_window is not None:
            self._windows = (grid[0] // self.unit_window) * (grid[1] // self.unit_window)
            self.report.notes.append(f"attention windows of {self.unit_window}x{self.unit_window} units: the units "
                                     f"window after window, {self._windows} windows")
        self.report.notes.append(f"merge units of {self.unit}x{self.unit} patches: the {structure.grid[0]}x"
                                 f"{structure.grid[1]} grid in unit order, {grid[0]}x{grid[1]} units")

    def _check_taps(self, structure: Structure, protected: int, suffix: int, last_layer: int) -> None:
        """Carried streams (Qwen3-VL's deepstack) are built for a unit stream of patches alone, without attention
        windows, whose layers all run (the adapter's own settings; anything else is a one-line error)."""
        layers = ", ".join(map(str, self.taps))
        if self.unit is None or protected or suffix or self.unit_window is not None or self.features is not None:
            raise ConfigError(f"outputs of layers {layers} through their own projectors (deepstack) follow the "
                              "compression only on merge units of patches alone, without attention windows or "
                              "--features")
        if max(self.taps) > last_layer or min(self.taps) < 0:
            raise ConfigError(f"deepstack layers {layers} are not among the model's layers 0-{last_layer}")

    def _project_taps(self, gm: fx.GraphModule, call: fx.Node, before: fx.Node) -> None:
        """Each carried stream back as windows of the final units (mass / size of the state entering the window
        projector ``call``) through its own projector: one token per unit, in the order of ``call``'s output."""
        graph = gm.graph
        assert self.unit is not None
        anchor = call
        for layer, mass, _ in self._carried:
            module_name = _unique_name(gm, "deepstack", layer)
            gm.add_submodule(module_name, self.taps[layer])
            with graph.inserting_after(anchor):
                windows = graph.call_function(carried_windows, (mass, before, self.unit))
            with graph.inserting_after(windows):
                anchor = graph.call_module(module_name, (windows,))
            self._carried_outputs.append(anchor)
            self.report.extra_outputs.append(f"deepstack_{layer}")
        missing = sorted(set(self.taps) - {layer for layer, _, _ in self._carried})
        if missing:
            raise StructureNotFoundError(f"deepstack layers {missing}: their streams were not found in the walk")

    def _method_site(self, config: TokenMethod, site: Site) -> Site:
        """The site a token method is shown: with merge units on, the unit view (one row of s^2 * C channels per
        unit, the protected prefix cut off, no grid); otherwise ``site``."""
        if not self._unit_live or isinstance(config, ProjectorConfig) or getattr(config, "handles_units", False):
            return site
        unit = self.unit
        assert unit is not None
        units = (site.tokens - site.protected) // (unit * unit) // self._windows  # per window: the same in each
        return dataclasses.replace(site, tokens=units, protected=0, channels=site.channels * unit * unit, grid=None,
                                   unit=unit)

    def _make_op(self, config: TokenMethod, site: Site) -> nn.Module | None:
        """``config``'s op at ``site``; with merge units on, a token method's op acting on whole units."""
        if isinstance(config, ProjectorConfig) and site.point == "block" and self._unit_live:
            raise ConfigError(f"{config.method} at block {site.layer}: with merge units (--unit {self.unit}) a "
                              "projector acts at the encoder output, where each unit becomes one token; leave out "
                              "at, or drop the unit")
        if self._windows > 1 and not isinstance(config, ProjectorConfig) and config.method not in WINDOWED_METHODS:
            raise ConfigError(f"{config.method} within attention windows ({self._windows} windows of "
                              f"{self.unit_window}x{self.unit_window} units) is not built: {', '.join(WINDOWED_METHODS)} "
                              "are, each window as a sample of its own (at a full-attention layer)")
        if self._carried and not isinstance(config, ProjectorConfig) and (
                config.method not in CARRYING_METHODS or getattr(config, "fuse", False)):
            layers = ", ".join(str(layer) for layer, _, _ in self._carried)
            raise ConfigError(f"{config.method}{' with fuse' if getattr(config, 'fuse', False) else ''} at layer "
                              f"{site.layer}, after the deepstack layer {layers}: its extra or fused unit (or the "
                              "neighbours it adds into each kept unit) has no deepstack counterpart (those outputs are "
                              "that layer's tokens of the same units); act at or before that layer, or use topk or "
                              "tome after it")
        op = config.make_op(self._method_site(config, site))
        if op is None or not isinstance(op, TokenOp) or not self._unit_live or getattr(config, "handles_units", False):
            return op  # (an op that acts on units itself: temporal pruning, which joins the frames)
        assert self.unit is not None
        return UnitOp(op, site.protected, self.unit, getattr(config, "unit_metric", "mean"),
                      getattr(config, "unit_score", "mean"),
                      drop_prefix=site.at_output and bool(getattr(op, "drop_prefix", False)), windows=self._windows)

    def _initial_state(self, gm: fx.GraphModule, structure: Structure, initial: fx.Node | None, tokens: int,
                       protected: int, suffix: int) -> fx.Node:
        """The token state with positions (``ops.state``), built where the stream enters the first block."""
        first = structure.sites[0]
        source = first.block_input or first.stream
        if self.unit is not None:  # one row per unit, on the unit grid
            grid = unit_grid(structure.grid, self.unit)
            with gm.graph.inserting_after(source):
                window = () if self.unit_window is None else (self.unit_window,)
                state = gm.graph.call_function(initial_unit_state, (source, protected, suffix, grid, self.frames,
                                                                    *window))
            self._pinned.add(state)
            self.report.positions = 2 + (1 if self.frames else 0)
            return state
        grid = structure.grid if structure.grid is not None and math.prod(structure.grid) == tokens - protected - suffix \
            else None
        with gm.graph.inserting_after(source):
            state = gm.graph.call_function(initial_state, (source, initial, protected, suffix, grid, self.frames))
        self._pinned.add(state)
        self.report.positions = (len(grid) if grid is not None and len(grid) >= 2 else 1) + (1 if self.frames else 0)
        return state

    def _view(self, graph: fx.Graph, view: object, state: fx.Node | None) -> fx.Node | None:
        """``view(state)`` (the sizes or the positions of a state with positions), one node per state; without
        positions the state is the sizes."""
        if state is None or (self.report.positions is None and view is positions_of):
            return None
        units = self.unit is not None and state not in self._token_states
        if self.report.positions is None and not units:
            return state
        key = (view, state)
        if key not in self._views:
            node = state
            with graph.inserting_after(state):
                if units:  # one row per unit: expanded to the tokens (``ops.state.expand_units``)
                    prefix = self.report.protected if self._unit_prefix is None else self._unit_prefix
                    node = graph.call_function(expand_units, (state, prefix, self.report.suffix, self.unit,
                                                              self.frames is not None))
            if self.report.positions is not None:
                with graph.inserting_after(node):
                    node = graph.call_function(view, (node,))
            self._views[key] = node
        return self._views[key]

    @staticmethod
    def _bias_other_attention(gm: fx.GraphModule, structure: Structure, ops: list[fx.Node], size: fx.Node,
                              tokens: int, protected: int, bias_fn: object) -> None:
        """Attention left uncompressed (a pooling head) whose keys are the compressed tokens gets their size bias
        too: proportional attention (or padding) applies wherever merged tokens are attended to. Keys that are the
        tokens after the protected prefix (a head that pools ``x[:, prefix:]``; the pooling checks refuse any other
        slice) get the sizes of those tokens; keys of any other count are refused."""
        below = descendants_of_all(ops)
        for other in structure.others:
            key_tokens = (tensor_meta_shape(other.key) or (0, 0))[-2 if other.kind == "sdpa" else -1]
            query_tokens = (tensor_meta_shape(other.query) or (0, 0))[-2]
            if other.attention not in below or key_tokens == query_tokens:
                continue
            if key_tokens not in (tokens, tokens - protected):
                raise StructureNotFoundError(
                    f"attention {other.attention.name} is left uncompressed and attends over {key_tokens} keys "
                    f"where the stream has {tokens} tokens ({protected} protected): the size bias of merged tokens "
                    "(proportional attention, padding) cannot be placed on its keys, and without it the merged "
                    "tokens would count as one token each"
                )
            with gm.graph.inserting_before(other.attention if other.softmax is None else other.softmax):
                sizes = size
                if key_tokens != tokens:
                    sizes = gm.graph.call_function(operator.getitem, (size, (slice(None), slice(protected, None))))
                bias = gm.graph.call_function(bias_fn, (sizes,))
            add_attention_bias(other, bias)

    @staticmethod
    def _marked_output(gm: fx.GraphModule) -> tuple[fx.Node, tuple[int, int]] | None:
        """The model's output tokens (B*T, H'W', D) and their grid, when a module an adapter marked with its grid
        (``TOKEN_GRID_ATTRIBUTE``: a tower's own projector) computes them, through at most a reshape back to clips."""
        output = next(n for n in gm.graph.nodes if n.op == "output")
        node = output.args[0]
        node = node[0] if isinstance(node, (tuple, list)) and len(node) == 1 else node
        chain: list[fx.Node] = []  # from the output up: reshapes of the projector's tokens
        for _ in range(4):
            if not isinstance(node, fx.Node):
                return None
            chain.append(node)
            grid = marked_grid(gm, node)
            if grid is not None:  # the first of its reshapes (nearest the projector) laid out (B*T, H'W', D)
                for candidate in reversed(chain):
                    shape = tensor_meta_shape(candidate)
                    if shape is not None and len(shape) == 3 and shape[1] == math.prod(grid):
                        return candidate, grid
                return None
            tensors = [arg for arg in node.args if isinstance(arg, fx.Node) and tensor_meta_shape(arg) is not None]
            if node.op not in ("call_function", "call_method") or len(tensors) != 1:  # sizes read from shapes: not
                return None  # tensors
            node = tensors[0]
        return None

    def _check_sequences_per_sample(self, site: AttentionSite, example_inputs: Mapping[str, torch.Tensor]) -> None:
        """One token sequence per sample (per frame with --frames). A model that folds another axis into the batch
        (MobileViT's unfold into pixel positions within a patch) attends over many short sequences and folds them
        back into a feature map afterwards, which needs every original token: refused, naming that."""
        batch = next(iter(example_inputs.values())).shape[0]
        expected = batch * (self.frames or 1)
        sequences = (tensor_meta_shape(site.stream) or (expected,))[0]
        if sequences != expected:
            raise StructureNotFoundError(
                f"attention {site.name} runs over {sequences} sequences for a batch of {batch}: the model folds "
                "another axis into the batch (as MobileViT unfolds a feature map into pixel positions within its "
                "patches) and folds the sequences back into a map afterwards, which needs every original token; "
                "token compression would change that layout, so this model is not supported"
            )

    def _last_layer(self, num_layers: int) -> int:
        if self.features is None:
            return num_layers - 1
        layer = self.features if self.features >= 0 else num_layers + self.features
        if not 0 <= layer < num_layers:
            raise ConfigError(
                f"--features {self.features} is out of range: the model has {num_layers} layers "
                f"(0-{num_layers - 1}, or -1 to -{num_layers} from the end)"
            )
        return layer

    def _protected(self, structure: Structure) -> int:
        given = {config.protected for config in self.configs if config.protected is not None}
        if len(given) > 1:
            raise ConfigError(f"the stages give different protected counts {sorted(given)}: give one")
        if given:
            protected = given.pop()
            tokens = structure.sites[0].num_tokens()
            if protected >= tokens:
                raise ConfigError(f"--protected {protected} is not below the model's {tokens} tokens")
            self.report.protected, self.report.protected_source = protected, "given with --protected"
        else:
            protected = structure.prefix
            self.report.protected = protected
        return protected

    def _suffix(self, structure: Structure, protected: int) -> int:
        """Protected tokens at the end (detection tokens): given with --protected-suffix, else found in the graph."""
        given = {config.protected_suffix for config in self.configs
                 if getattr(config, "protected_suffix", None) is not None}
        if len(given) > 1:
            raise ConfigError(f"the stages give different protected suffix counts {sorted(given)}: give one")
        if given:
            suffix = given.pop()
            tokens = structure.sites[0].num_tokens()
            if protected + suffix >= tokens:
                raise ConfigError(f"--protected {protected} and --protected-suffix {suffix} leave none of the "
                                  f"model's {tokens} tokens to compress")
            self.report.suffix, self.report.suffix_source = suffix, "given with --protected-suffix"
            return suffix
        self.report.suffix = structure.suffix
        return structure.suffix

    def _site(self, structure: Structure, site: AttentionSite, point: Point, tokens: int, protected: int,
              padded: bool, grid: tuple[int, ...] | None, suffix: int = 0, at_output: bool = False) -> Site:
        """The place as an op sees it: ``tokens`` less the protected suffix, which no op is shown."""
        layout = tensor_meta_shape(site.query) or ()
        heads = layout[1] if len(layout) == 4 else None
        channels = _channels(site.stream)
        return Site(point, site.index, len(structure.sites), tokens - suffix, protected, channels, heads, grid, padded,
                    at_output, unit=self.unit if self._unit_live else None, patch_grid=structure.grid,
                    frames=self._frames_now)

    def _after(self, op: nn.Module, tokens: int, grid: tuple[int, ...] | None, call: fx.Node, ops: list[fx.Node],
               config: TokenMethod, layer: int | None, suffix: int = 0,
               where: str | None = None) -> tuple[int, tuple[int, ...] | None]:
        ops.append(call)
        if not getattr(config, "only_drops_tokens", False):
            self._merged_by = self._merged_by or config.method  # positions may now be fractional (merged)
        if getattr(op, "joins_frames", False):
            self._joined = True
            self._masks_frames = bool(getattr(op, "masks_frames", False))
        if getattr(op, "emits_positions", False):
            self.report.positions = 3  # its state: (t, h, w) of each kept token
            self.report.emitted_grid = f"{type(op).__name__}'s (t, h, w) of the kept tokens"
        new_tokens = op.tokens_out(tokens - suffix) + suffix if isinstance(op, TokenOp) \
            else op.tokens_out() + (suffix if keeps_prefix(op) else 0)
        where = where or ("the encoder output" if layer is None else f"layer {layer}")
        self.report.notes.append(f"{where}: {config.method} {tokens} -> {new_tokens} tokens")
        new_grid = op.output_grid() if hasattr(op, "output_grid") else None
        return new_tokens, new_grid

    def _signals(self, graph: fx.Graph, site: AttentionSite | None, op: nn.Module) -> list[fx.Node]:
        signals = []
        for signal in getattr(op, "signals", ()):
            if signal == "metric" and site is not None:
                signals.append(insert_key_metric(graph, site))
            elif signal in ("class_attention", "received_attention") and site is not None:
                signals.append(insert_class_attention(graph, site, received=signal == "received_attention"))
            elif signal in self._inputs(op):
                signals.append(self._model_input(graph, signal, self._inputs(op)[signal]))
            else:
                raise ConfigError(f"{type(op).__name__} needs {signal!r}, which {'the encoder output' if site is None else 'this place'} does not provide")
        return signals

    @staticmethod
    def _inputs(op: nn.Module) -> dict[str, tuple[int, ...]]:
        """Inputs an op takes from outside the model (name -> shape without batch), e.g. text queries."""
        return dict(getattr(op, "input_shapes", {}))

    def _model_input(self, graph: fx.Graph, name: str, shape: tuple[int, ...]) -> fx.Node:
        """A new model input (e.g. LLaMA-VID's text queries), added after the existing ones."""
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for node in placeholders:
            if node.target == name:
                return node
        required = [n for n in placeholders if not n.args]  # placeholders with defaults must stay last
        with graph.inserting_after(required[-1]) if required else graph.inserting_before(placeholders[0]):
            node = graph.placeholder(name)
        self.report.extra_inputs[name] = shape
        return node

    @staticmethod
    def add_to_input_spec(gm: fx.GraphModule, names: list[str]) -> None:
        """A torch.export module checks and flattens its keyword inputs by a pytree spec: extend it with ``names``
        (after the existing ones, in placeholder order)."""
        from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
        from torch.utils import _pytree

        codegen = gm.graph._codegen
        spec = getattr(gm, "_in_spec", None)
        if not isinstance(codegen, _PyTreeCodeGen) or spec is None:
            return
        args, kwargs = _pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        kwargs = {**kwargs, **{name: None for name in names}}
        new_spec = _pytree.tree_structure((args, {k: 0 for k in kwargs}))
        info = codegen.pytree_info
        gm.graph._codegen = _PyTreeCodeGen(_PyTreeInfo([*info.orig_args, *names], new_spec, info.out_spec))
        gm._in_spec = new_spec

    def _insert_op(self, gm: fx.GraphModule, anchor: fx.Node, op: nn.Module, state: fx.Node | None,
                   signals: list[fx.Node], layer: int | None, take_uses: bool = True,
                   suffix: int = 0) -> tuple[fx.Node | None, fx.Node]:
        """Call ``op`` on ``anchor``; later users see its tokens (``take_uses``). Returns the token state after it
        and the call."""
        graph = gm.graph
        module_name = _unique_name(gm, type(op).__name__.lower(), layer)
        if not isinstance(op, TokenOp):  # a projector: tokens in, tokens out; sizes start afresh after it
            if suffix and layer is not None:
                raise ConfigError(
                    f"{type(op).__name__} reads the token grid, and the model has {suffix} protected tokens after "
                    f"it that later layers read; put the projector at the encoder output (--at encoder)"
                )
            gm.add_submodule(module_name, op)
            source = anchor
            if suffix:  # at the output: the trailing protected tokens go as the prefix goes (its prefix_mode)
                with graph.inserting_after(anchor):
                    source = graph.call_function(leading_tokens, (anchor, suffix))
            with graph.inserting_after(source):
                call = graph.call_module(module_name, (source, *signals))
            if suffix and keeps_prefix(op):
                with graph.inserting_after(call):
                    call = graph.call_function(rejoin_suffix, (call, anchor, suffix))
            if take_uses:
                own = {call, source, *call.all_input_nodes}
                anchor.replace_all_uses_with(call, delete_user_cb=lambda user: user not in own
                                             and user not in self._pinned)
            return None, call
        return self._call_token_op(gm, module_name, op, anchor, state, signals, suffix, set(), take_uses)

    def _call_token_op(self, gm: fx.GraphModule, module_name: str, op: TokenOp, anchor: fx.Node,
                       state: fx.Node | None, signals: list[fx.Node], suffix: int, keep: set[fx.Node],
                       take_uses: bool = True) -> tuple[fx.Node | None, fx.Node]:
        """Call the token op ``op`` on ``anchor`` (its tokens before the protected suffix, which rejoins after it)
        and give its tokens to the later users of ``anchor`` (all but ``keep``). Returns (state, call)."""
        graph = gm.graph
        gm.add_submodule(module_name, op)
        with graph.inserting_after(anchor):
            call = graph.call_module(module_name, (anchor, state, *signals))
        own = {call}
        carried = [mass for _, mass, _ in self._carried] if state is not None else []
        if carried:  # carried streams: more state columns, mapped by the op as it maps the size
            with graph.inserting_before(call):
                joined = graph.call_function(join_columns, (state, *carried))
            call.args = (anchor, joined, *signals)
        if suffix:  # the op sees the tokens in front of the protected suffix
            with graph.inserting_before(call):
                body = [None if arg is None else graph.call_function(leading_tokens, (arg, suffix))
                        for arg in (anchor, state, *signals)]
            call.args = tuple(body)
            own |= {node for node in body if node is not None}
        with graph.inserting_after(call):
            tokens = graph.call_function(operator.getitem, (call, 0))
        new_state = None
        if state is not None or op.creates_size:
            with graph.inserting_after(tokens):
                new_state = graph.call_function(operator.getitem, (call, 1))
        if carried:
            widths = (1 + (self.report.positions or 0), *(width for _, _, width in self._carried))
            with graph.inserting_after(new_state):
                parts = graph.call_function(split_columns, (new_state, widths))
            with graph.inserting_after(parts):
                new_state = graph.call_function(operator.getitem, (parts, 0))
            for index, (layer, _, width) in enumerate(self._carried):
                with graph.inserting_after(new_state):
                    mass = graph.call_function(operator.getitem, (parts, index + 1))
                self._carried[index] = (layer, mass, width)
        if suffix:
            with graph.inserting_after(tokens):
                tokens = graph.call_function(rejoin_suffix, (tokens, anchor, suffix))
            own.add(tokens)
            if new_state is not None:
                with graph.inserting_after(new_state):
                    new_state = graph.call_function(rejoin_suffix, (new_state, state, suffix))
        if take_uses:
            skip = own | keep | self._pinned
            anchor.replace_all_uses_with(tokens, delete_user_cb=lambda user: user not in skip)
        return new_state, call

    @staticmethod
    def _tokens_after(call: fx.Node) -> fx.Node:
        """The tokens a token op's call hands on (after the rejoined suffix, when there is one)."""
        tokens = next(u for u in call.users if u.args[1] == 0)
        rejoined = [u for u in tokens.users if u.target is rejoin_suffix]
        return rejoined[0] if rejoined else tokens

    def _insert_block_input_op(self, gm: fx.GraphModule, site: AttentionSite, op: TokenOp,
                               state: fx.Node | None, suffix: int = 0, tables: Sequence[PositionTable] = (),
                               positions: fx.Node | None = None, protected: int = 0) -> tuple[fx.Node | None, fx.Node]:
        """An op where the stream enters ``site``'s block, fed with the full-width queries and keys that block
        computes on the incoming stream (a copy of the projections, made only for an op that reads them) or with
        the incoming tokens themselves (``tokens``); the block then runs on the op's output. ``tables``: the site's
        rotary tables, rewired in the copy at the incoming tokens' ``positions`` (the tokens are compressed or in
        unit order, so the fixed tables no longer line up with them)."""
        graph = gm.graph
        source = site.block_input
        if source is None:
            raise StructureNotFoundError(f"no block input found for attention {site.name}")
        projected = [signal for signal in op.signals if signal != "tokens"]
        copies = copy_subgraph(graph, source, [site.query, site.key]) if projected else {}
        for table in tables:
            products = getattr(table, "products", ())
            if products and positions is not None and all(p in copies for p in products):
                copy = dataclasses.replace(table, products=tuple(copies[p] for p in products))  # type: ignore
                copy.rewire(gm, positions, protected, suffix)
        signals = []
        for signal in op.signals:
            if signal == "tokens":
                signals.append(source)
                continue
            if signal not in ("query_full", "key_full"):
                raise ConfigError(f"{type(op).__name__} needs {signal!r}, which a block input does not provide")
            node = copies.get(site.query if signal == "query_full" else site.key)
            if node is None:
                raise StructureNotFoundError(f"the queries and keys of attention {site.name} do not come from its block input")
            transposed = site.kind == "explicit" and signal == "key_full"
            with graph.inserting_after(node):
                signals.append(graph.call_function(full_width, (node, transposed)))
        module_name = _unique_name(gm, type(op).__name__.lower(), site.index)
        return self._call_token_op(gm, module_name, op, source, state, signals, suffix, set(copies.values()))

    def _output_node(self, gm: fx.GraphModule, structure: Structure, last_layer: int) -> fx.Node:
        if self.features is not None:
            return block_output(gm, structure, last_layer)
        return encoder_output(gm, structure)


# Token methods built within attention windows (Qwen2.5-VL, docs/qwen-vl.md): each window one sample of the op
# (``UnitOp(windows=W)``), the same count of units in every window; an extra or fused unit is the window's own.
WINDOWED_METHODS = ("topk", "tome", "prumerge", "adjacent")


# Token methods whose later decisions a carried stream (Qwen3-VL's deepstack) follows by the state's own rule:
# pruned units gathered, merged units the size-weighted mean of their members (ToMe's rule for the tokens too).
CARRYING_METHODS = ("topk", "tome")


def _folded_heads(site: AttentionSite) -> int:
    """The heads of a windowed attention with its windows folded in (H x windows), from its queries' shape."""
    layout = tensor_meta_shape(site.query) or ()
    if len(layout) != 4:
        raise StructureNotFoundError(f"attention {site.name} attends within windows, and its queries are not a "
                                     f"(batch, heads x windows, tokens, dim) tensor ({layout}): the size bias of "
                                     "merged tokens cannot be folded into its windows")
    return layout[1]


def check_windows(structure: Structure, windows: int | None) -> None:
    """Attention within windows folded into the heads is compressible only when the model says what they are (a
    windowed tower's merger: ``windows`` windows of units, the stream put window after window): otherwise the
    windows, fixed runs of consecutive tokens, would take other tokens after compression."""
    for site in structure.sites:
        if site.windows > 1 and site.windows == windows:  # the folds into and out of the windows are no grid
            for node in [*site.attention.args[:3], *site.attention.users]:
                if isinstance(node, fx.Node):
                    node.meta[WINDOW_FOLD] = True
        if site.windows > 1 and site.windows != windows:
            raise StructureNotFoundError(
                f"attention {site.name} attends within {site.windows} windows of consecutive tokens folded into the "
                "heads; merging or pruning tokens would break the windows (a tower whose own merger declares its "
                "windows, Qwen2.5-VL's, keeps the same count in each), so this windowed attention is not supported")


def refuse_windowed(site: AttentionSite, config: TokenMethod) -> None:
    """A method at a layer that attends within windows: its scores or keys would be per window (not built)."""
    if site.windows > 1:
        raise ConfigError(f"{config.method} at layer {site.index}: that layer attends within {site.windows} windows, "
                          "and scoring or matching units by per-window attention is not built; act at a "
                          "full-attention layer (fullatt_block_indexes)")


def resolve_unit(configs: Sequence[TokenMethod], given: int | None) -> int | None:
    """The merge unit: ``given`` (--unit), or the window side of the first window projector (patchmerger, unshuffle,
    pool avg/max) that a token method precedes. A given unit that differs from that window is an error."""
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
        raise ConfigError(f"--unit must be a whole number of patches >= 1 (the side of a unit), got {given!r}")
    seen_token_method = False
    for config in configs:
        if not isinstance(config, ProjectorConfig):
            seen_token_method = True
            continue
        window = config.window()
        if window is None or not seen_token_method:
            continue
        if given is not None and given != window:
            raise ConfigError(f"--unit {given} conflicts with {config.method}, which reads {window}x{window} windows "
                              f"after the compression: give --unit {window} or leave it out")
        return window
    return given


def _check_keeps_stream(op: nn.Module, config: TokenMethod, layer: int, protected: int, channels: int) -> None:
    """A projector inside the tower must leave a stream the later blocks can take: same width, same prefix."""
    if op.channels_out() != channels:
        raise ConfigError(
            f"{config.method} after block {layer} changes the width {channels} -> {op.channels_out()}; inside the "
            "tower the width must stay (use it at the encoder output, or keep out_channels at the input width)"
        )
    if op.prefix_out() != protected:
        raise ConfigError(
            f"{config.method} after block {layer} would drop the {protected} class/register tokens the later blocks "
            "read; keep them (prefix_mode keep) or use it at the encoder output"
        )


def seeded_input(batch: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Example values for an input a method adds (e.g. LLaMA-VID's text queries): seeded normal noise."""
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def _channels(node: fx.Node) -> int:
    shape = tensor_meta_shape(node)
    if shape is None or len(shape) != 3:
        raise StructureNotFoundError(f"the stream at {node.name} is not a (batch, tokens, channels) tensor: {shape}")
    return shape[2]


def keeps_prefix(op: nn.Module) -> bool:
    """A projector (or its merge-unit wrapper) that passes the protected tokens through (``prefix_mode keep``): the
    leading ones in front of its output and the trailing ones after it; every other projector drops both ends."""
    return getattr(getattr(op, "projector", op), "prefix_mode", "drop") == "keep"


def _unique_name(gm: fx.GraphModule, base: str, layer: int | None) -> str:
    """``tomemerge_3`` for layer 3 (``..._encoder`` at the output), made unique if a name is taken."""
    name = f"{base}_{'encoder' if layer is None else layer}"
    names, index = dict(gm.named_children()), 1
    candidate = name
    while candidate in names:
        candidate, index = f"{name}_{index}", index + 1
    return candidate
