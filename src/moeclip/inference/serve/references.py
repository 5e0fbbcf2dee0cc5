"""``POST /references`` and ``GET /references``: few-shot memory banks of a running service.

``POST /references`` (multipart: several ``images`` and an ``object``) builds the bank of that
object from the uploaded normal images, replacing an earlier one; ``/predict`` then scores that
object against it and says so (``references``). Uploads are checked as for ``/predict``: content
type, decoder, pixels per image, and the request size (all images together) from Content-Length.
"""
from typing import Any, Dict, List, Optional

from ...errors import MoECLIPError

#: At most this many images per request and this many objects with a bank (banks are large).
MAX_REFERENCE_IMAGES = 64
MAX_REFERENCE_OBJECTS = 32


def add_reference_routes(app, service, ApiError, read_upload, max_upload_bytes: int, max_pixels: int) -> None:
    """Install the two routes on ``app``; ``service`` (serve.app.Service) holds the detector, runtime and lock."""
    from fastapi import File, Form, UploadFile

    detector = service.detector

    def listing() -> Dict[str, Any]:
        banks = detector.references
        return {"weight": banks.weight if banks else None, "objects": banks.summary() if banks else []}

    @app.get("/references")
    def get_references() -> Dict[str, Any]:
        """Objects with a memory bank, their number of references and bank size."""
        return listing()

    @app.post("/references", responses={409: {"description": "not possible with this service's scoring"},
                                        413: {"description": "files or images too large"},
                                        415: {"description": "not a supported image type"},
                                        422: {"description": "invalid image or field"}})
    def post_references(images: List[UploadFile] = File(..., description="normal reference images"),
                        object: Optional[str] = Form(None, description="object description, e.g. 'metal nut'"),
                        ) -> Dict[str, Any]:
        if len(images) > MAX_REFERENCE_IMAGES:
            raise ApiError(413, "too_many_images", f"at most {MAX_REFERENCE_IMAGES} reference images per request")
        pils, names = [], []
        for up in images:
            try:
                pils.append(read_upload(up, max_upload_bytes, max_pixels))
            except ApiError as exc:
                raise ApiError(exc.status, exc.code, f"{up.filename}: {exc.detail}") from None
            names.append(up.filename or f"<upload {len(names)}>")
        text, _, _ = service.resolve(object, None)
        banks = detector.references
        if banks is not None and text not in banks and len(banks) >= MAX_REFERENCE_OBJECTS:
            raise ApiError(409, "too_many_objects", f"at most {MAX_REFERENCE_OBJECTS} objects with references")
        from ..references import attach_references

        with service.lock:
            try:
                bank = attach_references(detector, pils, text, names=names)
            except MoECLIPError as exc:
                raise ApiError(409, "references_not_possible", str(exc)) from None
            service.runtime = detector.runtime()
        return {"object": text, "references": bank.num_references, **listing()}
