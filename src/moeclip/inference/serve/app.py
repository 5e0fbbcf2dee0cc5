"""FastAPI app: ``POST /predict`` (multipart image + object), ``GET /health``, ``GET /`` (the page).

Uploads are checked before the model sees them: size (``max_upload_bytes``, also from the
Content-Length header before the body is parsed), content type, decoder (only PNG, JPEG, BMP,
TIFF and WebP are tried, so no exotic Pillow plugin ever parses user data) and pixel count
(``max_pixels``, read from the header before decoding, which stops decompression bombs).
Errors are JSON ``{"error": <code>, "detail": <message>}`` with status 411 (no Content-Length:
chunked bodies could not be bounded before spooling), 413 (too large),
415 (not a supported image type), 422 (undecodable image, bad field) or 500.

The model runs under one lock: a request waits for the previous one instead of running the
model concurrently (PyTorch modules are not guaranteed re-entrant, and one forward already
uses every core). The text-feature cache is bounded by clearing it after ``max_objects``
distinct descriptions, so a client cannot grow memory without limit.
"""
# no "from __future__ import annotations": FastAPI must see the real types of the endpoint
# parameters, which are imported inside create_app (FastAPI is an optional dependency).
import io
import threading
import time
from importlib import resources
from typing import Any, Dict, Optional

from PIL import Image

