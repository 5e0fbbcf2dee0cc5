"""The paper's cross-dataset protocol in one resumable run, and an honest comparison with the paper.

Protocol (the paper's, as the official code runs it): train on the VisA test split and test
zero-shot on every other benchmark; to test on VisA, train on MVTec AD. Each seed is one
replicate; with given checkpoints, each checkpoint is one replicate instead.

Every stage (one training per replicate, one test per replicate and dataset) is a folder of
the run; its completion marker is written last, so a stage with a marker is skipped and an
interrupted run continues where it stopped (an interrupted training resumes from its last
epoch). A marker records the stage's settings: a rerun with other settings into the same run
folder is refused rather than mixing results.

The reference numbers (the paper's table and an independent reproduction) live in
``moeclip/data/paper_results.json``, MuSc's published figures (for ``--transductive``) in
``moeclip/data/musc_results.json``; the per-image timings used for the dry-run's estimates
in ``moeclip/data/benchmark_figures.json`` (measured by ``benchmarks/``).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..data.registry import get_dataset, list_datasets
from ..errors import MoECLIPError
from ..fileio import atomic_write_text, replace_dir
from ..metrics.protocol import mean_std
from ..model.config import ModelConfig
from .config import TrainConfig

log = logging.getLogger(__name__)

#: training data -> zero-shot test data, per protocol (registry keys, the paper's table order)
PROTOCOLS: Dict[str, Tuple[Tuple[str, Tuple[str, ...]], ...]] = {
    "industrial": (("VisA", ("MVTec", "BTAD", "RSDD", "DTD-Synthetic")), ("MVTec", ("VisA",))),
    "medical": (("VisA", ("Brain", "headct", "Liver", "Retina", "Colon_colonDB", "Colon_clinicDB",
                          "Colon_cvc300", "Endo", "Colon_Kvasir")),),
}
PROTOCOL_NAMES = ("industrial", "medical", "all")
DEFAULT_SEEDS = (111, 112, 113)
#: the paper's four metrics first, then the extra ones our evaluation computes
REPORT_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1_max",
                  "image_f1_max")
METRIC_LABELS = {"image_auroc": "image AUROC", "image_ap": "image AP", "pixel_auroc": "pixel AUROC",
                 "pixel_ap": "pixel AP", "pixel_aupro": "pixel AUPRO", "pixel_f1_max": "pixel F1-max",
                 "image_f1_max": "image F1-max"}
RUN_FILE = "reproduce.json"  # marks a run folder as ours (settings of its first run)
DONE_FILE = "done.json"      # completion marker, written last
SPEC_FILE = "stage.json"     # the settings of a stage in progress (a training resumes only under the same)
STD_NOTE = "sample standard deviation over replicates (ddof=1); n/a for one replicate"


# --------------------------------------------------------------------------- packaged reference data

@lru_cache(maxsize=None)
def _package_json(name: str) -> dict:
    path = Path(__file__).resolve().parents[1] / "data" / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MoECLIPError(f"{path}: cannot read packaged data ({exc})") from None


def paper_results() -> dict:
    """The paper's table and the independent reproduction (percent), each value with its source."""
    return _package_json("paper_results.json")


def musc_results() -> dict:
    """MuSc's published figures (ICLR 2024, Table 1), percent, each with its source: ``--transductive``."""
    return _package_json("musc_results.json")


def benchmark_figures() -> dict:
    """Measured seconds per training step / test batch (``benchmarks/README.md``), for estimates."""
    return _package_json("benchmark_figures.json")


# --------------------------------------------------------------------------- protocol and settings

def protocol_legs(protocol: str, datasets: Optional[Sequence[str]] = None) -> List[Tuple[str, Tuple[str, ...]]]:
    """(training data, test data) pairs of ``protocol``, restricted to ``datasets`` (test data) if given."""
    if protocol not in PROTOCOL_NAMES:
        raise MoECLIPError(f"unknown protocol {protocol!r} (use {', '.join(PROTOCOL_NAMES)})")
    merged: Dict[str, List[str]] = {}
    for name in (("industrial", "medical") if protocol == "all" else (protocol,)):
        for train, tests in PROTOCOLS[name]:
            merged.setdefault(train, []).extend(t for t in tests if t not in merged.get(train, []))
    if datasets:
        wanted = [get_dataset(d).key for d in datasets]
        known = {t for tests in merged.values() for t in tests}
        outside = [w for w in wanted if w not in known]
        if outside:
            raise MoECLIPError(f"--datasets: {', '.join(outside)} not tested in the {protocol} protocol "
                               f"(its test datasets: {', '.join(sorted(known))})")
        merged = {k: [t for t in v if t in wanted] for k, v in merged.items()}
    return [(k, tuple(v)) for k, v in merged.items() if v]


