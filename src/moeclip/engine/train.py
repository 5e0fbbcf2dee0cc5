"""The training loop: the official protocol by default, atomic checkpoints, exact resume, torchrun."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from ..data.dataset import ZSADDataset, collate
from ..errors import MoECLIPError
from ..fileio import atomic_copy, atomic_write_text, replace_dir
from ..model.checkpoint import save_checkpoint
from ..precision import autocast
from . import distributed as dist_utils
from .config import TrainConfig  # defined torch-free for the CLI; importable from here too
from .evaluate import EvalSource, evaluate_source

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
SETTINGS_FILE = "run_settings.json"  # what a run started with; --resume must match it
LAST_DIR = "checkpoint"
BEST_DIR = "best"
#: Test hook (unset in normal use): the run SIGKILLs itself right after this optimiser step is logged, a real
#: process death at a known point, so the resume test does not race a poll of metrics.csv against the trainer.
KILL_ENV = "MOECLIP_TEST_KILL_AT_STEP"


class _LossModule(nn.Module):
    """DDP needs a forward(): it computes text features (adapter) and all losses in one call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, masks, labels, descriptions: Sequence[str]):
        unique = {d: self.model.text_features(d) for d in dict.fromkeys(descriptions)}
        text = torch.stack([unique[d] for d in descriptions])
        return self.model.compute_losses(images, masks, labels, text)


def _seed_epoch(seed: int, epoch: int) -> None:
    """Every epoch starts from a seed of its own, so a resumed run draws the same batches,
    augmentations and dropout masks as an uninterrupted one."""
    s = seed * 1000 + epoch
    torch.manual_seed(s)
    np.random.seed(s % (2 ** 32))
    random.seed(s)



def _fused(params) -> Dict:
    """Adam as one fused kernel on CPU and CUDA (torch >= 2.4): at small model sizes the
    per-parameter update loop was a measurable share of a training step."""
    devices = ("cpu", "cuda") if _torch_at_least(2, 4) else ("cuda",)
    ok = bool(params) and all(p.device.type in devices and p.dtype.is_floating_point for p in params)
    return {"fused": True} if ok else {}


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if resume:
            if not (run_dir / STATE_FILE).is_file():
                raise MoECLIPError(f"{run_dir}: nothing to resume (no {STATE_FILE})")
            return
        if not overwrite:
            raise MoECLIPError(f"{run_dir}: run directory exists and is not empty "
                               "(use --resume to continue it or --overwrite to start again)")
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif resume:
        raise MoECLIPError(f"{run_dir}: nothing to resume")
    run_dir.mkdir(parents=True, exist_ok=True)


#: Training options a resumed run must keep (its optimiser state and schedule were made with them).
#: ``epochs`` and ``max_steps`` may change (train longer); runtime options may change too.
RESUME_KEYS = ("batch_size", "lr", "betas", "milestones", "gamma", "seed", "precision", "grad_accum", "augment")


def data_fingerprint(source: EvalSource) -> Dict:
    """What a training source holds, independent of where it lies.

    Its root is the resolved common folder of its files; the content is a SHA-1 over each sample's
    path relative to that root, label, class, mask and file sizes, plus the class descriptions.
    Sizes, not bytes: hashing VisA's 2 GB at every resume would cost minutes, and a copied or
    moved dataset keeps its names and sizes, so it is recognised as the same data.
    """
    files = [os.path.realpath(s.image_path) for s in source.samples]
    files += [os.path.realpath(s.mask_path) for s in source.samples if s.mask_path]
    root = os.path.commonpath(files) if files else ""
    if files and os.path.isfile(root):
        root = os.path.dirname(root)

    def rel(path: Optional[str]) -> str:
        return "" if not path else os.path.relpath(os.path.realpath(path), root)

    def size(path: Optional[str]) -> int:
        try:
            return os.path.getsize(path) if path else -1
        except OSError:
            return -1

    rows = sorted(f"{rel(s.image_path)}|{s.label}|{s.class_name}|{rel(s.mask_path)}|"
                  f"{size(s.image_path)}|{size(s.mask_path)}" for s in source.samples)
    classes = sorted({s.class_name for s in source.samples})
    described = json.dumps({c: source.describe(c) for c in classes}, sort_keys=True)
    return {"name": source.name, "root": root, "images": len(rows),
            "content": hashlib.sha1("\n".join(rows).encode()).hexdigest(),
            "descriptions": hashlib.sha1(described.encode()).hexdigest()}


def run_settings(sources: Sequence[EvalSource], model_config, cfg: TrainConfig,
                 val_sources: Sequence[EvalSource] = ()) -> Dict:
    """The settings of a run (JSON-normalised): data, model and optimiser, as ``--resume`` compares them."""
    optimiser = {k: v for k, v in dataclasses.asdict(cfg).items() if k in RESUME_KEYS}
    model = model_config.to_dict()
    for k in ("model", "pretrained"):  # local files by resolved path
        v = model["backbone"].get(k)
        if isinstance(v, str) and os.path.isfile(v):
            model["backbone"][k] = os.path.realpath(v)
    doc = {"data": [data_fingerprint(s) for s in sources], "val": [data_fingerprint(s) for s in val_sources],
           "model": model, "optimiser": optimiser}
    return json.loads(json.dumps(doc))


