"""A bundle's token-op sites (``sites.json``): what ``verify`` needs to replay a reference with another runtime's
decisions pinned, without the PyTorch model.

Per site: the op's class and settings (its static attributes: the op is rebuilt from them, no weights involved),
the ONNX node's name and its input/output value names, which of the op's arguments were None (exported as ones);
per parity input: the decisions the reference run took (ONNX Runtime on the bundle's model, each op replayed on
the values it gave the node), so a candidate's decisions are compared without re-running the reference.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import ConfigError
from ...ops.base import TokenOp
from .decisions import SiteCall, onnx_site_run, site_nodes, torch_site_calls
from .pinned import candidate_tapes

SITES = "sites.json"
SITES_FORMAT = "tc-export token-op sites 1"
_SETTING_TYPES = (bool, int, float, str, type(None))


def op_settings(op: TokenOp) -> dict[str, Any]:
    """The op's static settings: its plain attributes (numbers, flags, names, tuples of them)."""
    settings = {}
    for name, value in vars(op).items():
        if name.startswith("_") or name == "training":
            continue
        if isinstance(value, _SETTING_TYPES) or (isinstance(value, tuple) and all(isinstance(v, _SETTING_TYPES)
                                                                                 for v in value)):
            settings[name] = list(value) if isinstance(value, tuple) else value
    return settings


def rebuild_op(entry: Mapping[str, Any]) -> TokenOp:
    """The op a ``sites.json`` entry describes (only ``tc_export.ops`` classes)."""
    module_name, _, class_name = str(entry.get("class", "")).rpartition(".")
    if not module_name.startswith("tc_export."):
        raise ConfigError(f"{SITES}: {entry.get('class')!r} is not a tc_export token op")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TokenOp)):
        raise ConfigError(f"{SITES}: {entry.get('class')!r} is not a tc_export token op")
    op = cls.__new__(cls)
    nn.Module.__init__(op)
    for name, value in entry.get("settings", {}).items():
        setattr(op, name, tuple(value) if isinstance(value, list) else value)
    return op.eval()


def write_sites(directory: Path, module: torch.nn.Module, onnx_path: Path, inputs: Mapping[str, torch.Tensor],
                feeds: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Write ``sites.json`` for the bundle's ONNX (False, nothing written: no tc_export function nodes)."""
    import onnx

    every = torch_site_calls(module, inputs)
    nodes = site_nodes(onnx.load(str(onnx_path), load_external_data=False))
    if not nodes:
        return False
    run, _ = onnx_site_run(onnx_path, feeds[0], every)
    calls = [every[i] for i, call in enumerate(run) if call.sizes.size]  # the sites with a node, in graph order
    if len(calls) != len(nodes):
        return False
    sites = [{"name": call.name, "class": f"{type(call.op).__module__}.{type(call.op).__qualname__}",
              "settings": op_settings(call.op), "node": node.name, "op_type": node.op_type,
              "inputs": list(node.input), "outputs": list(node.output[:2]),
              "present": [arg is not None for arg in call.inputs]} for call, node in zip(calls, nodes)]
    decisions = []
    for feed in feeds:
        run, _ = onnx_site_run(onnx_path, feed, calls)
        tapes = candidate_tapes(run)  # the decisions the graph took
        decisions.append([None if tape is None else [t.tolist() for t in tape.indices] for tape in tapes])
    (directory / SITES).write_text(json.dumps({"format": SITES_FORMAT, "sites": sites, "decisions": decisions}) + "\n")
    return True


def load_sites(directory: Path) -> dict[str, Any] | None:
    """``sites.json`` of a bundle (None: an older bundle or a flat export, which has none)."""
    path = directory / SITES
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"--against {directory}: cannot read {SITES} ({error})") from None
    if data.get("format") != SITES_FORMAT:
        raise ConfigError(f"--against {directory}: {SITES} is not a {SITES_FORMAT!r} file")
    return data


def placeholder_calls(sites: Sequence[Mapping[str, Any]]) -> list[SiteCall]:
    """One ``SiteCall`` per site with the rebuilt op and the arguments' presence (what ``onnx_site_run`` pairs)."""
    empty = torch.empty(0)
    return [SiteCall(site["name"], rebuild_op(site), tuple(empty if here else None for here in site["present"]),
                     np.empty(0)) for site in sites]