@dataclass
class ReproduceConfig:
    """Everything a reproduction run needs besides the data and output folders."""

    protocol: str = "all"
    seeds: Tuple[int, ...] = DEFAULT_SEEDS
    datasets: Optional[Tuple[str, ...]] = None           # restrict the test datasets
    checkpoints: Tuple[Tuple[str, str], ...] = ()        # (training data key, path): skip training
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backbone_overrides: Dict = field(default_factory=dict)  # for given checkpoints (flags given)
    adapter_overrides: Dict = field(default_factory=dict)
    eval_batch_size: int = 8
    skip_missing: bool = False
    device: str = "auto"
    transductive: bool = False  # also MuSc's protocol: each test also scored with the class's test split as a batch


@dataclass
class Located:
    """A dataset found under the data root."""

    key: str
    folder: Path
    root: Path
    images: int
    anomalous: int
    classes: int
    problems: int


@dataclass
class Stage:
    kind: str                      # "train", "test" or "transductive" (a test under MuSc's protocol)
    dataset: str                   # registry key of the data trained on / tested on
    replicate: str                 # "seed-111" or "ckpt-1"
    trained_on: str
    seed: Optional[int] = None
    checkpoint: Optional[str] = None   # a given checkpoint (no training stage)
    images: int = 0
    expected_s: Optional[float] = None
    figure: Optional[str] = None       # source of the estimate

    @property
    def path(self) -> str:
        return f"{self.kind}/{self.dataset}/{self.replicate}"

    @property
    def train_path(self) -> str:
        return f"train/{self.trained_on}/{self.replicate}"


# --------------------------------------------------------------------------- finding the data

