"""MoECLIP as an anomalib model: ``Engine().test/predict/export`` on any anomalib datamodule.

>>> from anomalib.data import MVTecAD
>>> from anomalib.engine import Engine
>>> from moeclip.integrations.anomalib import MoEClip
>>> model = MoEClip(checkpoint="runs/visa/checkpoint")          # our checkpoint directory
>>> Engine().test(model, datamodule=MVTecAD(root="datasets/MVTecAD", category="bottle"))

Like anomalib's own zero-shot models (WinCLIP, AnomalyVFM) it has no optimiser (training stays
``moeclip train``); validation only feeds anomalib's post-processor its normalisation bounds and
thresholds. The image is resized and normalised as moeclip does (bicubic to the checkpoint's
size, CLIP mean/std) by the pre-processor, so the anomalib graph -- and its ONNX/OpenVINO
export -- goes from a [0, 1] image of any size to:

- ``anomaly_map`` (B, S, S): moeclip's raw map (the sum of the 12 maps, blurred, upsampled), the
  same numbers ``moeclip test`` ranks for the pixel metrics;
- ``pred_score`` (B,): the single-image score of ``moeclip predict`` without a deployment file
  (the domain's rule on the map maximum's probability and the raw image score).

anomalib's post-processor then min-max normalises both with bounds measured on the validation
split and thresholds them (F1-adaptive). Its evaluator pools the images of the datamodule's one
category; the paper's per-class rule instead normalises map maxima and image scores per class
*before* combining them, so image AUROC can differ slightly while pixel AUROC agrees (see
README, "anomalib").

Few-shot: ``MoEClip(k_shot=K)`` draws K references from the datamodule's normal training images
(as anomalib's k-shot models do; the draw of ``moeclip test --shots K --shot-seeds S``, seed
``shot_seed``), builds moeclip's memory bank of them (read as ``moeclip predict --reference``
reads them, so the bank and the maps are the ones ``predict --reference`` gives) and outputs the
fused map of :mod:`moeclip.model.fusion` (in zero-shot raw units) with the same score rule.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import MoECLIPError

try:
    import torch
    from anomalib import LearningType
    from anomalib.data import Batch, InferenceBatch
    from anomalib.metrics import Evaluator
    from anomalib.models.components import AnomalibModule
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from anomalib.visualization import Visualizer
    from torch import nn
    from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize
except ImportError as exc:  # pragma: no cover - exercised without anomalib installed
    raise MoECLIPError(f"the anomalib integration needs anomalib ({exc.name or exc} is missing): "
                       "pip install 'moeclip[anomalib]'") from None

from ..data.transforms import CLIP_MEAN, CLIP_STD
from ..inference.graph import ScoringGraph, fuse_reference_maps, map_probability
from ..model.domain import Domain
from ..model.prompts import GENERIC_OBJECT

log = logging.getLogger(__name__)

__all__ = ["MoEClip", "MoEClipTorchModel", "load_moeclip"]

def load_moeclip(checkpoint: str | Path, **options: Any):
    """Our checkpoint directory, or an official ``.pth`` plus its hyper-parameters as keywords.

    Keywords are the ``moeclip`` model flags without dashes (``clip_model``, ``clip_weights``,
    ``image_size``, ``experts``, ``top_k``, ``rank``, ``moe_layers``, ``fofs``, ...; see
    :mod:`moeclip.model.options`).
    """
    from ..model.options import MODEL_OPTIONS, build_model

    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise MoECLIPError(f"MoEClip: unknown model option(s) {unknown} (known: {', '.join(MODEL_OPTIONS)})")
    return build_model(checkpoint, options)


class MoEClipTorchModel(ScoringGraph):
    """CLIP-normalised (B, 3, S, S) -> ``InferenceBatch(pred_score, anomaly_map)`` for one object.

    The object's text features live in the ``text_features`` buffer (set by :meth:`set_text`),
    so the exported graph has no text tower. Map and raw score are the ONNX export's graph
    (:class:`~moeclip.inference.graph.ScoringGraph`, traceable by ``torch.export``).
    """

    def __init__(self, moeclip, domain: str = "industrial"):
        super().__init__(domain)
        self.moeclip = moeclip.eval()
        self.domain = Domain.parse(domain)
        self.num_maps = int(moeclip.adapter_config.num_maps)
        self.register_buffer("text_features", torch.zeros(0))
        self.object: Optional[str] = None
        self.n_bank = 0
        self.stats = None
        self.reference_weight = 0.5

    @torch.no_grad()
    def set_text(self, description: str) -> None:
        """Encode ``description`` once; the (D, 2) features replace the buffer."""
        feats = self.moeclip.text_features(description).detach().float()
        self.text_features = feats.to(self.kernel.device)
        self.object = description

    def set_references(self, bank, weight: float = 0.5) -> None:
        """Few-shot: ``bank``'s features become buffers (``bank0``...), its normal statistics constants."""
        from ..model.fusion import check_weight

        stats = bank.normal_stats(self.moeclip, self.text_features, self.domain)
        if stats is None:
            raise MoECLIPError("MoEClip: k_shot must be at least 2 (the fusion's normal statistics are measured "
                               "leave-one-out over the references)")
        for i, f in enumerate(bank.features):
            self.register_buffer(f"bank{i}", f.detach().float().to(self.kernel.device).clone())
        self.n_bank, self.stats, self.reference_weight = bank.num_maps, stats, check_weight(weight)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        if self.text_features.numel() == 0:
            raise MoECLIPError("MoEClip: no object text features yet (call set_text or run the Engine)")
        out = self.moeclip.encode_image(images, compute_losses=False)
        size = tuple(images.shape[-2:])
        amap, raw = self.raw(out, self.text_features.to(out.det_feature.dtype), size)
        if self.n_bank:
            fs = self.few_shot(out, [getattr(self, f"bank{i}") for i in range(self.n_bank)], size)
            amap = fuse_reference_maps(amap, fs, self.stats, self.reference_weight)
        # moeclip predict's uncalibrated score: the mean per-map probability at the map maximum
        prob = map_probability(amap.amax(dim=(-2, -1)), self.num_maps)
        return InferenceBatch(pred_score=self.domain.combine(prob, raw.float()), anomaly_map=amap)


