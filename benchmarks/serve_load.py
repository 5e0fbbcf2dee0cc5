"""Load test of ``moeclip serve`` on loopback: throughput and latency with batching on and off.

Two servers run side by side on 127.0.0.1 (random-weight checkpoint, speed does not depend on the
values): ``--max-batch-size 8`` (batching on) and ``--max-batch-size 1`` (off). For each
concurrency (closed loop: C clients, each sends its next request when the last is answered)
the two are measured interleaved, so machine load hits both alike; each point is bounded by
``--requests`` and ``--max-seconds``. Then, optionally:

* ``--soak N``: N requests at concurrency 8 against the batching server: any 5xx is unexpected;
  resident memory (VmRSS) after the run is compared with after warm-up.
* ``--overload``: a third server with ``--max-queue 4 --max-batch-size 1`` gets 64 concurrent
  clients: how many 503s, and how fast they are answered, as the clients see it and as the
  server's access log says (``latency_ms``: from the request's arrival to its response).

Nothing leaves the machine: servers bind 127.0.0.1 and the clients only talk to them.

    python benchmarks/serve_load.py --clip-model tiny --requests 400 --soak 2000 --overload --json OUT
    python benchmarks/serve_load.py --clip-model ViT-B-16 --image-size 224 --requests 48 --max-seconds 60
    python benchmarks/serve_load.py --clip-model ViT-L-14-336 --image-size 518 --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_moeclip, finish, machine_info, print_table  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
#: The tests' tiny open_clip ViT (random weights): measures the service, not the model.
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Server:
    """``moeclip serve`` in a child process on a free loopback port."""

    def __init__(self, ckpt: Path, extra: List[str], log: Path, threads: int, device: str = "cpu",
                 precision: str = "fp32"):
        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log_path = log  # stdout and stderr: the access log's JSON lines among them
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moeclip", "serve", "--checkpoint", str(ckpt),
                                      "--device", device, "--precision", precision, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-level", "warning", *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server not ready within 300 s")
            time.sleep(0.2)
        self.rss_ready = rss_mib(self.proc.pid)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9
        finally:
            self.log.close()


def load(base: str, image: bytes, concurrency: int, requests: int, max_seconds: float) -> Dict[str, Any]:
    """Closed loop: ``concurrency`` clients until ``requests`` are answered or ``max_seconds`` pass."""
    import httpx

    lock = threading.Lock()
    latencies: List[float] = []
    statuses: Dict[int, int] = {}
    errors = [0]
    sent = [0]
    stop_at = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while True:
                with lock:
                    if sent[0] >= requests or time.monotonic() > stop_at:
                        return
                    sent[0] += 1
                t = time.perf_counter()
                try:
                    r = c.post(base + "/predict", files={"image": ("x.png", image, "image/png")},
                               data={"object": "metal nut"})
                    code = r.status_code
                except httpx.HTTPError:
                    code = None
                dt = time.perf_counter() - t
                with lock:
                    if code is None:
                        errors[0] += 1
                    else:
                        statuses[code] = statuses.get(code, 0) + 1
                        if code == 200:
                            latencies.append(dt)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = statuses.get(200, 0)
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else float("nan")

    return {"concurrency": concurrency, "answered": sum(statuses.values()), "ok": ok, "statuses": statuses,
            "connection_errors": errors[0], "wall_s": round(wall, 2), "throughput_rps": round(ok / wall, 2),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None}


def server_ms(log: Path, status: int) -> List[float]:
    """Latencies (ms) the server itself logged for responses of ``status`` (its access log)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("status") == status and rec.get("route") == "/predict":
                out.append(rec["latency_ms"])
    return sorted(out)


