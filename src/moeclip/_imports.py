"""Import torchvision and open_clip; in the ``moeclip`` command's own process, without the
sub-packages moeclip never uses.

``import torchvision`` executes ``torchvision.models``, ``.ops`` and ``.datasets``, and ``ops``
imports ``torch._dynamo``: 1 to 4 s, most of the start-up of ``moeclip demo`` or ``predict`` on a
small CPU. moeclip uses ``torchvision.transforms`` only (open_clip also imports one class from
``torchvision.ops.misc``). After :func:`defer_heavy_imports` (called by the command line's entry
point, which owns its process, and by nothing else), :func:`light_torchvision` imports
torchvision with those three packages created as placeholders that carry their real
``__path__`` (so their submodules import as usual) and run their real ``__init__`` in place the
first time any other attribute is asked for: code that uses them works unchanged, it pays for
them when it does. In any other process (a user's program or notebook that imports moeclip) the
imports are the ordinary ones: a library does not rewire another package's modules. Nothing
changes either when torchvision was imported before.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types

DEFERRED = ("torchvision.models", "torchvision.ops", "torchvision.datasets")

_lock = threading.RLock()
_LOADER_KEY = "_moeclip_deferred_loader"
_defer = False  # set by defer_heavy_imports (the moeclip command's process only)


def defer_heavy_imports() -> None:
    """From now on, import torchvision and open_clip with their unused packages deferred.

    For the ``moeclip`` command's entry point only: it changes what later imports of
    ``torchvision.models/ops/datasets`` and ``timm`` return in this process.
    """
    global _defer
    _defer = True


class _DeferredPackage(types.ModuleType):
    """A package whose ``__init__`` runs on the first attribute it does not have yet."""

    def __getattr__(self, name: str):
        with _lock:  # re-entrant: the package's own __init__ may look itself up while it runs
            loader = self.__dict__.pop(_LOADER_KEY, None)
            if loader is not None:
                loader.exec_module(self)  # the real package code, in this module object
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None


class _DeferredLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader):
        self.real = real

    def create_module(self, spec):
        return _DeferredPackage(spec.name)

    def exec_module(self, module) -> None:
        module.__dict__[_LOADER_KEY] = self.real


class _DeferringFinder(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not spec.submodule_search_locations:
            return None
        spec.loader = _DeferredLoader(spec.loader)
        return spec


def light_torchvision() -> None:
    """Import torchvision; after :func:`defer_heavy_imports`, deferring ``models``, ``ops`` and ``datasets``."""
    if "torchvision" in sys.modules:
        return
    if not _defer:
        import torchvision  # noqa: F401
        return
    with _deferring(*DEFERRED):
        import torchvision  # noqa: F401


@contextlib.contextmanager
def _deferring(*names: str):
    """While inside, a first import of one of ``names`` gives a deferred package."""
    with _lock:
        finder = _DeferringFinder(names)
        sys.meta_path.insert(0, finder)
        try:
            yield
        finally:
            sys.meta_path.remove(finder)


def import_open_clip():
    """``import open_clip``; after :func:`defer_heavy_imports`, with the ``timm`` package deferred too.

    open_clip imports timm for its timm-based towers (ConvNeXt, EVA: not ViTs moeclip can adapt),
    and ``timm`` imports ``timm.models`` and with it ``torch._dynamo``. The ``timm.layers`` classes
    open_clip names at import time still load; ``timm`` itself runs on first use.
    """
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    light_torchvision()
    if not _defer:
        import open_clip
        return open_clip
    with _deferring("timm"):
        import open_clip
    return open_clip
