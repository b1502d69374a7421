"""The schedules the search starts from: per method, families ordered from weakest to strongest compression.

Each family is one shape of schedule swept by one strength (r, keep, budget): ToMe's constant ``r`` and linear
(r, inflection) schedules, ToMe on the first layers only, ToMe keeping a fixed fraction per layer (front-heavy in
tokens), ToMe also merging at layer 0's input (``placement: input``, not the published placement: the only ToMe
schedule that shortens layer 0's attention), Top-K at EViT's layers or at one layer, PruMerge at one layer,
adjacent merging, and ToMe then Top-K.
The search takes from each the weakest member that meets the latency target, then refines per-layer ``r``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .schedule import Schedule, Shape, layer_counts

METHOD_NAMES = ("tome", "topk", "adjacent", "prumerge")


def tome_vector(r: Sequence[int], shape: Shape, multiple: int | None = None) -> Schedule | None:
    """Per-layer ToMe (``r`` per layer), snapped so every count leaving a merge is a multiple of ``multiple``."""
    from ...passes.tome import ToMeConfig

    values = [max(0, int(v)) for v in r]
    if multiple:
        values = snap(values, shape, multiple)
    limit = (shape.tokens - shape.protected) // 2
    values = [min(v, limit) for v in values]
    if not any(values):
        return None
    label = "tome r=" + ",".join(map(str, values))
    return Schedule(label, "per-layer r (searched)", (ToMeConfig(r=tuple(values)),))


def snap(r: Sequence[int], shape: Shape, multiple: int) -> list[int]:
    """Raise each merging layer's r so the tokens it leaves are a multiple of ``multiple`` (when reachable)."""
    out, n, p = [], shape.tokens, shape.protected
    for value in r:
        if value > 0:
            target = ((n - value) // multiple) * multiple
            if target >= n - (n - p) // 2 and target < n:
                value = n - target
        out.append(value)
        n -= min(value, (n - p) // 2)
    return out


def vector_of(schedule: Schedule, shape: Shape) -> list[int] | None:
    """The per-layer r of a ToMe-only schedule (what it merges at each layer), else None."""
    if schedule.methods != ("tome",):
        return None
    return [tokens_in - tokens_out for tokens_in, tokens_out in layer_counts(schedule.stages, shape)]


def families(shape: Shape, methods: Sequence[str], multiple: int | None = None) -> dict[str, list[Schedule]]:
    """Family name -> its schedules, weakest first."""
    from ...passes.adjacent import AdjacentConfig
    from ...passes.prumerge import PruMergeConfig
    from ...passes.tome import ToMeConfig
    from ...passes.topk import TopKConfig

    L, N, p = shape.layers, shape.tokens, shape.protected
    max_r = (N - p) // 2
    out: dict[str, list[Schedule]] = {}
    class_token = p > 0
    if "tome" in methods:
        out["tome constant r"] = [Schedule(f"tome r={r}", "tome constant r", (ToMeConfig(r=r),))
                                  for r in range(1, max_r + 1)]
        for inflection in (0.5, -0.5):
            name = f"tome linear (r, inflection {inflection:+g})"
            seen, members = set(), []
            for r in range(1, max_r + 1):
                config = ToMeConfig(r=r, inflection=inflection)
                if max(config.schedule(L)) <= max_r and tuple(config.schedule(L)) not in seen:
                    seen.add(tuple(config.schedule(L)))
                    members.append(Schedule(f"tome r={r} inflection={inflection:g}", name, (config,)))
            out[name] = members
        for first in sorted({max(1, L // 2), max(1, (2 * L + 2) // 3)} - {L}):
            name = f"tome first {first} layers"
            out[name] = [Schedule(f"tome r={r} layers=0-{first - 1}", name,
                                  (ToMeConfig(r=r, layers=tuple(range(first))),)) for r in range(1, max_r + 1)]
        geometric = []
        for step in range(1, 21):
            keep = 1.0 - step * 0.025
            r, n = [], N
            for _ in range(L):
                r.append(round((1.0 - keep) * (n - p)))
                n -= min(r[-1], (n - p) // 2)
            schedule = tome_vector(r, shape, multiple)
            if schedule is not None:
                geometric.append(Schedule(f"{schedule.label} (keep {keep:.3g}/layer)", "tome fixed fraction per layer",
                                          schedule.stages))
        out["tome fixed fraction per layer"] = geometric
        # Not the published placement (ToMeConfig.placement): layer 0's attention runs on merged tokens too.
        name = "tome at layer 0's input + constant r"
        out[name] = [Schedule(f"tome input r={r} layers=0 + tome r={r}", name,
                              (ToMeConfig(r=r, placement="input", layers=(0,)), ToMeConfig(r=r)))
                     for r in range(1, max_r + 1)]
    keeps = [round(1.0 - 0.05 * i, 2) for i in range(1, 20)]
    if "topk" in methods and class_token:
        evit = [layer for layer in TopKConfig().default_layers(L)] or sorted({L // 4, L // 2, (3 * L) // 4})
        out["topk EViT layers"] = [Schedule(f"topk keep={k} layers={','.join(map(str, evit))}", "topk EViT layers",
                                            (TopKConfig(keep=k, layers=tuple(evit)),)) for k in keeps]
        for layer in sorted({0, L // 4, L // 2}):
            name = f"topk at layer {layer}"
            out[name] = [Schedule(f"topk keep={k} layers={layer}", name, (TopKConfig(keep=k, layers=(layer,)),))
                         for k in keeps]
    if "prumerge" in methods and class_token:
        budgets = sorted({max(1, round((N - p) * f / 32)) for f in range(1, 32)}, reverse=True)
        for layer in sorted({0, L // 4, L // 2, L - 1}):
            name = f"prumerge at layer {layer}"
            out[name] = [Schedule(f"prumerge tokens={k} layers={layer}", name,
                                  (PruMergeConfig(tokens=k, layers=(layer,)),)) for k in budgets if k < N - p - 1]
    if "adjacent" in methods:
        out["adjacent constant r"] = [Schedule(f"adjacent r={r}", "adjacent constant r", (AdjacentConfig(r=r),))
                                      for r in range(1, max_r + 1)]
    if "tome" in methods and "topk" in methods and class_token and L >= 2:
        half = L // 2
        name = f"tome layers 0-{half - 1}, then topk 0.5 at {half}"
        out[name] = [Schedule(f"tome r={r} layers=0-{half - 1} + topk keep=0.5 layers={half}", name,
                              (ToMeConfig(r=r, layers=tuple(range(half))), TopKConfig(keep=0.5, layers=(half,))))
                     for r in range(1, max_r + 1)]
    return {name: members for name, members in out.items() if members}


def defaults(shape: Shape, methods: Sequence[str]) -> list[Schedule]:
    """Each method's default setting (the comparison rows a user would try first)."""
    from ...passes.adjacent import AdjacentConfig
    from ...passes.tome import ToMeConfig
    from ...passes.topk import TopKConfig

    out = []
    max_r = (shape.tokens - shape.protected) // 2
    if "tome" in methods:
        out.append(Schedule(f"tome r={min(16, max_r)} (default)", "default", (ToMeConfig(r=min(16, max_r)),)))
    if "topk" in methods and shape.protected > 0 and TopKConfig().default_layers(shape.layers):
        out.append(Schedule("topk keep=0.7 layers=3,6,9 (default)", "default", (TopKConfig(),)))
    if "adjacent" in methods:
        out.append(Schedule(f"adjacent r={min(8, max_r)} (default)", "default", (AdjacentConfig(r=min(8, max_r)),)))
    return out
