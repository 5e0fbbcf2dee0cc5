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


#: old module -> {old name: new "module.name"}: the same object under a new home (forwarded with a warning)
FORWARDED = {
    "moeclip.inference.deploy": {
        "load_detector": "moeclip.inference.deploy.load_deployment_detector",
        "absolute_options": "moeclip.model.options.absolute_options",
        **{n: f"moeclip.inference.postprocess.{n}" for n in (
            "fpr_threshold", "f1_threshold", "rates", "normalize", "unit_map", "resize_map")},
        "final_score": "moeclip.inference.postprocess.image_score",
        "uncalibrated_map_probability": "moeclip.inference.postprocess.map_probability",
        **{n: f"moeclip.inference.render.{n}" for n in ("heatmap_rgb", "overlay", "png_bytes", "save_png", "COLORMAP")},
    },
    "moeclip.inference.detector": {
        "uncalibrated_map_probability": "moeclip.inference.postprocess.map_probability",
    },
}
#: old module -> {old name: what replaces it}: gone, with a different signature (an error says where to go)
REPLACED = {
    "moeclip.inference.deploy": {
        "fit_normalization": "moeclip.inference.postprocess.Normalization.fit(...).to_dict()",
        "mask_image": "moeclip.inference.render.mask_image(moeclip.inference.postprocess.binary_mask(map, t))",
    },
    "moeclip.model.scoring": {"final_image_score": "moeclip.model.domain.Domain.parse(domain).combine"},
    "moeclip.analysis.overlay": {
        "heatmap_rgb": "moeclip.inference.render.heatmap_rgb(map, stretch_each=True)",
        "overlay": "moeclip.inference.render.overlay(image, map, stretch_each=True)",
    },
}


def moved_attribute(module: str, name: str):
    """Module ``__getattr__`` body: forward a moved name, or fail naming its replacement."""
    if name in FORWARDED.get(module, {}):
        new = FORWARDED[module][name]
        warnings.warn(f"{module}.{name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        mod, _, attr = new.rpartition(".")
        return getattr(importlib.import_module(mod), attr)
    if name in REPLACED.get(module, {}):
        raise AttributeError(f"{module}.{name} was replaced by {REPLACED[module][name]}")
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old name as the new module itself (one module object, not a copy)."""

    def __init__(self):
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the import system has just set __spec__ to the alias's: give the module its own back, or a
        # package would stop being one (importlib.resources, submodule imports)
        original = self._specs.pop(module.__spec__.name, None)
        if original is not None:
            module.__spec__ = original


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # before PathFinder: it would run moeclip/serve/app.py as moeclip.serve.app
