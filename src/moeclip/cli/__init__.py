"""``moeclip`` command line: one module per sub-command, each exposing ``register(subparsers)``.

A sub-command module adds its parser with ``subparsers.add_parser(...)`` and sets
``parser.set_defaults(func=run)`` where ``run(args) -> int`` returns the exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .._imports import defer_heavy_imports
from ..errors import MoECLIPError

# Sub-command modules, in the order they appear in --help. They import optional extras
# (serve, onnx) only when run, so every command is listed whatever is installed.
_COMMANDS = ["demo", "train", "test", "predict", "calibrate", "serve", "export", "explain",
             "analyze", "ablate", "datasets", "convert"]
_COMMANDS.append("reproduce")  # issue 15: the paper's protocol in one command


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="moeclip",
        description="MoECLIP zero-shot anomaly detection: train once, detect defects in unseen categories.",
    )
    parser.add_argument("--version", action="version", version=f"moeclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv=None) -> int:
    """The ``moeclip`` command; ``argv`` None: this process's own command line (the entry point).

    Only then does it defer torchvision's and timm's unused packages (:mod:`moeclip._imports`):
    the command owns its process, a program that calls ``main([...])`` keeps its imports as they are.
    """
    if argv is None:
        defer_heavy_imports()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MoECLIPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
