"""FastAPI app: ``POST /predict`` (multipart image + object), ``GET /health``, ``GET /`` (the page).

A thin caller of the pipeline: uploads are decoded by :func:`moeclip.inference.pipeline.decode`
(EXIF orientation applied, as ``predict`` reads files), scored by
:func:`~moeclip.inference.pipeline.score_images` and drawn by :mod:`moeclip.inference.render`.

Uploads are checked before the model sees them: size (``max_upload_bytes``, also from the
Content-Length header before the body is parsed), declared content type (an image type, or
``application/octet-stream`` as curl sends for WebP/TIFF), decoder (only the formats ``predict``
reads, :data:`~moeclip.data.imageio.IMAGE_FORMATS`: PNG, JPEG, BMP, TIFF, WebP, GIF; no other
Pillow plugin ever parses user data) and pixel count (``max_pixels``, read from the header before
decoding, which stops decompression bombs). Errors are JSON ``{"error": <code>, "detail":
<message>}`` with status 401 (API key missing or wrong), 411 (no Content-Length: chunked bodies
could not be bounded before spooling), 413 (too large), 415 (not a supported image type), 422
(undecodable image, bad field) or 500; under load 503 (queue full, with ``Retry-After``) and 504
(no result within the request timeout).

With ``api_key``, every POST, ``GET /metrics`` and ``GET /references`` need ``Authorization: Bearer <key>`` (compared
in constant time); ``/health``, ``/ready``, the page and the API docs stay open.

The model runs in one worker under one lock (PyTorch modules are not guaranteed re-entrant, and
one forward already uses every core); requests reach it through the batching queue of
:mod:`.batching` (or, on Ray Serve, ``@serve.batch``: :mod:`moeclip.integrations.ray_serve`).
``/health`` is the liveness check; ``/ready`` answers 200 once the model has run one warm-up
forward, 503 before and while draining. ``/metrics`` and the access log: :mod:`.observe`. The
text-feature cache is bounded by clearing it after ``max_objects`` distinct descriptions, so a
client cannot grow memory without limit.
"""
# no "from __future__ import annotations": FastAPI must see the real types of the endpoint
# parameters, which are imported inside create_app (FastAPI is an optional dependency).
import asyncio
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Dict, Optional

from PIL import Image

from ... import __version__
from ...data.imageio import IMAGE_FORMATS, ImageTooLarge, UnsupportedImage
from ...errors import MoECLIPError
from ...model.domain import Domain
from ...model.prompts import GENERIC_OBJECT
from ..deploy import Deployment
from ..pipeline import decode, score_images
from ..postprocess import resize_map
from ..render import data_url, heatmap_rgb, mask_image, overlay
from .batching import Batcher, BatchOptions, DeadlineExceeded, QueueFull
from .observe import Metrics, access_logger, log_access, request_id

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_DISPLAY_SIDE = 1024
MAX_OBJECT_CHARS = 200
#: Declared content types accepted for the upload (the decoder then decides what it really is).
CONTENT_TYPES = frozenset({
    "image/png", "image/x-png", "image/jpeg", "image/jpg", "image/pjpeg", "image/bmp", "image/x-bmp",
    "image/x-ms-bmp", "image/tiff", "image/tif", "image/webp", "image/gif", "application/octet-stream", ""})
