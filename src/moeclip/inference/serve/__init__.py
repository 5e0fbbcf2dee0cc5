"""The web service: a FastAPI app (``create_app``) with a JSON API and a one-page UI.

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart); importing this package does not.
"""
from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """See :func:`moeclip.inference.serve.app.create_app` (imported lazily so that FastAPI stays optional)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
