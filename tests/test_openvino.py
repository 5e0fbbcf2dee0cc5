"""OpenVINO export: fp32 equals PyTorch, ``predict --openvino`` equals ``predict --checkpoint`` and needs no torch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_f32_close, require_extra

require_extra("openvino")
require_extra("onnx")

from conftest import EXPORT_OBJECT, check_exported_predict, check_predict_without_torch  # noqa: E402

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
        # OpenVINO's kernels vs PyTorch's: float32 relative to the maps' magnitude, scores on [0, 1]
        assert_f32_close(got["anomaly_map"], ref["anomaly_map"])
        assert_f32_close(got["image_score"], ref["image_score"], scale=1.0)


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


def test_predict_openvino_equals_pytorch(exported, export_deploy_file, export_images, tmp_path, capsys):
    check_exported_predict("--openvino", exported, export_deploy_file, export_images, tmp_path, capsys)


def test_predict_openvino_runs_without_torch(exported, export_images, tmp_path):
    """The OpenVINO path imports neither torch nor the model (a fresh interpreter checks sys.modules)."""
    check_predict_without_torch("--openvino", exported, export_images, tmp_path / "out")


def test_predict_openvino_bf16_precision(exported, export_images, tmp_path, capsys):
    """``predict --openvino --precision bf16`` compiles the IR with OpenVINO's bf16 inference precision
    (computed in bf16 on CPUs with AMX/AVX-512 bf16, in fp32 elsewhere): same files, maps close to fp32."""
    import openvino

    from moeclip.inference.openvino import OpenVINORuntime

    # OpenVINO keeps f32 on a CPU without bf16 (no AMX/AVX-512 bf16): what the hint must then say
    capable = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    hint = {p: str(OpenVINORuntime(exported, inference_precision=p).compiled.get_property("INFERENCE_PRECISION_HINT"))
            for p in ("f32", "bf16")}
    assert hint["f32"].lower() == "<type: 'float32'>"
    assert hint["bf16"].lower() == ("<type: 'bfloat16'>" if capable else "<type: 'float32'>")
    rows, maps = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["predict", "--openvino", str(exported), str(export_images / "img1.png"), "--precision",
                     precision, "--out", str(out)]) == 0
        rows[precision] = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][0]
        maps[precision] = np.load(out / rows[precision]["map"])
    assert rows["bf16"]["object_source"] == "openvino"
    assert rows["bf16"]["raw_score"] == pytest.approx(rows["fp32"]["raw_score"], abs=0.05)
    diff = float(np.abs(maps["bf16"] - maps["fp32"]).max())
    scale = float(np.abs(maps["fp32"]).max())
    if capable:  # the CLI really computed in bf16 (8-bit mantissa): far from fp32 rounding, still close
        assert 1e-3 * scale < diff < 0.05 * scale, (diff, scale)
    else:  # bf16 falls back to f32: the fp32 maps
        assert diff <= 1e-5 * scale, (diff, scale)
    assert main(["predict", "--openvino", str(exported), str(export_images / "img1.png"), "--device", "cuda",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--device" in capsys.readouterr().err
