"""ONNX export of a MoECLIP detector for one object, and a runtime that needs only onnxruntime.

The exported graph maps CLIP-normalised images ``images`` (B, 3, S, S), B dynamic, to the raw
``anomaly_map`` (B, S, S) and the raw ``image_score`` (B,): exactly ``MoECLIP.predict`` for the
object description chosen at export time, whose text features are baked in as a constant
(the text tower is not exported). Top-k routing is exported as ``topk`` + ``scatter`` and so is
exact, not a soft approximation; ``routing_outputs=True`` adds the chosen experts of every MoE
layer (``routing.<i>``, (B, tokens, k)) as outputs so that this can be checked.

The scoring after the encoder is :class:`moeclip.inference.graph.ScoringGraph` (kornia's
Gaussian blur as two fixed convolutions with reflect padding: identical numbers, and no
dependence on how a kornia version traces), shared with the anomalib model.

Object, domain, image size, number of maps and the deployment (threshold, normalisation, pixel
threshold) are stored in the model's metadata (``moeclip.*`` keys), so that
:class:`OnnxRuntime` (the pipeline's runtime for exported models) turns an image file into the
same ``results.jsonl`` line as the PyTorch path without a deployment file. Importing this
module does not import torch.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .. import __version__
from ..errors import MoECLIPError
from ..fileio import atomic_write
from ..model.prompts import GENERIC_OBJECT
from .deploy import Deployment
from .exported import CLIP_MEAN, CLIP_STD, ExportedDetector, ExportedRuntime, preprocess  # noqa: F401 (API)

META_PREFIX = "moeclip."
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "image_score")
EXPORTERS = ("auto", "torchscript", "dynamo")

# ---------------------------------------------------------------------------- export (torch)
def _export_module(model, text, domain: str, routing_outputs: bool, bank=None, weight: float = 0.5, stats=None):
    """The nn.Module that is exported: image batch -> (map, score[, routing indices]).

    With a few-shot ``bank`` (a calibrated deployment's), the bank and its normal ``stats`` are
    baked in as constants and the outputs are the fused map and score on the raw scales
    (:func:`moeclip.model.fusion.fused_raw`); the graph computes each map's full (patches x
    bank) similarity matrix.
    """
    import torch

    from .graph import ScoringGraph, fuse_reference_maps

    class AnomalyExport(ScoringGraph):
        def __init__(self):
            super().__init__(domain)
            self.model = model
            self.register_buffer("text", text.detach().clone().float())
            self.routing_outputs = routing_outputs
            self.n_bank = 0 if bank is None else bank.num_maps
            for i, f in enumerate(bank.features if bank is not None else []):
                self.register_buffer(f"bank{i}", f.detach().float().cpu().clone())
            self.weight, self.stats = float(weight), stats

        def fused(self, out, g: torch.Tensor, score: torch.Tensor, size):
            """Few-shot: fuse the zero-shot map with the bank's map, in zero-shot raw units."""
            fs = self.few_shot(out, [getattr(self, f"bank{i}") for i in range(self.n_bank)], size)
            return fuse_reference_maps(g, fs, self.stats, self.weight), score

        def forward(self, images: torch.Tensor):
            out = self.model.encode_image(images, compute_losses=False)
            outputs = self.raw(out, self.text, tuple(images.shape[-2:]))
            if self.n_bank:
                outputs = self.fused(out, outputs[0], outputs[1], tuple(images.shape[-2:]))
            if self.routing_outputs:
                outputs = outputs + tuple(r.indices for r in out.routing)
            return outputs

    return AnomalyExport().eval()


@contextlib.contextmanager
def _no_mha_fastpath():
    """The fused attention kernel has no ONNX symbolic; export the plain attention ops instead."""
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "get_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        return True
    except ImportError:
        return False


