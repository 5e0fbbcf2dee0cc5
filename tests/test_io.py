"""Image and mask decoding: modes the official loader mishandles, and readable errors."""
import logging
import sys
import types

import numpy as np
import pytest
from PIL import Image

from moeclip.data import imageio as mio
from moeclip.data.imageio import binarize_mask, load_image, load_mask, resize_mask, to_pil_rgb, verify_image
from moeclip.errors import MoECLIPError


def _rgb(img):
    assert img.mode == "RGB"
    return np.asarray(img)


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

def test_grayscale_is_replicated(tmp_path):
    g = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    p = tmp_path / "gray.png"
    Image.fromarray(g, mode="L").save(p)
    out = _rgb(load_image(p))
    assert out.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_rgb_round_trip_and_case_sensitive_extension(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    p = tmp_path / "img.PNG"
    Image.fromarray(rgb).save(p, format="PNG")
    np.testing.assert_array_equal(_rgb(load_image(p)), rgb)


def test_16bit_ramp_is_rescaled_not_white(tmp_path, caplog):
    mio._warned.clear()
    ramp = (np.arange(256, dtype=np.uint16) * 256).reshape(16, 16)  # 0 .. 65280
    p = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode.startswith("I")
    with caplog.at_level(logging.WARNING, logger="moeclip.data.imageio"):
        out = _rgb(load_image(p))
    assert (out == 255).mean() < 0.01          # convert("RGB") would give ~99.6% white
    expected = np.rint(ramp / ramp.max() * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)
    assert any("rescaled" in r.message for r in caplog.records)


@pytest.mark.parametrize("dtype", [">u2", "<u2", np.int32])
def test_high_depth_pil_modes(dtype):
    a = (np.arange(12).reshape(3, 4) * 1000).astype(dtype)
    img = Image.fromarray(a)
    assert img.mode in ("I;16B", "I;16", "I")
    out = _rgb(to_pil_rgb(img))
    expected = np.rint(a.astype(float) / a.max() * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 1], expected)


def test_int_image_within_8bit_is_kept_as_pillow_converts():
    a = np.array([[0, 10], [100, 200]], dtype=np.int32)
    out = _rgb(to_pil_rgb(Image.fromarray(a)))
    np.testing.assert_array_equal(out[..., 2], a.astype(np.uint8))


