"""The fused transductive mode at inference: a runtime that scores a whole object group as one batch.

:class:`TransductiveRuntime` implements the pipeline's :class:`~moeclip.inference.pipeline.Runtime`
protocol, but ``raw`` must get *every* image of the batch at once (the mutual score compares each
image with the others): :func:`run_fused` (``moeclip predict --transductive``) and
``Detector.predict(..., transductive=True)`` call it with a whole object group. The maps and scores
are on the zero-shot raw scales (:mod:`moeclip.model.fused`), so the detector's own
:class:`~moeclip.inference.postprocess.PostProcessor` applies unchanged.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ..data.imageio import DEFAULT_MAX_PIXELS
from ..data.transforms import preprocess_image
from ..errors import MoECLIPError
from ..model.fused import MutualOptions, score_batch
from ..model.musc import ONE_IMAGE_FIX
from ..precision import autocast
from .pipeline import Job, ResultWriter, Runtime, Summary, decode, score_images
from .postprocess import PostProcessor, image_score

__all__ = ["TransductiveRuntime", "run_fused"]


class TransductiveRuntime(Runtime):
    """A detector's model, its reference banks if any, and the mutual score over the batch given to ``raw``."""

    def __init__(self, detector, opts: Optional[MutualOptions] = None, batch_size: int = 8):
        self.detector = detector
        self.opts = opts or MutualOptions()
        self.batch_size = batch_size
        self.num_maps = detector.num_maps
        self.image_size = int(detector.image_size)

    def raw(self, images, object: str, domain: str):
        """All images of one batch (2 or more) -> fused raw maps, raw scores, per-image extras."""
        if len(images) < 2:
            raise MoECLIPError(f"--transductive got one image of {object!r}: {ONE_IMAGE_FIX}")
        det = self.detector
        batch = torch.stack([preprocess_image(img, self.image_size) for img in images])
        banks = det.references
        bank = banks.get(object) if banks else None
        weight = banks.weight if banks else 0.5
        if bank is not None:
            bank = bank.to(det.device)
        res = score_batch(det.model, batch, det.text_features(object), domain, bank, weight, self.opts,
                          self.batch_size, autocast=lambda: autocast(det.device, det.precision))
        n = res.batch_size
        zmax = res.zero_shot.reshape(n, -1).max(1)
        extras: Dict[str, Any] = {
            "scoring": ["fused"] * n, "transductive": np.full(n, n, dtype=np.int64),
            "zero_shot_raw_score": res.raw_scores.copy(), "zero_shot_map_max": zmax,
            "zero_shot_score": np.array([image_score(float(m), float(r), domain, None, self.num_maps)
                                         for m, r in zip(zmax, res.raw_scores)], dtype=np.float32),
            "mutual_map_max": res.mutual.reshape(n, -1).max(1)}
        if banks:
            extras["references"] = np.full(n, bank.num_references if bank is not None else 0, dtype=np.int64)
        if res.few_shot is not None:
            extras["few_shot_map_max"] = res.few_shot.reshape(n, -1).max(1)
        return res.maps, res.raw_scores, extras

    def clear_cache(self) -> None:
        self.detector.model.text.clear_cache()


def run_fused(jobs: Sequence[Job], runtime: TransductiveRuntime, post: PostProcessor, writer: ResultWriter,
              workers: int = 4, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Summary:
    """``predict --transductive`` (fused): every object group of ``jobs`` is one batch.

    Broken files get their error line and the rest of the group is scored without them; a group
    left with one image gets an error line. With ``--resume``, images already written still join
    their group's batch (the others see the same batch) but are not written again.
    """
    from .transductive import group_by_object

    summary = Summary(skipped=sum(1 for j in jobs if writer.is_done(j)))

    def load(job: Job):
        try:
            return decode(job, max_pixels), None
        except MoECLIPError as exc:
            return None, str(exc)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for obj, group in group_by_object(jobs).items():
                loaded = list(pool.map(load, group))
                good = [(job, img) for job, (img, err) in zip(group, loaded) if err is None]
                for job, (_, err) in zip(group, loaded):
                    if err is not None and not writer.is_done(job):
                        writer.write_error(job, err)
                        summary.errors += 1
                if len(good) < 2:
                    for job, _ in good:
                        if not writer.is_done(job):
                            writer.write_error(job, f"the only readable image of {obj!r}: {ONE_IMAGE_FIX}")
                            summary.errors += 1
                    continue
                scored = score_images(runtime, post, [img for _, img in good], obj)
                for (job, img), s in zip(good, scored):
                    if writer.is_done(job):
                        continue
                    writer.write(job, s, img, post)
                    summary.scored += 1
                    summary.flagged += bool(s.decision)
                print(f"{obj}: {len(good)} image(s) scored as one batch (fused)", file=sys.stderr)
    finally:
        writer.close()
    return summary
