"""Zero-shot evaluation loop: the model over a dataset, class by class, scored by the official rule
(:mod:`moeclip.metrics.protocol`)."""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.dataset import ZSADDataset, collate
from ..data.sample import Sample
from ..metrics import ClassAccumulator, average_results
from ..metrics.protocol import mean_std
from ..model.scoring import Domain
from ..precision import autocast
from . import distributed as dist_utils

log = logging.getLogger(__name__)

METRIC_KEYS = ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1_max", "image_auroc", "image_ap", "image_f1_max")


@dataclass
class EvalSource:
    """One ``--data`` entry: its samples, domain and how to describe each class."""

    name: str
    domain: str
    samples: List[Sample]
    describe: Callable[[str], str]
    class_order: Sequence[str] = ()

    def groups(self) -> "OrderedDict[str, List[Sample]]":
        """Reporting units (class, or texture folder for DTD-Synthetic) in the official order."""
        order = {c: i for i, c in enumerate(self.class_order)}
        out: "OrderedDict[str, List[Sample]]" = OrderedDict()
        for s in sorted(self.samples, key=lambda s: (order.get(s.class_name, len(order)), s.group)):
            out.setdefault(s.group, []).append(s)
        return out


@dataclass
class ClassOutputs:
    """What the report needs of one class: per-image scores, labels, paths (maps on request)."""

    name: str
    class_name: str
    description: str
    image_scores: np.ndarray
    map_max: np.ndarray
    labels: np.ndarray
    paths: List[str]
    maps: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None


@dataclass
class EvalResult:
    source: str
    domain: str
    per_class: "OrderedDict[str, Dict]" = field(default_factory=OrderedDict)
    average: Dict = field(default_factory=dict)
    outputs: Dict[str, ClassOutputs] = field(default_factory=dict)
    skipped: List = field(default_factory=list)
    references: Dict[str, List[str]] = field(default_factory=dict)  # few-shot: class -> reference images


@dataclass
class FewShot:
    """Few-shot evaluation: per class, a memory bank of normal references fused with the zero-shot map.

    ``references(source, group, samples)`` returns the reference image paths of one class
    (drawn from its training normals or a user folder, never from the test samples). The
    fused map (:func:`moeclip.model.fusion.fused_raw`: both maps standardised by the bank's
    leave-one-out statistics, back in zero-shot raw units) is what the class is evaluated on;
    the image score fed to the official rule is the raw zero-shot score, as at prediction.
    """

    references: Callable[["EvalSource", str, List[Sample]], List[Path]]
    weight: float = 0.5
    bank_size: Optional[int] = None
    bank_fp16: bool = False


@dataclass
class Transductive:
    """Transductive evaluation (MuSc's protocol): per class, the class's whole test split is one batch.

    Each image's map is the zero-shot map fused with the mutual map over the class's other test
    images (and with the few-shot map under :class:`FewShot`), :mod:`moeclip.model.fused`.
    """

    options: Optional[object] = None  # moeclip.model.fused.MutualOptions (default: its defaults)


def _transductive_batches(model, loader, text, domain: Domain, device, precision: str, bank, weight: float,
                          transductive: Transductive):
    """(batch, fused maps, scores) for every batch of one class, after the whole class has been seen."""
    from ..model.fused import MutualOptions, concat_signals, forward_signals, fuse_batch

    opts = transductive.options or MutualOptions()
    kept, parts = [], []
    for batch in loader:
        with autocast(device, precision):
            parts.append(forward_signals(model, batch["image"].to(device), text, domain, bank, opts.tokens))
        kept.append(batch)
    stats = None if bank is None else bank.normal_stats(model, text, domain)
    fused = fuse_batch(concat_signals(parts), domain, stats, weight, opts)
    start = 0
    for batch in kept:
        n = batch["image"].shape[0]
        yield batch, torch.from_numpy(fused.maps[start:start + n]), torch.from_numpy(fused.raw_scores[start:start + n])
        start += n


