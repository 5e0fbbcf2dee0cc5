"""Ablations: train + zero-shot test for each setting of named switches, one comparison table.

The switches are the paper's ablation axes. ``one-at-a-time`` changes one switch from the
baseline per run (the paper's table: without FOFS, without ETF, without PAA, ...);
``grid`` runs the full Cartesian product.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Sequence, Tuple

from ..model.config import AdapterConfig
from ..errors import MoECLIPError

#: switch name -> (AdapterConfig field, value parser)
SWITCHES = {
    "fofs": ("fofs", lambda v: _onoff(v)),
    "paa": ("paa", lambda v: _onoff(v)),
    "etf": ("etf_weight", float),
    "balance": ("balance_weight", float),
    "experts": ("num_experts", int),
    "top-k": ("top_k", int),
    "rank": ("rank", int),
    "seg-proj": ("seg_proj", str),
    "released": ("released_training", lambda v: _onoff(v)),
}
DEFAULT_SWITCHES = ["fofs=on,off", "etf=0.01,0", "paa=on,off"]


def _onoff(v: str) -> bool:
    v = v.strip().lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise MoECLIPError(f"expected on/off, got {v!r}")


def parse_switches(specs: Sequence[str]) -> List[Tuple[str, List]]:
    """``["fofs=on,off", "experts=2,4"]`` -> [("fofs", [True, False]), ("experts", [2, 4])]; first value = baseline."""
    out = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().lower()
        if not sep or name not in SWITCHES:
            raise MoECLIPError(f"--switch {spec!r}: expected NAME=V1,V2 with NAME one of {', '.join(SWITCHES)}")
        parse = SWITCHES[name][1]
        vals = [parse(v) for v in values.split(",") if v.strip()]
        if len(vals) < 2:
            raise MoECLIPError(f"--switch {spec!r}: give at least two values (the first is the baseline)")
        out.append((name, vals))
    return out


def settings(switches: List[Tuple[str, List]], mode: str = "one-at-a-time") -> List[Dict]:
    """The runs: dicts switch -> value."""
    base = {name: vals[0] for name, vals in switches}
    if mode == "grid":
        return [dict(zip([n for n, _ in switches], combo)) for combo in itertools.product(*[v for _, v in switches])]
    if mode != "one-at-a-time":
        raise MoECLIPError(f"unknown ablation mode {mode!r} (one-at-a-time or grid)")
    runs = [dict(base)]
    for name, vals in switches:
        for v in vals[1:]:
            runs.append({**base, name: v})
    return runs


def apply(adapter: AdapterConfig, setting: Dict) -> AdapterConfig:
    return dataclasses.replace(adapter, **{SWITCHES[k][0]: v for k, v in setting.items()})


def label(setting: Dict, base: Dict) -> str:
    diff = {k: v for k, v in setting.items() if base.get(k) != v}
    if not diff:
        return "baseline"
    fmt = lambda v: ("on" if v else "off") if isinstance(v, bool) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in diff.items())


def table(rows: List[Dict], keys: Sequence[str]) -> str:
    head = "| setting | " + " | ".join(k.replace("_", " ") for k in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
    for r in rows:
        cells = ["n/a" if r[k] is None else f"{100 * r[k]:.1f}" for k in keys]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