#: The Pillow decoders tried on an upload: exactly those predict reads.
PIL_FORMATS = tuple(IMAGE_FORMATS)
FORMAT_NAMES = "PNG, JPEG, BMP, TIFF, WebP, GIF"


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> 8-bit RGB PIL image as a viewer shows it, or ApiError (413, 415, 422)."""
    if not data:
        raise ApiError(422, "empty_file", "the uploaded file is empty")
    try:
        return decode(data, max_pixels)
    except ImageTooLarge as exc:
        raise ApiError(413, "too_many_pixels", str(exc)) from None
    except UnsupportedImage:
        raise ApiError(415, "unsupported_image", f"not a {FORMAT_NAMES} image") from None
    except MoECLIPError as exc:
        raise ApiError(422, "invalid_image", str(exc)) from None


def _few_shot_fields(extra: Dict[str, Any]) -> Dict[str, Any]:
    """``/predict``'s few-shot fields from a runtime's extras (0 / None when zero-shot)."""
    def opt(value):
        return None if value is None else float(value)

    return {"references": int(extra.get("references", 0)), "zero_shot_score": opt(extra.get("zero_shot_score")),
            "few_shot_map_max": opt(extra.get("few_shot_map_max"))}


def _page() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


def bearer_ok(header: Optional[str], api_key: str) -> bool:
    """``Authorization: Bearer <api_key>``, compared in constant time."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Service:
    """The scoring behind ``/predict``: a Detector's runtime and post-processing, under one lock."""

    def __init__(self, detector, pixel_threshold: Optional[float], max_display_side: int, max_objects: int):
        self.detector = detector
        self.runtime = detector.runtime()  # few-shot when the detector has reference banks
        self.post = detector.post_processor()
        if pixel_threshold is not None:
            self.post.pixel_threshold = pixel_threshold
        self.max_display_side = max_display_side
        self.max_objects = max_objects
        self.lock = threading.Lock()
        self.seen_objects: set = set()
        self.ready = threading.Event()  # set after the warm-up forward
        self.on_batch = None            # called with each batch's size (metrics)

    def resolve(self, object: Optional[str], domain: Optional[str]):
        """(object, object source, Domain) of a request, or ApiError 422."""
        text = (object or "").strip()
        if len(text) > MAX_OBJECT_CHARS:
            raise ApiError(422, "invalid_object", f"object description longer than {MAX_OBJECT_CHARS} characters")
        if text:
            source = "form"
        elif self.detector.object:
            text, source = self.detector.object, "default"
        else:
            text, source = GENERIC_OBJECT, "generic"
        try:
            dom = Domain.parse(domain) if domain and domain.strip() else self.detector.domain
        except ValueError as exc:
            raise ApiError(422, "invalid_domain", str(exc)) from None
        return text, source, dom

    def score_batch(self, key, images):
        """Images of one (object, domain value) key -> their Scored results: one forward."""
        object, domain = key
        with self.lock:
            if object not in self.seen_objects:
                if len(self.seen_objects) >= self.max_objects:
                    self.runtime.clear_cache()
                    self.seen_objects.clear()
                self.seen_objects.add(object)
            results = score_images(self.runtime, self.post, images, object, domain)
        if self.on_batch is not None:
            self.on_batch(len(images))
        return results

    def warm_up(self) -> None:
        """One forward on a grey image (lazy initialisation, text features), then ready."""
        side = int(self.detector.image_size)
        with self.lock:
            score_images(self.runtime, self.post, [Image.new("RGB", (side, side), (128, 128, 128))],
                         self.detector.object or GENERIC_OBJECT, self.detector.domain.value)
        self.ready.set()

    def pictures(self, image: Image.Image, amap) -> Dict[str, Optional[str]]:
        """Heat map, overlay and mask as PNG data URLs, scaled to at most ``max_display_side``."""
        side = max(image.width, image.height)
        if side > self.max_display_side:
            scale = self.max_display_side / side
            size = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
            image = image.resize((size[1], size[0]), Image.BILINEAR)
            amap = resize_map(amap, size)
        unit = self.post.unit_map(amap)
        mask = self.post.mask(amap)
        return {"heatmap": data_url(Image.fromarray(heatmap_rgb(unit), mode="RGB")),
                "overlay": data_url(overlay(image, unit)), "map_scale": self.post.map_scale,
                "mask": None if mask is None else data_url(mask_image(mask))}


def _schemas():
    from pydantic import BaseModel, Field

    class PredictResponse(BaseModel):
        score: float = Field(description="image anomaly score in [0, 1]")
        raw_score: float = Field(description="raw image score (c_abnormal + 1) / 2")
        map_max: float = Field(description="maximum of the raw anomaly map")
        decision: Optional[bool] = Field(None, description="score >= threshold, when a threshold is set")
        threshold: Optional[float] = None
        object: str
        object_source: str = Field(description="form, default (deployment/--object) or generic")
        domain: str
        width: int = Field(description="width of the image as a viewer shows it (EXIF orientation applied)")
        height: int
        heatmap: str = Field(description="PNG data URL of the heat map")
        overlay: str = Field(description="PNG data URL of the heat map over the image")
        map_scale: str = Field(description="colours of heat map and overlay: 'calibrated' (the deployment's "
                                           "bounds, comparable across images) or 'per-image' (this map's own "
                                           "range: red is this image's most anomalous region)")
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
        auth: bool = Field(description="POST /predict needs 'Authorization: Bearer <key>'")

    return PredictResponse, Health


