"""``moeclip predict --transductive --scoring musc``: MuSc from the command line, training-free."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import GOLDEN, read_rows
from PIL import Image

from moeclip.cli import main

MUSC = GOLDEN / "musc"


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    """The golden batch as PNG files, the tiny CLIP's JSON config, and the expected tensors."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("musc_cli")
    cfg = json.loads((MUSC / "config.json").read_text())
    (root / "clip.json").write_text(json.dumps(cfg["clip_config"]))
    imgs = root / "imgs"
    imgs.mkdir()
    for name, arr in zip(cfg["names"], load_file(str(MUSC / "inputs.safetensors"))["images"]):
        Image.fromarray(arr.numpy()).save(imgs / f"{name}.png")
    expected = load_file(str(MUSC / "expected.safetensors"))
    return {"root": root, "imgs": imgs, "names": cfg["names"], "expected": expected}


def musc_args(run, *inputs, out, extra=()):
    root = run["root"]
    return ["predict", "--transductive", "--scoring", "musc", "--clip-model", str(root / "clip.json"),
            "--clip-weights", str(MUSC / "clip_vision.safetensors"), "--image-size", "64", "--levels", "3,6,9,12",
            "--rscin", "1,2,3", "--device", "cpu", "--out", str(out), *extra, *map(str, inputs)]


def test_cli_equals_official_maps_and_scores(golden_run, tmp_path):
    out = tmp_path / "out"
    assert main(musc_args(golden_run, golden_run["imgs"], out=out)) == 0
    rows = read_rows(out)
    exp = golden_run["expected"]
    assert len(rows) == 12
    for i, name in enumerate(golden_run["names"]):
        row = rows[f"{name}.png"]
        assert row["transductive"] == 12 and row["scoring"] == "musc"
        # the map as the official code leaves it (the images are at the model's size)
        np.testing.assert_allclose(np.load(out / row["map"]), exp["maps"][i].numpy(), rtol=0, atol=1e-4)
        assert row["raw_score"] == pytest.approx(float(exp["scores"][i]), abs=1e-5)
        assert row["map_max"] == pytest.approx(float(exp["map_max"][i]), abs=1e-4)
        assert 0.0 <= row["score"] <= 1.0 and (out / row["overlay"]).is_file()


def test_one_image_is_refused_and_nothing_written(golden_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(musc_args(golden_run, golden_run["imgs"] / "good_000.png", out=out)) == 2
    err = capsys.readouterr().err
    assert "at least 2 images" in err and "drop --transductive" in err
    assert not out.exists()


def test_broken_file_gets_its_line_and_the_rest_is_scored_without_it(golden_run, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(golden_run["imgs"], folder)
    (folder / "zz_broken.png").write_bytes(b"not an image")
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert main(musc_args(golden_run, folder, out=out)) == 0
    rows = read_rows(out)
    assert "error" in rows["zz_broken.png"] and "zz_broken.png" in rows["zz_broken.png"]["error"]
    assert all(r["transductive"] == 12 for n, r in rows.items() if n != "zz_broken.png")
    # scored exactly as the batch without the broken file
    assert main(musc_args(golden_run, golden_run["imgs"], out=ref)) == 0
    base = read_rows(ref)
    for name in base:
        assert rows[name]["raw_score"] == pytest.approx(base[name]["raw_score"], abs=1e-6)


def test_objects_are_scored_within_their_own_group(golden_run, tmp_path):
    """Two sub-folders, two objects: each is its own batch, as if run alone."""
    names = golden_run["names"]
    a, b = tmp_path / "in" / "a", tmp_path / "in" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    for i, name in enumerate(names):
        shutil.copy(golden_run["imgs"] / f"{name}.png", (a if i % 2 == 0 else b) / f"{name}.png")
    mixed = tmp_path / "mixed"
    assert main(musc_args(golden_run, tmp_path / "in", out=mixed,
                          extra=["--object", "a=part a", "--object", "b=part b"])) == 0
    rows = read_rows(mixed)
    assert {r["object"] for r in rows.values()} == {"part a", "part b"}
    assert all(r["transductive"] == 6 for r in rows.values())
    alone = tmp_path / "alone"
    assert main(musc_args(golden_run, a, out=alone, extra=["--threshold", "0.5"])) == 0
    for name, row in read_rows(alone).items():
        assert row["transductive"] == 6
        assert row["decision"] == (row["score"] >= 0.5) and row["threshold"] == 0.5
        assert rows[name]["raw_score"] == pytest.approx(row["raw_score"], abs=1e-6)
        np.testing.assert_allclose(np.load(mixed / rows[name]["map"]), np.load(alone / row["map"]), rtol=0, atol=1e-6)


def test_resume_scores_the_same_batch(golden_run, tmp_path):
    out = tmp_path / "out"
    assert main(musc_args(golden_run, golden_run["imgs"], out=out)) == 0
    full = read_rows(out)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:5]) + "\n")  # "interrupted" after 5 images
    assert main(musc_args(golden_run, golden_run["imgs"], out=out)) == 2  # not empty: refused
    assert main(musc_args(golden_run, golden_run["imgs"], out=out, extra=["--resume"])) == 0
    resumed = read_rows(out)
    assert len((out / "results.jsonl").read_text().splitlines()) == 12
    for name, row in full.items():
        assert resumed[name]["transductive"] == 12  # the done images still joined the batch
        assert resumed[name]["raw_score"] == pytest.approx(row["raw_score"], abs=1e-6)


def test_mutual_images_and_other_sizes(golden_run, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(golden_run["imgs"], folder)
    Image.open(folder / "good_000.png").resize((80, 50)).save(folder / "good_000.png")
    out1, out2 = tmp_path / "m1", tmp_path / "m2"
    for out in (out1, out2):
        assert main(musc_args(golden_run, folder, out=out, extra=["--mutual-images", "3"])) == 0
    r1, r2 = read_rows(out1), read_rows(out2)
    assert r1["good_000.png"]["transductive"] == 12
    assert np.load(out1 / r1["good_000.png"]["map"]).shape == (50, 80)
    for name in r1:
        assert r1[name]["raw_score"] == r2[name]["raw_score"]  # the sampled pairs are seeded
    exp = golden_run["expected"]
    i = golden_run["names"].index("good_003")
    assert r1["good_003.png"]["map_max"] != pytest.approx(float(exp["map_max"][i]), abs=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--levels", "3,13"], "outside 1..12"),
    (["--checkpoint", "ckpt"], "drop --checkpoint"),
    (["--experts", "2"], "drop --experts"),
    (["--mutual-images", "0"], "at least 1"),
])
def test_bad_flags_are_one_line_errors(golden_run, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(musc_args(golden_run, golden_run["imgs"], out=out, extra=extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_musc_flags_need_transductive(golden_run, tmp_path, capsys):
    assert main(["predict", "--mutual-images", "3", "--out", str(tmp_path / "o"), str(golden_run["imgs"])]) == 2
    assert "need --transductive" in capsys.readouterr().err


def test_weights_of_another_architecture_are_a_clear_error(golden_run, tiny_clip_config, tmp_path, capsys):
    out = tmp_path / "out"
    args = musc_args(golden_run, golden_run["imgs"], out=out)
    args[args.index("--clip-model") + 1] = str(tiny_clip_config)  # 4 blocks of width 64: not the fixture's tower
    args[args.index("--levels") + 1] = "1,2,3,4"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "clip_vision.safetensors" in err and "do not match" in err
    assert not out.exists()
