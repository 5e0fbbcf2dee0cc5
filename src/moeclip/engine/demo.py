"""The offline demo: synthetic data, a tiny random CLIP, training, zero-shot evaluation before/after,
then few-shot evaluation (K normal references per held-out category) of the trained model, then
transductive evaluation (each held-out category's test images scored as one batch: zero-shot +
mutual, :mod:`moeclip.model.fused`).

What it proves: the whole pipeline (data, MoE adapters, losses, training, zero-shot scoring,
metrics, checkpoints) works end to end, and training on some categories improves anomaly
localisation on categories never seen in training. What it does not prove: anything about
CLIP. A random-weight CLIP has no language grounding, so every category is prompted with one
shared description (the object-agnostic setting); real use needs pretrained CLIP weights and
per-class descriptions.

The few-shot references are extra ``<class>/train/good`` normals of the held-out categories,
drawn by the same generator from their own per-image seeds, so the test images (and so the
before/after numbers) are byte-identical with or without them, and no reference is a test image.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional

from ..errors import MoECLIPError
from ..fileio import atomic_write_text
from ..model.config import AdapterConfig, BackboneConfig, ModelConfig

SHARED_DESCRIPTION = "object"
SUMMARY_KEYS = ("pixel_auroc", "pixel_ap", "image_auroc", "image_ap")


def builtin_clip_config() -> str:
    """Path of the packaged tiny open_clip config (random weights; see configs/tiny-clip.json)."""
    return str(resources.files("moeclip") / "configs" / "tiny-clip.json")


@dataclass
class DemoConfig:
    out: Path
    clip_model: Optional[str] = None
    clip_weights: Optional[str] = None
    image_size: int = 64
    train_per_category: int = 160
    heldout_per_category: int = 20
    steps: int = 1000
    defect_scale: float = 2.5  # defects of a few patches: the tiny CLIP sees 8x8 patches of 64 px
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    workers: int = 1  # one loader process decodes and augments the next batches on a second core
    overwrite: bool = False
    progress: bool = True
    shots: int = 4  # few-shot references per held-out category in the third stage (0: skip it)
    reference_pool: int = 8  # extra normals generated per held-out category, the shots are drawn from them
    transductive: bool = True  # fourth stage: the held-out test images scored as one batch per category


def run_demo(cfg: DemoConfig, say=print, draw: Optional[Callable[..., None]] = None) -> Dict:
    """Run the demo into ``cfg.out``; returns the results document (also written as demo_results.json).

    ``draw(image_path, anomaly_map, mask, out_path)`` writes one picture of a held-out image into
    ``out/overlays`` (``moeclip demo`` passes :func:`moeclip.analysis.overlay.save_triptych`; the
    engine sits below ``analysis`` and does not import it); None writes no pictures.
    """
    import torch

    from ..precision import resolve_device
    from .evaluate import evaluate_source, format_table

    t0 = time.time()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise MoECLIPError(f"{out}: output directory is not empty (use --overwrite)")
    if cfg.shots < 0:
        raise MoECLIPError(f"--shots must be >= 0 (0 skips the few-shot stage), got {cfg.shots}")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    train_src, held_src = _make_data(cfg, out, say)

    say("[2/6] building the model")
    if not cfg.clip_model:
        # One compute thread for the tiny model. Two are faster on an idle 2-core machine (50 vs 70 ms
        # a step) but collapse when anything else runs: 1.4 s a step beside one busy process, as both
        # threads wait for each other at every operation; the thread count also changes the float
        # rounding, so it cannot follow the load without making the demo's results depend on it.
        torch.set_num_threads(1)
    model = _build_model(cfg, device, say)

    def evaluate(tag):
        res = evaluate_source(model, held_src, image_size=cfg.image_size, device=device, batch_size=32,
                              keep_maps=True, progress=cfg.progress)
        say(f"\n{tag}: zero-shot on held-out categories\n{format_table([res])}\n")
        return res

    say("[3/6] zero-shot evaluation before training")
    before = evaluate("before training")
    say(f"[4/6] training {cfg.steps} steps (batch {cfg.batch_size}, Adam lr {cfg.lr})")
    steps, train_seconds = _train(cfg, model, train_src, out / "run", device)
    say("[5/6] zero-shot evaluation after training")
    after = evaluate("after training")
    few, refs = _few_shot(cfg, model, held_src, device, say)
    trans = _transductive(cfg, model, held_src, device, say)
    doc = _write_outputs(cfg, model, out, before, after, steps, train_seconds, draw)
    if few is not None:
        doc["few_shot"] = {**{k: few.average.get(k) for k in SUMMARY_KEYS}, "shots": cfg.shots, "seed": 0,
                           "references": {g: [str(p) for p in ps] for g, ps in refs.items()}}
        doc["per_class"]["few_shot"] = few.per_class
    if trans is not None:
        doc["transductive"] = {**{k: trans.average.get(k) for k in SUMMARY_KEYS}, **trans_settings()}
        doc["per_class"]["transductive"] = trans.per_class
    doc["total_seconds"] = round(time.time() - t0, 1)
    atomic_write_text(out / "demo_results.json", json.dumps(doc, indent=2) + "\n")
    _print_summary(doc, out, say)
    return doc


def _make_data(cfg: DemoConfig, out: Path, say):
    """Step 1: the synthetic training and held-out sets, every category described the same way."""
    from ..data.synth import DEFAULT_HELDOUT_CATEGORIES, DEFAULT_TRAIN_CATEGORIES, generate_dataset
    from .sources import build_source

    say(f"[1/6] generating synthetic data in {out / 'data'}")
    n_tr, n_ho = cfg.train_per_category, cfg.heldout_per_category
    workers = min(4, os.cpu_count() or 1)  # the images do not depend on it
    generate_dataset(out / "data" / "train", DEFAULT_TRAIN_CATEGORIES, n_normal=n_tr // 2,
                     n_anomalous=n_tr - n_tr // 2, image_size=cfg.image_size, seed=cfg.seed, overwrite=True,
                     defect_scale=cfg.defect_scale, workers=workers)
    # train/good: the few-shot reference pool; per-image seeds keep the test images identical without it
    generate_dataset(out / "data" / "heldout", DEFAULT_HELDOUT_CATEGORIES, n_normal=n_ho // 2,
                     n_anomalous=n_ho - n_ho // 2, image_size=cfg.image_size, seed=cfg.seed + 1, overwrite=True,
                     n_train=max(cfg.reference_pool, cfg.shots) if cfg.shots > 0 else 0, defect_scale=cfg.defect_scale,
                     workers=workers)
    shared = out / "data" / "shared-description.json"
    categories = DEFAULT_TRAIN_CATEGORIES + DEFAULT_HELDOUT_CATEGORIES
    atomic_write_text(shared, json.dumps({c: SHARED_DESCRIPTION for c in categories}))
    train_src = build_source(f"folder={out / 'data' / 'train'}", descriptions=str(shared), report=say)
    held_src = build_source(f"folder={out / 'data' / 'heldout'}", descriptions=str(shared), report=say)
    say(f"      training categories: {', '.join(DEFAULT_TRAIN_CATEGORIES)} ({len(train_src.samples)} images)")
    say(f"      held-out categories: {', '.join(DEFAULT_HELDOUT_CATEGORIES)} ({len(held_src.samples)} images, "
        "never seen in training)")
    return train_src, held_src


def _build_model(cfg: DemoConfig, device, say):
    import torch

    from ..model.moeclip import MoECLIP

    torch.manual_seed(cfg.seed)
    backbone = BackboneConfig(model=cfg.clip_model or builtin_clip_config(), pretrained=cfg.clip_weights,
                              image_size=cfg.image_size)
    model = MoECLIP.from_config(ModelConfig(backbone, AdapterConfig())).to(device)
    say(f"      CLIP: {'built-in tiny config, random weights' if not cfg.clip_model else cfg.clip_model}; "
        f"{sum(p.numel() for p in model.trainable_parameters()):,} trainable adapter parameters")
    say(f"      prompts: every category is described as {SHARED_DESCRIPTION!r} (a random-weight text encoder "
        "cannot ground category names)")
    return model


def _train(cfg: DemoConfig, model, train_src, run_dir: Path, device):
    """Step 4: ``cfg.steps`` optimiser steps (a fixed count: the same run on any machine)."""
    from .train import TrainConfig, Trainer, prepare_run_dir

    prepare_run_dir(run_dir, resume=False, overwrite=True)
    tcfg = TrainConfig(epochs=10 ** 6, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, max_steps=cfg.steps,
                       include_backbone=True, workers=cfg.workers)
    trainer = Trainer(model, [train_src], tcfg, run_dir, device, progress=cfg.progress)
    t = time.time()
    trainer.train()
    return trainer.step, time.time() - t


def _few_shot(cfg: DemoConfig, model, held_src, device, say):
    """Step 6: the trained model on the held-out test images, fused with ``cfg.shots`` references each.

    The references are drawn (seed 0) from the held-out categories' ``train/good`` normals by the
    k-shot protocol's own picker, which refuses any reference that is also a test image.
    """
    from .evaluate import FewShot, evaluate_source, format_table
    from .kshot import reference_picker

    if cfg.shots <= 0:
        return None, {}
    say(f"[6/6] few-shot evaluation after training ({cfg.shots} normal references per held-out category)")
    pick, chosen = reference_picker(cfg.shots, seed=0), {}

    def references(source, group, samples):
        chosen[group] = pick(source, group, samples)
        return chosen[group]

    res = evaluate_source(model, held_src, few_shot=FewShot(references), image_size=cfg.image_size, device=device,
                          batch_size=32, progress=cfg.progress)
    say(f"\nfew-shot ({cfg.shots} refs): held-out categories\n{format_table([res])}\n")
    return res, chosen


def trans_settings() -> Dict:
    """What the demo's transductive stage runs: the product's defaults."""
    from ..model.fused import DEFAULT_MUTUAL_TOKENS, DEFAULT_MUTUAL_WEIGHT

    return {"tokens": DEFAULT_MUTUAL_TOKENS, "mutual_weight": DEFAULT_MUTUAL_WEIGHT, "batch": "class test split"}


def _transductive(cfg: DemoConfig, model, held_src, device, say):
    """Fourth stage: each held-out category's test images scored as one batch, zero-shot + mutual fused.

    MuSc's protocol (``moeclip test --transductive``): no references, the other unlabeled test
    images of the category are the evidence.
    """
    from .evaluate import Transductive, evaluate_source, format_table

    if not cfg.transductive:
        return None
    say("[+] transductive evaluation after training (each held-out category's test images as one batch)")
    res = evaluate_source(model, held_src, transductive=Transductive(), image_size=cfg.image_size, device=device,
                          batch_size=32, progress=cfg.progress)
    say(f"\ntransductive (zero-shot + mutual): held-out categories\n{format_table([res])}\n")
    return res


def _write_outputs(cfg: DemoConfig, model, out: Path, before, after, steps: int, train_seconds: float,
                   draw: Optional[Callable[..., None]]) -> Dict:
    """Checkpoint, pictures of the held-out images (anomalous first) and the results document."""
    from ..data.synth import DEFAULT_HELDOUT_CATEGORIES, DEFAULT_TRAIN_CATEGORIES
    from ..model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, out / "checkpoint", include_backbone=True, overwrite=True,
                           meta={"demo": True, "description": SHARED_DESCRIPTION, "steps": cfg.steps})
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    for group, o in after.outputs.items() if draw is not None else ():
        for i in range(min(4, len(o.paths))):
            idx = int(o.labels.argsort()[::-1][i])  # anomalous images first
            draw(o.paths[idx], o.maps[idx], o.masks[idx], overlays / f"{group}_{i}.png")

    def summary(res):
        return {k: res.average.get(k) for k in SUMMARY_KEYS}

    return {"before": summary(before), "after": summary(after),
            "per_class": {"before": before.per_class, "after": after.per_class},
            "train_steps": steps, "train_seconds": round(train_seconds, 1),
            "total_seconds": None, "checkpoint": str(ckpt),
            "description": SHARED_DESCRIPTION,
            "heldout_categories": list(DEFAULT_HELDOUT_CATEGORIES), "train_categories": list(DEFAULT_TRAIN_CATEGORIES)}


def _print_summary(doc: Dict, out: Path, say) -> None:
    b, a, f, t = doc["before"], doc["after"], doc.get("few_shot"), doc.get("transductive")
    head = "held-out averages       before  ->  after"
    say(head + (f"   few-shot ({f['shots']} refs)" if f else "") + ("   transductive" if t else ""))
    for k in SUMMARY_KEYS:
        fmt = lambda v: "  n/a" if v is None else f"{100 * v:5.1f}"  # noqa: E731
        say(f"  {k:<20} {fmt(b[k])}  -> {fmt(a[k])}" + (f"   {fmt(f[k])}" if f else "") +
            (f"{' ' * 15 if f else '   '}{fmt(t[k])}" if t else ""))
    say(f"\ncheckpoint: {doc['checkpoint']}  (usable by moeclip predict/test/serve/export)")
    say(f"overlays:   {out / 'overlays'}\nresults:    {out / 'demo_results.json'}  ({doc['total_seconds']} s in all)")
