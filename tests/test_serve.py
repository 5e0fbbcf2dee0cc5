"""The web service: good and bad uploads, limits, concurrency, the page in a real browser."""
from __future__ import annotations

import base64
import contextlib
import io
import shutil
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_f32_close, make_tiny_checkpoint, require_extra
from PIL import Image

require_extra("fastapi")
require_extra("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from moeclip.inference.deploy import Deployment  # noqa: E402
from moeclip.inference.detector import Detector  # noqa: E402
from moeclip.inference.serve import create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    """A tiny random checkpoint whose experts and routers are non-trivial."""
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=2)


@pytest.fixture(scope="module")
def deployment(tiny_ckpt) -> Deployment:
    return Deployment(object="metal nut", threshold=0.5, pixel_threshold=10.0, checkpoint=str(tiny_ckpt),
                      normalization={"map_min": -10.0, "map_max": 40.0, "score_min": 0.4, "score_max": 0.6})


@pytest.fixture(scope="module")
def detector(deployment):
    return Detector.from_deployment(deployment, device="cpu")


@pytest.fixture(scope="module")
def client(detector, deployment):
    app = create_app(detector, deployment, max_upload_bytes=200_000, max_pixels=1_000_000,
                     max_display_side=64)
    with TestClient(app) as c:
        yield c