from ... import __version__
from ...errors import MoECLIPError
from ...model.prompts import GENERIC_OBJECT
from ..deploy import Deployment
from ..postprocess import resize_map
from ..render import data_url, heatmap_rgb, mask_image, overlay

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_DISPLAY_SIDE = 1024
MAX_OBJECT_CHARS = 200
#: Content types accepted for the upload, and the Pillow decoders tried on it.
CONTENT_TYPES = frozenset({"image/png", "image/x-png", "image/jpeg", "image/jpg", "image/pjpeg", "image/bmp", "image/x-bmp",
                           "image/x-ms-bmp", "image/tiff", "image/webp"})
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> 8-bit RGB PIL image, or ApiError (413 too many pixels, 415 other format, 422 broken)."""
    from ...data.imageio import to_pil_rgb

    if not data:
        raise ApiError(422, "empty_file", "the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise ApiError(413, "too_many_pixels", f"image of {im.width}x{im.height} pixels exceeds the "
                                                       f"limit of {max_pixels} pixels")
            im.load()
            return to_pil_rgb(im, "upload")
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ApiError(415, "unsupported_image", f"not a {', '.join(PIL_FORMATS)} image") from None
    except MoECLIPError as exc:
        raise ApiError(422, "invalid_image", str(exc)) from None
    except Exception as exc:  # truncated or malformed data: Pillow raises many types
        raise ApiError(422, "invalid_image", f"cannot decode the image ({type(exc).__name__}: {exc})") from None


def _opt_float(value) -> Optional[float]:
    return None if value is None else float(value)


def _page() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(detector, deployment: Optional[Deployment] = None, *, pixel_threshold: Optional[float] = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_display_side: int = DEFAULT_MAX_DISPLAY_SIDE, max_objects: int = 256):
    """The app around a loaded :class:`~moeclip.inference.detector.Detector`.

    ``deployment`` (already applied to the detector, e.g. by :meth:`Deployment.detector`) provides
    the pixel threshold for masks unless ``pixel_threshold`` is given. Returned pictures are
    scaled down to ``max_display_side`` pixels; scores are computed at full resolution.
    """
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ...model.scoring import Domain

    if pixel_threshold is None and deployment is not None:
        pixel_threshold = deployment.pixel_threshold
    post = detector.post_processor()
    lock = threading.Lock()
    seen_objects: set = set()

    class PredictResponse(BaseModel):
        score: float = Field(description="image anomaly score in [0, 1]")
        raw_score: float = Field(description="raw image score (c_abnormal + 1) / 2")
        map_max: float = Field(description="maximum of the raw anomaly map")
        decision: Optional[bool] = Field(None, description="score >= threshold, when a threshold is set")
        threshold: Optional[float] = None
        object: str
        object_source: str = Field(description="form, default (deployment/--object) or generic")
        domain: str
        width: int
        height: int
        heatmap: str = Field(description="PNG data URL of the heat map")
        overlay: str = Field(description="PNG data URL of the heat map over the image")
        mask: Optional[str] = Field(None, description="PNG data URL of the binary mask (with a pixel threshold)")
        references: int = Field(0, description="normal references of this object used (few-shot); 0: zero-shot")
        zero_shot_score: Optional[float] = Field(None, description="few-shot: the zero-shot image score alone")
        few_shot_map_max: Optional[float] = Field(None, description="few-shot: maximum of the few-shot map")
        elapsed_ms: float

    class Health(BaseModel):
        status: str
        version: str
        object: Optional[str]
        domain: str
        threshold: Optional[float]
        pixel_threshold: Optional[float]
        image_size: int
        device: str
        max_upload_bytes: int
        max_pixels: int

    app = FastAPI(title="MoECLIP anomaly detection", version=__version__,
                  description="Zero-shot anomaly detection: upload an image, name the object, get an "
                              "anomaly score and heat map.")

    def error(status: int, code: str, detail: Any) -> JSONResponse:
        return JSONResponse({"error": code, "detail": detail}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error(exc.status_code, "http_error", exc.detail)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        """Refuse oversized bodies from their Content-Length, before multipart parsing spools them."""
        length = request.headers.get("content-length")
        if request.method == "POST" and length is None:
            return error(411, "length_required", "send a Content-Length header (chunked uploads are not accepted)")
        if request.method == "POST" and length is not None:
            try:
                too_big = int(length) > max_upload_bytes + 64 * 1024  # multipart envelope allowance
            except ValueError:
                return error(400, "bad_request", "invalid Content-Length header")
            if too_big:
                return error(413, "file_too_large", f"request body over the limit of {max_upload_bytes} bytes")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _page()

    @app.get("/health", response_model=Health)
    def health() -> Dict[str, Any]:
        return {"status": "ok", "version": __version__, "object": detector.object, "domain": detector.domain.value,
                "threshold": detector.threshold, "pixel_threshold": pixel_threshold,
                "image_size": int(detector.image_size), "device": str(detector.device),
                "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels}

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=False,
              responses={413: {"description": "file or image too large"},
                         415: {"description": "not a supported image type"},
                         422: {"description": "invalid image or field"}})
    def predict(image: UploadFile = File(..., description="PNG, JPEG, BMP, TIFF or WebP image"),
                object: Optional[str] = Form(None, description="object description, e.g. 'metal nut'"),
                domain: Optional[str] = Form(None, description="industrial or medical")) -> Dict[str, Any]:
        start = time.perf_counter()
        ctype = (image.content_type or "").split(";")[0].strip().lower()
        if ctype not in CONTENT_TYPES:
            raise ApiError(415, "unsupported_media_type",
                           f"content type {ctype or 'missing'!r} is not an image type this service reads "
                           f"(PNG, JPEG, BMP, TIFF, WebP)")
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(413, "file_too_large", f"file over the limit of {max_upload_bytes} bytes")
        pil = decode_upload(data, max_pixels)

        text = (object or "").strip()
        if len(text) > MAX_OBJECT_CHARS:
            raise ApiError(422, "invalid_object", f"object description longer than {MAX_OBJECT_CHARS} characters")
        if text:
            source = "form"
        elif detector.object:
            text, source = detector.object, "default"
        else:
            text, source = GENERIC_OBJECT, "generic"
        try:
            dom = Domain.parse(domain) if domain and domain.strip() else detector.domain
        except ValueError as exc:
            raise ApiError(422, "invalid_domain", str(exc)) from None

        with lock:
            if text not in seen_objects:
                if len(seen_objects) >= max_objects:
                    detector.model.text.clear_cache()
                    seen_objects.clear()
                seen_objects.add(text)
            pred = detector.predict([pil], object=text, domain=dom.value)[0]

        amap = pred.anomaly_map
        shown = pil
        side = max(pil.width, pil.height)
        if side > max_display_side:
            scale = max_display_side / side
            size = (max(1, round(pil.height * scale)), max(1, round(pil.width * scale)))
            shown = pil.resize((size[1], size[0]), Image.BILINEAR)
            amap = resize_map(amap, size)
        unit = post.unit_map(amap)
        return {
            "score": pred.score, "raw_score": pred.raw_score, "map_max": pred.map_max,
            "decision": pred.decision, "threshold": detector.threshold, "object": text,
            "object_source": source, "domain": dom.value, "width": pil.width, "height": pil.height,
            "heatmap": data_url(Image.fromarray(heatmap_rgb(unit), mode="RGB")),
            "overlay": data_url(overlay(shown, unit)),
            "mask": data_url(mask_image(amap >= pixel_threshold)) if pixel_threshold is not None else None,
            "references": int(pred.extra.get("references", 0)),
            "zero_shot_score": _opt_float(pred.extra.get("zero_shot_score")),
            "few_shot_map_max": _opt_float(pred.extra.get("few_shot_map_max")),
            "elapsed_ms": round((time.perf_counter() - start) * 1000.0, 1),
        }

    from .references import add_reference_routes

    add_reference_routes(app, detector, lock, ApiError, CONTENT_TYPES, decode_upload, max_upload_bytes, max_pixels)

    app.state.detector = detector
    app.state.lock = lock
    return app
