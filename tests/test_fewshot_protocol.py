"""The k-shot protocol: training normals in every layout, seeded draws, ``moeclip test --shots``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_f32_close, make_tiny_checkpoint

from moeclip.cli import main
from moeclip.data.references import draw_shots, folder_references, training_normals
from moeclip.data.sample import Sample
from moeclip.data.synth import generate_dataset
from moeclip.errors import MoECLIPError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_training_normals_in_each_layout(tmp_path):
    # MVTec / MPDD / synth: <class>/train/good; BTAD: train/ok; BMAD: train/good/img
    for folder, normal, sub in (("mvtec/bottle", "good", ""), ("btad/01", "ok", ""), ("brain", "good", "img")):
        root = tmp_path / folder
        want = [touch(root / "train" / normal / sub / f"{i}.png") for i in range(3)]
        touch(root / "train" / "bad" / "x.png")  # not normal: never a reference
        test = touch(root / "test" / "crack" / sub / "t.png")
        got = training_normals([Sample(str(test), 1, "c")], "D", "c")
        assert got == sorted(want)
    # raw VisA: the train/normal rows of split_csv/1cls.csv
    visa = tmp_path / "visa"
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0.JPG"),
            ("candle", "train", "normal", "candle/Data/Images/Normal/1.JPG"),
            ("candle", "test", "normal", "candle/Data/Images/Normal/2.JPG"),
            ("candle", "train", "anomaly", "candle/Data/Images/Anomaly/3.JPG"),
            ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/4.JPG")]
    for r in rows:
        touch(visa / r[3])
    (visa / "split_csv").mkdir()
    with open(visa / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows([list(r) + [""] for r in rows])
    got = training_normals([Sample(str(visa / rows[2][3]), 0, "candle")], "VisA", "candle")
    assert got == [visa / rows[0][3], visa / rows[1][3]]
    # polyp sets: images/ + masks/, no normals at all
    polyp = touch(tmp_path / "kvasir" / "images" / "1.png")
    with pytest.raises(MoECLIPError, match=r"Kvasir/polyp: no normal training images for class 'polyp'"):
        training_normals([Sample(str(polyp), 1, "polyp")], "Kvasir", "polyp")


def test_draw_shots_is_seeded_and_checked(tmp_path):
    pool = [tmp_path / f"{i}.png" for i in range(10)]
    a, b = draw_shots(pool, 3, 0), draw_shots(list(reversed(pool)), 3, 0)
    assert a == b and len(set(a)) == 3  # the pool's order does not matter
    assert draw_shots(pool, 3, 1) != a
    assert draw_shots(pool, None, 5) == pool
    with pytest.raises(MoECLIPError, match="only 10 normal reference"):
        draw_shots(pool, 11, 0, "X/c")
    touch(tmp_path / "refs" / "c" / "1.png")
    assert folder_references(str(tmp_path / "refs"), "c") == [tmp_path / "refs" / "c" / "1.png"]
    with pytest.raises(MoECLIPError, match="no reference images for class 'd'"):
        folder_references(str(tmp_path / "refs"), "d")


@pytest.fixture(scope="module")
def ckpt(tiny_clip_config, tmp_path_factory):
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=2)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root / "d", ["wood", "disc"], n_normal=2, n_anomalous=2, n_train=5, image_size=64, seed=0)
    return root / "d"


def test_test_shots_two_seeds_mean_and_std(ckpt, synth, tmp_path, capsys):
    out = tmp_path / "fs"
    assert main(["test", "--checkpoint", str(ckpt), "--data", f"folder={synth}", "--out", str(out),
                 "--shots", "2", "--shot-seeds", "0,1", "--bank-size", "50"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["few_shot"]["shots"] == 2 and doc["few_shot"]["seeds"] == [0, 1]
    ds = doc["datasets"][0]
    assert [s["seed"] for s in ds["per_seed"]] == [0, 1]
    for s in ds["per_seed"]:
        for cls, refs in s["references"].items():
            assert len(refs) == 2 and all(f"{cls}/train/good/" in r for r in refs)
    assert ds["per_seed"][0]["references"] != ds["per_seed"][1]["references"]
    keys = ("pixel_auroc", "pixel_ap", "image_auroc", "image_ap")
    for cls in ("wood", "disc"):
        for k in keys:
            vals = [s["per_class"][cls][k] for s in ds["per_seed"]]
            assert ds["per_class"][cls][k] == pytest.approx(np.mean(vals))
            assert ds["per_class_std"][cls][k] == pytest.approx(np.std(vals, ddof=1))
    for k in keys:
        vals = [s["average"][k] for s in ds["per_seed"]]
        assert ds["average"][k] == pytest.approx(np.mean(vals))
        assert ds["average_std"][k] == pytest.approx(np.std(vals, ddof=1))
    # the seeds do not give identical results (different references), so the std is informative
    assert any(ds["per_class_std"][c][k] > 0 for c in ("wood", "disc") for k in keys)
    rows = list(csv.reader((out / "results.csv").read_text().splitlines()))
    assert rows[0][:3] == ["dataset", "class", "seed"]
    assert {r[2] for r in rows[1:]} == {"0", "1", "mean", "std"}
    printed = capsys.readouterr().out
    assert "±" in printed and "| wood |" in printed


def test_reference_weight_zero_keeps_the_zero_shot_pixel_ranking(ckpt, synth, tmp_path):
    base = ["test", "--checkpoint", str(ckpt), "--data", f"folder={synth}"]
    assert main(base + ["--out", str(tmp_path / "zs")]) == 0
    assert main(base + ["--out", str(tmp_path / "w0"), "--shots", "1", "--reference-weight", "0"]) == 0
    zs = json.loads((tmp_path / "zs" / "results.json").read_text())["datasets"][0]["per_class"]
    w0 = json.loads((tmp_path / "w0" / "results.json").read_text())["datasets"][0]["per_class"]
    # weight 0: the fused map is a monotone function of the zero-shot map: same pixel ranking
    for cls in zs:
        # (float32 rounding of the monotone map can merge or split near-ties: F32_RTOL of the metric's range)
        assert_f32_close(w0[cls]["pixel_auroc"], zs[cls]["pixel_auroc"], scale=1.0)


def test_errors_name_the_class_and_refuse_test_images(ckpt, tmp_path, capsys):
    generate_dataset(tmp_path / "nt", ["wood"], n_normal=2, n_anomalous=2, n_train=0, image_size=64, seed=0)
    args = ["test", "--checkpoint", str(ckpt), "--data", f"folder={tmp_path / 'nt'}"]
    assert main(args + ["--out", str(tmp_path / "o1"), "--shots", "1"]) == 2
    assert "no normal training images for class 'wood'" in capsys.readouterr().err
    # user references that are test images are refused
    assert main(args + ["--out", str(tmp_path / "o2"), "--reference-data",
                        f"folder={tmp_path / 'nt' / 'wood' / 'test' / 'good'}"]) == 2
    assert "is also a test image" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "o3"), "--reference-data", "nope=/x"]) == 2
    assert "no --data named 'nope'" in capsys.readouterr().err


def test_reference_data_folder(ckpt, tmp_path):
    generate_dataset(tmp_path / "nt", ["wood"], n_normal=2, n_anomalous=2, n_train=0, image_size=64, seed=0)
    generate_dataset(tmp_path / "refs", ["wood"], n_normal=0, n_anomalous=0, n_train=3, image_size=64, seed=7)
    out = tmp_path / "o"
    assert main(["test", "--checkpoint", str(ckpt), "--data", f"folder={tmp_path / 'nt'}", "--out", str(out),
                 "--reference-data", f"folder={tmp_path / 'refs'}"]) == 0
    ds = json.loads((out / "results.json").read_text())["datasets"][0]
    refs = ds["per_seed"][0]["references"]["wood"]
    assert len(refs) == 3 and all("/refs/wood/train/good/" in r for r in refs)