def overload(base: str, image: bytes, clients: int = 64) -> Dict[str, Any]:
    """``clients`` requests at once: the 503s' latencies (they should not wait for the model)."""
    import httpx

    results: List[Any] = [None] * clients
    barrier = threading.Barrier(clients)

    def one(i: int) -> None:
        with httpx.Client(timeout=120) as c:
            barrier.wait()
            t = time.perf_counter()
            r = c.post(base + "/predict", files={"image": ("x.png", image, "image/png")})
            results[i] = (r.status_code, time.perf_counter() - t, r.headers.get("retry-after"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = sorted(dt for code, dt, _ in results if code == 503)
    served = sorted(dt for code, dt, _ in results if code == 200)

    def ms(values, q):
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1) if values else None

    return {"clients": clients, "ok": len(served), "refused_503": len(refused),
            "other": sorted({code for code, _, _ in results if code not in (200, 503)}),
            "retry_after": sorted({ra for code, _, ra in results if code == 503}),
            "refused_p50_ms": ms(refused, 0.5), "refused_max_ms": ms(refused, 1.0),
            "served_p50_ms": ms(served, 0.5), "served_max_ms": ms(served, 1.0)}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the checkpoint: 600 MB for ViT-B-16


def run(work: Path) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip-model", default="tiny", help="'tiny' (the tests' model) or an open_clip name")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=200, help="requests per point (upper bound)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time per point (upper bound)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved on/off rounds per concurrency")
    p.add_argument("--soak", type=int, default=0, metavar="N", help="N requests at concurrency 8, batching on")
    p.add_argument("--overload", action="store_true", help="64 clients against --max-queue 4")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the servers (0: default)")
    p.add_argument("--batch-delay-ms", type=float, default=10.0, help="--max-batch-delay-ms of the batching server")
    p.add_argument("--device", default="cpu", help="the servers' --device (cuda on a GPU machine)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    from PIL import Image

    from moeclip.model.checkpoint import save_checkpoint

    clip = args.clip_model
    if clip == "tiny":
        clip = str(work / "tiny-clip.json")
        Path(clip).write_text(json.dumps(TINY_CLIP))
    model = build_moeclip(clip, args.image_size, torch.device("cpu"))
    ckpt = save_checkpoint(model, work / "ckpt", include_backbone=True)
    del model
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)).save(buf, "PNG")
    image = buf.getvalue()

    doc: Dict[str, Any] = {"machine": machine_info(torch.device("cpu")), "args": vars(args), "points": []}
    common = ["--max-queue", "256", "--request-timeout-s", "300"]

    def start(extra: List[str], name: str) -> Server:
        return Server(ckpt, extra, work / f"{name}.log", args.threads, args.device, args.precision)

    servers = {"on": start(["--max-batch-size", "8", "--max-batch-delay-ms", str(args.batch_delay_ms), *common], "on"),
               "off": start(["--max-batch-size", "1", *common], "off")}
    try:
        rows = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            for _ in range(args.rounds):
                for mode in ("on", "off"):
                    point = {"batching": mode, **load(servers[mode].base, image, c, args.requests, args.max_seconds)}
                    doc["points"].append(point)
                    rows.append([mode, c, point["ok"], point["throughput_rps"], point["p50_ms"], point["p99_ms"],
                                 {k: v for k, v in point["statuses"].items() if k != 200} or "-"])
        print_table(rows, ["batching", "clients", "ok", "req/s", "p50 ms", "p99 ms", "non-200"])
        for c in sorted({pt["concurrency"] for pt in doc["points"]}):
            on = [pt["throughput_rps"] for pt in doc["points"] if pt["concurrency"] == c and pt["batching"] == "on"]
            off = [pt["throughput_rps"] for pt in doc["points"] if pt["concurrency"] == c and pt["batching"] == "off"]
            ratio = statistics.median(on) / statistics.median(off) if off and statistics.median(off) else None
            doc.setdefault("ratio_on_off", {})[c] = round(ratio, 2) if ratio else None
            print(f"clients {c}: batching on / off throughput = {ratio:.2f}x" if ratio else f"clients {c}: n/a")
        if args.soak:
            srv = servers["on"]
            before = rss_mib(srv.proc.pid)
            soak = load(srv.base, image, 8, args.soak, 3600.0)
            after = rss_mib(srv.proc.pid)
            unexpected = sum(v for k, v in soak["statuses"].items() if k >= 500)
            soak.update({"rss_after_warm_up_mib": round(srv.rss_ready, 1), "rss_before_soak_mib": round(before, 1),
                         "rss_after_mib": round(after, 1), "rss_growth_vs_warm_up": round(after / srv.rss_ready - 1, 4),
                         "unexpected_5xx": unexpected})
            doc["soak"] = soak
            print(f"soak: {soak['answered']} answered, {soak['ok']} ok, {unexpected} unexpected 5xx, "
                  f"{soak['connection_errors']} connection errors, {soak['throughput_rps']} req/s, "
                  f"RSS {srv.rss_ready:.0f} MiB after warm-up -> {after:.0f} MiB after "
                  f"({100 * soak['rss_growth_vs_warm_up']:+.1f} %)")
    finally:
        doc["exit_codes"] = {mode: srv.stop() for mode, srv in servers.items()}
    if args.overload:
        srv = start(["--max-batch-size", "1", "--max-queue", "4"], "overload")
        try:
            doc["overload"] = overload(srv.base, image)
        finally:
            doc["exit_codes"]["overload"] = srv.stop()
        logged = server_ms(srv.log_path, 503)
        doc["overload"]["refused_server_p50_ms"] = logged[len(logged) // 2] if logged else None
        doc["overload"]["refused_server_max_ms"] = logged[-1] if logged else None
        print("overload:", json.dumps(doc["overload"]))
    print("exit codes after SIGTERM:", doc["exit_codes"])
    finish(doc, args.json)


if __name__ == "__main__":
    main()
