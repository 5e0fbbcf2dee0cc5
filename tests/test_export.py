"""ONNX export: onnxruntime equals PyTorch (maps, scores, routing), and ``predict --onnx`` needs no torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import EXPORT_OBJECT  # noqa: E402

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
    pytest.importorskip("onnxscript")
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
    np.testing.assert_allclose(got["anomaly_map"], ref["anomaly_map"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["image_score"], ref["image_score"].numpy(), atol=1e-4, rtol=0)
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
    torch.testing.assert_close(amap, ref["anomaly_map"], atol=1e-5, rtol=0)
    torch.testing.assert_close(score, ref["image_score"], atol=1e-6, rtol=0)


def test_numpy_preprocess_equals_torchvision():
    rng = np.random.default_rng(0)
    for shape in [(50, 70, 3), (64, 64, 3), (100, 30, 3)]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        np.testing.assert_array_equal(preprocess(img, 64), preprocess_image(img, 64).numpy())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for i, shape in enumerate([(40, 60, 3), (64, 64, 3), (90, 50, 3)]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "bad.png").write_bytes(b"broken")
    return root


def read_rows(out: Path):
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {Path(r["path"]).name: r for r in rows}


def test_predict_onnx_equals_pytorch(exported, export_deploy_file, folder, tmp_path, capsys):
    onnx_out, torch_out = tmp_path / "onnx", tmp_path / "torch"
    assert main(["predict", "--onnx", str(exported), str(folder), "--out", str(onnx_out)]) == 0
    assert main(["predict", "--deploy", str(export_deploy_file), "--device", "cpu", str(folder),
                 "--out", str(torch_out)]) == 0
    a, b = read_rows(onnx_out), read_rows(torch_out)
    assert set(a) == set(b) == {"img0.png", "img1.png", "img2.png", "bad.png"}
    assert "error" in a["bad.png"]
    for name in ("img0.png", "img1.png", "img2.png"):
        ra, rb = a[name], b[name]
        assert ra["object"] == EXPORT_OBJECT and ra["object_source"] == "onnx"
        np.testing.assert_allclose(np.load(onnx_out / ra["map"]), np.load(torch_out / rb["map"]), atol=1e-4, rtol=0)
        assert ra["raw_score"] == pytest.approx(rb["raw_score"], abs=1e-5)
        assert ra["score"] == pytest.approx(rb["score"], abs=1e-5)
        assert ra["decision"] == rb["decision"] and ra["threshold"] == 0.4
        assert (onnx_out / ra["overlay"]).is_file() and (onnx_out / ra["mask"]).is_file()

    # the object is fixed by the export
    assert main(["predict", "--onnx", str(exported), "--object", "screw", str(folder),
                 "--out", str(tmp_path / "x")]) == 2
    assert "exported for 'metal nut'" in capsys.readouterr().err


def test_predict_onnx_runs_without_torch(exported, folder, tmp_path):
    """The ONNX path imports neither torch nor the model (a fresh interpreter checks sys.modules)."""
    out = tmp_path / "out"
    code = (
        "import argparse, sys\n"
        "from moeclip.cli import predict\n"
        "p = argparse.ArgumentParser(); predict.register(p.add_subparsers())\n"
        f"args = p.parse_args(['predict', '--onnx', {str(exported)!r}, {str(folder)!r}, '--out', {str(out)!r}])\n"
        "assert predict.run(args) == 0\n"
        "loaded = [m for m in ('torch', 'moeclip.model.moeclip', 'moeclip.inference.detector') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