def _norm(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def expected_folder_names(key: str) -> List[str]:
    spec = get_dataset(key)
    return list(dict.fromkeys(spec.all_names))


def locate_datasets(data_root: Path, keys: Sequence[str]) -> Tuple[Dict[str, Located], Dict[str, str]]:
    """Find each dataset in its own folder under ``data_root``, named by any registry name.

    Returns (found, missing) where ``missing`` maps a key to why it was not usable.
    """
    from ..data.scanners import scan

    data_root = Path(data_root)
    if not data_root.is_dir():
        raise MoECLIPError(f"{data_root}: --data-root is not a folder")
    children = [c for c in sorted(data_root.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    found: Dict[str, Located] = {}
    missing: Dict[str, str] = {}
    for key in keys:
        names = {_norm(n) for n in expected_folder_names(key)}
        hits = [c for c in children if _norm(c.name) in names]
        if not hits:
            missing[key] = f"no folder named {' / '.join(expected_folder_names(key))} under {data_root}"
            continue
        if len(hits) > 1:
            raise MoECLIPError(f"{data_root}: several folders name {key}: {', '.join(h.name for h in hits)}; "
                               f"keep one")
        try:
            result = scan(key, hits[0])
        except MoECLIPError as exc:
            missing[key] = f"{hits[0]}: {exc}"
            continue
        if not result.samples:
            missing[key] = f"{hits[0]}: no images found"
            continue
        found[key] = Located(key, hits[0], Path(result.root or hits[0]), len(result.samples),
                             sum(s.label for s in result.samples), len({s.group for s in result.samples}),
                             len(result.problems))
    return found, missing


# --------------------------------------------------------------------------- the plan

def _figure_for(task: str, backbone: Dict, precision: str, device: str, grad_checkpoint: bool = False):
    """(seconds per image, source) of a matching benchmark figure, or (None, None)."""
    for f in benchmark_figures()["figures"]:
        if (f["task"], f["clip_model"], f["image_size"], f["precision"], f["device"]) != \
                (task, backbone.get("model"), backbone.get("image_size"), precision, device):
            continue
        if task == "train" and bool(f.get("grad_checkpoint")) != bool(grad_checkpoint):
            continue
        return f["seconds_per_batch"] / f["batch_size"], f["source"]
    return None, None


def _checkpoint_backbone(path: str, config: ReproduceConfig) -> Dict:
    """Backbone settings of a given checkpoint (for the estimate), without loading weights."""
    p = Path(path)
    backbone = dataclasses.asdict(config.model.backbone)
    cfg = p / "config.json" if p.is_dir() else (p if p.name == "config.json" else None)
    if cfg is not None and cfg.is_file():
        try:
            backbone.update(json.loads(cfg.read_text()).get("model", {}).get("backbone", {}))
        except (OSError, json.JSONDecodeError):
            pass
    backbone.update(config.backbone_overrides)
    return backbone


@dataclass
class Plan:
    config: ReproduceConfig
    data_root: Path
    out: Path
    device: str
    stages: List[Stage]
    found: Dict[str, Located]
    missing: Dict[str, str]
    notes: List[str]

    def check(self) -> None:
        """Missing data is an error unless ``skip_missing``; an empty plan always is."""
        if self.missing and not self.config.skip_missing:
            items = "; ".join(f"{k} ({v})" for k, v in self.missing.items())
            raise MoECLIPError(f"missing: {items} (use --skip-missing to run what is there)")
        if not self.stages:
            raise MoECLIPError(f"{self.data_root}: nothing to run (no dataset of the protocol was found)")

    def spec(self, stage: Stage) -> Dict:
        """The settings a stage's results depend on (JSON-normalised, compared with its marker)."""
        if stage.kind == "train":
            train = dataclasses.asdict(dataclasses.replace(self.config.train, seed=stage.seed))
            for k in ("workers", "grad_checkpoint", "include_backbone", "val_metric"):
                train.pop(k, None)  # no influence on the trained weights
            doc = {"kind": "train", "dataset": stage.dataset, "seed": stage.seed,
                   "model": self.config.model.to_dict(), "train": train}
        else:
            origin = (self.spec(Stage("train", stage.trained_on, stage.replicate, stage.trained_on, stage.seed))
                      if stage.checkpoint is None else
                      {"checkpoint": os.path.abspath(stage.checkpoint),
                       "backbone_overrides": self.config.backbone_overrides,
                       "adapter_overrides": self.config.adapter_overrides})
            doc = {"kind": stage.kind, "dataset": stage.dataset, "trained_on": stage.trained_on,
                   "replicate": stage.replicate, "precision": self.config.train.precision, "model_from": origin}
        return json.loads(json.dumps(doc))

    @property
    def replicates(self) -> List[str]:
        return list(dict.fromkeys(s.replicate for s in self.stages))

    def format(self) -> str:
        """The dry-run's text: stages with estimates, datasets found and missing."""
        lines = [f"plan: protocol {self.config.protocol}, {len(self.replicates)} replicate(s) "
                 f"({', '.join(self.replicates) or 'none'}), device {self.device}, run folder {self.out}"]
        lines.append("datasets found:" if self.found else "datasets found: none")
        for loc in self.found.values():
            issues = f", {loc.problems} problem(s): moeclip datasets scan lists them" if loc.problems else ""
            lines.append(f"  {loc.key:<15} {loc.root}  ({loc.images} images, {loc.anomalous} anomalous, "
                         f"{loc.classes} classes{issues})")
        lines.append("datasets missing:" if self.missing else "datasets missing: none")
        for key, why in self.missing.items():
            lines.append(f"  {key:<15} {why}")
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append("stages:")
        total, unknown = 0.0, 0
        for i, s in enumerate(self.stages, 1):
            state = "done" if (self.out / s.path / DONE_FILE).is_file() else "todo"
            what = (f"train on {s.dataset} ({s.images} images), seed {s.seed}" if s.kind == "train" else
                    f"test {s.dataset} ({s.images} images) with the model trained on {s.trained_on}, {s.replicate}")
            lines.append(f"  {i:>3}. [{state}] {s.path:<34} {what}; expected {format_seconds(s.expected_s)}")
            if s.expected_s is None:
                unknown += 1
            elif state == "todo":
                total += s.expected_s
        figures = sorted({s.figure for s in self.stages if s.figure})
        known = format_seconds(total) if unknown < len(self.stages) else "unknown"
        lines.append(f"expected time of the stages to do: {known}"
                     + (f" ({unknown} stage(s) unknown: no benchmark figure for this model, image size, precision "
                        f"and device)" if unknown else ""))
        if figures:
            lines.append("  estimates: seconds per image of these measurements, times the images a stage processes")
        lines.extend(f"  from {f}" for f in figures)
        return "\n".join(lines)


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _checkpoint_groups(config: ReproduceConfig, legs) -> Dict[str, List[str]]:
    groups: Dict[str, List[str]] = {}
    for train, path in config.checkpoints:
        key = get_dataset(train).key
        groups.setdefault(key, []).append(path)
    unused = [k for k in groups if k not in {t for t, _ in legs}]
    if unused:
        raise MoECLIPError(f"--checkpoint {unused[0]}=...: no test of the {config.protocol} protocol uses a "
                           f"model trained on {unused[0]} (trained on: {', '.join(t for t, _ in legs)})")
    return groups


def _estimate(stage: Stage, config: ReproduceConfig, device: str) -> None:
    if stage.kind == "train":
        per_image, source = _figure_for("train", dataclasses.asdict(config.model.backbone), config.train.precision,
                                        device, config.train.grad_checkpoint)
        cfg = config.train
        steps = cfg.epochs * math.ceil(stage.images / (cfg.batch_size * cfg.grad_accum))
        if cfg.max_steps is not None:
            steps = min(steps, cfg.max_steps)
        work = steps * cfg.batch_size * cfg.grad_accum
    else:
        backbone = (_checkpoint_backbone(stage.checkpoint, config) if stage.checkpoint else
                    dataclasses.asdict(config.model.backbone))
        per_image, source = _figure_for("test", backbone, config.train.precision, device)
        work = stage.images
    if per_image is not None:
        stage.expected_s, stage.figure = work * per_image, source


def _absolute(value):
    if isinstance(value, str) and Path(value).expanduser().is_file():
        return os.path.abspath(Path(value).expanduser())
    return value


def _absolute_files(config: ReproduceConfig) -> ReproduceConfig:
    """Local model/weight files as absolute paths: the run can be continued from another folder."""
    b = config.model.backbone
    backbone = dataclasses.replace(b, model=_absolute(b.model), pretrained=_absolute(b.pretrained))
    overrides = {k: _absolute(v) if k in ("model", "pretrained") else v for k, v in config.backbone_overrides.items()}
    return dataclasses.replace(config, model=ModelConfig(backbone, config.model.adapter), backbone_overrides=overrides)


def _replicates(config: ReproduceConfig, train: str, tests, groups, missing: Dict[str, str], notes: List[str]):
    """(replicate, seed, checkpoint) of the models trained on ``train``; records why there are none."""
    if config.checkpoints:
        reps = [(f"ckpt-{i}", None, p) for i, p in enumerate(groups.get(train, []), 1)]
        if not reps:
            missing[f"model trained on {train}"] = f"no --checkpoint {train}=PATH given"
        return reps
    if train in missing:
        notes.append(f"no training data {train}: {', '.join(tests)} cannot be tested")
        return []
    return [(f"seed-{s}", s, None) for s in config.seeds]


def build_plan(data_root, out, config: ReproduceConfig, device: Optional[str] = None) -> Plan:
    """Stages in running order: per training data and replicate, its training then its tests.

    ``device`` (a device type) only selects the benchmark figures of the estimates; by default the
    type of ``config.device``.
    """
    if device is None:
        from ..precision import resolve_device

        device = resolve_device(config.device).type
    config = _absolute_files(config)
    legs = protocol_legs(config.protocol, config.datasets)
    if not config.checkpoints and not config.seeds:
        raise MoECLIPError("no seeds given")
    if len(set(config.seeds)) != len(config.seeds):
        raise MoECLIPError(f"--seeds {','.join(map(str, config.seeds))}: each seed once")
    groups = _checkpoint_groups(config, legs) if config.checkpoints else {}
    needed = [k for train, tests in legs for k in ((() if config.checkpoints else (train,)) + tests)]
    found, missing = locate_datasets(Path(data_root), list(dict.fromkeys(needed)))
    stages: List[Stage] = []
    notes: List[str] = []
    for train, tests in legs:
        reps = _replicates(config, train, tests, groups, missing, notes)
        present = [t for t in tests if t in found]
        if not reps or not present:
            continue
        for replicate, seed, ckpt in reps:
            if ckpt is None:
                stages.append(Stage("train", train, replicate, train, seed, images=found[train].images))
            for t in present:
                stages.append(Stage("test", t, replicate, train, seed, ckpt, images=found[t].images))
                if config.transductive:
                    stages.append(Stage("transductive", t, replicate, train, seed, ckpt, images=found[t].images))
    for s in stages:
        _estimate(s, config, device)
    return Plan(config, Path(data_root), Path(out), device, stages, found, missing, notes)


# --------------------------------------------------------------------------- running

def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _check_spec(recorded: Optional[dict], spec: dict, where: Path) -> None:
    if recorded is not None and recorded != spec:
        keys = sorted(k for k in set(recorded) | set(spec) if recorded.get(k) != spec.get(k))
        raise MoECLIPError(f"{where}: made with other settings ({', '.join(keys)} differ); "
                           f"use another --out for a run with these settings")


def stage_complete(plan: Plan, stage: Stage) -> bool:
    """True when the stage's marker exists (and records the same settings; else an error)."""
    marker = plan.out / stage.path / DONE_FILE
    if not marker.is_file():
        return False
    doc = _read_json(marker)
    if doc is None:
        raise MoECLIPError(f"{marker}: unreadable completion marker; delete the folder to redo the stage")
    _check_spec(doc.get("spec"), plan.spec(stage), marker)
    if stage.kind != "train" and doc.get("model_stamp") != model_stamp(plan, stage):
        return False  # its model was trained again (or the checkpoint replaced): test again
    return True


def model_stamp(plan: Plan, stage: Stage) -> Optional[str]:
    """Identifies the model a test stage evaluates: its training's completion time, or the file's mtime."""
    if stage.checkpoint is None:
        done = _read_json(plan.out / stage.train_path / DONE_FILE) or {}
        return done.get("finished")
    p = Path(stage.checkpoint)
    p = p / "adapters.safetensors" if p.is_dir() else p
    return str(p.stat().st_mtime_ns) if p.exists() else None


def _mark_done(folder: Path, spec: dict, started: float, extra: dict) -> None:
    doc = {"spec": spec, "finished": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
           "seconds": round(time.time() - started, 3), **extra}
    atomic_write_text(folder / DONE_FILE, json.dumps(doc, indent=2) + "\n")


def _source(plan: Plan, key: str):
    from .sources import build_source

    loc = plan.found[key]
    return build_source(f"{key}={loc.root}", report=lambda *a: None)  # problems: counted in the plan


def _run_train(plan: Plan, stage: Stage, device, say, progress: bool) -> None:
    """One training: resumes from the stage's last epoch when it was interrupted."""
    import torch

    from ..model.moeclip import MoECLIP
    from .train import STATE_FILE, Trainer

    folder, spec, started = plan.out / stage.path, plan.spec(stage), time.time()
    resume = (folder / STATE_FILE).is_file() and (folder / SPEC_FILE).is_file()
    if resume:
        _check_spec(_read_json(folder / SPEC_FILE), spec, folder / SPEC_FILE)
    elif folder.exists():
        shutil.rmtree(folder)  # started but not one epoch saved: nothing to keep
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SPEC_FILE, json.dumps(spec, indent=2) + "\n")
    source = _source(plan, stage.dataset)
    config = plan.config
    torch.manual_seed(stage.seed)  # FOFS matrices and projection init, as `moeclip train`
    model = MoECLIP.from_config(config.model).to(device)
    store_clip = config.train.include_backbone or config.model.backbone.pretrained is None  # random CLIP: keep it
    cfg = dataclasses.replace(config.train, seed=stage.seed, include_backbone=store_clip)
    trainer = Trainer(model, [source], cfg, folder, device, progress=progress)
    if resume:
        trainer.resume()
        say(f"  resumed at epoch {trainer.epoch}, step {trainer.step}")
    trainer.train()
    _mark_done(folder, spec, started, {"epoch": trainer.epoch, "step": trainer.step,
                                       "checkpoint": "checkpoint"})


def _load_for(plan: Plan, stage: Stage, device, cache: dict):
    from ..model.checkpoint import load_model

    if stage.checkpoint is None:
        path, kwargs = str(plan.out / stage.train_path / "checkpoint"), {}
    else:
        path = stage.checkpoint
        kwargs = {"backbone_overrides": plan.config.backbone_overrides,
                  "adapter_overrides": plan.config.adapter_overrides}
    if cache.get("path") != path:
        cache.clear()
        model = load_model(path, **kwargs).to(device).cast_frozen_weights(plan.config.train.precision)
        cache.update(path=path, model=model)
    return path, cache["model"]


def results_document(checkpoint: str, config: dict, results) -> Tuple[str, str]:
    """results.json and results.csv text, in the format of ``moeclip test``."""
    from .evaluate import METRIC_KEYS

    doc = {"checkpoint": checkpoint, "config": config,
           "datasets": [{"name": r.source, "domain": r.domain, "per_class": r.per_class, "average": r.average,
                         "skipped": [list(s) for s in r.skipped]} for r in results]}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "class", *METRIC_KEYS])
    for r in results:
        for name, m in list(r.per_class.items()) + [("average", r.average)]:
            w.writerow([r.source, name] + ["" if m.get(k) is None else f"{m[k]:.6f}" for k in METRIC_KEYS])
    return json.dumps(doc, indent=2) + "\n", buf.getvalue()