def _error(status: int, code: str, detail: Any, headers: Optional[Dict[str, str]] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.code, exc.detail, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http_error", exc.detail)


def overloaded(exc: Exception) -> ApiError:
    return ApiError(503, "overloaded", f"{exc}; retry later", headers={"Retry-After": "1"})


def _install_gate(app, max_upload_bytes: int, api_key: Optional[str], queue) -> None:
    """Refuse unauthorised, oversized and (queue full) overflowing POSTs before multipart parsing
    spools their bodies; ``GET /metrics`` and ``GET /references`` need the key too."""
    from fastapi import Request

    @app.middleware("http")
    async def _gate(request: Request, call_next):
        protected = request.method == "POST" or request.url.path in ("/metrics", "/references")
        if not protected:
            return await call_next(request)
        if api_key and not bearer_ok(request.headers.get("authorization"), api_key):
            return _error(401, "unauthorized", "send the API key as 'Authorization: Bearer <key>'",
                          headers={"WWW-Authenticate": 'Bearer realm="moeclip"'})
        if request.method != "POST":
            return await call_next(request)
        if request.url.path == "/predict" and queue.full():
            exc = overloaded(QueueFull(f"the queue is full ({queue.max_queue} requests waiting)"))
            return _error(exc.status, exc.code, exc.detail, headers=exc.headers)
        length = request.headers.get("content-length")
        if length is None:
            return _error(411, "length_required", "send a Content-Length header (chunked uploads are not accepted)")
        try:
            too_big = int(length) > max_upload_bytes + 64 * 1024  # multipart envelope allowance
        except ValueError:
            return _error(400, "bad_request", "invalid Content-Length header")
        if too_big:
            return _error(413, "file_too_large", f"request body over the limit of {max_upload_bytes} bytes")
        return await call_next(request)


def _install_observer(app, metrics: Metrics, access_log: bool) -> None:
    """Outermost: request id (``X-Request-ID``), metrics and one access-log line for every response."""
    from fastapi import Request

    logger = access_logger() if access_log else None

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        rid = request_id(request.headers.get("x-request-id"))
        try:
            response = await call_next(request)
        except Exception:  # a bug, not bad input: logged with its trace, answered in JSON
            log.exception("request %s failed", rid)
            response = _error(500, "internal_error", f"internal error (request id {rid})")
        response.headers["X-Request-ID"] = rid
        seconds = time.perf_counter() - start
        metrics.observe(request.url.path, response.status_code, seconds)
        if logger is not None:
            extra = getattr(request.state, "access", None) or {}
            log_access(logger, rid, request.method, request.url.path, response.status_code, seconds, extra)
        return response


def _read_upload(image, max_upload_bytes: int, max_pixels: int) -> Image.Image:
    ctype = (image.content_type or "").split(";")[0].strip().lower()
    if ctype not in CONTENT_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype or 'missing'!r} is not an image type this service reads ({FORMAT_NAMES})")
    data = image.file.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise ApiError(413, "file_too_large", f"file over the limit of {max_upload_bytes} bytes")
    return decode_upload(data, max_pixels)


