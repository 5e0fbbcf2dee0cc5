"""A runtime and its post-processor from a small, picklable spec: the top of :mod:`moeclip.inference`.

:class:`RuntimeSpec` says which model to run (a checkpoint, a deployment file, an ONNX model
or an OpenVINO IR) and how to score it; :meth:`RuntimeSpec.build` returns :class:`Built`
(runtime, post-processor, default object). ``predict``, the Ray actors and scripts use it; the
runtimes themselves sit below (``torch_runtime``, ``references``, ``onnx``, ``openvino``, over
the :mod:`~moeclip.inference.pipeline` protocol), with the PyTorch
:class:`~moeclip.inference.detector.Detector` between them and this module.

Importing this module imports no torch: the PyTorch side (:mod:`moeclip.inference.detector`) is
imported when a spec that needs it is built, so ``predict --onnx``/``--openvino`` run without
PyTorch installed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Tuple

from ..errors import MoECLIPError
from ..model.options import build_model
from .deploy import Deployment
from .exported import ExportedRuntime
from .onnx import OnnxRuntime
from .openvino import OpenVINORuntime
from .pipeline import Runtime
from .postprocess import PostProcessor

__all__ = ["RuntimeSpec", "Built"]


class Built(NamedTuple):
    runtime: Runtime
    post: PostProcessor
    default_object: Optional[str]   # the deployment's or export's object, if any
    object_source: str              # what the default is called in results: deploy / onnx / openvino / flag


@dataclass
class RuntimeSpec:
    """How to build a runtime and its post-processor; small and picklable (worker processes).

    One of ``onnx`` (an exported model), ``openvino`` (an exported IR), ``deploy`` (a deployment
    file, which names its checkpoint) or ``checkpoint`` (+ ``model_options``, see
    :mod:`moeclip.model.options`). ``threshold``/``pixel_threshold``/``domain`` override the
    deployment's or export's. ``object``: the plain description asked for (checked against an
    export's); ``object_rules``: per-file rules were asked for (an export has one object only).
    """

    checkpoint: Optional[str] = None
    model_options: Dict[str, Any] = field(default_factory=dict)
    deploy: Optional[str] = None
    onnx: Optional[str] = None
    device: str = "auto"
    precision: str = "fp32"
    threshold: Optional[float] = None
    pixel_threshold: Optional[float] = None
    domain: Optional[str] = None
    object: Optional[str] = None
    object_rules: bool = False
    openvino: Optional[str] = None  # an exported OpenVINO IR (moeclip.inference.openvino)
    # few-shot: (object description or "" for every object, reference images spec) pairs
    references: Tuple[Tuple[str, str], ...] = ()
    reference_weight: float = 0.5
    bank_size: Optional[int] = None
    bank_fp16: bool = False
    # fused transductive mode: the keywords of Detector.transductive_runtime (None: batch by batch)
    transductive: Optional[Dict[str, Any]] = None

    def build(self) -> Built:
        dep = Deployment.load(self.deploy) if self.deploy else None
        if self.transductive is not None and (self.openvino or self.onnx or dep is not None):
            raise MoECLIPError("--transductive runs the PyTorch model of a --checkpoint (the mutual score needs "
                               "its tokens); drop --onnx/--openvino/--deploy")
        if self.openvino:
            return self._build_openvino(dep)
        if self.onnx:
            return self._build_onnx(dep)
        return self._build_torch(dep)

    # ------------------------------------------------------------------ PyTorch
    def _build_torch(self, dep: Optional[Deployment]) -> Built:
        # lazily, for torch (``predict --onnx/--openvino`` run without it); no cycle: nothing the
        # Detector imports imports this module
        from .detector import Detector

        if dep is not None:
            if self.object and self.object != dep.object and (self.threshold is None or dep.normalization is not None):
                print(f"warning: {self.deploy} was calibrated for {dep.object!r}; its threshold and "
                      f"normalisation may not suit {self.object!r}", file=sys.stderr)
            det = Detector.from_deployment(dep, checkpoint=self.checkpoint, options=self.model_options,
                                           device=self.device, precision=self.precision, threshold=self.threshold,
                                           domain=self.domain, pixel_threshold=self.pixel_threshold)
            self._attach_references(det)
            return Built(det.runtime(), det.post_processor(), dep.object, "deploy")
        if not self.checkpoint:
            raise MoECLIPError("--checkpoint is required (or --deploy FILE, or --onnx MODEL)")
        det = Detector(build_model(self.checkpoint, self.model_options), device=self.device,
                       precision=self.precision, domain=self.domain or "industrial", threshold=self.threshold,
                       pixel_threshold=self.pixel_threshold)
        self._attach_references(det)
        runtime = det.runtime() if self.transductive is None else det.transductive_runtime(**self.transductive)
        return Built(runtime, det.post_processor(), None, "flag")

    def _attach_references(self, det) -> None:
        """Few-shot: one memory bank per referenced object (:mod:`moeclip.inference.references`)."""
        for obj, spec in self.references:
            det.with_references([spec], obj, bank_size=self.bank_size, fp16=self.bank_fp16,
                                weight=self.reference_weight)

    # ------------------------------------------------------------------ exported models
    def _build_onnx(self, dep: Optional[Deployment]) -> Built:
        if self.checkpoint:
            raise MoECLIPError("--onnx runs the exported model; drop --checkpoint")
        if self.references:
            raise MoECLIPError("--onnx: few-shot references are not supported by the exported model; "
                               "use --checkpoint with --reference")
        if self.model_options:
            raise MoECLIPError(f"--onnx: model flags {sorted(self.model_options)} do not apply to an exported model")
        return self._built_exported(OnnxRuntime(self.onnx, deployment=dep), "--onnx", self.onnx, "onnx")

    def _build_openvino(self, dep: Optional[Deployment]) -> Built:
        """The checks of ``predict --onnx``, for an IR."""
        if self.references:
            raise MoECLIPError("--openvino: few-shot references are not supported by the exported model; "
                               "use --checkpoint with --reference")
        if self.checkpoint or self.onnx:
            raise MoECLIPError("--openvino runs the exported model; drop --checkpoint/--onnx")
        if self.model_options:
            raise MoECLIPError(f"--openvino: model flags {sorted(self.model_options)} do not apply to an "
                               "exported model")
        if self.device not in ("auto", "cpu"):
            raise MoECLIPError("--openvino runs on OpenVINO's CPU device; drop --device")
        # --precision bf16/fp16: OpenVINO computes the IR in that precision where the CPU has it (AMX,
        # AVX-512 bf16/fp16); fp32 (the default) gives PyTorch's fp32 maps
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[self.precision]
        rt = OpenVINORuntime(self.openvino, deployment=dep, inference_precision=hint)
        return self._built_exported(rt, "--openvino", self.openvino, "openvino")

    def _built_exported(self, rt: ExportedRuntime, flag: str, path, source: str) -> Built:
        """An exported model's runtime: the object and domain are the export's."""
        if self.object_rules:
            raise MoECLIPError(f"{flag}: the object is fixed by the export; --class-map and KEY=DESC rules "
                               "do not apply")
        if self.object and self.object.strip() != rt.object:
            raise MoECLIPError(f"{flag}: {path} was exported for {rt.object!r}, not {self.object!r}; "
                               "export again for another object")
        if self.domain and self.domain != rt.domain:
            raise MoECLIPError(f"{flag}: {path} was exported for the {rt.domain} domain")
        return Built(rt, rt.post_processor(self.threshold, self.pixel_threshold), rt.object, source)