def _run_test(plan: Plan, stage: Stage, device, say, progress: bool, cache: dict) -> None:
    """One zero-shot test (or, kind "transductive", MuSc's protocol: each class's test split one batch),
    written into a side folder that replaces the stage folder when complete."""
    from .evaluate import Transductive, evaluate_source

    folder, spec, started = plan.out / stage.path, plan.spec(stage), time.time()
    part = folder.with_name(f".{folder.name}.partial")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    path, model = _load_for(plan, stage, device, cache)
    source = _source(plan, stage.dataset)
    result = evaluate_source(model, source, image_size=model.config.backbone.image_size, device=device,
                             precision=plan.config.train.precision, batch_size=plan.config.eval_batch_size,
                             workers=plan.config.train.workers, progress=progress,
                             transductive=Transductive() if stage.kind == "transductive" else None)
    doc, table = results_document(path, model.config.to_dict(), [result])
    atomic_write_text(part / "results.json", doc)
    atomic_write_text(part / "results.csv", table)
    _mark_done(part, spec, started, {"results": "results.json", "model_stamp": model_stamp(plan, stage)})
    replace_dir(part, folder)  # over an incomplete leftover, or the results of a model trained again


def run_plan(plan: Plan, *, say: Callable[[str], None] = print, progress: bool = True) -> Dict[str, Path]:
    """Run every stage not yet complete, then write the report; returns the report paths."""
    from ..precision import resolve_device

    plan.check()
    device = resolve_device(plan.config.device)
    if plan.out.is_dir() and any(plan.out.iterdir()) and not (plan.out / RUN_FILE).is_file():
        raise MoECLIPError(f"{plan.out}: not empty and not a reproduce run folder (no {RUN_FILE}); "
                           f"use a new --out")
    plan.out.mkdir(parents=True, exist_ok=True)
    if not (plan.out / RUN_FILE).is_file():
        atomic_write_text(plan.out / RUN_FILE, json.dumps(_settings(plan), indent=2) + "\n")
    cache: dict = {}
    for i, stage in enumerate(plan.stages, 1):
        head = f"[{i}/{len(plan.stages)}] {stage.path}"
        if stage_complete(plan, stage):
            say(f"{head}: complete, skipped")
            continue
        say(f"{head}: running (expected {format_seconds(stage.expected_s)})")
        started = time.time()
        if stage.kind == "train":
            cache.clear()
            _run_train(plan, stage, device, say, progress)
        else:
            _run_test(plan, stage, device, say, progress, cache)
        say(f"{head}: done in {format_seconds(time.time() - started)}")
    return write_report(plan)


