"""The one post-processing module, and the single scoring path every caller goes through.

The same raw outputs (a raw map at model resolution and a raw image score) must give identical
scores and maps through the Detector, a deployment file, the ONNX runtime, the pipeline that
``predict`` and ``serve`` run, the report and ``moeclip test``'s metric protocol.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_checkpoint, require_extra
from PIL import Image

from moeclip.analysis.report import final_image_scores
from moeclip.inference import postprocess as pp
from moeclip.inference.deploy import Deployment
from moeclip.inference.detector import Detector
from moeclip.inference.pipeline import Job, ResultWriter, score_images
from moeclip.inference.torch_runtime import TorchRuntime
from moeclip.metrics import auroc, evaluate_class
from moeclip.metrics.protocol import final_image_scores_, minmax_scale
from moeclip.model.domain import Domain

S = 64          # the tiny model's resolution
NUM_MAPS = 12
NORM = {"map_min": -3.0, "map_max": 30.0, "score_min": 0.4, "score_max": 0.6}


# ---------------------------------------------------------------------------- the module
def test_import_is_torch_free():
    code = ("import sys\n"
            "import moeclip.inference.postprocess, moeclip.inference.pipeline, moeclip.inference.render\n"
            "import moeclip.inference.deploy, moeclip.inference.onnx, moeclip.model.options\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr


def test_scales():
    # raw = num_maps / 2 means z_abnormal = z_normal on every map: probability 1/2
    assert pp.map_probability(NUM_MAPS / 2, NUM_MAPS) == pytest.approx(0.5)
    assert pp.map_probability(NUM_MAPS, NUM_MAPS) == pytest.approx(1 / (1 + np.exp(-1)))
    assert np.all(np.diff(pp.map_probability(np.linspace(-50, 50, 11), NUM_MAPS)) > 0)
    np.testing.assert_allclose(pp.normalize([-1.0, 0.0, 1.0, 3.0], 0.0, 2.0), [0.0, 0.0, 0.5, 1.0])
    assert pp.normalize(5.0, 1.0, 1.0) == 1.0 and pp.normalize(0.5, 1.0, 1.0) == 0.0  # constant range


def test_normalization_round_trip_and_fit():
    n = pp.Normalization.from_dict(NORM)
    assert n.to_dict() == NORM and pp.Normalization.from_dict(n) is n and pp.Normalization.from_dict(None) is None
    assert n.map(13.5) == pytest.approx(0.5) and n.score(0.45) == pytest.approx(0.25)
    fit = pp.Normalization.fit(1.0, 3.0, 0.4, 0.6, headroom=1.0)
    assert (fit.map_max, fit.score_max) == pytest.approx((5.0, 0.8))


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_image_score_rule(domain):
    n = pp.Normalization.from_dict(NORM)
    got = pp.image_score(13.5, 0.45, domain, n, NUM_MAPS)
    assert got == pytest.approx(0.5 if domain == "medical" else 0.5 * 0.5 + 0.5 * 0.25)
    uncal = pp.image_score(9.0, 0.7, domain, None, NUM_MAPS)
    m = float(pp.map_probability(9.0, NUM_MAPS))
    assert uncal == pytest.approx(m if domain == "medical" else 0.5 * m + 0.35, abs=1e-7)


def test_post_processor_outputs():
    rng = np.random.default_rng(0)
    raw = rng.normal(8, 3, (S, S)).astype(np.float32)
    post = pp.PostProcessor(NUM_MAPS, "industrial", NORM, threshold=0.3, pixel_threshold=9.0)
    s = post(raw, 0.55, size=(40, 90))
    assert s.anomaly_map.shape == (40, 90) and s.anomaly_map.dtype == np.float32
    assert s.map_max == float(raw.max())  # the model resolution's maximum, not the resized map's
    assert s.score == pp.image_score(raw.max(), 0.55, "industrial", NORM, NUM_MAPS)
    assert s.decision is (s.score >= 0.3)
    mask = post.mask(s.anomaly_map)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, s.anomaly_map >= 9.0)
    unit = post.unit_map(s.anomaly_map)
    assert unit.min() >= 0 and unit.max() <= 1
    np.testing.assert_allclose(unit, np.clip((s.anomaly_map - -3.0) / 33.0, 0, 1), atol=1e-6)
    assert pp.PostProcessor(NUM_MAPS).mask(raw) is None and pp.PostProcessor(NUM_MAPS)(raw, 0.5).decision is None
    med = post.with_domain("medical")(raw, 0.55)
    assert med.score == pytest.approx(float(post.normalization.map(raw.max())))
    with pytest.raises(ValueError, match="domain"):
        post.with_domain("space")


def test_heat_map_shows_where_the_model_looks_without_a_calibration():
    # the demo's model: raw maps around -40 for 12 maps, a defect 7 units higher. The uncalibrated
    # probability is ~0.001 everywhere (a uniformly blue picture); the per-image scale spans [0, 1]
    raw = np.full((S, S), -40.0, np.float32)
    raw[20:30, 40:50] = -33.0
    raw[0, 0] = -41.0
    post = pp.PostProcessor(NUM_MAPS)
    assert float(pp.map_probability(raw, NUM_MAPS).max()) < 0.01
    unit = post.unit_map(raw)
    assert post.map_scale == "per-image"
    assert unit[25, 45] == 1.0 and unit[0, 0] == 0.0
    assert unit[5, 5] == pytest.approx(1.0 / 8.0)  # (-40 - -41) / (-33 - -41)
    assert not post.unit_map(np.full((4, 4), 3.0, np.float32)).any()  # a flat map: nothing to show
    # a calibration keeps its absolute scale: the same map of another image keeps its colours
    cal = pp.PostProcessor(NUM_MAPS, normalization=NORM)
    assert cal.map_scale == "calibrated"
    np.testing.assert_allclose(cal.unit_map(raw), np.clip((raw + 3.0) / 33.0, 0, 1), atol=1e-6)
    np.testing.assert_allclose(cal.unit_map(raw + 10), np.clip((raw + 13.0) / 33.0, 0, 1), atol=1e-6)


def test_resize_map_equals_torch_upsampling():
    import torch.nn.functional as F

    a = np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)
    for size in [(64, 64), (37, 90), (1, 5), (16, 16)]:
        ref = F.interpolate(torch.from_numpy(a)[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]
        np.testing.assert_allclose(pp.resize_map(a, size), ref.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------- one path
def fixed_raw(images, seed=0):
    """Deterministic raw outputs of a batch (what any runtime would return)."""
    rng = np.random.default_rng(seed + len(images))
    maps = rng.normal(8, 4, (len(images), S, S)).astype(np.float32)
    scores = rng.uniform(0.35, 0.65, len(images)).astype(np.float32)
    return maps, scores


class FixedRuntime:
    num_maps, image_size = NUM_MAPS, S

    def raw(self, images, object, domain):
        return fixed_raw(images)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=5)


def tiny_onnx(path: Path, deployment: Deployment) -> Path:
    """An ONNX graph with moeclip metadata whose outputs are fixed_raw's (a constant, tiled by batch)."""
    onnx = require_extra("onnx")
    require_extra("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    maps, scores = fixed_raw([None])
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "ones2"], ["reps_map"], axis=0),
        helper.make_node("Tile", ["map_const", "reps_map"], ["anomaly_map"]),
        helper.make_node("Tile", ["score_const", "batch"], ["image_score"]),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([1, 1], np.int64), "ones2"),
             numpy_helper.from_array(maps, "map_const"), numpy_helper.from_array(scores, "score_const")]
    graph = helper.make_graph(
        nodes, "fixed", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, S, S])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["B", S, S]),
         helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["B"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"format": "moeclip-onnx", "object": deployment.object, "domain": deployment.domain,
            "image_size": str(S), "num_maps": str(NUM_MAPS), "deployment": json.dumps(deployment.to_dict())}
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = "moeclip." + k, v
    onnx.save(model, str(path))
    return path


