"""OpenVINO export: fp32 equals PyTorch, ``predict --openvino`` equals ``predict --checkpoint`` and needs no torch."""
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

pytest.importorskip("openvino")
pytest.importorskip("onnx")

from conftest import EXPORT_OBJECT  # noqa: E402

from moeclip.cli import main  # noqa: E402
from moeclip.errors import MoECLIPError  # noqa: E402
from moeclip.inference.openvino import OpenVINODetector, read_metadata  # noqa: E402


@pytest.fixture(scope="module")
def exported(export_deploy_file, tmp_path_factory) -> Path:
    """fp32 IR through the CLI, with the deployment embedded."""
    out = tmp_path_factory.mktemp("ov") / "ir"
    assert main(["export", "openvino", "--deploy", str(export_deploy_file), "--out", str(out)]) == 0
    return out / "model.xml"


@pytest.fixture(scope="module")
def exported_fp16(export_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ov") / "ir16"
    assert main(["export", "openvino", "--checkpoint", str(export_ckpt), "--object", EXPORT_OBJECT, "--fp16",
                 "--out", str(out), "--no-check"]) == 0
    return out / "model.xml"


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_fp32_equals_pytorch(exported, export_detector):
    runner = OpenVINODetector(exported)
    for batch in (1, 3):
        x = images(batch, seed=batch)
        got = runner.run(x.numpy())
        ref = export_detector.model.predict(x, EXPORT_OBJECT, "industrial")
        np.testing.assert_allclose(got["anomaly_map"], ref["anomaly_map"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["image_score"], ref["image_score"].numpy(), atol=1e-5, rtol=0)


def test_fp16_difference_is_measured(exported_fp16, exported, export_detector, capsys):
    """fp16 weights: smaller file, maps close to (not equal to) fp32; the difference is reported."""
    x = images(4, seed=11)
    ref = export_detector.model.predict(x, EXPORT_OBJECT, "industrial")["anomaly_map"].numpy()
    got = OpenVINODetector(exported_fp16).run(x.numpy())["anomaly_map"]
    diff = float(np.abs(got - ref).max())
    scale = float(ref.max() - ref.min())
    print(f"fp16 IR: max |map - torch| {diff:.3e} ({diff / scale:.2e} of the map range)")
    assert 1e-6 < diff < 0.05 * scale  # really fp16 (differs), still close
    assert exported_fp16.with_suffix(".bin").stat().st_size < 0.6 * exported.with_suffix(".bin").stat().st_size
    assert read_metadata(exported_fp16)["precision"] == "fp16"


def test_metadata(exported):
    meta = read_metadata(exported)
    assert meta["format"] == "moeclip-openvino" and meta["object"] == EXPORT_OBJECT and meta["domain"] == "industrial"
    assert (meta["image_size"], meta["num_maps"], meta["precision"]) == ("64", "12", "fp32")
    assert json.loads(meta["normalisation"])["resize"] == "bicubic"
    assert json.loads(meta["deployment"])["threshold"] == 0.4
    assert json.loads((exported.parent / "moeclip.json").read_text())["object"] == EXPORT_OBJECT
    runner = OpenVINODetector(exported.parent)  # the folder works too
    assert (runner.threshold, runner.pixel_threshold, runner.num_maps) == (0.4, 12.0, 12)


def test_bad_inputs(exported, tmp_path, capsys):
    with pytest.raises(MoECLIPError, match="not found"):
        OpenVINODetector(tmp_path / "missing.xml")
    (tmp_path / "bad.xml").write_text("<net/>")
    with pytest.raises(MoECLIPError, match="bad.xml"):
        OpenVINODetector(tmp_path / "bad.xml")
    assert main(["export", "openvino", "--checkpoint", "x", "--out", str(exported.parent)]) == 2
    assert "already exists" in capsys.readouterr().err


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


def test_predict_openvino_equals_pytorch(exported, export_deploy_file, folder, tmp_path, capsys):
    ov_out, torch_out = tmp_path / "ov", tmp_path / "torch"
    assert main(["predict", "--openvino", str(exported), str(folder), "--out", str(ov_out)]) == 0
    assert main(["predict", "--deploy", str(export_deploy_file), "--device", "cpu", str(folder),
                 "--out", str(torch_out)]) == 0
    a, b = read_rows(ov_out), read_rows(torch_out)
    assert set(a) == set(b) == {"img0.png", "img1.png", "img2.png", "bad.png"}
    assert "error" in a["bad.png"]
    for name in ("img0.png", "img1.png", "img2.png"):
        ra, rb = a[name], b[name]
        assert ra["object"] == EXPORT_OBJECT and ra["object_source"] == "openvino"
        assert set(ra) - {"object_source"} == set(rb) - {"object_source"}
        np.testing.assert_allclose(np.load(ov_out / ra["map"]), np.load(torch_out / rb["map"]), atol=1e-4, rtol=0)
        assert ra["raw_score"] == pytest.approx(rb["raw_score"], abs=1e-5)
        assert ra["score"] == pytest.approx(rb["score"], abs=1e-5)
        assert ra["decision"] == rb["decision"] and ra["threshold"] == 0.4
        assert (ov_out / ra["overlay"]).is_file() and (ov_out / ra["mask"]).is_file()

    assert main(["predict", "--openvino", str(exported), "--object", "screw", str(folder),
                 "--out", str(tmp_path / "x")]) == 2
    assert "exported for 'metal nut'" in capsys.readouterr().err


def test_predict_openvino_runs_without_torch(exported, folder, tmp_path):
    """The OpenVINO path imports neither torch nor the model (a fresh interpreter checks sys.modules)."""
    out = tmp_path / "out"
    code = (
        "import argparse, sys\n"
        "from moeclip.cli import predict\n"
        "p = argparse.ArgumentParser(); predict.register(p.add_subparsers())\n"
        f"args = p.parse_args(['predict', '--openvino', {str(exported)!r}, {str(folder)!r}, '--out', {str(out)!r}])\n"
        "assert predict.run(args) == 0\n"
        "loaded = [m for m in ('torch', 'moeclip.model.moeclip', 'moeclip.inference.detector') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
