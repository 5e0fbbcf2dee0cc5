"""``moeclip calibrate`` and the deployment file: threshold rules, normalisation, use by predict."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_checkpoint, require_extra
from PIL import Image

from moeclip.cli import main
from moeclip.errors import MoECLIPError
from moeclip.inference.deploy import Deployment
from moeclip.inference.detector import load_deployment_detector
from moeclip.inference.postprocess import Normalization, f1_threshold, fpr_threshold, image_score, rates, resize_map


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    """A tiny random checkpoint whose experts and routers are non-trivial."""
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


def noise_image(path: Path, seed: int, size=(48, 48), blob: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    a = rng.integers(90, 140, (*size, 3), dtype=np.uint8)
    if blob:
        a[10:22, 12:30] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """An MVTec-style folder: nut/test/good (6), nut/test/scratch (4) with masks."""
    root = tmp_path_factory.mktemp("data") / "mine"
    for i in range(6):
        noise_image(root / "nut" / "test" / "good" / f"{i:03d}.png", i)
    for i in range(4):
        noise_image(root / "nut" / "test" / "scratch" / f"{i:03d}.png", 100 + i, blob=True)
        m = np.zeros((48, 48), dtype=np.uint8)
        m[10:22, 12:30] = 255
        (root / "nut" / "ground_truth" / "scratch").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "nut" / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return root


# ---------------------------------------------------------------------------- threshold rules
def test_fpr_threshold_is_the_most_sensitive_meeting_the_bound():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=200)
    for max_fpr in (0.0, 0.01, 0.05, 0.2):
        t = fpr_threshold(normals, max_fpr)
        assert np.mean(normals >= t) <= max_fpr
        below = np.max(normals[normals < t])  # any lower threshold flags one more normal
        assert np.mean(normals >= below) > max_fpr
    assert fpr_threshold([0.3, 0.3, 0.3], 0.0) > 0.3
    with pytest.raises(MoECLIPError):
        fpr_threshold([], 0.01)


def test_f1_threshold_matches_brute_force():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(300), 2)  # many ties
    labels = (rng.random(300) < scores).astype(int)
    t, f1 = f1_threshold(scores, labels)
    brute = max((rates(scores, labels, c)["f1"], c) for c in np.unique(scores))
    assert f1 == pytest.approx(brute[0]) and rates(scores, labels, t)["f1"] == pytest.approx(f1)
    with pytest.raises(MoECLIPError, match="both normal and anomalous"):
        f1_threshold([0.1, 0.2], [0, 0])


def test_normalization_headroom():
    n = Normalization.fit(1.0, 3.0, 0.4, 0.6, headroom=1.0).to_dict()
    assert n == pytest.approx({"map_min": 1.0, "map_max": 5.0, "score_min": 0.4, "score_max": 0.8})


def test_image_score_by_hand_and_through_the_detector(tiny_ckpt):
    """The final image score against values written out by hand (the paper's rule: industrial averages the
    map score and the detection score, medical takes the map score), numpy and the Detector alike."""
    import math

    from moeclip.inference.detector import Detector
    from moeclip.model.options import build_model

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    norm = {"map_min": -3.0, "map_max": 30.0, "score_min": 0.4, "score_max": 0.6}
    # (map max, raw score) -> (map score, detection score) on [0, 1]; 12 maps summed, each patch
    # score a = raw / 12 is a softmax probability sigmoid(2a - 1) without a normalisation; clipped with one
    by_hand = {
        None: {(12.3, 0.51): (sigmoid(2 * 12.3 / 12 - 1), 0.51), (-5.0, 0.3): (sigmoid(2 * -5.0 / 12 - 1), 0.3),
               (40.0, 0.7): (sigmoid(2 * 40.0 / 12 - 1), 0.7)},
        "norm": {(12.3, 0.51): (15.3 / 33, 0.11 / 0.2), (-5.0, 0.3): (0.0, 0.0), (40.0, 0.7): (1.0, 1.0)},
    }
    for key, cases in by_hand.items():
        normalization = None if key is None else norm
        det = Detector(build_model(tiny_ckpt), device="cpu",
                       normalization=None if normalization is None else Normalization(**normalization))
        assert det.num_maps == 12
        for (mmax, raw), (m, s) in cases.items():
            for domain, want in (("industrial", 0.5 * m + 0.5 * s), ("medical", m)):
                # float32 arithmetic (as the model's) against float64 by hand: a few ulps of the score
                got = image_score(mmax, raw, domain, normalization, det.num_maps)
                assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (key, mmax, raw, domain)
                assert det.score_from(mmax, raw, det.domain.parse(domain)) == got


def test_resize_map_equals_torch():
    import torch.nn.functional as F

    a = np.random.default_rng(0).normal(size=(9, 7)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(a)[None, None], size=(31, 20), mode="bilinear", align_corners=True)[0, 0]
    np.testing.assert_allclose(resize_map(a, (31, 20)), ref.numpy(), atol=1e-5)


def test_deployment_file_errors(tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text("{not json")
    with pytest.raises(MoECLIPError, match="invalid JSON"):
        Deployment.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MoECLIPError, match="not a moeclip deployment"):
        Deployment.load(bad)
    bad.write_text(json.dumps({"format": "moeclip-deploy", "version": 1, "object": "nut", "domain": "space"}))
    with pytest.raises(MoECLIPError, match="domain"):
        Deployment.load(bad)
    with pytest.raises(MoECLIPError, match="not found"):
        Deployment.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- the command
def test_calibrate_normal_then_predict(tiny_ckpt, dataset, tmp_path):
    normals = dataset / "nut" / "test" / "good"
    dep_path = tmp_path / "deploy.json"
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--object", "hex nut",
                 "--normal", str(normals), "--max-fpr", "0.34", "--out", str(dep_path)]) == 0
    dep = Deployment.load(dep_path)
    assert dep.object == "hex nut" and dep.domain == "industrial"
    assert dep.checkpoint == str(Path(tiny_ckpt).resolve())
    assert dep.calibration["criterion"] == "fpr" and dep.calibration["num_normal"] == 6
    assert set(dep.normalization) == {"map_min", "map_max", "score_min", "score_max"}
    obs = dep.calibration["observed"]
    assert dep.normalization["map_max"] == pytest.approx(2 * obs["map_max"] - obs["map_min"])  # headroom 1

    det = load_deployment_detector(dep_path, device="cpu")
    assert det.threshold == dep.threshold and det.object == "hex nut"
    assert det.normalization.map_max == dep.normalization["map_max"]

    out = tmp_path / "pred"
    assert main(["predict", "--deploy", str(dep_path), "--device", "cpu", str(normals), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["object"] == "hex nut" and r["object_source"] == "deploy" for r in rows)
    # floor(0.34 * 6) = 2 normals may be flagged: the most sensitive threshold sits just above the 3rd highest
    # calibration score, so predict flags the 2 highest. predict recomputes the scores in another run (batch
    # composition): a score within float32 rounding of the threshold (scores span [0, 1]: 1e-5) may fall on
    # either side; every other one is decided by its rank, and each decision is score >= threshold.
    ranked = sorted(rows, key=lambda r: -r["score"])
    near = [abs(r["score"] - dep.threshold) <= 1e-5 for r in ranked]
    assert sum(near) <= 2  # the 3rd highest normal sits at the threshold (one ulp below it)
    for rank, (r, close) in enumerate(zip(ranked, near)):
        assert r["decision"] == (r["score"] >= dep.threshold)
        if not close:
            assert r["decision"] == (rank < 2), (rank, r["score"], dep.threshold)
    for r in rows:
        mask = np.asarray(Image.open(out / r["mask"]))
        amap = np.load(out / r["map"])
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, amap >= dep.pixel_threshold)

    # again: refuses to replace the deployment file without --overwrite
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--device", "cpu",
                 "--normal", str(normals), "--out", str(dep_path)]) == 2


def test_calibrate_labelled_data_f1(tiny_ckpt, dataset, tmp_path, capsys):
    dep_path = tmp_path / "deploy.json"
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--device", "cpu",
                 "--data", f"folder={dataset}", "--out", str(dep_path)]) == 0
    dep = Deployment.load(dep_path)
    cal = dep.calibration
    assert dep.object == "nut"  # the class name, no official description for a custom folder
    assert cal["criterion"] == "f1" and cal["pixel_criterion"] == "f1"
    assert (cal["num_normal"], cal["num_anomalous"]) == (6, 4)
    obs = cal["observed"]
    assert dep.normalization == pytest.approx(obs)  # no headroom with labelled data
    # the stored F1 is the best any threshold reaches on these images' scores: predict with the deployment
    # rescores them, scikit-learn's F1 of every cut (score >= each score) gives the best one by brute force
    sk = require_extra("sklearn.metrics")
    out = tmp_path / "pred"
    assert main(["predict", "--deploy", str(dep_path), "--device", "cpu", str(dataset / "nut" / "test"),
                 "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    scores = np.array([r["score"] for r in rows])
    labels = np.array([Path(r["path"]).parent.name == "scratch" for r in rows], dtype=int)
    assert labels.sum() == 4
    best = max(sk.f1_score(labels, scores >= c) for c in scores)
    assert cal["image"]["f1"] == pytest.approx(best, abs=1e-6)  # stored rounded to 6 decimals
    assert cal["image"]["f1"] == pytest.approx(sk.f1_score(labels, scores >= dep.threshold), abs=1e-6)

    # an F1 rule needs anomalies
    assert main(["calibrate", "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--criterion", "f1",
                 "--normal", str(dataset / "nut" / "test" / "good"), "--out", str(tmp_path / "x.json")]) == 2
    assert "labelled --data" in capsys.readouterr().err