def _fixed_case(tiny_ckpt, tmp_path, domain):
    """A deployment file, an image, and the post-processor's result on fixed_raw's outputs (the expected one)."""
    dep = Deployment(object="metal nut", domain=domain, threshold=0.4, pixel_threshold=9.0, normalization=NORM,
                     checkpoint=str(tiny_ckpt))
    dep_path = dep.save(tmp_path / "deploy.json")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    maps, scores = fixed_raw([image])
    expected = pp.PostProcessor(NUM_MAPS, domain, NORM, 0.4, 9.0)(maps[0], float(scores[0]), (40, 90))
    return dep, dep_path, image, expected


def _assert_same_result(got, expected):
    # bitwise: every path post-processes the same float32 raw outputs with the same code
    assert got.score == expected.score and got.raw_score == expected.raw_score
    assert got.map_max == expected.map_max and got.decision == expected.decision
    np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_every_path_gives_the_same_scores(tiny_ckpt, tmp_path, domain):
    dep, dep_path, image, expected = _fixed_case(tiny_ckpt, tmp_path, domain)

    # the Detector (PyTorch runtime) with its model's raw outputs replaced by the fixed ones
    det = Detector.from_deployment(dep_path, device="cpu")
    det.predict_tensors = lambda batch, obj, dom: {"anomaly_map": torch.from_numpy(fixed_raw(list(batch))[0]),
                                                   "image_score": torch.from_numpy(fixed_raw(list(batch))[1])}
    via_detector = det.predict([image], object="metal nut")[0]
    # the pipeline (predict / serve) with the deployment's post-processor
    post = Deployment.load(dep_path).post_processor(NUM_MAPS)
    via_pipeline = score_images(TorchRuntime(det), post, [image], "metal nut")[0]
    for got in (via_detector, via_pipeline):
        _assert_same_result(got, expected)

    # the files predict writes: map, overlay on the fixed scale, mask from the pixel threshold
    writer = ResultWriter(tmp_path / "out", masks=True)
    rec = writer.write(Job(tmp_path / "x.png", object="metal nut"), via_pipeline, image, post)
    writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "out" / rec["map"]), expected.anomaly_map)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / rec["mask"])) == 255,
                                  expected.anomaly_map >= 9.0)
    assert rec["score"] == expected.score and rec["domain"] == domain and rec["threshold"] == 0.4


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_onnx_runtime_gives_the_same_scores(tiny_ckpt, tmp_path, domain):
    """The ONNX runtime (a graph returning fixed_raw's outputs, the deployment in its metadata): its own
    test, so that without the onnx extra only this part skips."""
    from moeclip.inference.onnx import OnnxDetector
    from moeclip.inference.pipeline import decode

    dep, _, image, expected = _fixed_case(tiny_ckpt, tmp_path, domain)
    onnx_det = OnnxDetector(tiny_onnx(tmp_path / "fixed.onnx", dep))
    via_onnx = onnx_det.predict([decode(image)])[0]
    _assert_same_result(via_onnx, expected)
    writer = ResultWriter(tmp_path / "out", masks=True)
    rec = writer.write(Job(tmp_path / "x.png", object="metal nut"), via_onnx, image, onnx_det.post)
    writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "out" / rec["map"]), expected.anomaly_map)
    assert rec["score"] == expected.score and rec["threshold"] == 0.4


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_report_protocol_and_calibrated_rule_agree(domain):
    """``moeclip test`` (the protocol), the report and a deployment normalised with the class's own
    range give the same image scores: the per-class rule and its single-image analogue are one rule."""
    rng = np.random.default_rng(7)
    maps = rng.normal(8, 4, (12, 16, 16)).astype(np.float32)
    raw = rng.uniform(0.35, 0.65, 12).astype(np.float32)
    labels = np.arange(12) % 2
    mmax = maps.max(axis=(1, 2))

    # maps leave [0, 1]: min-max with the class's range; raw scores stay inside: kept as they are
    by_hand = Domain.parse(domain).combine((mmax - maps.min()) / (maps.max() - maps.min()), raw)
    protocol = final_image_scores_(raw.copy(), mmax.copy(), domain, minmax_scale(maps))
    report = final_image_scores(raw, mmax, domain, (maps.min(), maps.max()))
    np.testing.assert_allclose(protocol, by_hand, atol=1e-6)
    np.testing.assert_allclose(report, by_hand, atol=1e-6)
    assert auroc(report, labels) == pytest.approx(evaluate_class(maps, None, raw, labels, domain)["image_auroc"])

    norm = pp.Normalization(float(maps.min()), float(maps.max()), 0.0, 1.0)
    post = pp.PostProcessor(NUM_MAPS, domain, norm)
    single = [post(m, float(s)).score for m, s in zip(maps, raw)]
    np.testing.assert_allclose(single, by_hand, atol=1e-6)