# --------------------------------------------------------------------------- the report

def collect(plan: Plan, kind: str = "test") -> Dict[str, Dict[str, Dict[str, Optional[float]]]]:
    """dataset -> replicate -> metric -> value in percent (None: undefined), from complete ``kind`` stages."""
    out: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for s in plan.stages:
        if s.kind != kind or not (plan.out / s.path / DONE_FILE).is_file():
            continue
        path = plan.out / s.path / "results.json"
        doc = _read_json(path)
        if doc is None or not doc.get("datasets"):
            raise MoECLIPError(f"{path}: missing or unreadable results of a completed stage")
        average = doc["datasets"][0]["average"]
        out.setdefault(s.dataset, {})[s.replicate] = {
            m: None if average.get(m) is None else 100.0 * float(average[m]) for m in REPORT_METRICS}
    return out


def _reference(table: dict, key: str, metric: str) -> Tuple[Optional[float], Optional[str]]:
    entry = table.get("datasets", {}).get(key, {}).get(metric)
    return (entry["value"], entry["source"]) if entry else (None, None)


def _reference_average(table: dict, metric: str, keys: Sequence[str],
                       recompute: bool) -> Tuple[Optional[float], Optional[str]]:
    """The stated average when ``keys`` are the datasets it covers; else (if ``recompute``) the
    mean of the table's values over ``keys`` (an average over other datasets is not comparable)."""
    entry = table.get("averages", {}).get(metric)
    if entry and sorted(entry["over"]) == sorted(keys):
        return entry["value"], entry["source"]
    values = [_reference(table, k, metric)[0] for k in keys]
    if not recompute or not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), f"mean of the paper's values for the {len(keys)} dataset(s) run here"