def record_run_settings(run_dir: Path, settings: Dict) -> None:
    atomic_write_text(Path(run_dir) / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")


def _data_changes(kind: str, before: List[Dict], now: List[Dict]) -> List[str]:
    if len(before) != len(now):
        return [f"{kind}: {len(before)} source(s) -> {len(now)}"]
    out = []
    for b, n in zip(before, now):
        where = b["root"] if b["root"] == n["root"] else f"{b['root']} -> {n['root']}"
        if b["content"] != n["content"]:
            out.append(f"{kind} {n['name']} ({where}): other images ({b['images']} -> {n['images']}, "
                       "or other names, labels, masks or file sizes)")
        elif b["descriptions"] != n["descriptions"]:
            out.append(f"{kind} {n['name']}: other class descriptions (--descriptions)")
    return out


def _dict_changes(kind: str, before: Dict, now: Dict, prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(before) | set(now)):
        b, n = before.get(k), now.get(k)
        if isinstance(b, dict) and isinstance(n, dict):
            out += _dict_changes(kind, b, n, f"{prefix}{k}.")
        elif b != n:
            out.append(f"{kind} {prefix}{k} {b!r} -> {n!r}")
    return out


def check_resume_settings(run_dir: Path, settings: Dict, say: Callable[[str], None] = print) -> None:
    """Refuse to resume with other data, model or optimiser settings than the run started with.

    Data count as the same when their content fingerprint matches (:func:`data_fingerprint`),
    wherever they lie now: a moved or copied dataset resumes, with a note.
    """
    path = Path(run_dir) / SETTINGS_FILE
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        say(f"note: {run_dir} records no settings ({SETTINGS_FILE}: started by an older moeclip); "
            "resuming without checking that data and settings are the same")
        return
    except (OSError, json.JSONDecodeError) as exc:
        raise MoECLIPError(f"{path}: unreadable ({exc}); delete it to resume without the check") from None
    changes = (_data_changes("--data", before.get("data", []), settings["data"])
               + _data_changes("--val", before.get("val", []), settings["val"])
               + _dict_changes("model", before.get("model", {}), settings["model"])
               + _dict_changes("optimiser", before.get("optimiser", {}), settings["optimiser"]))
    if changes:
        raise MoECLIPError(f"{run_dir}: --resume with other settings than the run started with: "
                           f"{'; '.join(changes)}. Resume with the recorded settings ({path}), or start a new "
                           "run with another --out (or --overwrite to replace this one)")
    for b, n in zip(before.get("data", []) + before.get("val", []), settings["data"] + settings["val"]):
        if b["root"] != n["root"]:
            say(f"note: {n['name']} moved ({b['root']} -> {n['root']}), same content: resuming")


class Trainer:
    def __init__(self, model, sources: Sequence[EvalSource], cfg: TrainConfig, run_dir: str | Path,
                 device: torch.device, val_sources: Sequence[EvalSource] = (), image_size: Optional[int] = None,
                 progress: bool = True, on_epoch: Optional[Callable[[int, Dict], None]] = None):
        self.model, self.cfg, self.device = model, cfg, device
        self.run_dir = Path(run_dir)
        self.image_size = image_size or model.config.backbone.image_size
        self.val_sources = list(val_sources)
        self.progress = progress and dist_utils.is_main()
        self.on_epoch = on_epoch
        samples, descriptions = [], []
        for src in sources:
            for s in src.samples:
                samples.append(s)
                descriptions.append(src.describe(s.class_name))
        if not samples:
            raise MoECLIPError("no training images")
        bad = [s.image_path for s in samples if s.label == 1 and not s.has_pixel_gt]
        if bad:
            raise MoECLIPError(f"training needs masks for anomalous images; {bad[0]} has none "
                               f"(image-level-only data such as HeadCT cannot be used for training)")
        self.descriptions = descriptions
        self.dataset = ZSADDataset(samples, image_size=self.image_size, augment=cfg.augment)
        model.grad_checkpoint = cfg.grad_checkpoint
        self.loss_module = _LossModule(model).to(device)
        self.ddp = None
        if dist_utils.is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.ddp = DDP(self.loss_module, device_ids=ids, find_unused_parameters=False)
        if not cfg.include_backbone:
            # bf16/fp16: frozen weights cast once, bit-identical under autocast (not when the
            # checkpoints must store the CLIP itself in full precision)
            model.cast_frozen_weights(cfg.precision)
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=tuple(cfg.betas), **_fused(self.params))
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.milestones), cfg.gamma)
        self.epoch, self.step, self.best = 0, 0, None

    # ------------------------------------------------------------------ state
    def _weights_digest(self) -> str:
        import hashlib

        h = hashlib.sha1()
        for k, v in sorted(self.model.adapter_state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, epoch_metrics: Dict) -> None:
        digests = dist_utils.gather_objects(self._weights_digest())  # every rank must hold the same weights
        if not dist_utils.is_main():
            return
        tmp = self.run_dir / f".{LAST_DIR}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        meta = {"epoch": self.epoch, "step": self.step, "metrics": epoch_metrics,
                "train_config": dataclasses.asdict(self.cfg), "world_size": dist_utils.world_size(),
                "weight_digests": digests}
        save_checkpoint(self.model, tmp, meta=meta, include_backbone=self.cfg.include_backbone)
        state = {"epoch": self.epoch, "step": self.step, "best": self.best,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, tmp / STATE_FILE)
        replace_dir(tmp, self.run_dir / LAST_DIR)
        # the state file sits beside the checkpoint so `--resume` finds both together
        atomic_copy(self.run_dir / LAST_DIR / STATE_FILE, self.run_dir / STATE_FILE)

    def resume(self) -> None:
        from ..model.checkpoint import read_checkpoint

        ckpt_dir = self.run_dir / LAST_DIR
        _, adapters, _ = read_checkpoint(ckpt_dir)
        self.model.load_adapter_state_dict(adapters, str(ckpt_dir))
        state = torch.load(self.run_dir / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state.get("best")

    # ------------------------------------------------------------------ loop
    def _loader(self, epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        if dist_utils.is_distributed():
            sampler = DistributedSampler(self.dataset, shuffle=True, seed=self.cfg.seed, drop_last=False)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(self.dataset, generator=g)
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                          num_workers=self.cfg.workers, collate_fn=collate, generator=g)

    def _log_row(self, row: Dict) -> None:
        if not dist_utils.is_main():
            return
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def _step_bar(self, batches_per_epoch: int):
        """A run bounded by ``max_steps`` shows optimiser steps of the run's total, not epochs."""
        cfg = self.cfg
        if cfg.max_steps is None:
            return None
        per_epoch = -(-batches_per_epoch // cfg.grad_accum)
        total = min(cfg.max_steps, self.step + per_epoch * (cfg.epochs - self.epoch))
        return tqdm(total=total, initial=self.step, desc="training", unit="step", disable=not self.progress)

    def train(self) -> Dict:
        cfg = self.cfg
        module = self.ddp or self.loss_module
        history = {}
        path_to_desc = {s.image_path: d for s, d in zip(self.dataset.samples, self.descriptions)}
        step_bar = None
        kill_at = int(os.environ.get(KILL_ENV) or 0)
        while self.epoch < cfg.epochs:
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            _seed_epoch(cfg.seed, self.epoch)
            self.model.train()
            loader = self._loader(self.epoch)
            if step_bar is None:
                step_bar = self._step_bar(len(loader))
            per_epoch = step_bar is None
            bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="batch",
                       disable=not self.progress) if per_epoch else step_bar
            sums, count, t0 = {}, 0, time.time()
            self.optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(bar if per_epoch else loader):
                descs = [path_to_desc[p] for p in batch["path"]]
                with autocast(self.device, cfg.precision):
                    losses = module(batch["image"].to(self.device), batch["mask"].to(self.device),
                                    batch["label"].to(self.device), descs)
                (losses["total"] / cfg.grad_accum).backward()
                if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader):
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()  # per iteration, as the official code
                    self.step += 1
                    if step_bar is not None:
                        step_bar.update(1)
                parts = {"loss": losses["total"].item(), "ce": losses["ce"].item(),
                         "seg": losses["seg"].sum().item(), "etf": losses["etf"].item(),
                         "balance": losses["balance"].item()}
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if self.progress:
                    bar.set_postfix({k: f"{v / count:.3f}" for k, v in sums.items()})
                self._log_row({"epoch": self.epoch + 1, "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                               **{k: round(v, 6) for k, v in parts.items()}})
                if kill_at and self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    break
            self.epoch += 1
            epoch_metrics = {k: v / max(count, 1) for k, v in sums.items()}
            epoch_metrics["seconds"] = time.time() - t0
            if self.val_sources:
                epoch_metrics["val"] = self.validate()
            history[self.epoch] = epoch_metrics
            self.save(epoch_metrics)
            if self.on_epoch and dist_utils.is_main():
                self.on_epoch(self.epoch, epoch_metrics)
            dist_utils.barrier()
        if step_bar is not None:
            step_bar.close()
        return history

    def validate(self) -> Dict:
        """Zero-shot evaluation on the --val data; keeps the best checkpoint by ``val_metric``."""
        results = [evaluate_source(self.model, s, image_size=self.image_size, device=self.device,
                                   precision=self.cfg.precision, progress=False) for s in self.val_sources]
        values = [r.average.get(self.cfg.val_metric) for r in results]
        values = [v for v in values if v is not None]
        score = sum(values) / len(values) if values else None
        summary = {r.source: r.average for r in results}
        summary["score"] = score
        if score is not None and (self.best is None or score > self.best) and dist_utils.is_main():
            self.best = score
            tmp = self.run_dir / f".{BEST_DIR}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_checkpoint(self.model, tmp, meta={"epoch": self.epoch, self.cfg.val_metric: score},
                            include_backbone=self.cfg.include_backbone)
            replace_dir(tmp, self.run_dir / BEST_DIR)
        self.model.train()
        return summary