class MoEClip(AnomalibModule):
    """A trained MoECLIP checkpoint as a zero-shot anomalib model.

    Args:
        checkpoint: our checkpoint directory (``moeclip train``) or an official ``.pth``.
        class_name: object description for the prompts; default: the datamodule's category
            (described as moeclip describes that dataset's classes), else ``"object"``.
        domain: ``industrial`` (default) or ``medical``: blur size and image-score rule.
        k_shot: normal reference images drawn from the datamodule's training split (few-shot, >= 2;
            0: zero-shot).
        shot_seed: seed of that draw (``moeclip test --shot-seeds``).
        reference_weight: weight of the few-shot map in the fusion (``--reference-weight``).
        pre_processor, post_processor, evaluator, visualizer: as every anomalib model.
        **model_options: hyper-parameters of an official ``.pth`` (see :func:`load_moeclip`).
    """

    def __init__(self, checkpoint: str | Path, class_name: Optional[str] = None, domain: str = "industrial",
                 k_shot: int = 0, pre_processor: nn.Module | bool = True, post_processor: nn.Module | bool = True,
                 evaluator: Evaluator | bool = True, visualizer: Visualizer | bool = True,
                 shot_seed: int = 0, reference_weight: float = 0.5, **model_options: Any) -> None:
        from ..model.fusion import check_weight

        if k_shot < 0 or k_shot == 1:
            raise MoECLIPError(f"MoEClip: k_shot must be 0 (zero-shot) or at least 2 (the fusion's normal statistics "
                               f"are measured leave-one-out over the references), got {k_shot}")
        check_weight(reference_weight)
        moeclip = load_moeclip(checkpoint, **model_options)
        size = int(moeclip.config.backbone.image_size)
        if pre_processor is True:  # the default needs the checkpoint's size, known only now
            pre_processor = self.configure_pre_processor((size, size))
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.model = MoEClipTorchModel(moeclip, domain)
        self.image_size = size
        self.class_name = class_name
        self.k_shot, self.shot_seed, self.reference_weight = k_shot, shot_seed, reference_weight
        self.references: list = []
        self.model.set_text(class_name or GENERIC_OBJECT)  # usable (and exportable) before any setup

    # ------------------------------------------------------------------ anomalib hooks
    def setup(self, stage: str) -> None:
        """Pick the object description once the datamodule is known."""
        del stage
        description = self._description()
        if description != self.model.object:
            log.info("MoEClip: object description %r", description)
            self.model.set_text(description)
            self.model.n_bank = 0
        if self.k_shot and not self.model.n_bank:
            self._attach_references(description)

    def _attach_references(self, description: str) -> None:
        """Draw ``k_shot`` normal training images of the datamodule and fuse with their memory bank."""
        from ..data.references import draw_shots
        from ..inference.references import bank_from_images

        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        data = getattr(datamodule, "train_data", None)
        samples = getattr(data, "samples", None)
        if samples is None or not len(samples):
            raise MoECLIPError("MoEClip: k_shot needs a datamodule with a training split of normal images")
        normal = samples[samples["label_index"] == 0] if "label_index" in samples else samples
        pool = [Path(p) for p in normal["image_path"]]
        what = f"MoEClip: {getattr(datamodule, 'category', '') or 'training split'}"
        self.references = [str(p) for p in draw_shots(pool, self.k_shot, self.shot_seed, what)]
        moeclip = self.model.moeclip
        bank = bank_from_images(moeclip, self.references, description, text=self.model.text_features,
                                domain=self.model.domain.value)
        log.info("MoEClip: %d references from the training split", len(self.references))
        self.model.set_references(bank, self.reference_weight)

    def _description(self) -> str:
        if self.class_name:
            return self.class_name
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        category = getattr(datamodule, "category", None)
        if not category:
            return GENERIC_OBJECT
        from ..data.registry import describe, get_dataset

        try:
            spec = get_dataset(getattr(datamodule, "name", ""))
        except Exception:  # not a dataset moeclip knows: the category name itself
            spec = None
        return describe(spec, str(category))

    def val_dataloader(self):
        """No validation data without a datamodule (``Engine().predict(data_path=...)``).

        anomalib validates zero-shot models before predicting, to fit the post-processor's bounds;
        a datamodule's split takes precedence over this, so only then is the step skipped (the
        outputs then stay unnormalised: the raw map and the score in [0, 1]).
        """
        return []

    @staticmethod
    def configure_optimizers() -> None:
        """Zero-shot: nothing to optimise (train with ``moeclip train``)."""
        return

    def validation_step(self, batch: Batch, *args, **kwargs) -> Batch:
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def test_step(self, batch: Batch, *args, **kwargs) -> Batch:
        return self.validation_step(batch)

    def predict_step(self, batch: Batch, *args, **kwargs) -> Batch:
        return self.validation_step(batch)

    @property
    def trainer_arguments(self) -> Dict[str, Any]:
        return {}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.FEW_SHOT if self.k_shot else LearningType.ZERO_SHOT

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Bicubic resize to the checkpoint's size and CLIP normalisation, as moeclip preprocesses."""
        size = tuple(image_size) if image_size is not None else (518, 518)
        return PreProcessor(transform=Compose([
            Resize(size, antialias=True, interpolation=InterpolationMode.BICUBIC),
            Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ]))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        return PostProcessor()

    def to_onnx(self, export_root: Path | str, model_file_name: str = "model",
                input_size: tuple[int, int] | None = None, **kwargs: Any) -> Path:
        """anomalib's export at opset 18 (its default, 14, cannot express the graph and only logs a failure)."""
        kwargs.setdefault("opset_version", 18)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)