def test_cli_choices_come_from_the_library():
    from moeclip import precision
    from moeclip.cli.common import DOMAINS, PRECISIONS

    assert set(PRECISIONS) == set(precision.PRECISIONS)
    assert DOMAINS == ("industrial", "medical") == tuple(d.value for d in Domain)


def test_score_images_passes_runtime_extras_and_decodes_uploads():
    import io

    from moeclip.inference.pipeline import Prediction, decode

    class WithExtras(FixedRuntime):
        def raw(self, images, object, domain):
            maps, scores = fixed_raw(images)
            return maps, scores, {"fewshot_max": maps.max(axis=(1, 2)) + 1}

    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(buf, format="GIF")
    images = [decode(buf.getvalue()), Image.new("RGB", (30, 12))]
    assert images[0].size == (20, 10) and images[0].mode == "RGB"
    got = score_images(WithExtras(), pp.PostProcessor(NUM_MAPS), images, "object")
    maps, _ = fixed_raw(images)
    assert [g.extra["fewshot_max"] for g in got] == pytest.approx(list(maps.max(axis=(1, 2)) + 1))
    assert [g.anomaly_map.shape for g in got] == [(10, 20), (12, 30)]
    assert Prediction.from_scored(got[1], "object", "industrial").extra == got[1].extra
