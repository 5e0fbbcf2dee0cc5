"""Serving in production: batching, backpressure, deadlines, readiness, metrics, access log, drain."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_f32_close, make_tiny_checkpoint, require_extra
from PIL import Image

require_extra("fastapi")
require_extra("python_multipart")
require_extra("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from moeclip.inference.deploy import Deployment  # noqa: E402
from moeclip.inference.detector import Detector  # noqa: E402
from moeclip.inference.serve import app as serve_app  # noqa: E402
from moeclip.inference.serve import create_app  # noqa: E402
from moeclip.inference.serve.batching import Batcher, BatchOptions, DeadlineExceeded, QueueFull  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
#: Distinct sizes: each request's map is recognised by its shape.
SIZES = [(48, 80), (64, 64), (40, 72), (56, 60), (72, 50), (36, 90)]


@pytest.fixture(scope="module")
def deploy_file(tiny_clip_config, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("serveops")
    ckpt = make_tiny_checkpoint(tiny_clip_config, directory / "tiny", seed=2)
    dep = Deployment(object="metal nut", threshold=0.5, pixel_threshold=10.0, checkpoint=str(ckpt),
                     normalization={"map_min": -10.0, "map_max": 40.0, "score_min": 0.4, "score_max": 0.6})
    return dep.save(directory / "deploy.json")


@pytest.fixture(scope="module")
def detector(deploy_file):
    return Detector.from_deployment(deploy_file, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("serveimgs")
    paths = []
    for i, (h, w) in enumerate(SIZES):
        a = np.random.default_rng(10 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def app_for(detector, **kwargs):
    return create_app(detector, Deployment(object="metal nut", threshold=0.5, pixel_threshold=10.0),
                      max_display_side=64, **kwargs)


def wait_until(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def post(client, path: Path, **headers):
    return client.post("/predict", files={"image": (path.name, path.read_bytes(), "image/png")},
                       data={"object": "metal nut"}, headers=headers)


class Gate:
    """Stands in for the runtime: holds every forward until released (the model is 'busy')."""

    def __init__(self, runtime):
        self.runtime, self.open, self.entered = runtime, threading.Event(), threading.Event()
        self.num_maps, self.image_size = runtime.num_maps, runtime.image_size

    def raw(self, *args, **kwargs):
        self.entered.set()
        assert self.open.wait(30), "gate never opened"
        return self.runtime.raw(*args, **kwargs)

    def clear_cache(self):
        self.runtime.clear_cache()


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not in the metrics")


# ---------------------------------------------------------------------------- the batcher alone
def test_batcher_groups_by_key_in_order_and_bounds_batches():
    calls, started = [], threading.Event()
    release = threading.Event()

    def run(key, payloads):
        if not started.is_set():
            started.set()
            release.wait(10)
        calls.append((key, list(payloads)))
        return [f"{key}:{p}" for p in payloads]

    b = Batcher(run, max_batch_size=3, max_batch_delay_ms=0, max_queue=10).start()
    first = b.submit("a", 0)
    started.wait(10)  # the worker holds request 0; the rest queue behind it
    futures = [b.submit(k, i) for i, k in enumerate("abaaab", start=1)]
    assert b.depth == 6 and not b.full()
    release.set()
    assert first.result(10) == ("a:0", 1)
    results = [f.result(10) for f in futures]
    assert [r[0] for r in results] == [f"{k}:{i}" for i, k in enumerate("abaaab", start=1)]
    assert calls[1:] == [("a", [1, 3, 4]), ("b", [2, 6]), ("a", [5])]  # oldest first, one key, at most 3
    assert [r[1] for r in results] == [3, 2, 3, 3, 1, 2]
    assert b.close(5)


def test_batcher_refuses_when_full_and_drops_expired_or_abandoned():
    release = threading.Event()
    ran = []

    def run(key, payloads):
        release.wait(10)
        ran.extend(payloads)
        return payloads

    b = Batcher(run, max_batch_size=1, max_batch_delay_ms=0, max_queue=2).start()
    b.submit("k", "busy")
    wait_until(lambda: b.depth == 0, what="the first request to start")
    expired = b.submit("k", "expired", deadline=time.monotonic() + 0.05)
    abandoned = b.submit("k", "abandoned")
    assert b.full()
    with pytest.raises(QueueFull):
        b.submit("k", "overflow")
    assert abandoned.cancel()
    time.sleep(0.1)
    release.set()
    with pytest.raises(DeadlineExceeded):
        expired.result(10)
    assert b.close(5)
    assert ran == ["busy"]  # neither the expired nor the abandoned request cost a forward
    with pytest.raises(QueueFull):
        b.submit("k", "after close")


def test_batch_options_are_checked():
    for bad in ({"max_batch_size": 0}, {"max_queue": 0}, {"max_batch_delay_ms": -1}, {"request_timeout_s": 0}):
        with pytest.raises(Exception, match="--"):
            BatchOptions(**bad)


# ---------------------------------------------------------------------------- batching equality
@pytest.fixture(scope="module")
def predicted(deploy_file, images, tmp_path_factory) -> dict:
    """``moeclip predict --deploy`` on the files: {file name: raw map}."""
    from moeclip.cli import main

    out = tmp_path_factory.mktemp("predicted") / "out"
    assert main(["predict", *map(str, images), "--deploy", str(deploy_file), "--device", "cpu",
                 "--out", str(out), "--no-overlays", "--batch-size", "1"]) == 0
    maps = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        maps[Path(rec["path"]).name] = (np.load(out / rec["map"]), rec)
    assert len(maps) == len(images)
    return maps


@pytest.mark.parametrize("batch_size", [1, 4])
def test_batched_and_unbatched_maps_equal_predict(detector, images, predicted, batch_size, monkeypatch):
    batches = []
    original = serve_app.score_images

    def recording(runtime, post, imgs, object, domain=None):
        out = original(runtime, post, imgs, object, domain)
        batches.append(out)
        return out

    monkeypatch.setattr(serve_app, "score_images", recording)
    app = app_for(detector, batching=BatchOptions(max_batch_size=batch_size, max_batch_delay_ms=300))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, what="/ready")
        batches.clear()  # the warm-up forward
        with ThreadPoolExecutor(len(images)) as pool:
            responses = list(pool.map(lambda p: post(client, p), images))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    sizes = [len(b) for b in batches]
    assert max(sizes) <= batch_size and sum(sizes) == len(images)
    if batch_size > 1:
        assert max(sizes) > 1, sizes  # requests really shared forwards
    by_shape = {s.anomaly_map.shape: s for batch in batches for s in batch}
    for path, r in zip(images, responses):
        expected, rec = predicted[path.name]
        got = by_shape[expected.shape]
        assert_f32_close(got.anomaly_map, expected, what=path.name)  # relative to the map's magnitude
        j = r.json()
        assert_f32_close(j["raw_score"], rec["raw_score"], scale=1.0, what="raw_score")
        assert_f32_close(j["map_max"], rec["map_max"], what="map_max")
        assert j["raw_score"] == got.raw_score and (j["height"], j["width"]) == expected.shape


# ---------------------------------------------------------------------------- backpressure, deadlines, ready
def test_full_queue_answers_503_at_once(detector, images):
    app = app_for(detector, batching=BatchOptions(max_batch_size=1, max_batch_delay_ms=0, max_queue=2))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, what="/ready")
        service = app.state.service
        gate = Gate(service.runtime)
        service.runtime = gate
        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(post, client, images[0])]
            assert gate.entered.wait(10)
            held += [pool.submit(post, client, images[i]) for i in (1, 2)]
            wait_until(lambda: app.state.queue.depth == 2, what="two queued requests")
            start = time.perf_counter()
            r = post(client, images[3])
            elapsed = time.perf_counter() - start
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"] == "overloaded" and "queue is full" in r.json()["detail"]
            assert elapsed < 1.0
            gate.open.set()
            assert [f.result(30).status_code for f in held] == [200, 200, 200]
        service.runtime = gate.runtime


def test_deadline_answers_504(detector, images):
    app = app_for(detector, batching=BatchOptions(request_timeout_s=0.5))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, what="/ready")
        service = app.state.service
        gate = Gate(service.runtime)
        service.runtime = gate
        try:
            start = time.perf_counter()
            r = post(client, images[0])
            assert r.status_code == 504, r.text
            assert r.json() == {"error": "timeout", "detail": "no result within 0.5 s (--request-timeout-s)"}
            assert 0.5 <= time.perf_counter() - start < 5
        finally:
            gate.open.set()
            service.runtime = gate.runtime


def test_ready_only_after_warm_up(detector):
    app = app_for(detector)
    service = app.state.service
    gate = Gate(service.runtime)
    service.runtime = gate  # the warm-up forward waits at the gate
    with TestClient(app) as client:
        assert gate.entered.wait(10)
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        assert client.get("/health").status_code == 200  # alive all along
        assert metric(client.get("/metrics").text, "moeclip_ready") == 0
        gate.open.set()
        wait_until(lambda: client.get("/ready").status_code == 200, what="/ready")
        assert client.get("/ready").json() == {"status": "ready"}
        assert metric(client.get("/metrics").text, "moeclip_ready") == 1
    service.runtime = gate.runtime


# ---------------------------------------------------------------------------- metrics and access log
def test_metrics_and_access_log(detector, images, capsys):
    app = app_for(detector, api_key="k3y", load_seconds=1.25)
    auth = {"Authorization": "Bearer k3y"}
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, what="/ready")
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        capsys.readouterr()
        ok = client.post("/predict", files={"image": ("a.png", images[0].read_bytes(), "image/png")},
                         data={"object": "hex nut"}, headers={**auth, "X-Request-ID": "abc-123"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "abc-123"
        bad = client.post("/predict", files={"image": ("a.txt", b"hello", "text/plain")}, headers=auth)
        assert bad.status_code == 415 and bad.json()["error"] == "unsupported_media_type"
        odd = client.get("/no/such/page", headers={"X-Request-ID": "not a token\tat all"})
        assert odd.status_code == 404 and len(odd.headers["x-request-id"]) == 32
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        m = client.get("/metrics", headers=auth)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert metric(text, "moeclip_requests_total", route="/predict", status="200") == 1
    assert metric(text, "moeclip_requests_total", route="/predict", status="415") == 1
    assert metric(text, "moeclip_requests_total", route="/metrics", status="401") == 1
    assert metric(text, "moeclip_requests_total", route="other", status="404") == 1
    assert metric(text, "moeclip_request_latency_seconds_count", route="/predict") == 2
    assert metric(text, "moeclip_batch_size_count") == 1 and metric(text, "moeclip_batch_size_sum") == 1
    assert metric(text, "moeclip_queue_depth") == 0
    assert metric(text, "moeclip_model_load_seconds") == 1.25
    assert "hex nut" not in text and "no/such" not in text  # no unbounded labels
    first, second, third = lines
    assert (first["request_id"], first["route"], first["status"], first["batch_size"], first["object"]) == \
        ("abc-123", "/predict", 200, 1, "hex nut")
    assert first["latency_ms"] > 0 and first["method"] == "POST"
    assert (second["status"], second["batch_size"]) == (415, None)
    assert (third["route"], third["status"], third["request_id"]) == ("other", 404, odd.headers["x-request-id"])


# ---------------------------------------------------------------------------- SIGTERM drain
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv, tmp_path, env=None):
    log = open(tmp_path / "server.log", "wb")
    environment = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "moeclip", "serve", *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=environment, start_new_session=True)
    return proc, log


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything the server spawned (Ray's processes)
    except ProcessLookupError:
        pass


def _wait_ready(httpx, base, proc, tmp_path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server not ready:\n" + (tmp_path / "server.log").read_text())


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(deploy_file, images, tmp_path):
    httpx = require_extra("httpx")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc, log = _start(["--deploy", str(deploy_file), "--device", "cpu", "--port", str(port),
                        "--max-batch-delay-ms", "2000", "--drain-timeout-s", "20"], tmp_path)
    try:
        _wait_ready(httpx, base, proc, tmp_path, 60)

        def send(path):
            return httpx.post(base + "/predict", files={"image": (path.name, path.read_bytes(), "image/png")},
                              timeout=30)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, p) for p in images[:4]]
            wait_until(lambda: "moeclip_queue_depth 4.0" in httpx.get(base + "/metrics").text,
                       what="four queued requests")
            proc.send_signal(signal.SIGTERM)
            responses = [f.result(30) for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert proc.wait(30) == 0, (tmp_path / "server.log").read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
    finally:
        _stop(proc)
        log.close()


# ---------------------------------------------------------------------------- Ray Serve
@pytest.mark.slow
def test_ray_serve_answers_like_the_plain_server(deploy_file, detector, images, tmp_path_factory):
    """``moeclip serve --ray local`` (a local Ray cluster in a child process) against the in-process app."""
    require_extra("ray")  # with its serve extra (moeclip[ray]); not imported here: its import warns
    httpx = require_extra("httpx")
    tmp = tmp_path_factory.mktemp("rs")  # short: Ray's socket paths have a length limit
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc, log = _start(["--ray", "local", "--replicas", "1", "--deploy", str(deploy_file), "--device", "cpu",
                        "--port", str(port), "--api-key", "k", "--max-display-side", "64"], tmp,
                       env={"RAY_TMPDIR": str(tmp)})
    auth = {"Authorization": "Bearer k"}
    plain = create_app(detector, Deployment.load(deploy_file), api_key="k", max_display_side=64)
    try:
        _wait_ready(httpx, base, proc, tmp, 240)
        with TestClient(plain) as local:
            wait_until(lambda: local.get("/ready").status_code == 200, what="/ready")

            def both(method, path, **kwargs):
                return local.request(method, path, **kwargs), httpx.request(method, base + path, timeout=60, **kwargs)

            for p in images[:3]:
                files = {"image": (p.name, p.read_bytes(), "image/png")}
                want, got = both("POST", "/predict", files=files, data={"object": "hex nut"}, headers=auth)
                assert got.status_code == want.status_code == 200, got.text
                w, g = want.json(), got.json()
                for key in ("score", "raw_score"):
                    assert_f32_close(g[key], w[key], scale=1.0, what=key)
                assert_f32_close(g["map_max"], w["map_max"], what="map_max")
                for key in ("object", "object_source", "domain", "width", "height", "decision", "threshold"):
                    assert g[key] == w[key]
                assert got.headers["x-request-id"]
            bad = {"image": ("x.txt", b"hello", "text/plain")}
            for kwargs in ({"files": bad, "headers": auth}, {"files": bad}):
                want, got = both("POST", "/predict", **kwargs)
                assert (got.status_code, got.json()) == (want.status_code, want.json())
            for path in ("/", "/health", "/ready"):
                want, got = both("GET", path)
                assert got.status_code == want.status_code == 200 and got.text == want.text
            assert "moeclip_batch_size_count" in httpx.get(base + "/metrics", headers=auth).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp / "server.log").read_text()
    finally:
        _stop(proc)
        log.close()


def test_app_without_lifespan_and_lifespan_twice(detector, images):
    """A TestClient used outside 'with' (no lifespan) still answers; a second lifespan restarts the queue."""
    app = app_for(detector)
    assert post(TestClient(app), images[0]).status_code == 200
    for _ in range(2):
        with TestClient(app) as client:
            assert post(client, images[1]).status_code == 200


@pytest.mark.parametrize("flags, message", [
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    (["--request-timeout-s", "0"], "--request-timeout-s must be positive"),
    (["--ray", "--replicas", "0"], "--replicas must be at least 1"),
    (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica must not be negative"),
])
def test_serve_flags_are_checked_before_anything_starts(flags, message, tmp_path, capsys):
    from moeclip.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), *flags]) == 2
    assert message in capsys.readouterr().err
