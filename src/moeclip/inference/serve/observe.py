"""What an operator watches: Prometheus metrics (``GET /metrics``), a JSON access log, request ids.

Labels are bounded: the route is one of :data:`ROUTES` (anything else is ``other``) and the
status is the HTTP code; object descriptions and file names never become labels (they are in
the access log only). Each app has its own registry, so several apps in one process (tests,
Ray Serve replicas) do not mix their counts.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import Any, Callable, Dict, Optional

__all__ = ["ROUTES", "Metrics", "request_id", "access_logger", "log_access"]

#: The routes counted under their own name (the ``route`` label's whole value set, with ``other``).
ROUTES = frozenset({"/", "/predict", "/references", "/health", "/ready", "/metrics", "/docs",
                    "/openapi.json"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
ACCESS_LOGGER = "moeclip.access"


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


def request_id(incoming: Optional[str]) -> str:
    """The client's ``X-Request-ID`` when it is a short plain token (it is logged), else a new one."""
    return incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex


class Metrics:
    """The service's Prometheus metrics in a registry of its own."""

    def __init__(self, queue_depth: Callable[[], float]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("moeclip_requests", "HTTP requests by route and status", ("route", "status"),
                                registry=self.registry)
        self.latency = Histogram("moeclip_request_latency_seconds", "request latency by route", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("moeclip_batch_size", "images per model forward", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.queue = Gauge("moeclip_queue_depth", "requests waiting for the model", registry=self.registry)
        self.queue.set_function(queue_depth)
        self.load_seconds = Gauge("moeclip_model_load_seconds", "time to load the model", registry=self.registry)
        self.ready = Gauge("moeclip_ready", "1 once the model is loaded and warmed up", registry=self.registry)

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(int(status))).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (not the one at creation: test capture swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - a closed stderr must not fail a request
            self.handleError(record)


def access_logger() -> logging.Logger:
    """``moeclip.access``: one JSON object per line on stderr (configure or silence it like any logger)."""
    log = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def log_access(log: logging.Logger, rid: str, method: str, path: str, status: int, seconds: float,
               extra: Dict[str, Any]) -> None:
    record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "request_id": rid, "method": method,
              "route": route_label(path), "status": int(status), "latency_ms": round(seconds * 1000.0, 2),
              "batch_size": extra.get("batch_size"), "object": extra.get("object")}
    log.info(json.dumps(record, ensure_ascii=False))