def _class_bank(model, paths: Sequence[Path], description: str, image_size: int, few_shot: FewShot,
                precision: str, batch_size: int, text: torch.Tensor, domain: Domain):
    from ..data.imageio import load_image
    from ..data.transforms import preprocess_image
    from ..model.fewshot import build_bank

    images = torch.stack([preprocess_image(load_image(p), image_size) for p in paths])
    return build_bank(model, images, description, references=[str(p) for p in paths], bank_size=few_shot.bank_size,
                      fp16=few_shot.bank_fp16, batch_size=batch_size, precision=precision, text=text, domain=domain)


def _score_batch(model, images: torch.Tensor, text: torch.Tensor, domain: Domain, device, precision: str,
                 bank=None, weight: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """(maps, image scores) of one batch on CPU: zero-shot raw, or fused with the bank's few-shot map."""
    with autocast(device, precision):
        if bank is None:
            out = model.predict(images, text, domain)
            return out["anomaly_map"].float().cpu(), out["image_score"].float().cpu()
        from ..model.fewshot import predict_with_bank

        out = predict_with_bank(model, images, text, bank, domain)
    from ..model.fusion import fused_raw

    fused, score = fused_raw(out["anomaly_map"].cpu().numpy(), out["few_shot_map"].cpu().numpy(),
                             out["image_score"].cpu().numpy(), bank.normal_stats(model, text, domain), weight)
    return torch.from_numpy(fused), torch.from_numpy(score)


@torch.inference_mode()
def evaluate_source(model, source: EvalSource, *, image_size: int, device: torch.device, precision: str = "fp32",
                    batch_size: int = 8, workers: int = 0, skip_bad: bool = False, keep_maps: bool = False,
                    on_batch: Optional[Callable] = None, progress: bool = True,
                    few_shot: Optional[FewShot] = None, transductive: Optional[Transductive] = None) -> EvalResult:
    """Evaluate every class of ``source``; maps are kept at the evaluation resolution (S x S).

    With ``few_shot``, each class is scored against a memory bank of its references (see :class:`FewShot`);
    with ``transductive``, each class's test images are one batch (see :class:`Transductive`; every
    process scores the whole class under torchrun).
    """
    model.eval()
    domain = Domain.parse(source.domain)
    result = EvalResult(source.name, domain.value)
    for group, samples in source.groups().items():
        class_name = samples[0].class_name
        description = source.describe(class_name)
        dataset = ZSADDataset(samples, image_size=image_size, skip_bad=skip_bad)
        if skip_bad:
            result.skipped.extend(dataset.validate(progress=False))
        if len(dataset) == 0:
            log.warning("%s/%s: no readable images, skipped", source.name, group)
            continue
        has_gt = all(s.has_pixel_gt for s in dataset.samples)
        acc = ClassAccumulator(domain.value, num_images=len(dataset), image_shape=(image_size, image_size),
                               has_pixel_gt=has_gt)
        text = model.text_features(description)
        bank = None
        if few_shot is not None:
            refs = few_shot.references(source, group, samples)
            bank = _class_bank(model, refs, description, image_size, few_shot, precision, batch_size, text, domain)
            result.references[group] = [str(r) for r in refs]
        # under torchrun each rank scores an interleaved shard; the shards are gathered in order
        shard = list(range(dist_utils.rank(), len(dataset), dist_utils.world_size()))
        sharded = dist_utils.is_distributed() and transductive is None
        subset = torch.utils.data.Subset(dataset, shard) if sharded else dataset
        loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
        scores, maxes, labels, paths = [], [], [], []
        maps_keep, masks_keep = [], []
        local = []
        bar = tqdm(loader, desc=f"{source.name}/{group}", unit="batch",
                   disable=not progress or not dist_utils.is_main(), leave=False)
        weight = few_shot.weight if few_shot is not None else 0.5
        if transductive is None:
            scored = ((b, *_score_batch(model, b["image"].to(device), text, domain, device, precision, bank, weight))
                      for b in bar)
        else:
            scored = _transductive_batches(model, bar, text, domain, device, precision, bank, weight, transductive)
        for batch, amap, score in scored:
            mask = batch["mask"][:, 0] > 0.5
            if on_batch is not None:
                on_batch(source, group, batch, amap, score)
            local.append((batch["index"].numpy(), amap.numpy(), mask.numpy(), score.numpy(),
                          batch["label"].numpy(), list(batch["path"])))
        parts = [p for rank_parts in dist_utils.gather_objects(local) for p in rank_parts] if sharded else local
        if sharded:  # back to the dataset order: identical to one process
            flat = [(int(i), p[1][j], p[2][j], p[3][j], p[4][j], p[5][j]) for p in parts for j, i in enumerate(p[0])]
            flat.sort(key=lambda t: t[0])
            parts = [(np.array([t[0]]), t[1][None], t[2][None], np.array([t[3]]), np.array([t[4]]), [t[5]])
                     for t in flat]
        for _, amap, mask, score, label, pths in parts:
            acc.add(amap, mask if has_gt else None, score, label)
            scores.append(score)
            maxes.append(amap.reshape(amap.shape[0], -1).max(1))
            labels.append(label)
            paths.extend(pths)
            if keep_maps:
                maps_keep.append(amap)
                masks_keep.append(mask)
        metrics = acc.compute()
        metrics["num_images"] = len(dataset)
        metrics["num_anomalous"] = int(np.concatenate(labels).sum())
        result.per_class[group] = metrics
        result.outputs[group] = ClassOutputs(
            group, class_name, description, np.concatenate(scores), np.concatenate(maxes), np.concatenate(labels),
            paths, np.concatenate(maps_keep) if keep_maps else None, np.concatenate(masks_keep) if keep_maps else None)
    result.average = {k: v for k, v in average_results(
        [{k: m[k] for k in METRIC_KEYS} for m in result.per_class.values()]).items()}
    return result


def format_table(results: Sequence[EvalResult], keys: Sequence[str] = METRIC_KEYS) -> str:
    """Markdown table in percent, per class then the dataset average; n/a where undefined."""
    head = ["dataset", "class"] + [k.replace("_", " ") for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    for r in results:
        for name, m in r.per_class.items():
            lines.append("| " + " | ".join([r.source, name] + [cell(m.get(k)) for k in keys]) + " |")
        lines.append("| " + " | ".join([f"**{r.source}**", "**average**"] +
                                        [f"**{cell(r.average.get(k))}**" for k in keys]) + " |")
    return "\n".join(lines)


def seed_statistics(per_seed: Sequence[EvalResult], keys: Sequence[str] = METRIC_KEYS) -> Dict[str, Dict]:
    """Mean and sample std (:func:`mean_std`) over seeds of each metric, per class and for the average.

    ``{"per_class": {cls: {k: mean}}, "per_class_std": ..., "average": {k: mean}, "average_std": ...}``;
    a metric undefined in any seed (None) stays None, and so does the std of a single seed.
    """
    def stats(dicts: List[Dict]) -> Tuple[Dict, Dict]:
        mean, std = {}, {}
        for k in keys:
            vals = [d.get(k) for d in dicts]
            if any(v is None for v in vals):
                mean[k] = std[k] = None
            else:
                mean[k], std[k], _ = mean_std(vals)
        return mean, std

    out: Dict[str, Dict] = {"per_class": OrderedDict(), "per_class_std": OrderedDict()}
    for name in per_seed[0].per_class:
        out["per_class"][name], out["per_class_std"][name] = stats([r.per_class[name] for r in per_seed])
    out["average"], out["average_std"] = stats([r.average for r in per_seed])
    return out


def format_table_seeds(rows: Sequence[Tuple[str, Dict[str, Dict]]], keys: Sequence[str] = METRIC_KEYS) -> str:
    """Markdown table of ``mean ± std`` (percent) over seeds; ``rows`` are (dataset, seed_statistics)."""
    head = ["dataset", "class"] + [k.replace("_", " ") for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(m, s):
        if m is None:
            return "n/a"
        return f"{100 * m:.1f}" if s is None else f"{100 * m:.1f} ± {100 * s:.1f}"

    for source, st in rows:
        for name, m in st["per_class"].items():
            sd = st["per_class_std"][name]
            lines.append("| " + " | ".join([source, name] + [cell(m.get(k), sd.get(k)) for k in keys]) + " |")
        avg, sd = st["average"], st["average_std"]
        lines.append("| " + " | ".join([f"**{source}**", "**average**"] +
                                        [f"**{cell(avg.get(k), sd.get(k))}**" for k in keys]) + " |")
    return "\n".join(lines)
