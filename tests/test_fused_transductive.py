"""The fused transductive mode: zero-shot + mutual (+ few-shot) maps, one calibrated fusion, on one batch."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_checkpoint, read_rows
from PIL import Image

from moeclip.cli import main
from moeclip.errors import MoECLIPError
from moeclip.inference.detector import Detector
from moeclip.model.fused import MutualOptions, fuse_signals


@pytest.fixture(scope="module")
def ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=5)


@pytest.fixture(scope="module")
def det(ckpt):
    return Detector.from_checkpoint(ckpt, device="cpu")


def texture(seed: int, defect: bool = False) -> np.ndarray:
    """A striped 64 px part with a little noise; ``defect``: a bright square at rows/cols 24-40."""
    rng = np.random.default_rng(seed)
    x = np.arange(64)
    base = (128 + 60 * np.sin(x / 3.0))[None, :, None] * np.ones((64, 1, 3))
    img = base + rng.normal(0, 4, (64, 64, 3))
    if defect:
        img[24:40, 24:40] = [255, 20, 200]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parts")
    for i in range(5):
        Image.fromarray(texture(i)).save(root / f"good_{i}.png")
    Image.fromarray(texture(9, defect=True)).save(root / "zz_defect.png")
    return root


def robust(x):
    x = np.asarray(x, np.float64).ravel()
    med = np.median(x)
    return med, 1.4826 * np.median(np.abs(x - med))


# ---------------------------------------------------------------------------- the rule
def test_fuse_signals_is_the_weighted_mean_of_robust_z_scores_on_the_zero_shot_scale():
    rng = np.random.default_rng(0)
    z, u = rng.normal(10, 3, (3, 8, 8)), rng.gamma(2.0, 0.01, (3, 8, 8))
    (mz, sz), (mu, su) = robust(z), robust(u)
    for w in (0.0, 0.3, 1.0):
        expected = mz + sz * ((1 - w) * (z - mz) / sz + w * (u - mu) / su)
        np.testing.assert_allclose(fuse_signals(z, u, mutual_weight=w), expected, rtol=1e-5, atol=1e-5 * sz)
    # a positive affine change of the mutual signal changes nothing
    np.testing.assert_allclose(fuse_signals(z, 7 * u + 3), fuse_signals(z, u), rtol=1e-5, atol=1e-4)


def test_fuse_signals_with_references_shares_the_rest_as_the_few_shot_rule():
    from moeclip.model.fusion import ReferenceStats, SignalStats

    rng = np.random.default_rng(1)
    z, f, u = rng.normal(10, 3, (2, 8, 8)), rng.random((2, 8, 8)), rng.random((2, 8, 8))
    st = ReferenceStats(SignalStats(9.0, 2.0), SignalStats(0.4, 0.1))
    mu, su = robust(u)
    expected = 9.0 + 2.0 * (0.5 * 0.7 * (z - 9.0) / 2.0 + 0.5 * 0.3 * (f - 0.4) / 0.1 + 0.5 * (u - mu) / su)
    np.testing.assert_allclose(fuse_signals(z, u, f, st, reference_weight=0.3, mutual_weight=0.5), expected,
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(MoECLIPError, match="mutual-weight"):
        fuse_signals(z, u, mutual_weight=1.5)
    with pytest.raises(MoECLIPError, match="mutual-tokens"):
        MutualOptions(tokens="cls")


# ---------------------------------------------------------------------------- Python API
def test_weight_zero_is_the_zero_shot_prediction_and_extras_keep_it(det, folder):
    paths = sorted(folder.glob("*.png"))
    zs = det.predict(paths)
    fused = det.predict(paths, transductive=True, mutual_weight=0.0)
    for a, b in zip(fused, zs):
        scale = float(np.abs(b.anomaly_map).max())
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=0, atol=1e-5 * scale)
        assert a.score == pytest.approx(b.score, abs=1e-6)
        assert a.extra["transductive"] == len(paths) and a.extra["scoring"] == "fused"
        assert a.extra["zero_shot_score"] == pytest.approx(b.score, abs=1e-6)
        assert a.extra["zero_shot_map_max"] == pytest.approx(b.map_max, rel=1e-5)


@pytest.mark.parametrize("tokens", ["adapted", "frozen", "seg"])
def test_mutual_map_alone_finds_the_odd_patch_and_ignores_batch_order(det, folder, tokens):
    paths = sorted(folder.glob("*.png"))  # zz_defect.png last
    res = det.predict(paths, transductive=True, mutual_weight=1.0, tokens=tokens)
    amap = res[-1].anomaly_map
    inside, outside = amap[24:40, 24:40].mean(), np.concatenate([amap[:16].ravel(), amap[48:].ravel()]).mean()
    assert inside > outside
    assert res[-1].map_max > max(r.map_max for r in res[:-1])  # the defect image holds the batch's peak
    shuffled = det.predict(paths[::-1], transductive=True, mutual_weight=1.0, tokens=tokens, batch_size=2)
    for a, b in zip(res, shuffled[::-1]):
        scale = float(np.abs(a.anomaly_map).max())
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=0, atol=1e-4 * scale)


def test_one_image_is_refused_and_references_join(det, folder, ckpt):
    with pytest.raises(MoECLIPError, match="at least 2 images"):
        det.predict([folder / "good_0.png"], transductive=True)
    with pytest.raises(MoECLIPError, match="transductive=True"):
        det.predict([folder / "good_0.png"], tokens="seg")
    withref = Detector.from_checkpoint(ckpt, device="cpu").with_references(
        [folder / "good_3.png", folder / "good_4.png"], weight=0.5)
    paths = [folder / f"good_{i}.png" for i in range(3)] + [folder / "zz_defect.png"]
    res = withref.predict(paths, transductive=True)
    fs = withref.predict(paths)  # few-shot alone: the same zero-shot parts
    for a, b in zip(res, fs):
        assert a.extra["references"] == 2 and a.extra["transductive"] == 4
        assert a.extra["few_shot_map_max"] == pytest.approx(b.extra["few_shot_map_max"], rel=1e-5)
        assert a.extra["zero_shot_raw_score"] == pytest.approx(b.extra["zero_shot_raw_score"], abs=1e-6)
    # mutual weight 0 with references: the few-shot prediction itself
    same = withref.predict(paths, transductive=True, mutual_weight=0.0)
    for a, b in zip(same, fs):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=0,
                                   atol=1e-5 * float(np.abs(b.anomaly_map).max()))


# ---------------------------------------------------------------------------- CLI
def fused_args(ckpt, *inputs, out, extra=()):
    return ["predict", "--checkpoint", str(ckpt), "--transductive", "--device", "cpu", "--out", str(out),
            *extra, *map(str, inputs)]


def test_cli_lines_keep_the_zero_shot_fields_and_equal_the_api(det, ckpt, folder, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(folder, src)
    (src / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(fused_args(ckpt, src, out=out, extra=["--threshold", "0.5"])) == 0
    rows = read_rows(out)
    assert "error" in rows["broken.png"] and "broken.png" in rows["broken.png"]["error"]
    api = {Path(p.path).name: p for p in det.predict(sorted(folder.glob("*.png")), transductive=True)}
    for name, p in api.items():
        row = rows[name]
        assert row["transductive"] == 6 and row["scoring"] == "fused"  # the broken file left the batch
        for key in ("zero_shot_raw_score", "zero_shot_map_max", "zero_shot_score", "mutual_map_max"):
            assert row[key] == pytest.approx(p.extra[key], rel=1e-5, abs=1e-6)
        assert row["score"] == pytest.approx(p.score, abs=1e-6)
        assert row["decision"] == (row["score"] >= 0.5)
        np.testing.assert_allclose(np.load(out / row["map"]), p.anomaly_map, rtol=0,
                                   atol=1e-5 * float(np.abs(p.anomaly_map).max()))


def test_cli_one_image_groups_and_errors(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(fused_args(ckpt, folder / "good_0.png", out=out)) == 2
    assert "at least 2 images" in capsys.readouterr().err and not out.exists()
    # two objects: each is its own batch, as if run alone
    root = tmp_path / "mixed"
    for i, p in enumerate(sorted(folder.glob("*.png"))):
        dst = root / ("a" if i % 2 == 0 else "b") / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
    mixed, alone = tmp_path / "m", tmp_path / "a"
    assert main(fused_args(ckpt, root, out=mixed, extra=["--object", "a=part a", "--object", "b=part b"])) == 0
    assert main(fused_args(ckpt, root / "a", out=alone, extra=["--object", "part a"])) == 0
    rows, ref = read_rows(mixed), read_rows(alone)
    assert all(r["transductive"] == 3 for r in rows.values())
    for name, r in ref.items():
        assert rows[name]["score"] == pytest.approx(r["score"], abs=1e-6)
    for extra, message in ((["--scoring", "fused", "--onnx", "x.onnx"], "drop --onnx"),
                           (["--rscin", "1"], "drop --rscin")):
        assert main(fused_args(ckpt, folder, out=tmp_path / "e", extra=extra)) == 2
        assert message in capsys.readouterr().err
    assert main(["predict", "--transductive", "--device", "cpu", "--out", str(tmp_path / "e"), str(folder)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(ckpt), "--mutual-tokens", "seg", "--out", str(tmp_path / "e"),
                 str(folder)]) == 2
    assert "need --transductive" in capsys.readouterr().err


# ---------------------------------------------------------------------------- moeclip test --transductive
@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from moeclip.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root / "d", ["wood", "disc"], n_normal=3, n_anomalous=3, n_train=4, image_size=64, seed=0)
    return root / "d"


def saved_maps(folder: Path) -> dict:
    """Saved maps by ``<class>/<parent>_<stem>.npy``."""
    return {f"{p.parent.name}/{p.name}": np.load(p) for p in folder.rglob("*.npy")}


def test_test_transductive_is_the_class_as_one_batch(ckpt, synth_data, tmp_path):
    import json

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    common = ["test", "--checkpoint", str(ckpt), "--data", f"folder={synth_data}", "--device", "cpu",
              "--transductive", "--save-maps"]
    assert main(common + ["--out", str(out_a), "--batch-size", "8"]) == 0
    assert main(common + ["--out", str(out_b), "--batch-size", "2"]) == 0  # batches of 2, same class batch
    doc = json.loads((out_a / "results.json").read_text())
    assert doc["transductive"]["tokens"] == "adapted" and doc["transductive"]["weight"] == 0.5
    a, b = saved_maps(out_a / "maps"), saved_maps(out_b / "maps")
    assert len(a) == 12 and set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5 * float(np.abs(a[name]).max()))
    # each class's maps are Detector.predict(that class's test images, transductive=True)
    det = Detector.from_checkpoint(ckpt, device="cpu")
    for cls, desc in (("wood", "wood grain"), ("disc", "metal disc")):  # the synthetic data's descriptions
        paths = sorted((synth_data / cls / "test").rglob("*.png"))
        for p, pred in zip(paths, det.predict(paths, object=desc, transductive=True)):
            got = a[f"{cls}/{p.parent.name}_{p.stem}.npy"]
            np.testing.assert_allclose(got, pred.anomaly_map, rtol=0, atol=1e-5 * float(np.abs(got).max()))


def test_test_transductive_with_shots(ckpt, synth_data, tmp_path):
    import json

    out = tmp_path / "k"
    assert main(["test", "--checkpoint", str(ckpt), "--data", f"folder={synth_data}", "--device", "cpu",
                 "--transductive", "--shots", "2", "--shot-seeds", "0,1", "--save-maps", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["transductive"] is not None and doc["few_shot"]["shots"] == 2
    seed0 = doc["datasets"][0]["per_seed"][0]
    maps = saved_maps(out / "seed0" / "maps")
    refs = seed0["references"]["wood"]
    det = Detector.from_checkpoint(ckpt, device="cpu").with_references(refs, object="wood grain")
    paths = sorted((synth_data / "wood" / "test").rglob("*.png"))
    for p, pred in zip(paths, det.predict(paths, object="wood grain", transductive=True)):
        got = maps[f"wood/{p.parent.name}_{p.stem}.npy"]
        np.testing.assert_allclose(got, pred.anomaly_map, rtol=0, atol=1e-5 * float(np.abs(got).max()))


# ---------------------------------------------------------------------------- serve: POST /predict/batch
def test_serve_predict_batch_scores_the_request_as_one_batch(det, folder):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from moeclip.inference.serve import create_app

    paths = sorted(folder.glob("*.png"))
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    files.insert(2, ("images", ("broken.png", b"not an image", "image/png")))
    with TestClient(create_app(det)) as client:
        r = client.post("/predict/batch", files=files, data={"object": "part"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["transductive"] == len(paths) and doc["object"] == "part"
        rows = doc["results"]
        assert [x["name"] for x in rows] == [p.name for p in paths[:2]] + ["broken.png"] + [p.name for p in paths[2:]]
        assert "error" in rows[2] and "score" not in rows[2]
        api = det.predict(paths, object="part", transductive=True)  # the batch without the broken upload
        for row, p in zip(rows[:2] + rows[3:], api):
            assert row["score"] == pytest.approx(p.score, abs=1e-6) and row["transductive"] == len(paths)
            assert row["zero_shot_score"] == pytest.approx(p.extra["zero_shot_score"], abs=1e-6)
            assert row["mutual_map_max"] == pytest.approx(p.extra["mutual_map_max"], rel=1e-5)
        one = client.post("/predict/batch", files=files[:1] + [files[2]])
        assert one.status_code == 422 and one.json()["error"] == "batch_too_small"
    calibrated = Detector(det.model, device="cpu",
                          normalization={"map_min": -10.0, "map_max": 40.0, "score_min": 0.4, "score_max": 0.6})
    with TestClient(create_app(calibrated)) as client:
        r = client.post("/predict/batch", files=files)
        assert r.status_code == 409 and "calibrated zero-shot" in r.json()["detail"]


def test_cli_resume_keeps_the_batch_and_mutual_images_is_seeded(det, ckpt, folder, tmp_path):
    out = tmp_path / "out"
    assert main(fused_args(ckpt, folder, out=out)) == 0
    full = read_rows(out)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")  # "interrupted" after 2 images
    assert main(fused_args(ckpt, folder, out=out, extra=["--resume"])) == 0
    resumed = read_rows(out)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(full)
    for name, row in full.items():
        assert resumed[name]["transductive"] == len(full)  # the done images still joined the batch
        assert resumed[name]["score"] == pytest.approx(row["score"], abs=1e-6)
        assert resumed[name]["mutual_map_max"] == pytest.approx(row["mutual_map_max"], rel=1e-5)
    # --mutual-images M: each image against M others drawn by --mutual-seed; same seed, same maps
    paths = sorted(folder.glob("*.png"))
    a = det.predict(paths, transductive=True, mutual_images=2, mutual_seed=1, mutual_weight=1.0)
    b = det.predict(paths, transductive=True, mutual_images=2, mutual_seed=1, mutual_weight=1.0)
    c = det.predict(paths, transductive=True, mutual_weight=1.0)
    assert all(np.array_equal(x.anomaly_map, y.anomaly_map) for x, y in zip(a, b))
    assert any(not np.allclose(x.anomaly_map, y.anomaly_map) for x, y in zip(a, c))
    m = tmp_path / "m"
    assert main(fused_args(ckpt, folder, out=m, extra=["--mutual-images", "2", "--mutual-seed", "1",
                                                        "--mutual-weight", "1"])) == 0
    for p, pred in zip(paths, a):
        np.testing.assert_allclose(np.load(m / read_rows(m)[p.name]["map"]), pred.anomaly_map, rtol=0,
                                   atol=1e-5 * float(np.abs(pred.anomaly_map).max()))