def _add_operations_routes(app, service: Service, metrics: Metrics) -> None:
    """``GET /ready`` and ``GET /metrics``."""
    from fastapi.responses import Response

    @app.get("/ready", responses={503: {"description": "loading, warming up or shutting down"}})
    def ready() -> Dict[str, Any]:
        """200 once the model is loaded and warmed up (route traffic here); 503 before and while draining."""
        if app.state.draining:
            raise ApiError(503, "draining", "the service is shutting down")
        if not service.ready.is_set():
            raise ApiError(503, "not_ready", "the model is loading or warming up")
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response, responses={401: {"description": "API key missing or wrong"}})
    def metrics_route() -> Response:
        """Prometheus text format: requests by route and status, latency, batch sizes, queue depth, load time."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(detector, deployment: Optional[Deployment] = None, *, pixel_threshold: Optional[float] = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_display_side: int = DEFAULT_MAX_DISPLAY_SIDE, max_objects: int = 256,
               api_key: Optional[str] = None, batching: Optional[BatchOptions] = None, queue=None,
               load_seconds: Optional[float] = None, access_log: bool = True):
    """The app around a loaded :class:`~moeclip.inference.detector.Detector`.

    ``deployment`` (already applied to the detector, e.g. by :meth:`Detector.from_deployment`) provides
    the pixel threshold for masks unless ``pixel_threshold`` is given. Returned pictures are
    scaled down to ``max_display_side`` pixels; scores are computed at full resolution.
    ``api_key``: require ``Authorization: Bearer <api_key>`` on POSTs, ``/metrics`` and ``/references``.
    ``batching``: queue and batch limits (:class:`.batching.BatchOptions`). ``queue``: a factory
    ``queue(service) -> object`` with the :class:`.batching.Batcher` interface (``submit_async``,
    ``full``, ``depth``, ``max_queue``, ``start``, ``close``) that replaces the in-process batcher
    (Ray Serve's ``@serve.batch``). ``load_seconds``: reported as ``moeclip_model_load_seconds``.
    """
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import HTMLResponse
    from starlette.concurrency import run_in_threadpool

    if pixel_threshold is None and deployment is not None:
        pixel_threshold = deployment.pixel_threshold
    options = batching or BatchOptions()
    service = Service(detector, pixel_threshold, max_display_side, max_objects)
    queue = queue(service) if queue is not None else Batcher.from_options(service.score_batch, options)
    metrics = Metrics(lambda: queue.depth)
    metrics.ready.set_function(lambda: float(service.ready.is_set() and not app.state.draining))
    if load_seconds is not None:
        metrics.load_seconds.set(load_seconds)
    service.on_batch = metrics.batch_size.observe
    PredictResponse, Health = _schemas()

    def warm_up() -> None:
        try:
            service.warm_up()
        except Exception:  # stays unready (/ready 503); the log says why
            log.exception("warm-up forward failed")

    @asynccontextmanager
    async def lifespan(app):
        queue.start()
        if not service.ready.is_set():
            threading.Thread(target=warm_up, name="moeclip-warm-up", daemon=True).start()
        yield
        app.state.draining = True
        await run_in_threadpool(queue.close, options.drain_timeout_s)

    app = FastAPI(title="MoECLIP anomaly detection", version=__version__, lifespan=lifespan,
                  description="Zero-shot anomaly detection: upload an image, name the object, get an "
                              "anomaly score and heat map.")
    app.state.draining = False
    _install_error_handlers(app)
    _install_gate(app, max_upload_bytes, api_key, queue)
    _install_observer(app, metrics, access_log)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _page()

    @app.get("/health", response_model=Health)
    def health() -> Dict[str, Any]:
        return {"status": "ok", "version": __version__, "object": detector.object, "domain": detector.domain.value,
                "threshold": detector.threshold, "pixel_threshold": service.post.pixel_threshold,
                "image_size": int(detector.image_size), "device": str(detector.device),
                "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "auth": bool(api_key)}

    async def score(pil: Image.Image, text: str, dom: Domain, deadline: float):
        try:
            return await asyncio.wait_for(queue.submit_async((text, dom.value), pil, deadline),
                                          max(0.0, deadline - time.monotonic()))
        except QueueFull as exc:
            raise overloaded(exc) from None
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise ApiError(504, "timeout", f"no result within {options.request_timeout_s:g} s "
                                           "(--request-timeout-s)") from None

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=False,
              responses={401: {"description": "API key missing or wrong"},
                         413: {"description": "file or image too large"},
                         415: {"description": "not a supported image type"},
                         422: {"description": "invalid image or field"},
                         503: {"description": "queue full (Retry-After) or shutting down"},
                         504: {"description": "no result within the request timeout"}})
    async def predict(request: Request, image: UploadFile = File(..., description=f"{FORMAT_NAMES} image"),
                      object: Optional[str] = Form(None, description="object description, e.g. 'metal nut'"),
                      domain: Optional[str] = Form(None, description="industrial or medical")) -> Dict[str, Any]:
        start = time.perf_counter()
        deadline = time.monotonic() + options.request_timeout_s
        pil = await run_in_threadpool(_read_upload, image, max_upload_bytes, max_pixels)
        text, source, dom = service.resolve(object, domain)
        request.state.access = access = {"object": text}
        scored, access["batch_size"] = await score(pil, text, dom, deadline)
        pictures = await run_in_threadpool(service.pictures, pil, scored.anomaly_map)
        return {"score": scored.score, "raw_score": scored.raw_score, "map_max": scored.map_max,
                "decision": scored.decision, "threshold": service.post.threshold, "object": text,
                "object_source": source, "domain": dom.value, "width": pil.width, "height": pil.height,
                **pictures, **_few_shot_fields(scored.extra),
                "elapsed_ms": round((time.perf_counter() - start) * 1000.0, 1)}

    from .references import add_reference_routes

    add_reference_routes(app, service, ApiError, _read_upload, max_upload_bytes, max_pixels)
    _add_operations_routes(app, service, metrics)
    from .batch import add_batch_route  # POST /predict/batch: several images of one object as one batch

    add_batch_route(app, service, ApiError, _read_upload, max_upload_bytes, max_pixels)

    app.state.detector = detector
    app.state.service = service
    app.state.lock = service.lock
    app.state.queue = queue
    app.state.metrics = metrics
    return app
