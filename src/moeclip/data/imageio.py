"""Image and mask decoding.

Images follow the official MoECLIP loader (``PIL.Image.open(p).convert("RGB")``,
no EXIF transpose, so dataset images and their masks stay aligned), with guards for inputs the
official code mishandles: 16-bit / int32 / float images (``convert`` would clip
them to white) are rescaled to uint8, TIFFs Pillow cannot read go through OpenCV
when it is installed, and any unreadable file becomes a :class:`MoECLIPError`
that names the file.

Masks keep their raw values (palette indices, not palette colours) and are
binarised with ``!= 0`` (``"nonzero"``, the official behaviour, needed for VisA's
1..k labels) or ``> 127`` (``"half"``, for JPEG-derived masks with halos).

User photos (``predict``, ``serve``, the Python API) are read with ``orient=True``: the EXIF
orientation tag is applied, so they are scored and overlaid as a viewer shows them.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import Callable, Optional, Tuple, TypeVar, Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import MoECLIPError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "ImageTooLarge",
    "UnsupportedImage",
    "decode_image_bytes",
    "exif_oriented",
    "MASK_POLICIES",
    "load_image",
    "to_pil_rgb",
    "verify_image",
    "load_mask",
    "binarize_mask",
    "resize_mask",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
SizeLike = Union[int, Tuple[int, int]]
T = TypeVar("T")

#: Pillow raises its own DecompressionBombError at twice ``Image.MAX_IMAGE_PIXELS``
#: (about 179 Mpx); we use the same default so behaviour matches plain Pillow.
DEFAULT_MAX_PIXELS: Optional[int] = 2 * 89_478_485

MASK_POLICIES = ("nonzero", "half")

#: Pillow decoders for user images (predict folders and globs, serve uploads): format -> suffixes.
#: (Pillow's JPEG decoder also reads the multi-picture JPEGs many phones write.)
IMAGE_FORMATS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "BMP": (".bmp",),
                 "TIFF": (".tif", ".tiff"), "WEBP": (".webp",), "GIF": (".gif",)}
#: Lower-case file suffixes taken from folders and globs.
IMAGE_EXTENSIONS = frozenset(ext for exts in IMAGE_FORMATS.values() for ext in exts)

_EXIF_ORIENTATION = 0x0112

# Errors Pillow and its format plugins raise for truncated or malformed files
# (UnidentifiedImageError is an OSError). DecompressionBombError is handled apart.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError)

_TIFF_EXTS = (".tif", ".tiff")
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    """Warn the first time per process; high-bit-depth datasets would otherwise flood the log."""
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s (further occurrences are not reported)", message)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------
# pixel-value conversion
# ---------------------------------------------------------------------------

def _to_uint8(arr: np.ndarray, source: str) -> np.ndarray:
    """Map any numeric array to uint8 without clipping bright images to white.

    uint8 passes through; bool becomes 0/255; integers whose maximum exceeds 255
    are rescaled ``arr / arr.max() * 255`` (integers already within 0..255 are
    kept as they are, which is what Pillow's ``convert`` gives); floats with a
    maximum <= 1 are taken as [0, 1] and multiplied by 255, larger floats are
    treated like integers. Negative values and NaN become 0.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MoECLIPError(f"{source}: unsupported pixel type {arr.dtype}")
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    a = np.clip(a, 0.0, None)
    peak = float(a.max()) if a.size else 0.0
    if np.issubdtype(arr.dtype, np.floating) and peak <= 1.0:
        a = a * 255.0
    elif peak > 255.0:
        _warn_once(f"rescale:{arr.dtype}",
                   f"{source}: {arr.dtype} pixels up to {peak:g} rescaled to 8 bit "
                   f"(arr / max * 255) instead of being clipped to white")
        a = a / peak * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image, source: str) -> Image.Image:
    """``convert("RGB")`` as the official code, except for high-bit-depth modes."""
    if img.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(img), source), mode="L").convert("RGB")
    # RGBA/LA/PA: alpha dropped (not composited); P: palette applied; L/1: replicated.
    return img.convert("RGB")


