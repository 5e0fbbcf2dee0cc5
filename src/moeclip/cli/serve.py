"""``moeclip serve``: the web service (JSON API + upload page) around one loaded model.

It listens on 127.0.0.1 by default. ``--api-key`` (or the ``MOECLIP_API_KEY`` environment
variable, which keeps the key out of the process list) requires ``Authorization: Bearer <key>``
on ``POST /predict``; binding to another address without a key prints a warning. The key
travels in clear text over plain HTTP: put a TLS reverse proxy in front for a public address.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import MoECLIPError
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
    add_model_args(p, checkpoint_required=False)
    p.set_defaults(func=run)


def build_app(args: argparse.Namespace):
    """The FastAPI app the command would serve (also used by tests)."""
    try:
        from ..inference.serve.app import create_app
    except ImportError as exc:
        raise MoECLIPError(f"serving needs the serve extra ({exc.name} is missing): "
                           "pip install 'moeclip[serve]'") from None
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
    return create_app(detector, dep, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                      max_pixels=args.max_pixels, max_display_side=args.max_display_side, api_key=api_key(args))


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
    app = build_app(args)
    if args.host not in _LOOPBACK and not api_key(args):
        print(f"warning: serving on {args.host} without authentication (set --api-key or ${API_KEY_ENV}, "
              "and put a TLS reverse proxy in front)", file=sys.stderr)
    print(f"serving on http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
