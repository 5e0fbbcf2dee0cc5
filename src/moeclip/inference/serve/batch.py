"""``POST /predict/batch``: several images of one object scored as one batch (the fused transductive mode).

Multipart: several ``images``, an ``object`` and a ``domain`` (as ``/predict``). Each image is scored
against the other images of the request (zero-shot + mutual map, + the few-shot map when the
service has references for the object; :mod:`moeclip.model.fused`), so the request needs at least
2 readable images. The answer lists one result per image in upload order: its scores and the
zero-shot parts, or its ``error`` when the upload could not be read (the rest are scored without
it). Pictures are not returned (a batch would be large); ``map_max`` and the scores are.
"""
from typing import Any, Dict, List, Optional

from ...errors import MoECLIPError

#: At most this many images per request (the mutual score is quadratic in the batch).
MAX_BATCH_IMAGES = 64


def add_batch_route(app, service, ApiError, read_upload, max_upload_bytes: int, max_pixels: int,
                    max_images: int = MAX_BATCH_IMAGES) -> None:
    """Install ``POST /predict/batch`` on ``app``; ``service`` (serve.app.Service) holds the detector and lock."""
    from fastapi import File, Form, UploadFile

    from ..pipeline import score_images

    detector = service.detector

    @app.post("/predict/batch", responses={409: {"description": "not possible with this service's scoring"},
                                           413: {"description": "too many images or too large"},
                                           422: {"description": "fewer than 2 readable images, or a bad field"}})
    def predict_batch(images: List[UploadFile] = File(..., description="images of one object (2 or more)"),
                      object: Optional[str] = Form(None, description="object description, e.g. 'metal nut'"),
                      domain: Optional[str] = Form(None, description="industrial or medical")) -> Dict[str, Any]:
        if len(images) > max_images:
            raise ApiError(413, "too_many_images", f"at most {max_images} images per batch request")
        text, source, dom = service.resolve(object, domain)
        pils, rows = [], []
        for i, up in enumerate(images):
            name = up.filename or f"<upload {i}>"
            try:
                pils.append(read_upload(up, max_upload_bytes, max_pixels))
                rows.append({"name": name})
            except ApiError as exc:
                rows.append({"name": name, "error": exc.detail, "error_code": exc.code})
        if len(pils) < 2:
            from ...model.musc import ONE_IMAGE_FIX

            raise ApiError(422, "batch_too_small", f"{len(pils)} readable image(s): {ONE_IMAGE_FIX}")
        with service.lock:
            try:
                runtime = detector.transductive_runtime()
                scored = score_images(runtime, service.post, pils, text, dom.value)
            except MoECLIPError as exc:
                raise ApiError(409, "batch_not_possible", str(exc)) from None
        it = iter(zip(pils, scored))
        for row in rows:
            if "error" in row:
                continue
            pil, s = next(it)
            row.update({"score": s.score, "raw_score": s.raw_score, "map_max": s.map_max, "decision": s.decision,
                        "width": pil.width, "height": pil.height,
                        **{k: (v.item() if hasattr(v, "item") else v) for k, v in s.extra.items()}})
        return {"object": text, "object_source": source, "domain": dom.value, "threshold": service.post.threshold,
                "transductive": len(pils), "results": rows}