def _cell(values: Sequence[float], paper: Optional[float], paper_source: Optional[str],
          independent: Optional[float], independent_source: Optional[str]) -> dict:
    mean, std, n = mean_std(values)
    return {"mean": mean, "std": std, "n": n, "paper": paper, "paper_source": paper_source,
            "diff": None if mean is None or paper is None else mean - paper,
            "independent": independent, "independent_source": independent_source}


def summarise(collected: Dict[str, Dict[str, Dict[str, Optional[float]]]], replicates: Sequence[str],
              trained_on: Dict[str, str]) -> dict:
    """Per dataset and averaged: ours mean +- std over replicates beside the reference numbers.

    The average of a replicate is the mean over the datasets where the metric is defined; the
    mean and std of the average are taken over the replicates' averages.
    """
    ref = paper_results()
    ind = ref["independent"]
    order = [s.key for s in list_datasets()]
    keys = sorted(collected, key=lambda k: order.index(k) if k in order else len(order))
    datasets = []
    for key in keys:
        per_rep = collected[key]
        metrics = {}
        for m in REPORT_METRICS:
            values = [per_rep[r][m] for r in replicates if r in per_rep and per_rep[r].get(m) is not None]
            metrics[m] = _cell(values, *_reference(ref, key, m), *_reference(ind, key, m))
        datasets.append({"key": key, "name": get_dataset(key).display_name, "domain": get_dataset(key).domain,
                         "trained_on": trained_on.get(key), "per_replicate": per_rep, "metrics": metrics})
    average = {}
    per_rep_avg: Dict[str, Dict[str, Optional[float]]] = {r: {} for r in replicates}
    for m in REPORT_METRICS:
        covered = [d["key"] for d in datasets if d["metrics"][m]["n"] > 0]
        for r in replicates:
            vals = [collected[k][r][m] for k in covered if r in collected[k] and collected[k][r][m] is not None]
            per_rep_avg[r][m] = statistics.fmean(vals) if vals else None
        cell = _cell([v[m] for v in per_rep_avg.values() if v[m] is not None],
                     *_reference_average(ref, m, covered, recompute=True),
                     *_reference_average(ind, m, covered, recompute=False))
        cell["datasets"] = covered
        average[m] = cell
    return {"unit": "percent", "std": STD_NOTE, "replicates": list(replicates), "datasets": datasets,
            "average": average, "average_per_replicate": per_rep_avg,
            "sources": {"paper": ref["paper"], "independent": ind["source"]}}


