"""``moeclip predict``: outputs, objects, errors, resumption, and equality with the official code."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_f32_close, make_tiny_checkpoint
from PIL import Image

from moeclip.cli import main
from moeclip.cli.common import build_model
from moeclip.data.transforms import CLIP_MEAN, CLIP_STD, preprocess_image
from moeclip.inference.detector import Detector


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    """A tiny random checkpoint whose experts and routers are non-trivial."""
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def detector(tiny_ckpt) -> Detector:
    return Detector(build_model(tiny_ckpt), device="cpu")


def write_image(path: Path, h: int, w: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def images(tmp_path) -> Path:
    """screw/{a,b}.png, nut/{a,c}.png (stem collision), nut/broken.png (corrupt), notes.txt."""
    root = tmp_path / "imgs"
    write_image(root / "screw" / "a.png", 40, 56, 1)
    write_image(root / "screw" / "b.png", 64, 64, 2)
    write_image(root / "nut" / "a.png", 70, 50, 3)
    write_image(root / "nut" / "c.jpg", 30, 30, 4)
    (root / "nut" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


def read_results(out: Path):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_folder_outputs_match_detector(tiny_ckpt, detector, images, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--batch-size", "2",
                 str(images), "--out", str(out)]) == 0
    rows = read_results(out)
    assert len(rows) == 5  # 4 images + the corrupt one; notes.txt is not an image
    bad = [r for r in rows if "error" in r]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png") and "broken.png" in bad[0]["error"]
    good = [r for r in rows if "error" not in r]
    names = [r["name"] for r in good]
    assert len(set(names)) == 4 and {"a", "a-2"} <= set(names)  # colliding stems made unique
    import matplotlib

    for r in good:
        assert r["object"] == "object" and r["object_source"] == "generic"
        assert 0.0 <= r["score"] <= 1.0 and "decision" not in r
        img = Image.open(r["path"])
        amap = np.load(out / r["map"])
        assert amap.dtype == np.float32 and amap.shape == (img.height, img.width)
        # no calibration: the overlay colours this map's own range, blue (min) to red (max)
        assert r["map_scale"] == "per-image"
        drawn = np.asarray(Image.open(out / r["overlay"]).convert("RGB"), np.float32)
        unit = (amap - amap.min()) / (amap.max() - amap.min())
        heat = matplotlib.colormaps["jet"](unit)[..., :3] * 255.0
        np.testing.assert_allclose(drawn, (np.asarray(img.convert("RGB"), np.float32) + heat) / 2, atol=1.5)
        ref = detector.predict([r["path"]])[0]  # the same model through the Python API
        # batches of 2 (CLI) vs 1 (API): float32 of another batch grouping (maps ~20-30, scores on [0, 1])
        assert_f32_close(amap, ref.anomaly_map, what=r["path"])
        assert_f32_close(r["raw_score"], ref.raw_score, scale=1.0)
        assert_f32_close(r["score"], ref.score, scale=1.0)
        assert_f32_close(r["map_max"], ref.map_max)
    assert not (out / "masks").exists()


def test_refuses_non_empty_out_then_overwrites(tiny_ckpt, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(tiny_ckpt), "--device", "cpu", str(images / "screw"), "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--object", "metal screw"]) == 0
    rows = read_results(out)
    assert len(rows) == 2 and all(r["object"] == "metal screw" and r["object_source"] == "flag" for r in rows)


def test_resume_skips_done_and_drops_cut_line(tiny_ckpt, images, tmp_path):
    out = tmp_path / "out"
    base = ["predict", "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--no-overlays", str(images),
            "--out", str(out)]
    assert main(base) == 0
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    # simulate a crash: two lines finished, the third cut in the middle
    (out / "results.jsonl").write_text("".join(lines[:2]) + lines[2][:15])
    assert main(base + ["--resume"]) == 0
    rows = read_results(out)
    assert len(rows) == 5 and len({r["path"] for r in rows}) == 5
    assert len({r["name"] for r in rows if "name" in r}) == 4


def test_class_map_and_key_rules(tiny_ckpt, images, tmp_path):
    cmap = tmp_path / "classes.txt"
    cmap.write_text("# folder name or glob: description\nscrew: metal screw\n")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--class-map", str(cmap),
                 "--object", "*.jpg=round nut", "--object", "hex nut", str(images), "--out", str(out)]) == 0
    by_name = {Path(r["path"]).relative_to(images).as_posix(): r for r in read_results(out)}
    assert by_name["screw/a.png"]["object"] == "metal screw"
    assert by_name["screw/a.png"]["object_source"] == "class-map"
    assert by_name["nut/c.jpg"]["object"] == "round nut"
    assert by_name["nut/a.png"]["object"] == "hex nut" and by_name["nut/a.png"]["object_source"] == "flag"


def test_globs_missing_files_and_threshold(tiny_ckpt, images, tmp_path):
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(tiny_ckpt), "--device", "cpu", "--precision", "bf16",
            str(images / "**" / "*.png"), str(tmp_path / "missing.png"), "--out", str(out)]
    assert main(args) == 0
    rows = read_results(out)
    assert sum("error" in r for r in rows) == 2  # broken.png and missing.png
    good = [r for r in rows if "error" not in r]
    assert len(good) == 3 and all("decision" not in r for r in good)
    assert all(np.isfinite(np.load(out / r["map"])).all() for r in good)
    # a threshold between the lowest and the middle score (the same run again: bitwise the same scores)
    low, mid, _ = sorted(r["score"] for r in good)
    assert low < mid
    threshold = (low + mid) / 2
    assert main(args + ["--threshold", str(threshold), "--overwrite"]) == 0
    again = [r for r in read_results(out) if "error" not in r]
    assert sorted(r["score"] for r in again) == sorted(r["score"] for r in good)
    assert all(r["threshold"] == threshold and r["decision"] == (r["score"] >= threshold) for r in again)
    assert sorted(r["decision"] for r in again) == [False, True, True]


def test_needs_a_model(images, tmp_path, capsys):
    assert main(["predict", str(images), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------- official checkpoint
def official_flags(golden_dir, cfg):
    moe = cfg["moeclip_config"]
    return ["--clip-model", str(golden_dir / "config.json"),
            "--clip-weights", str(golden_dir / "clip_tiny.safetensors"),
            "--image-size", str(cfg["image_size"]), "--experts", str(moe["moe_num_experts"]),
            "--top-k", str(moe["moe_top_k"]), "--rank", str(moe["moe_r"]), "--alpha", str(moe["moe_lora_alpha"]),
            "--moe-layers", ",".join(map(str, moe["moe_layers"])), "--levels", ",".join(map(str, moe["levels"])),
            "--seg-proj", moe["seg_proj_sharing_strategy"], "--image-adapt-weight", str(moe["image_adapt_weight"])] \
        + ([] if moe["use_fofs"] else ["--no-fofs"]) + ([] if moe["use_paa"] else ["--no-paa"]) \
        + (["--relu"] if moe["relu"] else [])


def test_official_checkpoint_matches_golden(golden_dir, tmp_path):
    """PNGs of the golden images through the CLI equal the model on the re-read pixels, and the
    same model on the golden tensors equals the official outputs: the chain CLI -> official holds."""
    from safetensors.torch import load_file

    from moeclip.cli.common import model_options
    from moeclip.cli.predict import register

    cfg = json.loads((golden_dir / "config.json").read_text())
    inputs = load_file(str(golden_dir / "inputs.safetensors"))
    expected = load_file(str(golden_dir / "expected.safetensors"))
    obj = cfg["object_description"]
    ckpt = golden_dir / "official_checkpoint.pth"
    flags = official_flags(golden_dir, cfg)

    # the flags build the official model: its direct output equals the official one
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["predict", "x", "--out", "o", "--checkpoint", str(ckpt), *flags])
    model = build_model(ckpt, model_options(args))
    direct = model.predict(inputs["images"], obj, domain="industrial")
    # the official code's outputs, recorded on another machine: float32 relative to the maps' magnitude
    assert_f32_close(direct["anomaly_map"], expected["anomaly_map.Industrial"])
    assert_f32_close(direct["image_score"], expected["image_score_raw"], scale=1.0)

    # images -> 8-bit PNGs -> CLI
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    paths = []
    for i, x in enumerate(inputs["images"]):
        rgb = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        paths.append(tmp_path / f"golden_{i}.png")
        Image.fromarray(rgb).save(paths[-1])
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), *flags, "--object", obj, "--device", "cpu",
                 *map(str, paths), "--out", str(out)]) == 0
    rows = read_results(out)
    reread = torch.stack([preprocess_image(Image.open(p).convert("RGB"), cfg["image_size"]) for p in paths])
    inside = ((inputs["images"] * std + mean) >= 0) & ((inputs["images"] * std + mean) <= 1)
    assert (reread - inputs["images"]).abs()[inside].max() < 0.01  # 8-bit quantisation (and clipping) only
    ref = model.predict(reread, obj, domain="industrial")
    for i, r in enumerate(rows):
        # the CLI's batches vs one batch of all images: float32 of another batch grouping (maps ~31)
        assert_f32_close(np.load(out / r["map"]), ref["anomaly_map"][i], what=r["path"])
        assert_f32_close(r["raw_score"], ref["image_score"][i], scale=1.0)
        assert r["object"] == obj


def test_exif_orientation_and_gif(tiny_ckpt, detector, tmp_path):
    """A phone photo (EXIF orientation 6) is scored and reported as a viewer shows it; a GIF in a folder
    is read too. Dataset loading keeps the raw pixels (masks are not rotated)."""
    from PIL import ImageOps

    from moeclip.data.imageio import load_image

    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(folder / "phone.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "anim.gif")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(tiny_ckpt), "--device", "cpu", str(folder), "--out", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in read_results(out)}
    phone = rows["phone.jpg"]
    assert (phone["width"], phone["height"]) == (40, 70)  # rotated: stored 70 wide, 40 high
    assert np.load(out / phone["map"]).shape == (70, 40)
    assert Image.open(out / phone["overlay"]).size == (40, 70)
    shown = ImageOps.exif_transpose(Image.open(folder / "phone.jpg")).convert("RGB")
    ref = detector.predict([shown])[0]
    assert_f32_close(phone["score"], ref.score, scale=1.0)  # another batch than the folder's
    via_path = detector.predict([str(folder / "phone.jpg")])[0]  # the Python API with a path
    assert via_path.anomaly_map.shape == (70, 40) and via_path.score == ref.score  # the same batch: bitwise
    assert (rows["anim.gif"]["width"], rows["anim.gif"]["height"]) == (30, 20)
    assert load_image(folder / "phone.jpg").size == (70, 40)  # datasets: raw pixels, aligned with masks
