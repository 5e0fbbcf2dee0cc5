"""OpenVINO IR export of a MoECLIP detector for one object, and a runtime that needs only openvino + numpy.

The IR is converted from the ONNX graph of :func:`moeclip.inference.onnx.export_onnx` (the same
exact graph: top-k routing as ``topk`` + ``scatter``, the fixed-kernel blur), so the
OpenVINO model maps CLIP-normalised ``images`` (B, 3, S, S), B dynamic, to the raw
``anomaly_map`` (B, S, S) and the raw ``image_score`` (B,). ``fp16=True`` stores the weights in
half precision (half the file); on CPUs without native fp16/bf16 arithmetic OpenVINO still
computes in fp32 after decompressing them.

Metadata (format, object, domain, image size, number of maps, input normalisation, deployment)
travels in the IR's ``rt_info`` under ``moeclip`` and in a sidecar ``moeclip.json`` next to
``model.xml`` for people and other tools. The runtime compiles with an fp32 inference precision
hint, so CPUs whose default is bf16 (Intel AMX) still give PyTorch's fp32 maps.

Importing this module imports neither torch nor openvino.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import MoECLIPError
from ..fileio import replace_dir
from .deploy import Deployment
from .exported import CLIP_MEAN, CLIP_STD, ExportedDetector, ExportedRuntime
from .onnx import export_onnx
from .onnx import read_metadata as read_onnx_metadata

RT_SECTION = "moeclip"
MODEL_FILE = "model.xml"
SIDECAR = "moeclip.json"
FORMAT = "moeclip-openvino"
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise MoECLIPError("OpenVINO needs the openvino package: pip install 'moeclip[openvino]'") from None
    return ov


# ---------------------------------------------------------------------------- export (torch + onnx)
def export_openvino(detector, out_dir: str | Path, object: Optional[str] = None, domain: Optional[str] = None,
                    deployment: Optional[Deployment] = None, fp16: bool = False, checkpoint: Optional[str] = None,
                    exporter: str = "auto", overwrite: bool = False,
                    onnx_path: Optional[str | Path] = None) -> Path:
    """Write ``out_dir/model.xml`` (+ ``.bin`` and ``moeclip.json``) for one object; returns the xml path.

    ``onnx_path``: convert this model of ``export onnx`` instead of exporting again (``detector``
    and the export options are then unused). The folder is assembled next to ``out_dir`` and
    moved into place at the end, so an interrupted export leaves no half-written model.
    """
    ov = _openvino()
    out = Path(out_dir)
    if out.exists() and not (overwrite and out.is_dir()):
        raise MoECLIPError(f"{out} already exists (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        temporary = onnx_path is None
        if temporary:
            onnx_path = export_onnx(detector, work / "model.onnx", object=object, domain=domain,
                                    deployment=deployment, exporter=exporter, checkpoint=checkpoint)
        meta = read_onnx_metadata(onnx_path)
        model = ov.convert_model(str(onnx_path))
        if temporary:
            Path(onnx_path).unlink()
        meta.update(format=FORMAT, precision="fp16" if fp16 else "fp32",
                    normalisation=json.dumps({"resize": "bicubic", "scale": "1/255",
                                              "mean": [round(float(v), 8) for v in CLIP_MEAN],
                                              "std": [round(float(v), 8) for v in CLIP_STD]}))
        for key, value in meta.items():
            model.set_rt_info(str(value), [RT_SECTION, key])
        ov.save_model(model, str(work / MODEL_FILE), compress_to_fp16=fp16)
        (work / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_dir(work, out)  # plain modes (mkdtemp made it 0700), then in place
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out / MODEL_FILE


def compare_openvino(detector, path: str | Path, images=None, seed: int = 0) -> Dict[str, Any]:
    """Max absolute differences between OpenVINO and PyTorch on ``images`` (default: 3 random)."""
    import torch

    runner = OpenVINODetector(path)
    if images is None:
        images = torch.randn(3, 3, runner.image_size, runner.image_size, generator=torch.Generator().manual_seed(seed))
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    got = runner.run(images.numpy())
    device = next(detector.model.parameters()).device
    with torch.no_grad():
        text = detector.model.text_features(runner.object).to(device)
        ref = detector.model.predict(images.to(device), text, runner.domain)
    return {"batch": int(images.shape[0]),
            "anomaly_map": float(np.abs(got["anomaly_map"] - ref["anomaly_map"].float().cpu().numpy()).max()),
            "image_score": float(np.abs(got["image_score"] - ref["image_score"].float().cpu().numpy()).max())}


# ---------------------------------------------------------------------------- runtime (numpy + openvino)
def _resolve(path: Path) -> Path:
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise MoECLIPError(f"{path}: OpenVINO model not found")
    return path


def read_metadata(path: str | Path) -> Dict[str, str]:
    """The ``moeclip`` rt_info of an exported IR (a folder or its ``model.xml``)."""
    path = _resolve(Path(path))
    return _rt_meta(_read_model(_openvino().Core(), path), path)


def _read_model(core, path: Path):
    try:
        return core.read_model(str(path))
    except Exception as exc:  # openvino raises RuntimeError subclasses
        raise MoECLIPError(f"{path}: not a loadable OpenVINO model ({str(exc).splitlines()[0]})") from None


def _rt_meta(model, path: Path) -> Dict[str, str]:
    if not model.has_rt_info([RT_SECTION, "format"]):
        raise MoECLIPError(f"{path}: not exported by 'moeclip export openvino' (no moeclip metadata)")
    info = model.get_rt_info()[RT_SECTION]
    return {str(k): str(info[k].astype(str) if hasattr(info[k], "astype") else info[k]) for k in info}


class OpenVINORuntime(ExportedRuntime):
    """The pipeline runtime of an exported IR: OpenVINO + numpy, no PyTorch.

    Object, domain, image size and number of maps come from the IR's rt_info; ``deployment``
    (default: the one stored at export) supplies the post-processing. ``inference_precision``
    is OpenVINO's ``INFERENCE_PRECISION_HINT`` (``f32`` by default: PyTorch's fp32 maps;
    ``bf16``/``f16`` only where the CPU computes in them).
    """

    def __init__(self, path: str | Path, deployment: Optional[Deployment] = None, device: str = "CPU",
                 inference_precision: str = "f32", num_threads: Optional[int] = None):
        ov = _openvino()
        path = _resolve(Path(path))
        if inference_precision not in INFERENCE_PRECISIONS:
            raise MoECLIPError(f"inference precision must be one of {', '.join(INFERENCE_PRECISIONS)}")
        core = ov.Core()
        model = _read_model(core, path)
        meta = _rt_meta(model, path)
        if meta.get("format") != FORMAT:
            raise MoECLIPError(f"{path}: not exported by 'moeclip export openvino' (format {meta.get('format')!r})")
        config: Dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.compiled = core.compile_model(model, device, config)
        self._set_metadata(path, meta, deployment)
        # compiled outputs keep the model's order, not always its tensor names
        self.output_names = [next((n for n in sorted(o.get_names()) if not n.startswith("/")), o.get_any_name())
                             for o in model.outputs]
        self._request = self.compiled.create_infer_request()

    def run(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        """Preprocessed (B, 3, S, S) float32 -> every output of the graph by name."""
        res = self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return {name: np.array(res[out]) for name, out in zip(self.output_names, self.compiled.outputs)}


class OpenVINODetector(ExportedDetector, OpenVINORuntime):
    """An exported IR with its post-processing: ``predict`` as :class:`~moeclip.inference.detector.Detector`.

    ``threshold``/``pixel_threshold`` override the deployment's.
    """

    def __init__(self, path: str | Path, deployment: Optional[Deployment] = None, threshold: Optional[float] = None,
                 pixel_threshold: Optional[float] = None, **runtime_options: Any):
        OpenVINORuntime.__init__(self, path, deployment, **runtime_options)
        self._set_post(threshold, pixel_threshold)