def test_palette_image_uses_palette_colours(tmp_path):
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    p = tmp_path / "pal.png"
    img.save(p)
    out = _rgb(load_image(p))
    np.testing.assert_array_equal(out[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(out[1, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])


def test_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[0, 0, 3] = 0      # fully transparent: colour still kept (no compositing)
    rgba[1, 1, 3] = 255
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    out = _rgb(load_image(p))
    assert np.all(out == np.array([200, 100, 50], dtype=np.uint8))


@pytest.mark.parametrize("arr, expected", [
    (np.full((3, 4), 7, np.uint8), 7),
    (np.full((3, 4, 1), 9, np.uint8), 9),
    (np.full((3, 4), 0.5, np.float32), 128),
    (np.full((3, 4), 1.0, np.float64), 255),
    (np.full((3, 4), True), 255),
])
def test_numpy_inputs(arr, expected):
    out = _rgb(to_pil_rgb(arr))
    assert out.shape == (3, 4, 3)
    assert np.all(out == expected)


def test_numpy_colour_and_uint16():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(to_pil_rgb(rgb)), rgb)
    rgba = np.concatenate([rgb, np.zeros((4, 5, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(_rgb(to_pil_rgb(rgba)), rgb)
    u16 = np.array([[0, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(_rgb(to_pil_rgb(u16))[..., 0], [[0, 255]])


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 5), np.uint8), np.zeros((2,), np.uint8),
                                 np.zeros((0, 3), np.uint8), "not an image"])
def test_bad_array_inputs(bad):
    with pytest.raises(MoECLIPError):
        to_pil_rgb(bad)


def test_max_pixels_guard(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(p)
    with pytest.raises(MoECLIPError, match="exceeds the limit"):
        load_image(p, max_pixels=1000)
    with pytest.raises(MoECLIPError, match=str(p)):
        verify_image(p, max_pixels=1000)
    assert load_image(p, max_pixels=1200).size == (40, 30)
    assert load_image(p, max_pixels=None).size == (40, 30)


def _corrupt_png(path):
    good = path.parent / "good_src.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(good)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("loader", [load_image, load_mask, verify_image])
def test_corrupt_png_names_the_file(tmp_path, loader):
    p = _corrupt_png(tmp_path / "broken.png")
    with pytest.raises(MoECLIPError) as ei:
        loader(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("loader", [load_image, load_mask, verify_image])
def test_garbage_and_missing_files(tmp_path, loader):
    p = tmp_path / "garbage.jpg"
    p.write_bytes(b"this is not an image at all")
    with pytest.raises(MoECLIPError, match="garbage.jpg"):
        loader(p)
    with pytest.raises(MoECLIPError, match="not found"):
        loader(tmp_path / "missing.png")
    with pytest.raises(MoECLIPError, match="directory"):
        loader(tmp_path)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_tiff_falls_back_to_cv2_when_pillow_fails(tmp_path, monkeypatch):
    p = tmp_path / "scan.tif"
    p.write_bytes(b"II*\x00 but not really a tiff")
    bgr = np.zeros((3, 4, 3), np.uint8)
    bgr[..., 0] = 9   # blue in OpenCV order
    fake = types.SimpleNamespace(IMREAD_UNCHANGED=-1, imdecode=lambda buf, flag: bgr.copy())
    monkeypatch.setitem(sys.modules, "cv2", fake)
    out = _rgb(load_image(p))
    assert np.all(out[..., 2] == 9) and np.all(out[..., :2] == 0)
    verify_image(p)  # accepted through the fallback too
    # cv2 failing as well -> the Pillow error is reported
    monkeypatch.setitem(sys.modules, "cv2",
                        types.SimpleNamespace(IMREAD_UNCHANGED=-1, imdecode=lambda b, f: None))
    with pytest.raises(MoECLIPError, match="scan.tif"):
        load_image(p)


def test_no_cv2_fallback_for_non_tiff(tmp_path, monkeypatch):
    p = tmp_path / "x.png"
    p.write_bytes(b"junk")
    fake = types.SimpleNamespace(IMREAD_UNCHANGED=-1,
                                 imdecode=lambda b, f: np.zeros((2, 2, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "cv2", fake)
    with pytest.raises(MoECLIPError):
        load_image(p)


# ---------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------

def test_palette_mask_uses_indices(tmp_path):
    idx = np.zeros((6, 6), np.uint8)
    idx[1, 1], idx[2, 3], idx[4, 5] = 1, 2, 3
    img = Image.fromarray(idx, mode="P")
    # Index 1 is black in the palette: convert("L") would lose it.
    img.putpalette([0, 0, 0, 0, 0, 0, 0, 255, 0, 255, 255, 255] + [0] * (256 * 3 - 12))
    p = tmp_path / "pal_mask.png"
    img.save(p)
    assert Image.open(p).mode == "P"
    m = load_mask(p)
    assert m.dtype == np.bool_ and m.shape == (6, 6)
    np.testing.assert_array_equal(m, idx != 0)


def test_visa_style_small_labels_nonzero(tmp_path):
    lab = np.zeros((5, 5), np.uint8)
    lab[2:4, 1:3] = 1
    lab[0, 4] = 2
    p = tmp_path / "visa.png"
    Image.fromarray(lab).save(p)
    np.testing.assert_array_equal(load_mask(p), lab != 0)
    assert not load_mask(p, policy="half").any()


def test_rgb_and_rgba_masks_take_channel_max(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (0, 0, 1)       # luminance rounds to 0; max keeps it
    rgb[1, 1] = (255, 255, 255)
    p = tmp_path / "rgb_mask.png"
    Image.fromarray(rgb).save(p)
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[1, 1] = True
    np.testing.assert_array_equal(load_mask(p), expected)

    rgba = np.concatenate([rgb, np.full((4, 4, 1), 255, np.uint8)], axis=2)  # opaque alpha
    p2 = tmp_path / "rgba_mask.png"
    Image.fromarray(rgba, mode="RGBA").save(p2)
    np.testing.assert_array_equal(load_mask(p2), expected)


def test_16bit_mask_raw_values(tmp_path):
    m16 = np.zeros((4, 4), np.uint16)
    m16[0, 0], m16[1, 1] = 1, 65535
    p = tmp_path / "m16.png"
    Image.fromarray(m16).save(p)
    np.testing.assert_array_equal(load_mask(p), m16 != 0)
    np.testing.assert_array_equal(load_mask(p, policy="half"), m16 > 32767)


def test_jpeg_like_noisy_mask_half_policy(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros((20, 20), bool)
    truth[5:15, 6:12] = True
    noisy = np.where(truth, 255 - rng.integers(0, 30, truth.shape),
                     rng.integers(0, 30, truth.shape)).astype(np.uint8)
    p = tmp_path / "mask.png"
    Image.fromarray(noisy).save(p)
    np.testing.assert_array_equal(load_mask(p, policy="half"), truth)
    assert load_mask(p).sum() > truth.sum()          # "nonzero" keeps the halo

    # A real JPEG round trip of a block mask: "half" recovers it exactly.
    pj = tmp_path / "mask.jpg"
    Image.fromarray(truth.astype(np.uint8) * 255).save(pj, quality=90)
    np.testing.assert_array_equal(load_mask(pj, policy="half"), truth)


def test_bilevel_mask_modes():
    m = np.array([[True, False], [False, True]])
    img = Image.fromarray(m)
    assert img.mode == "1"
    vals = mio._mask_values(img, "x")
    np.testing.assert_array_equal(binarize_mask(vals, "nonzero"), m)
    np.testing.assert_array_equal(binarize_mask(vals, "half"), m)


def test_mask_resize_nearest_matches_pil(tmp_path):
    rng = np.random.default_rng(3)
    m = rng.random((7, 11)) > 0.5
    p = tmp_path / "m.png"
    Image.fromarray(m.astype(np.uint8) * 255).save(p)
    out = load_mask(p, size=(5, 13))
    assert out.shape == (5, 13)
    ref = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((13, 5), Image.NEAREST)) != 0
    np.testing.assert_array_equal(out, ref)
    assert load_mask(p, size=9).shape == (9, 9)
    np.testing.assert_array_equal(resize_mask(m, (7, 11)), m)


def test_unknown_policy_is_user_error(tmp_path):
    p = tmp_path / "m.png"
    Image.new("L", (2, 2)).save(p)
    with pytest.raises(MoECLIPError, match="policy"):
        load_mask(p, policy="otsu")


# ---------------------------------------------------------------------------
# file modes of everything the package writes
# ---------------------------------------------------------------------------

_WRITERS = r'''
import sys, pathlib
sys.path.insert(0, sys.argv[3])
from conftest import make_tiny_checkpoint, train_args
from moeclip.cli import main
from moeclip.data.synth import generate_dataset
out, clip = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
generate_dataset(out / "data" / "train", ["disc"], n_normal=3, n_anomalous=3, image_size=64, seed=0)
normal = out / "data" / "train" / "disc" / "test" / "good"
ck = make_tiny_checkpoint(clip, out / "ckpt", seed=0)                                 # save_checkpoint
assert main(train_args(out / "data", clip, out / "run", "--epochs", "2")) == 0  # checkpoint/ replaced
assert main(["calibrate", "--checkpoint", str(ck), "--normal", str(normal), "--reference",
             "--out", str(out / "deploy.json")]) == 0                                 # deployment + bank
from moeclip import Detector
det = Detector.from_checkpoint(ck).with_references(str(normal), object="object")
det.references.save(out / "banks")                                                   # few-shot banks
assert main(["export", "onnx", "--checkpoint", str(ck), "--out", str(out / "m.onnx")]) == 0
assert main(["export", "openvino", "--checkpoint", str(ck), "--out", str(out / "ov")]) == 0
assert main(["predict", "--checkpoint", str(ck), str(normal), "--out", str(out / "preds")]) == 0
'''


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, tiny_clip_config, umask):
    """Every output (safetensors checkpoints and banks, folders moved into place, OpenVINO's folder,
    JSON, ONNX, maps) gets the mode ``open()``/``mkdir`` give under the umask, never 0600/0700 only."""
    import os
    import subprocess
    from pathlib import Path

    pytest.importorskip("openvino")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _WRITERS, str(out), str(tiny_clip_config),
                          str(Path(__file__).parent)], env=env, preexec_fn=lambda: os.umask(umask),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    paths = [p for p in out.rglob("*") if p.relative_to(out).parts[0] != "data"]
    suffixes = {p.suffix for p in paths if p.is_file()}
    assert {".safetensors", ".json", ".onnx", ".xml", ".bin", ".npy", ".png", ".jsonl"} <= suffixes
    assert (out / "deploy.bank.safetensors").is_file() and (out / "run" / "checkpoint").is_dir()
    wrong = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in paths
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert not wrong
