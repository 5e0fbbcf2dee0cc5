"""Few-shot wherever users score images: Detector.with_references and ``moeclip predict --reference``."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_f32_close, make_tiny_checkpoint, require_extra
from PIL import Image

from moeclip.cli import main
from moeclip.data.transforms import preprocess_image
from moeclip.inference.detector import Detector
from moeclip.inference.postprocess import resize_map
from moeclip.model.checkpoint import load_model
from moeclip.model.fewshot import build_bank, predict_with_bank


@pytest.fixture(scope="module")
def ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=4)


def write_image(path: Path, h: int, w: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    for i in range(3):
        write_image(root / "refs" / f"r{i}.png", 64, 64, 10 + i)
    write_image(root / "test" / "screw" / "a.png", 48, 80, 1)
    write_image(root / "test" / "nut" / "b.png", 64, 64, 2)
    return root


def test_detector_with_references_matches_the_fusion_rule(ckpt, files):
    det = Detector.from_checkpoint(ckpt, device="cpu").with_references(files / "refs", object="screw", weight=0.3)
    assert det.references.weight == 0.3 and det.references.get("screw").num_references == 3
    img = files / "test" / "screw" / "a.png"
    pred = det.predict([img], object="screw")[0]
    # by hand: the model's two maps, then the fusion rule
    model = load_model(ckpt)
    refs = torch.stack([preprocess_image(Image.open(p).convert("RGB"), 64) for p in sorted((files / "refs").iterdir())])
    bank = build_bank(model, refs, "screw")
    x = preprocess_image(Image.open(img).convert("RGB"), 64)[None]
    out = predict_with_bank(model, x, model.text_features("screw"), bank)
    zs, fs, s = out["anomaly_map"][0].numpy(), out["few_shot_map"][0].numpy(), float(out["image_score"][0])
    st = bank.stats  # leave-one-out over the 3 references
    fused = st.zero_shot.center + st.zero_shot.scale * (
        0.7 * (zs.astype(np.float64) - st.zero_shot.center) / st.zero_shot.scale
        + 0.3 * (fs - st.few_shot.center) / st.few_shot.scale)
    assert pred.extra["references"] == 3
    assert pred.extra["zero_shot_raw_score"] == pytest.approx(s, abs=1e-6)
    assert pred.extra["few_shot_map_max"] == pytest.approx(float(fs.max()), rel=1e-5)
    assert pred.extra["zero_shot_map_max"] == pytest.approx(float(zs.max()), rel=1e-5)
    # the fused map in zero-shot raw units, at the image's size; the score is the zero-shot rule on it
    assert pred.anomaly_map.shape == (48, 80)
    scale = np.abs(fused).max()
    np.testing.assert_allclose(pred.anomaly_map, resize_map(fused, (48, 80)), atol=1e-5 * scale, rtol=0)
    assert pred.map_max == pytest.approx(float(fused.max()), rel=1e-5)
    prob = 1 / (1 + np.exp(-(2 * fused.max() / 12 - 1)))
    assert pred.score == pytest.approx(0.5 * prob + 0.5 * s, abs=1e-6)
    # another object has no bank: zero-shot, as a detector without references
    plain = Detector.from_checkpoint(ckpt, device="cpu").predict([img], object="nut")[0]
    other = det.predict([img], object="nut")[0]
    assert other.extra["references"] == 0 and other.score == pytest.approx(plain.score, abs=1e-6)
    # a reference scored against its own bank: a near-zero few-shot part
    own = det.predict([files / "refs" / "r1.png"], object="screw")[0]
    assert own.extra["few_shot_map_max"] < 1e-4


def read_results(out: Path):
    return {Path(r["path"]).name: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_predict_reference_flags_and_results(ckpt, files, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), "--device", "cpu", str(files / "test"), "--out", str(out),
                 "--object", "screw=a screw", "--reference", f"screw={files / 'refs' / '*.png'}",
                 "--reference-weight", "0.3", "--bank-size", "100", "--bank-fp16"]) == 0
    rows = read_results(out)
    assert rows["a.png"]["references"] == 3 and rows["b.png"]["references"] == 0
    for key in ("raw_score", "zero_shot_raw_score", "zero_shot_map_max", "zero_shot_score", "few_shot_map_max"):
        assert key in rows["a.png"]
    assert "few_shot_map_max" not in rows["b.png"]
    det = Detector.from_checkpoint(ckpt, device="cpu").with_references(
        files / "refs", object="a screw", weight=0.3, bank_size=100, fp16=True)
    want = det.predict([files / "test" / "screw" / "a.png"], object="a screw")[0]
    assert rows["a.png"]["score"] == pytest.approx(want.score, abs=1e-5)
    raw = np.load(out / "maps" / "a.npy")
    np.testing.assert_allclose(raw, want.anomaly_map, atol=1e-5 * np.abs(want.anomaly_map).max(), rtol=0)
    # one folder of references for every image
    out2 = tmp_path / "out2"
    assert main(["predict", "--checkpoint", str(ckpt), "--device", "cpu", str(files / "test"), "--out", str(out2),
                 "--reference", str(files / "refs")]) == 0
    assert {r["references"] for r in read_results(out2).values()} == {3}


def test_predict_reference_errors(ckpt, files, tmp_path, capsys):
    base = ["predict", "--checkpoint", str(ckpt), "--device", "cpu", str(files / "test")]
    assert main(base + ["--out", str(tmp_path / "a"), "--reference", f"bolt={files / 'refs'}"]) == 2
    assert "no --object bolt=DESC" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--reference", str(files / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "c"), "--reference", str(files / "refs"),
                        "--reference-weight", "2"]) == 2
    assert "--reference-weight must be in [0, 1]" in capsys.readouterr().err


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_serve_references(ckpt, files):
    require_extra("fastapi")
    require_extra("multipart")
    from fastapi.testclient import TestClient

    from moeclip.inference.serve import create_app

    det = Detector.from_checkpoint(ckpt, device="cpu")
    with TestClient(create_app(det, max_upload_bytes=200_000)) as c:
        assert c.get("/references").json() == {"weight": None, "objects": []}
        test_img = png_bytes(3)
        before = c.post("/predict", files={"image": ("t.png", test_img, "image/png")}, data={"object": "nut"}).json()
        assert before["references"] == 0 and before["few_shot_map_max"] is None
        refs = [("images", (f"r{i}.png", png_bytes(20 + i), "image/png")) for i in range(2)]
        r = c.post("/references", files=refs, data={"object": "nut"})
        assert r.status_code == 200, r.text
        assert r.json()["references"] == 2 and r.json()["objects"][0]["object"] == "nut"
        stats = r.json()["objects"][0]["normal_stats"]  # leave-one-out over the 2 references
        assert stats["domain"] == "industrial" and stats["few_shot"]["scale"] > 0 and stats["zero_shot"]["scale"] > 0
        after = c.post("/predict", files={"image": ("t.png", test_img, "image/png")}, data={"object": "nut"}).json()
        assert after["references"] == 2 and after["zero_shot_score"] == pytest.approx(before["score"], abs=1e-5)
        # the same as the Python API with the same references
        want = Detector.from_checkpoint(ckpt, device="cpu").with_references(
            [Image.open(io.BytesIO(png_bytes(20 + i))) for i in range(2)], object="nut")
        assert after["score"] == pytest.approx(
            want.predict([Image.open(io.BytesIO(test_img))], object="nut")[0].score, abs=1e-5)
        # a reference scores (near) zero on the few-shot part; other objects stay zero-shot
        own = c.post("/predict", files={"image": ("r.png", png_bytes(21), "image/png")}, data={"object": "nut"}).json()
        assert own["few_shot_map_max"] < 1e-4
        other = c.post("/predict", files={"image": ("t.png", test_img, "image/png")}, data={"object": "bolt"}).json()
        assert other["references"] == 0
        # bad uploads: as for /predict
        bad = c.post("/references", files=[("images", ("x.txt", b"hello", "text/plain"))], data={"object": "nut"})
        assert bad.status_code == 415 and "x.txt" in bad.json()["detail"]
        listing = c.get("/references").json()
        assert listing["weight"] == 0.5 and [o["references"] for o in listing["objects"]] == [2]


def test_calibrate_leave_one_out_then_predict_with_the_deployment(ckpt, files, tmp_path):
    from moeclip.inference.deploy import Deployment
    from moeclip.inference.references import FusedScorer, bank_from_images, load_references

    refs = sorted((files / "refs").iterdir())
    # the scorer, leave-one-out: each image against a bank of the other images only
    det = Detector.from_checkpoint(ckpt, device="cpu")
    pils, names = load_references([str(p) for p in refs])
    full = bank_from_images(det.model, pils, "screw", names=names)
    maps, scores, _ = FusedScorer(det, full, 0.5, leave_one_out=True).raw(pils, "screw", "industrial")
    maps, scores = torch.from_numpy(maps), torch.from_numpy(scores)
    from moeclip.model.fusion import fused_raw

    for i in range(3):
        others = [p for j, p in enumerate(refs) if j != i]
        want = Detector.from_checkpoint(ckpt, device="cpu").with_references(others, object="screw")
        raw = want.runtime().raw([pils[i]], "screw", "industrial")
        # the few-shot part against the others only, fused with the full bank's statistics (the deployment's)
        fs = raw[2]["few_shot_map_max"][0]
        assert fs > 1e-3  # not compared with itself
        det_full = Detector.from_checkpoint(ckpt, device="cpu")
        with torch.inference_mode():
            x = torch.stack([preprocess_image(pils[i], 64)])
            out = predict_with_bank(det_full.model, x, det_full.text_features("screw"),
                                    want.references.get("screw"))
        m, s = fused_raw(out["anomaly_map"].numpy(), out["few_shot_map"].numpy(), out["image_score"].numpy(),
                         full.stats, 0.5)
        # a batch of 3 vs 1: float32 of another batch grouping, relative to the map's magnitude
        assert_f32_close(maps[i], m[0])
        assert_f32_close(scores[i], s[0], scale=1.0)
    # the CLI: deployment + bank beside it; predict --deploy then scores few-shot
    dep_path = tmp_path / "deploy.json"
    assert main(["calibrate", "--checkpoint", str(ckpt), "--device", "cpu", "--normal", str(files / "refs"),
                 "--object", "screw", "--reference", "--out", str(dep_path)]) == 0
    dep = Deployment.load(dep_path)
    assert Path(dep.references).name == "deploy.bank.safetensors" and Path(dep.references).is_file()
    assert dep.calibration["few_shot"]["leave_one_out"] is True and dep.calibration["few_shot"]["references"] == 3
    assert_f32_close(dep.calibration["observed"]["map_max"], maps.amax())  # calibrate's own batches
    out = tmp_path / "preds"
    assert main(["predict", "--deploy", str(dep_path), "--device", "cpu", str(files / "test" / "screw"),
                 "--out", str(out)]) == 0
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["references"] == 3 and "decision" in row
    deployed = Detector.from_deployment(dep, device="cpu")
    want = deployed.predict([files / "test" / "screw" / "a.png"], object="screw")[0]
    assert_f32_close(row["score"], want.score, scale=1.0) and want.extra["references"] == 3
    # separate reference images (not leave-one-out)
    assert main(["calibrate", "--checkpoint", str(ckpt), "--device", "cpu", "--normal", str(files / "test"),
                 "--object", "screw", "--reference", str(files / "refs"), "--bank-size", "50",
                 "--out", str(tmp_path / "d2.json")]) == 0
    d2 = Deployment.load(tmp_path / "d2.json")
    assert d2.calibration["few_shot"] == {"references": 3, "leave_one_out": False, "bank_size": 50,
                                          "bank_fp16": False}


def test_onnx_export_bakes_the_bank_in(ckpt, files, tmp_path):
    require_extra("onnx")
    require_extra("onnxruntime")
    from moeclip.inference.onnx import OnnxRuntime, compare_onnx, read_metadata

    dep_path = tmp_path / "deploy.json"
    assert main(["calibrate", "--checkpoint", str(ckpt), "--device", "cpu", "--normal", str(files / "refs"),
                 "--object", "screw", "--reference", "--out", str(dep_path)]) == 0
    model_path = tmp_path / "m.onnx"
    assert main(["export", "onnx", "--deploy", str(dep_path), "--out", str(model_path), "--exporter",
                 "torchscript"]) == 0

    det = Detector.from_deployment(dep_path, device="cpu")
    diffs = compare_onnx(det, model_path)
    # float32 along two runtimes: relative to the map's magnitude (the image score is in [0, 1])
    magnitude = np.abs(det.runtime().raw([Image.open(files / "test" / "screw" / "a.png").convert("RGB")],
                                         "screw", "industrial")[0]).max()
    assert diffs["anomaly_map"] < 1e-5 * magnitude and diffs["image_score"] < 1e-5
    rt = OnnxRuntime(model_path)
    assert read_metadata(model_path)["references"] == "3"
    img = Image.open(files / "test" / "screw" / "a.png").convert("RGB")
    onnx_maps, onnx_scores = rt.raw([img])[:2]
    torch_maps, torch_scores = det.runtime().raw([img], "screw", "industrial")[:2]
    # onnxruntime's kernels vs PyTorch's: float32 relative to the maps' magnitude, scores on [0, 1]
    assert_f32_close(onnx_maps, torch_maps)
    assert_f32_close(onnx_scores, torch_scores, scale=1.0)
    # predict --onnx and predict --deploy give the same results
    for flag, path, out in (("--onnx", model_path, "po"), ("--deploy", dep_path, "pd")):
        assert main(["predict", flag, str(path), str(files / "test" / "screw"), "--out", str(tmp_path / out)]) == 0
    a = json.loads((tmp_path / "po" / "results.jsonl").read_text().splitlines()[0])
    b = json.loads((tmp_path / "pd" / "results.jsonl").read_text().splitlines()[0])
    # the same fields, but the zero-shot and few-shot parts, which the exported graph does not output
    assert a["references"] == b["references"] == 3
    assert set(b) - set(a) == {"zero_shot_raw_score", "zero_shot_map_max", "zero_shot_score", "few_shot_map_max"}
    assert_f32_close(a["score"], b["score"], scale=1.0)


def test_one_reference_uses_the_batch_statistics_and_cannot_be_exported(ckpt, files, tmp_path, capsys):
    require_extra("onnx")
    from moeclip.model.fusion import fused_raw

    one = files / "refs" / "r0.png"
    det = Detector.from_checkpoint(ckpt, device="cpu").with_references([one], object="screw")
    assert det.references.get("screw").stats is None  # nothing to leave out
    imgs = [Image.open(files / "test" / "screw" / "a.png").convert("RGB"), Image.open(one).convert("RGB")]
    maps = det.runtime().raw(imgs, "screw", "industrial")[0]
    with torch.inference_mode():
        x = torch.stack([preprocess_image(i, 64) for i in imgs])
        out = predict_with_bank(det.model, x, det.text_features("screw"), det.references.get("screw"))
    want = fused_raw(out["anomaly_map"].numpy(), out["few_shot_map"].numpy(), out["image_score"].numpy(), None)[0]
    assert_f32_close(maps, want)
    dep = tmp_path / "d.json"
    assert main(["calibrate", "--checkpoint", str(ckpt), "--device", "cpu", "--normal", str(files / "test"),
                 "--object", "screw", "--reference", str(one), "--out", str(dep)]) == 0
    assert main(["export", "onnx", "--deploy", str(dep), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "needs at least 2 reference images" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_weight_zero_is_the_zero_shot_prediction(ckpt, files):
    """``--reference-weight 0``: the fused map written back in zero-shot units is the zero-shot map itself."""
    img = files / "test" / "screw" / "a.png"
    plain = Detector.from_checkpoint(ckpt, device="cpu").predict([img], object="screw")[0]
    zero = Detector.from_checkpoint(ckpt, device="cpu").with_references(files / "refs", object="screw", weight=0.0)
    got = zero.predict([img], object="screw")[0]
    np.testing.assert_allclose(got.anomaly_map, plain.anomaly_map, atol=1e-6 * np.abs(plain.anomaly_map).max(), rtol=0)
    assert got.score == pytest.approx(plain.score, abs=1e-6) and got.extra["references"] == 3
