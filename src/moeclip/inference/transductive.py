"""Transductive scoring: each image is scored against the other images of its batch (MuSc).

The batch is every readable image of one object in the run (``moeclip predict --transductive``):
images of different objects never meet. The loop reuses the pipeline's pieces (inputs, decoding,
:class:`~moeclip.inference.pipeline.ResultWriter`, ``--overwrite``/``--resume``), but scores a whole
object group at once instead of fixed-size batches::

    jobs -> groups by object -> decode + preprocess (broken files: their error line)
         -> MuSc on the group (>= 2 images) -> one result line per image, "transductive": N

With ``--resume``, images already in ``results.jsonl`` still join their group's batch (so the
others see the same batch as in an uninterrupted run) but are not written again.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.imageio import DEFAULT_MAX_PIXELS
from ..errors import MoECLIPError
from .pipeline import Job, ResultWriter, Summary, decode
from .postprocess import Normalization, PostProcessor, Scored, decide, resize_map

__all__ = ["MuScSpec", "MuScPostProcessor", "group_by_object", "check_batch", "run_transductive"]


@dataclass
class MuScSpec:
    """How to build the frozen-CLIP MuSc scorer (:class:`moeclip.model.musc.MuSc`); picklable."""

    clip_model: str = "ViT-L-14-336"
    clip_weights: Optional[str] = "openai"
    image_size: int = 518
    quick_gelu: bool = False
    levels: Optional[List[int]] = None       # 1-based block outputs (default: quarter points)
    windows: Tuple[int, ...] = (1, 2, 3)     # RsCIN
    mutual_images: Optional[int] = None      # compare each image with at most M others
    seed: int = 0                            # which M others
    device: str = "auto"
    batch_size: int = 8                      # forward pass only

    def build(self):
        from ..model.musc import MuSc

        weights = None if isinstance(self.clip_weights, str) and self.clip_weights.lower() == "none" \
            else self.clip_weights
        return MuSc.from_options(self.clip_model, weights, image_size=self.image_size, quick_gelu=self.quick_gelu,
                                 device=self.device, levels=self.levels, windows=self.windows,
                                 mutual_images=self.mutual_images, seed=self.seed, batch_size=self.batch_size)


@dataclass
class MuScPostProcessor(PostProcessor):
    """MuSc's outputs as users see them: the score is the RsCIN score, the map MuSc's own.

    The map is only resized to the image (bilinear, ``align_corners=True``; untouched at the
    model's size). Heat-map colours span the batch's map range (:meth:`for_batch`), so the
    images of one batch are comparable; MuSc distances have no fixed scale across batches.
    """

    num_maps: int = 1

    def __call__(self, raw_map, raw_score: float, size: Optional[Tuple[int, int]] = None) -> Scored:
        raw_map = np.asarray(raw_map, dtype=np.float32)
        score = float(np.clip(raw_score, 0.0, 1.0))
        full = resize_map(raw_map, size) if size is not None else raw_map
        return Scored(full, float(raw_map.max()), float(raw_score), score, decide(score, self.threshold))

    def for_batch(self, maps: np.ndarray) -> "MuScPostProcessor":
        """This post-processor with colours on ``maps``' value range."""
        lo, hi = float(np.min(maps)), float(np.max(maps))
        return replace(self, normalization=Normalization(lo, hi, 0.0, 1.0))


def group_by_object(jobs: Sequence[Job]) -> Dict[str, List[Job]]:
    """Jobs by object description, in first-seen order (each group is one MuSc batch)."""
    groups: Dict[str, List[Job]] = {}
    for job in jobs:
        groups.setdefault(job.object, []).append(job)
    return groups


def check_batch(jobs: Sequence[Job]) -> None:
    """Refuse a run in which no object has two images (before anything is written)."""
    from ..model.musc import ONE_IMAGE_FIX

    groups = group_by_object(jobs)
    if not any(len(g) >= 2 for g in groups.values()):
        what = "one image" if len(jobs) == 1 else "one image per object"
        raise MoECLIPError(f"--transductive got {what}: {ONE_IMAGE_FIX}")


def run_transductive(jobs: Sequence[Job], scorer, post: MuScPostProcessor, writer: ResultWriter, workers: int = 4,
                     max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Summary:
    """Score every object group of ``jobs`` as one batch; write the lines not yet in the writer's results."""
    import torch

    from ..data.transforms import preprocess_image
    from ..model.musc import ONE_IMAGE_FIX

    summary = Summary(skipped=sum(1 for j in jobs if writer.is_done(j)))
    size = scorer.image_size

    def load(job: Job):
        try:
            img = decode(job, max_pixels)
            return preprocess_image(img, size), (img.height, img.width), None
        except MoECLIPError as exc:
            return None, None, str(exc)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for obj, group in group_by_object(jobs).items():
                loaded = list(pool.map(load, group))
                good = [(job, x, hw) for job, (x, hw, err) in zip(group, loaded) if err is None]
                for job, (_, _, err) in zip(group, loaded):
                    if err is not None and not writer.is_done(job):
                        writer.write_error(job, err)
                        summary.errors += 1
                if len(good) < 2:
                    for job, _, _ in good:
                        if not writer.is_done(job):
                            writer.write_error(job, f"the only readable image of {obj!r}: {ONE_IMAGE_FIX}")
                            summary.errors += 1
                    continue
                result = scorer.score_tensors(torch.stack([x for _, x, _ in good]))
                maps = result.maps.numpy()
                batch_post = post.for_batch(maps)
                for i, (job, _, hw) in enumerate(good):
                    if writer.is_done(job):
                        continue
                    scored = batch_post(maps[i], float(result.scores[i]), hw)
                    scored.extra = {"scoring": "musc", "transductive": result.batch_size}
                    writer.write(job, scored, decode(job, max_pixels), batch_post)
                    summary.scored += 1
                    summary.flagged += bool(scored.decision)
                print(f"{obj}: {result.batch_size} image(s) scored as one batch", file=sys.stderr)
    finally:
        writer.close()
    return summary