def summarise_transductive(transductive, zero_shot, replicates: Sequence[str]) -> dict:
    """MuSc's protocol beside the zero-shot one: per dataset and metric, ours (mean +- std over
    replicates) transductive and zero-shot, MuSc's published figure and the MoECLIP paper's."""
    musc, paper = musc_results(), paper_results()
    order = [s.key for s in list_datasets()]
    rows = []
    for key in sorted(transductive, key=lambda k: order.index(k) if k in order else len(order)):
        metrics = {}
        for m in REPORT_METRICS[:5]:
            def values(table):
                per = table.get(key, {})
                return [per[r][m] for r in replicates if r in per and per[r].get(m) is not None]
            t_mean, t_std, n = mean_std(values(transductive))
            z_mean, _, _ = mean_std(values(zero_shot))
            ms, ms_src = _reference(musc, key, m)
            metrics[m] = {"mean": t_mean, "std": t_std, "n": n, "zero_shot": z_mean, "musc": ms,
                          "musc_source": ms_src, "paper": _reference(paper, key, m)[0],
                          "diff_musc": None if t_mean is None or ms is None else t_mean - ms}
        rows.append({"key": key, "name": get_dataset(key).display_name, "metrics": metrics})
    return {"datasets": rows, "source": musc["method"]}


def _transductive_markdown(summary: dict) -> List[str]:
    t = summary.get("transductive")
    if not t:
        return []
    src = t["source"]
    lines = ["## Transductive (MuSc's protocol)", "",
             "Each class's whole test split is one unlabeled batch (`moeclip test --transductive`): MoECLIP's "
             "zero-shot map fused with the mutual map (README 'Transductive scoring'). **transductive** = ours "
             "(mean ± std over the replicates), **zero-shot** = ours above, **MuSc** = its published figure "
             f"({src['table']}; {src['title']}, {src['venue']}), **paper** = MoECLIP's zero-shot figure, "
             "**Δ MuSc** = transductive − MuSc.", "",
             "| dataset | metric | transductive | zero-shot | MuSc | paper | Δ MuSc |", "|---|---|---|---|---|---|---|"]
    for d in t["datasets"]:
        for m, c in d["metrics"].items():
            lines.append(f"| {d['name']} | {METRIC_LABELS[m]} | {_ours(c)} | {_fmt(c['zero_shot'])} | "
                         f"{_fmt(c['musc'])} | {_fmt(c['paper'])} | {_fmt(c['diff_musc'], signed=True)} |")
    return lines + [""]


def _fmt(v: Optional[float], digits: int = 1, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _ours(cell: dict) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.1f} ± {_fmt(cell['std'], 2)}"


def _settings(plan: Plan) -> dict:
    c = plan.config
    return {"protocol": c.protocol, "data_root": str(plan.data_root), "device": plan.device,
            "seeds": list(c.seeds) if not c.checkpoints else None,
            "checkpoints": [list(x) for x in c.checkpoints] or None,
            "model": c.model.to_dict() if not c.checkpoints else None,
            "train": dataclasses.asdict(c.train) if not c.checkpoints else None,
            "missing": plan.missing, "notes": plan.notes, "transductive": c.transductive}


