"""Old module paths (before the layered layout) keep working, with a warning naming the new one."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module -> new module
MOVED = {
    **{f"moeclip.{m}": f"moeclip.model.{m}" for m in (
        "backbone", "router", "experts", "fofs", "moe", "paa", "projections", "prompts", "text",
        "losses", "scoring", "config", "checkpoint")},
    "moeclip.detector": "moeclip.inference.detector",
    "moeclip.deploy": "moeclip.inference.deploy",
    "moeclip.export_onnx": "moeclip.inference.onnx",
    "moeclip.serve": "moeclip.inference.serve",
    "moeclip.serve.app": "moeclip.inference.serve.app",
    "moeclip.overlay": "moeclip.analysis.overlay",
    "moeclip.explain": "moeclip.analysis.explain",
    "moeclip.viz": "moeclip.analysis.viz",
    "moeclip.report": "moeclip.analysis.report",
    "moeclip.ablate": "moeclip.analysis.ablate",
    "moeclip.demo": "moeclip.engine.demo",
    "moeclip.data.io": "moeclip.data.imageio",
    "moeclip.metrics.evaluate": "moeclip.metrics.protocol",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before the path finder, which would load a second copy