def exif_oriented(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation tag applied (the image itself if none)."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _oriented_rgb(img: Image.Image, source: str) -> Image.Image:
    return _pil_to_rgb(exif_oriented(img), source)


def to_pil_rgb(x, source: str = "<array>", orient: bool = False) -> Image.Image:
    """Return an 8-bit RGB PIL image from a PIL image or a numpy array.

    Arrays may be HxW, HxWx1, HxWx3 (RGB order) or HxWx4 (alpha dropped), of
    dtype uint8, uint16/int (rescaled if above 255), bool, or float in [0, 1].
    ``orient`` applies a PIL image's EXIF orientation tag (arrays have none).
    """
    if isinstance(x, Image.Image):
        return _oriented_rgb(x, source) if orient else _pil_to_rgb(x, source)
    if not isinstance(x, np.ndarray):
        raise MoECLIPError(f"{source}: expected a PIL image or numpy array, got {type(x).__name__}")
    if x.ndim == 3 and x.shape[2] in (1, 3, 4):
        x = x[..., 0] if x.shape[2] == 1 else x[..., :3]
    elif x.ndim != 2:
        raise MoECLIPError(f"{source}: array of shape {x.shape} is not an image "
                           f"(expected HxW, HxWx1, HxWx3 or HxWx4)")
    if 0 in x.shape:
        raise MoECLIPError(f"{source}: empty image of shape {x.shape}")
    a = np.ascontiguousarray(_to_uint8(x, source))
    if a.ndim == 2:
        return Image.fromarray(a, mode="L").convert("RGB")
    return Image.fromarray(a, mode="RGB")


# ---------------------------------------------------------------------------
# opening files
# ---------------------------------------------------------------------------

class ImageTooLarge(MoECLIPError):
    """More pixels than allowed (a possible decompression bomb)."""


class UnsupportedImage(MoECLIPError):
    """Data that none of the allowed decoders recognises."""


def _check_pixels(width: int, height: int, path: str, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{path}: image of {width}x{height} pixels exceeds the limit of "
                           f"{max_pixels} pixels (possible decompression bomb; raise max_pixels "
                           f"if the file is genuine)")


def _cv2_read(path: str) -> Optional[np.ndarray]:
    """Decode a TIFF with OpenCV (as AdaCLIP does); None if cv2 is absent or fails.

    Returns channels in RGB(A) order. ``imdecode`` from bytes also copes with
    non-ASCII paths, which ``cv2.imread`` does not on Windows.
    """
    if not path.lower().endswith(_TIFF_EXTS):
        return None
    try:
        import cv2  # optional; not a dependency
    except ImportError:
        return None
    try:
        arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except Exception:  # noqa: BLE001 - any cv2 failure just means "no fallback"
        return None
    if arr is None or arr.size == 0:
        return None
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(arr)


def _decode(path: PathLike, kind: str, max_pixels: Optional[int],
            from_pil: Callable[[Image.Image, str], T],
            from_array: Callable[[np.ndarray, str], T], verify: bool = False) -> T:
    """Fully decode ``path`` with Pillow (else OpenCV, for TIFF) and convert it.

    ``from_pil`` runs while the file is open, so the decoded pixels are not
    copied once more just to detach them. ``verify``: Pillow's ``verify()`` instead of
    decoding (and no warning when OpenCV reads what Pillow could not). Raises MoECLIPError
    naming the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MoECLIPError(f"{kind} file not found: {path}")
    if os.path.isdir(path):
        raise MoECLIPError(f"{kind} path is a directory, not a file: {path}")
    try:
        with Image.open(path) as im:
            _check_pixels(im.width, im.height, path, max_pixels)
            if verify:
                im.verify()
            else:
                im.load()
            return from_pil(im, path)
    except MoECLIPError:
        raise
    except Image.DecompressionBombError as exc:  # never retry a bomb with another decoder
        raise MoECLIPError(f"cannot read {kind} file {path}: {_reason(exc)}") from exc
    except _READ_ERRORS as exc:
        arr = _cv2_read(path)
        if arr is None:
            raise MoECLIPError(f"cannot read {kind} file {path}: {_reason(exc)}") from exc
        if not verify:
            _warn_once(f"cv2:{kind}", f"{path}: Pillow failed ({_reason(exc)}); decoded with OpenCV")
        _check_pixels(arr.shape[1], arr.shape[0], path, max_pixels)
        return from_array(arr, path)


def load_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, orient: bool = False) -> Image.Image:
    """Decode an image file to 8-bit RGB, as the official ``open(...).convert("RGB")``.

    ``max_pixels`` (None disables the check; Pillow's own limit still applies)
    rejects decompression bombs before any pixel data is decoded. ``orient`` applies the
    EXIF orientation tag (user photos; never for dataset images, whose masks are not rotated).
    """
    return _decode(path, "image", max_pixels, _oriented_rgb if orient else _pil_to_rgb, to_pil_rgb)


def decode_image_bytes(data: bytes, source: str = "upload", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                       formats=tuple(IMAGE_FORMATS), orient: bool = True) -> Image.Image:
    """Bytes (e.g. an upload) -> oriented 8-bit RGB, trying only the Pillow decoders in ``formats``.

    Errors are :class:`MoECLIPError` naming ``source``: :class:`UnsupportedImage` (not one of
    ``formats``), :class:`ImageTooLarge` (pixel limit, decompression bomb), plain for broken data.
    """
    import io

    if not data:
        raise MoECLIPError(f"{source}: the file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            _check_pixels(im.width, im.height, source, max_pixels)
            im.load()
            return _oriented_rgb(im, source) if orient else _pil_to_rgb(im, source)
    except MoECLIPError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{source}: {exc}") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedImage(f"{source}: not a {', '.join(formats)} image") from None
    except Exception as exc:  # noqa: BLE001 - truncated or malformed data: Pillow raises many types
        raise MoECLIPError(f"{source}: cannot decode the image ({_reason(exc)})") from None


def verify_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> None:
    """Cheap integrity check (header, size, Pillow ``verify()``) without decoding pixels.

    ``verify()`` checks structure (e.g. PNG chunk CRCs) but not every truncation
    (JPEG); a file passing here can still fail in :func:`load_image`.
    """
    _decode(path, "image", max_pixels, lambda im, p: None, lambda a, p: None, verify=True)


# ---------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------

def _mask_values(data, source: str) -> np.ndarray:
    """Raw 2-D mask values: palette indices for ``P``, channel max for colour masks.

    ``convert("L")`` is avoided for palettes because luminance can map a non-zero
    index (e.g. a dark label colour) to 0. Alpha channels are ignored.
    """
    if isinstance(data, Image.Image):
        mode = data.mode
        if mode in ("1", "L", "P") or mode in _HIGH_DEPTH_MODES:
            arr = np.asarray(data)
        elif mode in ("LA", "PA", "La"):
            arr = np.asarray(data)[..., 0]
        elif mode in ("RGB", "RGBA", "RGBX", "RGBa"):
            arr = np.asarray(data)[..., :3].max(axis=2)
        else:  # CMYK, YCbCr, LAB, HSV: rare; luminance is the only sensible reduction.
            arr = np.asarray(data.convert("L"))
    else:
        arr = np.asarray(data)
        if arr.ndim == 3:
            arr = arr[..., 0] if arr.shape[2] in (1, 2) else arr[..., :3].max(axis=2)
    if arr.ndim != 2:
        raise MoECLIPError(f"{source}: mask of shape {arr.shape} is not 2-D")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    return arr


def binarize_mask(values: np.ndarray, policy: str = "nonzero") -> np.ndarray:
    """Binarise raw mask values: ``!= 0`` (``"nonzero"``) or above half range (``"half"``).

    ``"half"`` is ``> 127`` for 8-bit data (and other types) and ``> 32767`` for
    uint16, so 0/65535 masks behave like 0/255 ones.
    """
    if policy == "nonzero":
        return np.asarray(values) != 0
    if policy == "half":
        values = np.asarray(values)
        if values.dtype == np.bool_:
            return values.copy()
        is_u16 = values.dtype.kind == "u" and values.dtype.itemsize == 2  # any byte order
        threshold = 32767 if is_u16 else 127
        return values > threshold
    raise MoECLIPError(f"unknown mask policy {policy!r}; choose one of {', '.join(MASK_POLICIES)}")


def _as_hw(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_mask(mask: np.ndarray, size: SizeLike) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to ``size`` (int or (H, W)).

    Uses Pillow's NEAREST, the resampler torchvision's ``Resize`` applies to the
    official PIL masks, so pixel selection matches the official pipeline.
    """
    h, w = _as_hw(size)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (h, w):
        return mask.copy()
    img = Image.fromarray(mask.astype(np.uint8), mode="L")
    return np.asarray(img.resize((w, h), Image.NEAREST)) != 0


def load_mask(path: PathLike, size: Optional[SizeLike] = None, policy: str = "nonzero",
              max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask file to a boolean (H, W) array, optionally nearest-resized to ``size``.

    ``size`` is an int (square) or (H, W). Binarising before the nearest resize
    equals the official resize-then-``!= 0`` order (a pointwise threshold
    commutes with nearest sampling).
    """
    if policy not in MASK_POLICIES:
        raise MoECLIPError(f"unknown mask policy {policy!r}; choose one of {', '.join(MASK_POLICIES)}")
    values = _decode(path, "mask", max_pixels, _mask_values, _mask_values)
    mask = binarize_mask(values, policy)
    return mask if size is None else resize_mask(mask, size)