def _export(model, path: Path, obj: str, dom: str, size: int, routing_outputs: bool, exporter: str,
            opset: Optional[int], bank=None, weight: float = 0.5) -> str:
    """Write the graph to ``path``; returns the exporter used.

    ``auto`` tries the TorchScript exporter first (seconds instead of minutes for ViT-L, and
    equally exact here) and falls back to the dynamo exporter where the former is gone.
    """
    import torch

    if exporter not in EXPORTERS:
        raise MoECLIPError(f"unknown exporter {exporter!r} (use {', '.join(EXPORTERS)})")
    with torch.no_grad():
        text = model.text_features(obj)
    stats = None
    if bank is not None:
        stats = bank.normal_stats(model, text, dom)
        if stats is None:
            raise MoECLIPError("exporting a few-shot detector needs at least 2 reference images (the fusion's "
                               "normal statistics are measured leave-one-out over them)")
    module = _export_module(model, text, dom, routing_outputs, bank, weight, stats)
    names = list(OUTPUT_NAMES) + ([f"routing.{i}" for i in range(len(model.moe))] if routing_outputs else [])
    example = torch.zeros(2, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)

    def dynamo() -> str:
        if not _has_onnxscript():
            raise MoECLIPError("the dynamo ONNX exporter needs onnxscript: pip install onnxscript")
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=names,
                          dynamo=True, opset_version=opset or 18, optimize=False, verbose=False,
                          dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}}, external_data=False)
        return "dynamo"

    def torchscript() -> str:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation + constant-folding notes
            torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=names,
                              dynamo=False, opset_version=opset or 17,
                              dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]})
        return "torchscript"

    with torch.no_grad(), _no_mha_fastpath():
        if exporter == "dynamo":
            return dynamo()
        if exporter == "torchscript":
            return torchscript()
        try:
            return torchscript()
        except Exception as exc:  # the legacy exporter is deprecated and may be missing
            if not _has_onnxscript():
                raise
            import logging

            logging.getLogger(__name__).warning("TorchScript ONNX export failed (%s); using the dynamo exporter",
                                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return dynamo()


def export_onnx(detector, path: str | Path, object: Optional[str] = None, domain: Optional[str] = None,
                deployment: Optional[Deployment] = None, routing_outputs: bool = False,
                exporter: str = "auto", opset: Optional[int] = None, checkpoint: Optional[str] = None) -> Path:
    """Export ``detector`` (a :class:`~moeclip.inference.detector.Detector`) for one object to ``path``.

    ``object``/``domain`` default to the deployment's, then the detector's. The deployment's
    threshold, pixel threshold and normalisation go into the metadata.
    """
    try:
        import onnx
    except ImportError:
        raise MoECLIPError("ONNX export needs the onnx package: pip install 'moeclip[onnx]'") from None
    dep = deployment
    path = Path(path)
    obj = object or (dep.object if dep else None) or detector.object or GENERIC_OBJECT
    dom = domain or (dep.domain if dep else None) or detector.domain.value
    if dep is not None and obj != dep.object:
        import logging

        logging.getLogger(__name__).warning("exporting for %r with a deployment calibrated for %r", obj, dep.object)
    model = detector.model
    device = next(model.parameters()).device
    size = int(detector.image_size)
    refs = getattr(detector, "references", None)
    bank = refs.get(obj) if refs else None

    def write(tmp: str) -> None:  # the graph, then its metadata, into a temporary file
        model.cpu().eval()  # exported on the CPU in fp32; moved back afterwards
        try:
            used = _export(model, Path(tmp), obj, dom, size, routing_outputs, exporter, opset, bank,
                           refs.weight if refs else 0.5)
        finally:
            model.to(device)
        meta = _metadata(detector, dep, obj, dom, size, used, checkpoint)
        if bank is not None:
            meta["references"] = str(bank.num_references)
        _write_metadata(onnx, tmp, meta)

    atomic_write(path, write)
    return path


def _metadata(detector, dep: Optional[Deployment], obj: str, dom: str, size: int, used: str,
              checkpoint: Optional[str]) -> Dict[str, str]:
    model = detector.model
    meta = {
        "format": "moeclip-onnx", "version": __version__, "object": obj, "domain": dom,
        "image_size": str(size), "num_maps": str(model.adapter_config.num_maps),
        "exporter": used,
        "checkpoint": str(checkpoint or (dep.checkpoint if dep else "") or ""),
    }
    if dep is not None:
        meta["deployment"] = json.dumps(dep.to_dict())
    elif detector.threshold is not None or detector.normalization is not None or detector.pixel_threshold is not None:
        n = detector.normalization
        meta["deployment"] = json.dumps(Deployment(
            object=obj, domain=dom, threshold=detector.threshold, pixel_threshold=detector.pixel_threshold,
            normalization=None if n is None else n.to_dict()).to_dict())
    return meta


def _write_metadata(onnx, path: str, meta: Dict[str, str]) -> None:
    proto = onnx.load(path)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    proto.producer_name = "moeclip"
    onnx.save(proto, path)


def compare_onnx(detector, path: str | Path, images=None, object: Optional[str] = None,
                 seed: int = 0) -> Dict[str, Any]:
    """Max absolute differences between onnxruntime and PyTorch on ``images`` (default: 3 random).

    ``images`` are preprocessed (B, 3, S, S) tensors or arrays. With routing outputs in the
    model, ``routing_mismatches`` counts tokens whose chosen experts differ.
    """
    import torch

    runner = OnnxRuntime(path)
    size = runner.image_size
    if images is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(3, 3, size, size, generator=g)
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    onnx_out = runner.run(images.numpy())
    device = next(detector.model.parameters()).device
    with torch.no_grad():
        text = detector.model.text_features(object or runner.object).to(device)
        ref = detector.model.predict(images.to(device), text, runner.domain)
    refs = getattr(detector, "references", None)
    bank = refs.get(object or runner.object) if refs else None
    if bank is not None:  # few-shot export: compare the fused outputs
        from ..model.fewshot import predict_with_bank
        from ..model.fusion import fused_raw

        fs = predict_with_bank(detector.model, images.to(device), text, bank.to(device), runner.domain)
        stats = bank.normal_stats(detector.model, text, runner.domain)
        maps, scores = fused_raw(fs["anomaly_map"].cpu().numpy(), fs["few_shot_map"].cpu().numpy(),
                                 fs["image_score"].cpu().numpy(), stats, refs.weight)
        ref = {"anomaly_map": torch.from_numpy(maps), "image_score": torch.from_numpy(scores),
               "vision": ref["vision"]}
    diffs: Dict[str, Any] = {
        "batch": int(images.shape[0]),
        "anomaly_map": float(np.abs(onnx_out["anomaly_map"] - ref["anomaly_map"].float().cpu().numpy()).max()),
        "image_score": float(np.abs(onnx_out["image_score"] - ref["image_score"].float().cpu().numpy()).max()),
    }
    routed = [k for k in onnx_out if k.startswith("routing.")]
    if routed:
        diffs["routing_mismatches"] = int(sum(
            (onnx_out[f"routing.{i}"] != r.indices.cpu().numpy()).any(-1).sum()
            for i, r in enumerate(ref["vision"].routing)))
    return diffs


# ---------------------------------------------------------------------------- runtime (numpy + onnxruntime)
def read_metadata(path: str | Path) -> Dict[str, str]:
    """The ``moeclip.*`` metadata of an exported model (prefix stripped)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


def _session(path: Path, providers: Optional[Sequence[str]]):
    try:
        import onnxruntime as ort
    except ImportError:
        raise MoECLIPError("running an ONNX model needs onnxruntime: pip install 'moeclip[onnx]'") from None
    if not path.is_file():
        raise MoECLIPError(f"{path}: ONNX model not found")
    try:
        return ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise MoECLIPError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None


class OnnxRuntime(ExportedRuntime):
    """The pipeline runtime of an exported model: onnxruntime + numpy, no PyTorch.

    Object, domain, image size and number of maps come from the model's metadata;
    ``deployment`` (default: the one stored at export) supplies the post-processing.
    """

    def __init__(self, path: str | Path, deployment: Optional[Deployment] = None,
                 providers: Optional[Sequence[str]] = None):
        path = Path(path)
        self.session = _session(path, providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        meta = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
        if meta.get("format") != "moeclip-onnx":
            raise MoECLIPError(f"{path}: not exported by 'moeclip export onnx' (no moeclip metadata)")
        self._set_metadata(path, meta, deployment)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        """Preprocessed (B, 3, S, S) float32 -> every output of the graph by name."""
        outs = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(self.output_names, outs))


class OnnxDetector(ExportedDetector, OnnxRuntime):
    """An exported model with its post-processing: ``predict`` as :class:`~moeclip.inference.detector.Detector`.

    ``threshold``/``pixel_threshold`` override the deployment's.
    """

    def __init__(self, path: str | Path, deployment: Optional[Deployment] = None,
                 threshold: Optional[float] = None, pixel_threshold: Optional[float] = None,
                 providers: Optional[Sequence[str]] = None):
        OnnxRuntime.__init__(self, path, deployment, providers)
        self._set_post(threshold, pixel_threshold)
