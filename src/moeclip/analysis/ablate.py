"""Ablations: train + zero-shot test for each setting of named switches, one comparison table.

The switches are the paper's ablation axes. ``one-at-a-time`` changes one switch from the
baseline per run (the paper's table: without FOFS, without ETF, without PAA, ...);
``grid`` runs the full Cartesian product. Every run trains from the same seed, so the table
compares the switches, not the draws. torch is imported only by the functions that train.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import MoECLIPError
from ..fileio import atomic_write_text
from ..model.config import AdapterConfig, ModelConfig

#: the averaged metrics each run reports (fractions; the tables show percent)
KEYS = ("pixel_auroc", "pixel_ap", "image_auroc", "image_ap")

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
    return ", ".join(f"{k}={_show(v)}" for k, v in diff.items())


def _show(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def table(rows: List[Dict], keys: Sequence[str]) -> str:
    head = "| setting | " + " | ".join(k.replace("_", " ") for k in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
    for r in rows:
        cells = ["n/a" if r[k] is None else f"{100 * r[k]:.1f}" for k in keys]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def demo_data(out: Path, image_size: int, seed: int) -> Tuple[str, str, str]:
    """The demo's synthetic setting under ``out/data``: (training ``--data``, held-out ``--data``,
    descriptions file). Every category shares one description, as a random-weight CLIP cannot
    ground class names; an ablation then runs on a CPU in minutes without a download."""
    from ..data.synth import DEFAULT_HELDOUT_CATEGORIES, DEFAULT_TRAIN_CATEGORIES, generate_dataset
    from ..engine.demo import SHARED_DESCRIPTION, DemoConfig

    d = DemoConfig(out=out)
    data = Path(out) / "data"
    for name, categories, n, offset in (("train", DEFAULT_TRAIN_CATEGORIES, d.train_per_category, 0),
                                        ("heldout", DEFAULT_HELDOUT_CATEGORIES, d.heldout_per_category, 1)):
        generate_dataset(data / name, categories, n_normal=n // 2, n_anomalous=n // 2, image_size=image_size,
                         seed=seed + offset, overwrite=True, defect_scale=d.defect_scale)
    shared = data / "shared-description.json"
    everything = DEFAULT_TRAIN_CATEGORIES + DEFAULT_HELDOUT_CATEGORIES
    atomic_write_text(shared, json.dumps({c: SHARED_DESCRIPTION for c in everything}))
    return f"folder={data / 'train'}", f"folder={data / 'heldout'}", str(shared)


def run_ablation(base: ModelConfig, runs: List[Dict], baseline: Dict, train_sources, test_sources, train_cfg,
                 out: Path, *, image_size: int, device, say=print) -> List[Dict]:
    """Train and test one model per setting in ``runs`` (each under ``out/runs/NN``) with the
    same seed (``train_cfg.seed``); one row per run: the setting, the metrics averaged over the
    test sources (:data:`KEYS`) and the per-source averages."""
    import torch

    from ..engine.evaluate import evaluate_source
    from ..engine.train import Trainer, prepare_run_dir
    from ..model.moeclip import MoECLIP

    rows: List[Dict] = []
    for i, setting in enumerate(runs):
        name = label(setting, baseline)
        say(f"[{i + 1}/{len(runs)}] {name}")
        torch.manual_seed(train_cfg.seed)
        model = MoECLIP.from_config(ModelConfig(base.backbone, apply(base.adapter, setting))).to(device)
        run_dir = Path(out) / "runs" / f"{i:02d}"
        prepare_run_dir(run_dir, resume=False, overwrite=True)
        Trainer(model, train_sources, train_cfg, run_dir, device).train()
        results = [evaluate_source(model, s, image_size=image_size, device=device, precision=train_cfg.precision)
                   for s in test_sources]
        average = {k: _mean([r.average.get(k) for r in results]) for k in KEYS}
        rows.append({"setting": name, **setting, **average, "per_dataset": {r.source: r.average for r in results}})
        say(table(rows[-1:], KEYS))
    return rows


def write_ablation(out: Path, rows: List[Dict], switches: List[Tuple[str, List]], mode: str,
                   steps: Optional[int]) -> str:
    """``ablation.md`` (the table, returned), ``ablation.json`` (everything) and ``ablation.csv``."""
    out = Path(out)
    md = table(rows, KEYS)
    atomic_write_text(out / "ablation.md", md + "\n")
    doc = {"switches": [[n, v] for n, v in switches], "mode": mode, "steps": steps, "runs": rows}
    atomic_write_text(out / "ablation.json", json.dumps(doc, indent=2, default=str) + "\n")
    header = ["setting", *[n for n, _ in switches], *KEYS]
    lines = [",".join(header)] + [",".join("" if r.get(h) is None else str(r[h]) for h in header) for r in rows]
    atomic_write_text(out / "ablation.csv", "\n".join(lines) + "\n")
    return md


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
