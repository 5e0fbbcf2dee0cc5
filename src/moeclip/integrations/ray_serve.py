"""The web service on Ray Serve: ``moeclip serve --ray`` and a deployment for your own Serve apps.

Each replica loads the model once and serves the app of :mod:`moeclip.inference.serve.app`
(same routes, same responses, same page); only the batching differs: ``@serve.batch`` collects
concurrent requests of a replica (``max_batch_size``, ``max_batch_delay_ms``) and each batch is
split by (object, domain) into forwards, as the in-process batcher does. The replica bounds its
own queue (``max_queue``: JSON 503) and applies the request deadline (JSON 504); Serve spreads
requests over ``replicas`` and drains a replica for ``drain_timeout_s`` when it stops.

Compose it into your own Serve application::

    from ray import serve
    from moeclip.integrations.ray_serve import application
    from moeclip.inference.deploy import Deployment
    from moeclip.inference.detector import Detector

    def load():  # runs in each replica
        dep = Deployment.load("deploy.json")
        return Detector.from_deployment(dep, device="cuda"), dep

    serve.run(application(load, replicas=2, gpus_per_replica=1), route_prefix="/")

Ray is imported lazily: ``moeclip`` works without it (``pip install 'moeclip[ray]'``).
"""
from __future__ import annotations

import asyncio
import functools
import signal
import sys
import threading
import time
from typing import Any, Callable, Hashable, List, Optional, Tuple

from ..errors import MoECLIPError
from ..inference.serve.batching import BatchOptions, DeadlineExceeded, QueueFull

__all__ = ["ServeBatchQueue", "deployment_class", "application", "serve_forever"]

#: The Serve application name used by ``moeclip serve --ray``.
APP_NAME = "moeclip"


def _serve():
    try:
        from ray import serve
    except ImportError as exc:
        raise MoECLIPError("--ray needs Ray Serve, which is not installed: pip install 'moeclip[ray]'") from exc
    return serve


class ServeBatchQueue:
    """The :class:`~moeclip.inference.serve.batching.Batcher` interface of the app on ``@serve.batch``."""

    def __init__(self, service, options: BatchOptions):
        self.service = service
        self.max_queue = options.max_queue
        self._waiting = 0

        async def run(requests):
            return await self._run(requests)

        self._batched = _serve().batch(max_batch_size=options.max_batch_size,
                                       batch_wait_timeout_s=options.max_batch_delay_ms / 1000.0)(run)

    @property
    def depth(self) -> int:
        return self._waiting

    def full(self) -> bool:
        return self._waiting >= self.max_queue

    def start(self) -> "ServeBatchQueue":
        return self

    def close(self, timeout: Optional[float] = None) -> bool:
        return True  # Serve drains the replica (graceful_shutdown_timeout_s) before it stops

    async def submit_async(self, key: Hashable, payload: Any, deadline: Optional[float] = None):
        if self._waiting >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
        self._waiting += 1
        try:
            result = await self._batched((key, payload, deadline))
        finally:
            self._waiting -= 1
        if isinstance(result, Exception):
            raise result
        return result

    async def _run(self, requests: List[Tuple[Hashable, Any, Optional[float]]]) -> List[Any]:
        """One ``@serve.batch`` batch -> one forward per (object, domain), off the event loop."""
        out: List[Any] = [None] * len(requests)
        groups: dict = {}
        now = time.monotonic()
        for i, (key, _, deadline) in enumerate(requests):
            if deadline is not None and now > deadline:
                out[i] = DeadlineExceeded("the request's deadline passed while it was queued")
            else:
                groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            try:
                results = await asyncio.to_thread(self.service.score_batch, key, [requests[i][1] for i in idx])
            except Exception as exc:  # this group's callers get the error; the others their results
                results = [exc] * len(idx)
            for i, result in zip(idx, results):
                out[i] = result if isinstance(result, Exception) else (result, len(idx))
        return out


@functools.lru_cache(maxsize=None)
def deployment_class():
    """The Serve deployment ``MoECLIPServe(load, app_options)``: ``load() -> (Detector, Deployment or None)``
    runs in the replica; ``app_options`` are :func:`~moeclip.inference.serve.app.create_app`'s keywords."""
    serve = _serve()

    @serve.deployment(name="MoECLIPServe")
    @serve.ingress()
    class MoECLIPServe:
        def __init__(self, load: Callable[[], Tuple[Any, Any]], app_options: dict):
            start = time.perf_counter()
            self.detector, self.deployment = load()
            self.load_seconds = time.perf_counter() - start
            self.app_options = dict(app_options)

        def __serve_build_asgi_app__(self):
            from ..inference.serve.app import create_app

            options = self.app_options.get("batching") or BatchOptions()
            return create_app(self.detector, self.deployment, load_seconds=self.load_seconds,
                              queue=lambda service: ServeBatchQueue(service, options), **self.app_options)

    return MoECLIPServe


def application(load: Callable[[], Tuple[Any, Any]], *, replicas: int = 1, gpus_per_replica: float = 0.0,
                batching: Optional[BatchOptions] = None, **app_options):
    """A bound Serve application (for ``serve.run``): ``replicas`` copies of the service."""
    _check(replicas, gpus_per_replica)
    batching = batching or BatchOptions()
    return deployment_class().options(
        num_replicas=replicas, ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica},
        # the replica, not Serve, answers the overflow (JSON 503) and holds a full batch besides
        max_ongoing_requests=batching.max_queue + batching.max_batch_size,
        max_queued_requests=batching.max_queue,  # beyond: Serve's own 503 (its body, not ours)
        graceful_shutdown_timeout_s=batching.drain_timeout_s,
    ).bind(load, {"batching": batching, **app_options})


def _check(replicas: int, gpus_per_replica: Optional[float]) -> None:
    if replicas < 1:
        raise MoECLIPError("--replicas must be at least 1")
    if gpus_per_replica is not None and gpus_per_replica < 0:
        raise MoECLIPError("--gpus-per-replica must not be negative")


def _gpus(replicas: int, gpus_per_replica: Optional[float]) -> float:
    import ray

    cluster = float(ray.cluster_resources().get("GPU", 0))
    gpus = (1.0 if cluster else 0.0) if gpus_per_replica is None else float(gpus_per_replica)
    if gpus > 0 and replicas * gpus > cluster:
        raise MoECLIPError(f"{replicas} replica(s) x {gpus:g} GPU need {replicas * gpus:g} GPUs; the cluster has "
                           f"{cluster:g}")
    return gpus


def serve_forever(load: Callable[[], Tuple[Any, Any]], *, address: str = "local", host: str = "127.0.0.1",
                  port: int = 8000, replicas: int = 1, gpus_per_replica: Optional[float] = None,
                  **app_options) -> int:
    """``moeclip serve --ray``: run the application until SIGTERM/SIGINT, then drain, stop, return 0."""
    from .ray import connect

    _check(replicas, gpus_per_replica)
    serve = _serve()
    connected = connect(address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        app = application(load, replicas=replicas, gpus_per_replica=_gpus(replicas, gpus_per_replica),
                          **app_options)
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        print(f"serving on http://{host}:{port}/ with Ray Serve, {replicas} replica(s) (API docs at /docs)",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping: draining the replicas", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if connected:
            import ray

            ray.shutdown()
    return 0