def png(h=48, w=80, seed=0, fmt="PNG") -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression-bomb header)."""
    data = bytearray(png(1, 1))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def post(client, data: bytes, ctype="image/png", **fields):
    return client.post("/predict", files={"image": ("x.png", data, ctype)}, data=fields)


# ---------------------------------------------------------------------------- good requests
def test_health_page_and_schema(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["object"] == "metal nut" and h["threshold"] == 0.5
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="image"' in page.text and 'id="object"' in page.text and 'id="score"' in page.text
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body


def test_predict_matches_detector(client, detector):
    data = png(48, 80)
    r = post(client, data, object="hex nut")
    assert r.status_code == 200, r.text
    j = r.json()
    ref = detector.predict([Image.open(io.BytesIO(data)).convert("RGB")], object="hex nut")[0]
    # the service's decoding and batch vs the Detector's: float32 of another path, scores on [0, 1]
    assert_f32_close(j["score"], ref.score, scale=1.0) and assert_f32_close(j["raw_score"], ref.raw_score, scale=1.0)
    assert j["decision"] == (ref.score >= 0.5) and j["threshold"] == 0.5
    assert (j["object"], j["object_source"], j["domain"]) == ("hex nut", "form", "industrial")
    assert (j["width"], j["height"]) == (80, 48)
    assert decode_data_url(j["overlay"]).size == (64, 38)  # scaled to max_display_side
    assert decode_data_url(j["heatmap"]).size == (64, 38)
    assert decode_data_url(j["mask"]).mode == "L"


def test_heat_map_scale_per_image_without_calibration(client, tiny_ckpt):
    # a deployment with bounds: the calibrated scale, said in the answer
    assert post(client, png(48, 80)).json()["map_scale"] == "calibrated"
    from moeclip.inference.detector import Detector

    app = create_app(Detector.from_checkpoint(tiny_ckpt, device="cpu"), None, max_display_side=64)
    with TestClient(app) as c:
        j = post(c, png(48, 80), object="hex nut").json()
        assert "per image" in c.get("/").text
    assert j["map_scale"] == "per-image"
    heat = np.asarray(decode_data_url(j["heatmap"]).convert("RGB")).reshape(-1, 3)
    # the map's own minimum and maximum: jet's dark blue (0, 0, 128) and dark red (128, 0, 0) both appear
    assert (np.abs(heat.astype(int) - [0, 0, 128]).sum(1) <= 2).any()
    assert (np.abs(heat.astype(int) - [128, 0, 0]).sum(1) <= 2).any()


def test_default_object_jpeg_and_medical(client):
    r = post(client, png(fmt="JPEG"), ctype="image/jpeg", domain="medical")
    assert r.status_code == 200, r.text
    assert (r.json()["object"], r.json()["object_source"], r.json()["domain"]) == ("metal nut", "default", "medical")


# ---------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("case, status, code", [
    ("missing", 422, "invalid_request"),
    ("text", 415, "unsupported_media_type"),
    ("corrupt", 422, "invalid_image"),
    ("ppm", 415, "unsupported_image"),
    ("empty", 422, "empty_file"),
    ("large_file", 413, "file_too_large"),
    ("many_pixels", 413, "too_many_pixels"),
    ("bomb", 413, "too_many_pixels"),
    ("domain", 422, "invalid_domain"),
    ("object", 422, "invalid_object"),
])
def test_bad_uploads(client, case, status, code):
    if case == "missing":
        r = client.post("/predict", data={"object": "nut"})
    elif case == "text":
        r = post(client, b"hello", ctype="text/plain")
    elif case == "corrupt":
        r = post(client, png()[:60])
    elif case == "ppm":
        r = post(client, png(fmt="PPM"))  # labelled PNG; Pillow reads PPM, but predict's formats exclude it
    elif case == "empty":
        r = post(client, b"")
    elif case == "large_file":
        r = post(client, np.random.default_rng(0).bytes(300_000))
    elif case == "many_pixels":
        r = post(client, png_with_size(2000, 1000))  # 2 Mpx > the app's 1 Mpx limit
    elif case == "bomb":
        r = post(client, png_with_size(60000, 60000))  # beyond Pillow's own limit
    elif case == "domain":
        r = post(client, png(), domain="space")
    else:
        r = post(client, png(), object="x" * 500)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["detail"]


def test_content_length_checked_before_parsing(client):
    r = client.post("/predict", content=b"x" * 10, headers={"content-length": "99999999",
                                                            "content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"] == "file_too_large"


def test_chunked_upload_refused(client):
    def body():
        yield b"--b\r\n"

    r = client.post("/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 411 and r.json()["error"] == "length_required"


def test_serve_command_builds_app_from_deploy(deployment, tmp_path):
    """``moeclip serve --deploy F`` (without starting uvicorn): checkpoint, object, threshold from the file."""
    import argparse

    from moeclip.cli import serve

    path = deployment.save(tmp_path / "deploy.json")
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--deploy", str(path), "--device", "cpu", "--max-upload-mb", "0.01"])
    with TestClient(serve.build_app(args)) as c:
        h = c.get("/health").json()
        assert (h["object"], h["threshold"], h["pixel_threshold"]) == ("metal nut", 0.5, 10.0)
        assert h["max_upload_bytes"] == 10485
        assert post(c, png(100, 100)).status_code == 413


def exif_jpeg(h=48, w=80, orientation=6, seed=0) -> bytes:
    """A JPEG stored h x w whose EXIF orientation tag says: show it rotated (6: 90 degrees clockwise)."""
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, ctype", [("WEBP", "image/webp"), ("TIFF", "application/octet-stream"),
                                        ("GIF", "image/gif"), ("BMP", "")])
def test_accepts_every_format_predict_reads(client, fmt, ctype):
    """curl sends WebP/TIFF as application/octet-stream: the decoder, not the label, decides."""
    r = post(client, png(fmt=fmt), ctype=ctype)
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (80, 48)


def test_exif_orientation_is_applied(client, detector):
    data = exif_jpeg()
    r = post(client, data, ctype="image/jpeg", object="hex nut")
    assert r.status_code == 200, r.text
    j = r.json()
    assert (j["width"], j["height"]) == (48, 80)  # as a viewer shows it: rotated
    assert decode_data_url(j["overlay"]).size == (38, 64)
    from PIL import ImageOps

    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    ref = detector.predict([shown], object="hex nut")[0]
    assert_f32_close(j["score"], ref.score, scale=1.0)
    assert ref.anomaly_map.shape == (80, 48)
    # the Python API reads the same photo (PIL with its EXIF) the same way
    direct = detector.predict([Image.open(io.BytesIO(data))], object="hex nut")[0]
    assert direct.score == ref.score and direct.anomaly_map.shape == (80, 48)


@pytest.fixture(scope="module")
def locked(detector, deployment):
    with TestClient(create_app(detector, deployment, api_key="s3cret-key")) as c:
        yield c


def test_api_key_required_on_predict(locked):
    h = locked.get("/health")
    assert h.status_code == 200 and h.json()["auth"] is True  # /health stays open
    assert locked.get("/").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
        r = locked.post("/predict", files={"image": ("x.png", png(), "image/png")}, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.json()["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = locked.post("/predict", files={"image": ("x.png", png(), "image/png")},
                    headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200, r.text
    # the few-shot banks' listing is not public either (object names, bank statistics)
    assert locked.get("/references").status_code == 401
    assert locked.get("/references", headers={"Authorization": "Bearer s3cret-key"}).status_code != 401


def test_serve_command_api_key_from_environment(deployment, tmp_path, monkeypatch, capsys):
    import argparse

    from moeclip.cli import serve

    path = deployment.save(tmp_path / "deploy.json")
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    monkeypatch.setenv("MOECLIP_API_KEY", "from-env")
    args = parser.parse_args(["serve", "--deploy", str(path), "--device", "cpu"])
    assert serve.api_key(args) == "from-env"
    with TestClient(serve.build_app(args)) as c:
        assert c.get("/health").json()["auth"] is True
        assert post(c, png()).status_code == 401
        ok = c.post("/predict", files={"image": ("x.png", png(), "image/png")},
                    headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
    flag = parser.parse_args(["serve", "--deploy", str(path), "--api-key", "flag-key"])
    assert serve.api_key(flag) == "flag-key"  # the flag wins over the environment
    monkeypatch.delenv("MOECLIP_API_KEY")
    assert serve.api_key(parser.parse_args(["serve", "--deploy", str(path)])) is None


def test_concurrent_requests_are_serialised(client, detector):
    active, peak = [0], [0]
    guard = threading.Lock()
    original = detector.predict_tensors  # the model call behind the service's runtime

    def spy(*args, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        try:
            return original(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    detector.predict_tensors = spy
    try:
        data = png(seed=5)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda o: post(client, data, object=o), ["nut", "bolt", "nut", "bolt"]))
    finally:
        del detector.predict_tensors
    assert all(r.status_code == 200 for r in results)
    assert results[0].json()["score"] == results[2].json()["score"]
    assert peak[0] == 1


# ---------------------------------------------------------------------------- browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def browser_page():
    """A headless chromium page (needs chromium + playwright)."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on a free port in a thread; yields the base URL."""
    uvicorn = require_extra("uvicorn")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}/"
    finally:
        # uvicorn's own shutdown: the loop sees should_exit, closes the socket and returns from run();
        # the join's bound only keeps a hang from blocking the suite, and a thread still alive fails
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "uvicorn did not shut down"