def report_markdown(plan: Plan, summary: dict) -> str:
    c = plan.config
    reps = summary["replicates"]
    if c.checkpoints:
        how = "given checkpoints: " + ", ".join(f"{t}={p}" for t, p in c.checkpoints)
    else:
        t, b = c.train, c.model.backbone
        losses = ("released-code training (no ETF/balance losses, no LoRA dropout)"
                  if c.model.adapter.released_training else "paper losses (ETF + balance)")
        steps = f", at most {t.max_steps} steps" if t.max_steps is not None else ""
        how = (f"trained here: {losses}, lr {t.lr:g}, {t.epochs} epochs, batch {t.batch_size}{steps}; "
               f"backbone {b.model} ({b.pretrained or 'random weights'}) at {b.image_size} px")
    lines = ["# MoECLIP: reproduction of the paper's zero-shot results", "",
             f"Protocol **{c.protocol}** on `{plan.data_root}`; {len(reps)} replicate(s): {', '.join(reps)}; "
             f"{how}; precision {c.train.precision}, device {plan.device}.", "",
             "Values in percent. **ours** = mean ± sample standard deviation over the replicates (ddof=1; n/a "
             "for one replicate), **n** = replicates, **Δ** = ours − paper (points), **independent** = an "
             "independent one-seed run of the released code. n/a: undefined for the dataset (no masks: pixel "
             "metrics; no normal images: image metrics) or not reported.", ""]
    if plan.missing:
        lines += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in plan.missing.items()), ""]
    for m in REPORT_METRICS[:4]:
        lines += [f"## {METRIC_LABELS[m]}", "", "| dataset | trained on | ours | n | paper | Δ | independent |",
                  "|---|---|---|---|---|---|---|"]
        for d in summary["datasets"]:
            cell = d["metrics"][m]
            lines.append(f"| {d['name']} | {d['trained_on']} | {_ours(cell)} | {cell['n']} | {_fmt(cell['paper'])} "
                         f"| {_fmt(cell['diff'], signed=True)} | {_fmt(cell['independent'], 2)} |")
        cell = summary["average"][m]
        lines.append(f"| **average** ({len(cell['datasets'])} datasets) | | **{_ours(cell)}** | {cell['n']} "
                     f"| {_fmt(cell['paper'])} | {_fmt(cell['diff'], signed=True)} "
                     f"| {_fmt(cell['independent'], 2)} |")
        if cell["paper_source"] and not cell["paper_source"].startswith("paper main table"):
            lines.append(f"\nPaper average here: {cell['paper_source']} (the paper's own average covers more).")
        lines.append("")
    lines += ["## Other metrics (ours)", "", "| dataset | " + " | ".join(METRIC_LABELS[m] for m in REPORT_METRICS[4:])
              + " |", "|---" * (1 + len(REPORT_METRICS[4:])) + "|"]
    for d in summary["datasets"]:
        lines.append(f"| {d['name']} | " + " | ".join(_ours(d["metrics"][m]) for m in REPORT_METRICS[4:]) + " |")
    lines += ["", "## Per replicate", "", "| dataset | " + " | ".join(METRIC_LABELS[m] for m in REPORT_METRICS[:4])
              + " |", "|---" * 5 + "|"]
    for d in summary["datasets"]:
        for r in reps:
            vals = d["per_replicate"].get(r)
            if vals:
                lines.append(f"| {d['name']} {r} | " + " | ".join(_fmt(vals[m], 2) for m in REPORT_METRICS[:4]) + " |")
    lines += [""] + _transductive_markdown(summary)
    lines += [f"Paper: {summary['sources']['paper']['title']} ({summary['sources']['paper']['venue']}, "
              f"arXiv {summary['sources']['paper']['arxiv']}), {summary['sources']['paper']['table']}.",
              f"Independent reproduction: {summary['sources']['independent']}.", ""]
    return "\n".join(lines)


def report_csv(summary: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    reps = summary["replicates"]
    w.writerow(["dataset", "trained_on", "metric", "n", "ours_mean", "ours_std", "paper", "diff", "independent",
                *reps])
    rows = [(d["key"], d["trained_on"], d["metrics"], d["per_replicate"]) for d in summary["datasets"]]
    rows.append(("average", "", summary["average"], summary["average_per_replicate"]))
    for key, trained_on, metrics, per_rep in rows:
        for m in REPORT_METRICS:
            c = metrics[m]
            per = [per_rep.get(r, {}).get(m) for r in reps]
            w.writerow([key, trained_on, m, c["n"]] + [_fmt(c[k], 4) for k in ("mean", "std", "paper", "diff",
                                                                                 "independent")]
                       + [_fmt(v, 4) for v in per])
    return buf.getvalue()


def write_report(plan: Plan) -> Dict[str, Path]:
    """RUN/reproduction.{md,json,csv} from the completed test stages."""
    trained_on = {s.dataset: s.trained_on for s in plan.stages if s.kind == "test"}
    summary = summarise(collect(plan), plan.replicates, trained_on)
    if plan.config.transductive:
        summary["transductive"] = summarise_transductive(collect(plan, "transductive"), collect(plan),
                                                         plan.replicates)
    doc = {"settings": _settings(plan), **summary}
    paths = {ext: plan.out / f"reproduction.{ext}" for ext in ("md", "json", "csv")}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2) + "\n")
    atomic_write_text(paths["csv"], report_csv(summary))
    atomic_write_text(paths["md"], report_markdown(plan, summary))
    return paths
