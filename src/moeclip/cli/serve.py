"""``moeclip serve``: the web service (JSON API + upload page) around one loaded model.

It listens on 127.0.0.1 by default. ``--api-key`` (or the ``MOECLIP_API_KEY`` environment
variable, which keeps the key out of the process list) requires ``Authorization: Bearer <key>``
on POSTs and ``/metrics``; binding to another address without a key prints a warning. The key
travels in clear text over plain HTTP: put a TLS reverse proxy in front for a public address.

Requests are batched (``--max-batch-size``, ``--max-batch-delay-ms``) behind a bounded queue
(``--max-queue``: 503 when full) with a deadline (``--request-timeout-s``: 504). SIGTERM (or
Ctrl-C) stops accepting, answers what is queued or in flight for up to ``--drain-timeout-s``,
then exits 0. ``--ray`` serves the same app on Ray Serve (:mod:`moeclip.integrations.ray_serve`).
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time

from ..errors import MoECLIPError
from ..integrations.ray import ray_address
from .common import add_domain_arg, add_model_args, model_options

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "MOECLIP_API_KEY"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="web service: upload page + JSON API (POST /predict)",
        description="Serve a model over HTTP: a page at / to upload an image and see the heat map, "
                    "POST /predict (multipart 'image' + 'object'), GET /health, OpenAPI at /docs.")
    p.add_argument("--deploy", metavar="FILE", help="deployment file from 'moeclip calibrate' "
                   "(decisions, normalisation, masks; also supplies --checkpoint and the default object)")
    p.add_argument("--object", help="default object description when a request names none")
    add_domain_arg(p, "default domain")
    p.add_argument("--threshold", type=float, help="decision threshold (overrides --deploy)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40e6)")
    p.add_argument("--max-display-side", type=int, default=1024,
                   help="returned pictures are scaled to at most this many pixels per side (default 1024)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on POST /predict (default: ${API_KEY_ENV}, "
                        "which keeps the key out of the process list; unset: no authentication)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    g = p.add_argument_group("batching, backpressure and shutdown")
    g.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="most requests scored in one forward (default 8; 1: no batching)")
    g.add_argument("--max-batch-delay-ms", type=float, default=10.0, metavar="MS",
                   help="longest wait for a batch to fill after its first request (default 10)")
    g.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for the model; beyond it: 503 with Retry-After at once (default 64)")
    g.add_argument("--request-timeout-s", type=float, default=30.0, metavar="S",
                   help="a request not answered within S seconds gets a 504 (default 30)")
    g.add_argument("--drain-timeout-s", type=float, default=30.0, metavar="S",
                   help="on SIGTERM: stop accepting, answer what is in flight for up to S seconds, exit 0 "
                        "(default 30)")
    r = p.add_argument_group("Ray Serve (pip install 'moeclip[ray]')")
    r.add_argument("--ray", nargs="?", const="local", default=None, type=ray_address, metavar="ADDRESS",
                   help="serve on Ray Serve: 'local' (default) starts Ray here, 'auto' joins the cluster of "
                        "'ray start', or HOST:PORT / ray://HOST:PORT")
    r.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas with --ray (default 1)")
    r.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                   help="GPUs per replica with --ray, fractions allowed (default: 1 if the cluster has GPUs, else 0)")
    add_model_args(p, checkpoint_required=False)
    p.set_defaults(func=run)


def batch_options(args: argparse.Namespace):
    from ..inference.serve.batching import BatchOptions

    return BatchOptions(max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
                        max_queue=args.max_queue, request_timeout_s=args.request_timeout_s,
                        drain_timeout_s=args.drain_timeout_s)


def app_options(args: argparse.Namespace) -> dict:
    """``create_app``'s keyword arguments from the flags (except the model)."""
    return {"max_upload_bytes": int(args.max_upload_mb * 1024 * 1024), "max_pixels": args.max_pixels,
            "max_display_side": args.max_display_side, "api_key": api_key(args), "batching": batch_options(args)}


def build_app(args: argparse.Namespace):
    """The FastAPI app the command would serve (also used by tests)."""
    create_app = _create_app()
    options = app_options(args)
    start = time.perf_counter()
    detector, dep = load_detector(args)
    return create_app(detector, dep, load_seconds=time.perf_counter() - start, **options)


def _create_app():
    try:
        from ..inference.serve.app import create_app
    except ImportError as exc:
        raise MoECLIPError(f"serving needs the serve extra ({exc.name} is missing): "
                           "pip install 'moeclip[serve]'") from None
    return create_app


def load_detector(args: argparse.Namespace):
    """(Detector, Deployment or None) from the flags (picklable recipe for Ray Serve replicas)."""
    from ..inference.deploy import Deployment

    dep = Deployment.load(args.deploy) if args.deploy else None
    if dep is not None:
        from ..inference.detector import Detector

        detector = Detector.from_deployment(dep, checkpoint=args.checkpoint, options=model_options(args),
                                            device=args.device, precision=args.precision, object=args.object,
                                            domain=args.domain, threshold=args.threshold)
    elif args.checkpoint:
        from .common import detector_from_args

        detector = detector_from_args(args, object=args.object, threshold=args.threshold)
    else:
        raise MoECLIPError("--checkpoint is required (or --deploy FILE)")
    return detector, dep


def api_key(args: argparse.Namespace):
    """``--api-key``, else ``$MOECLIP_API_KEY``; None (no authentication) when neither is set."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise MoECLIPError(f"the API key is empty (--api-key or ${API_KEY_ENV})")
    return key.strip() if key else None


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise MoECLIPError("serving needs uvicorn: pip install 'moeclip[serve]'") from None
    if args.host not in _LOOPBACK and not api_key(args):
        print(f"warning: serving on {args.host} without authentication (set --api-key or ${API_KEY_ENV}, "
              "and put a TLS reverse proxy in front)", file=sys.stderr)
    if args.ray is not None:
        from ..integrations import ray_serve

        _create_app()  # the serve extra, checked here rather than in a replica
        return ray_serve.serve_forever(functools.partial(load_detector, args), address=args.ray, host=args.host,
                                       port=args.port, replicas=args.replicas,
                                       gpus_per_replica=args.gpus_per_replica, **app_options(args))
    app = build_app(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.drain_timeout_s)
    server = _server_class()(config)
    print(f"serving on http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    previous = {sig: signal.signal(sig, _exit_quietly) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()  # re-raises the signal it caught once done: _exit_quietly then keeps exit status 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _exit_quietly(signum, frame) -> None:
    """After a graceful shutdown the stop signal has done its job: exit 0, not 128 + signal."""


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: /ready answers 503 (draining) at once, then uvicorn's graceful shutdown."""

        def handle_exit(self, sig, frame) -> None:
            self.config.app.state.draining = True
            super().handle_exit(sig, frame)

    return DrainingServer

