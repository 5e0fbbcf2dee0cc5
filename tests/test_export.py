"""ONNX export: onnxruntime equals PyTorch (maps, scores, routing), and ``predict --onnx`` needs no torch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_f32_close, require_extra
from PIL import Image

ort = require_extra("onnxruntime")
require_extra("onnx")

from conftest import EXPORT_OBJECT, check_exported_predict, check_predict_without_torch  # noqa: E402

from moeclip.cli import main  # noqa: E402
from moeclip.data.transforms import preprocess_image  # noqa: E402
from moeclip.inference.onnx import OnnxDetector, export_onnx, preprocess, read_metadata  # noqa: E402


@pytest.fixture(scope="module")
def exported(export_ckpt, export_detector, export_deploy_file, tmp_path_factory) -> Path:
    """The default export through the CLI, with the deployment and the routing outputs."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "onnx", "--deploy", str(export_deploy_file), "--out", str(path), "--routing-outputs"]) == 0
    return path


@pytest.fixture(scope="module")
def exported_dynamo(export_detector, tmp_path_factory) -> Path:
    """The dynamo (torch.export) exporter through the API: ~10 s even for the tiny model."""
    require_extra("onnxscript")
    return export_onnx(export_detector, tmp_path_factory.mktemp("onnx") / "dyn.onnx", object=EXPORT_OBJECT,
                       routing_outputs=True, exporter="dynamo")


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("exporter", ["auto", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_onnxruntime_equals_pytorch(request, export_detector, exporter):
    path = request.getfixturevalue("exported" if exporter == "auto" else "exported_dynamo")
    runner = OnnxDetector(path)
    for batch in (1, 3):
        check_equal(runner, export_detector, batch)


def check_equal(runner, detector, batch):
    x = images(batch, seed=batch)
    got = runner.run(x.numpy())
    ref = detector.model.predict(x, EXPORT_OBJECT, "industrial")
    # onnxruntime's kernels vs PyTorch's: float32 relative to the maps' magnitude, scores on [0, 1]
    assert_f32_close(got["anomaly_map"], ref["anomaly_map"])
    assert_f32_close(got["image_score"], ref["image_score"], scale=1.0)
    routing = ref["vision"].routing
    assert len(routing) == 4
    for i, r in enumerate(routing):
        np.testing.assert_array_equal(got[f"routing.{i}"], r.indices.numpy())


def test_metadata(exported):
    meta = read_metadata(exported)
    assert meta["exporter"] == "torchscript"  # auto: the fast exporter while torch has it
    assert meta["object"] == EXPORT_OBJECT and meta["domain"] == "industrial" and meta["image_size"] == "64"
    assert json.loads(meta["deployment"])["threshold"] == 0.4
    runner = OnnxDetector(exported)
    assert (runner.threshold, runner.pixel_threshold, runner.num_maps) == (0.4, 12.0, 12)


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_export_module_equals_predict(export_detector, domain):
    """The exported module (fixed-conv blur instead of kornia) computes model.predict, both blur sizes."""
    from moeclip.inference.onnx import _export_module

    text = export_detector.model.text_features(EXPORT_OBJECT)
    module = _export_module(export_detector.model, text, domain, routing_outputs=False)
    x = images(2, seed=7)
    with torch.no_grad():
        amap, score = module(x)
    ref = export_detector.model.predict(x, text, domain)
    # a fixed convolution instead of kornia's blur: float32 of another path, relative to the maps' magnitude
    assert_f32_close(amap, ref["anomaly_map"])
    assert_f32_close(score, ref["image_score"], scale=1.0)


def test_numpy_preprocess_equals_torchvision():
    rng = np.random.default_rng(0)
    for shape in [(50, 70, 3), (64, 64, 3), (100, 30, 3)]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        np.testing.assert_array_equal(preprocess(img, 64), preprocess_image(img, 64).numpy())


def test_predict_onnx_equals_pytorch(exported, export_deploy_file, export_images, tmp_path, capsys):
    check_exported_predict("--onnx", exported, export_deploy_file, export_images, tmp_path, capsys)


def test_predict_onnx_runs_without_torch(exported, export_images, tmp_path):
    """The ONNX path imports neither torch nor the model (a fresh interpreter checks sys.modules)."""
    check_predict_without_torch("--onnx", exported, export_images, tmp_path / "out")