@pytest.mark.parametrize("key", [None, "page-key"])
def test_page_in_browser(detector, deployment, tmp_path, browser_page, key):
    """Upload an image on the page (with the API key when the service needs one), read the score,
    check the overlay of an EXIF-rotated photo is upright, take a screenshot."""
    app = create_app(detector, deployment, api_key=key)
    image = tmp_path / "part.jpg"
    image.write_bytes(exif_jpeg(60, 90, seed=3))  # stored 90 wide, shown 60 wide
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    expected = TestClient(app).post("/predict", files={"image": ("part.jpg", image.read_bytes(), "image/jpeg")},
                                    data={"object": "metal nut"}, headers=headers).json()
    page = browser_page
    with running(app) as url:
        page.goto(url, timeout=20_000)
        page.set_input_files("#image", str(image))
        page.fill("#object", "metal nut")
        if key:
            page.wait_for_selector("#api-key", state="visible", timeout=20_000)
            page.click("#submit")  # without the key: the refusal is shown
            page.wait_for_selector("#error:not([hidden])", timeout=20_000)
            assert "401" in page.text_content("#error")
            page.fill("#api-key", key)
        else:
            assert not page.is_visible("#api-key")
        page.click("#submit")
        page.wait_for_selector("#result:not([hidden])", timeout=20_000)
        assert float(page.text_content("#score")) == pytest.approx(expected["score"], abs=1e-4)
        assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
        size = page.evaluate("() => [document.getElementById('overlay').naturalWidth, "
                             "document.getElementById('overlay').naturalHeight]")
        assert size == [60, 90]  # upright, as the browser shows the photo
        assert page.text_content("#decision") in ("normal", "anomalous")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
