"""Checkpoints: our safetensors + JSON format, and the official ``.pth`` format (read, convert, write).

Our format is a directory (or the pair of files inside it)::

    CKPT/config.json          {"format": "moeclip", "version", "model": {backbone, adapter}, "meta": {...}}
    CKPT/adapters.safetensors the adapter weights (FOFS matrices included)

``config.json`` alone rebuilds the model: backbone name/config and weight source, every
adapter hyper-parameter. Writes are atomic (temporary files, then rename).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .. import __version__
from ..errors import MoECLIPError
from ..fileio import atomic_write, atomic_write_text
from .config import AdapterConfig, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "adapters.safetensors"
CLIP_WEIGHTS_FILE = "clip.safetensors"
CLIP_CONFIG_FILE = "clip_config.json"
FORMAT = "moeclip"


# ---------------------------------------------------------------------------- official names
#: Our name and the official name of every non-expert adapter parameter, in both directions.
#: ``{n}`` a layer index, ``{wb}`` weight|bias; ``{fc}`` the official linear layer, read as
#: ``fc`` or ``fc.0`` (with ReLU) and written as ``relu`` says; ``{fc0}`` read the same, always written ``fc.0``.
_NAMES = (
    ("moe.{n}.router.gate.weight", "image_adapter.moe_adapters.{n}.gate.weight"),
    ("seg_proj.{n}.proj.weight", "image_adapter.seg_proj.{n}.{fc}.weight"),
    ("det_proj.norm.{wb}", "image_adapter.det_proj.ln.{wb}"),
    ("det_proj.dwconv.weight", "image_adapter.det_proj.adapter.0.weight"),
    ("det_proj.pwconv.weight", "image_adapter.det_proj.adapter.2.weight"),
    ("text.adapter.proj.weight", "text_adapter.0.{fc0}.weight"),
)
_FIELDS = {"n": r"(?P<n>\d+)", "wb": r"(?P<wb>weight|bias)", "fc": r"fc(?:\.0)?", "fc0": r"fc(?:\.0)?"}


def _pattern(template: str) -> "re.Pattern[str]":
    """A name template of :data:`_NAMES` as a regular expression (fields as in :data:`_FIELDS`)."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, ...
    return re.compile("".join(_FIELDS[p] if i % 2 else re.escape(p) for i, p in enumerate(parts)))


_OURS = [(_pattern(ours), official) for ours, official in _NAMES]
_OFFICIAL = [(_pattern(official), ours) for ours, official in _NAMES]


def official_to_ours(state: Dict[str, torch.Tensor], source: str = "official checkpoint") -> Dict[str, torch.Tensor]:
    """Map the official parameter names (``image_adapter.*``, ``text_adapter.*``) to ours.

    Per-expert LoRA matrices are stacked into (E, r, d) / (E, d, r) tensors.
    """
    ours: Dict[str, torch.Tensor] = {}
    experts: Dict[Tuple[int, str], Dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"image_adapter\.moe_adapters\.(\d+)\.experts\.(\d+)\.(lora_[AB])\.weight", key)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = value
            continue
        for pattern, name in _OFFICIAL:
            m = pattern.fullmatch(key)
            if m:
                ours[name.format(**m.groupdict())] = value
                break
        else:
            if key.startswith("image_adapter.") or key.startswith("text_adapter."):
                raise MoECLIPError(f"{source}: unknown official parameter {key!r}")
    for (layer, kind), per_expert in experts.items():
        n = len(per_expert)
        if sorted(per_expert) != list(range(n)):
            raise MoECLIPError(f"{source}: MoE layer {layer} has experts {sorted(per_expert)}")
        ours[f"moe.{layer}.experts.{kind}"] = torch.stack([per_expert[e] for e in range(n)])
    return ours


def ours_to_official(state: Dict[str, torch.Tensor], relu: bool = False) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_ours` (also used to compare gradients with the reference)."""
    out: Dict[str, torch.Tensor] = {}
    seg = "fc.0" if relu else "fc"
    for key, value in state.items():
        m = re.fullmatch(r"moe\.(\d+)\.experts\.(lora_[AB])", key)
        if m:
            for e in range(value.shape[0]):
                out[f"image_adapter.moe_adapters.{m[1]}.experts.{e}.{m[2]}.weight"] = value[e]
            continue
        for pattern, name in _OURS:
            m = pattern.fullmatch(key)
            if m:
                out[name.format(fc=seg, fc0="fc.0", **m.groupdict())] = value
                break
        else:
            raise KeyError(f"no official name for {key!r}")
    return out


def read_official(path: str | Path) -> Dict[str, Any]:
    """The official ``{"epoch", "text_adapter", "image_adapter"}`` file, loaded weights-only."""
    path = Path(path)
    if not path.is_file():
        raise MoECLIPError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MoECLIPError(f"{path}: not a weights-only torch checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "image_adapter" not in ckpt:
        raise MoECLIPError(f"{path}: not an official MoECLIP checkpoint (no 'image_adapter' entry)")
    state = {f"image_adapter.{k}": v for k, v in ckpt["image_adapter"].items()}
    state.update({f"text_adapter.{k}": v for k, v in ckpt.get("text_adapter", {}).items()})
    return {"epoch": ckpt.get("epoch"), "state": official_to_ours(state, str(path)),
            "adapt_text": "text_adapter" in ckpt}


# ---------------------------------------------------------------------------- our format
def save_checkpoint(model, directory: str | Path, meta: Optional[Dict[str, Any]] = None,
                    overwrite: bool = False, include_backbone: bool = False) -> Path:
    """Write ``config.json`` + ``adapters.safetensors`` atomically into ``directory``.

    ``include_backbone`` also stores the CLIP weights (and its model config, when it came
    from a JSON file) inside the checkpoint, referenced by relative paths: for random or
    custom CLIPs that no tag can rebuild (the demo, tests). Pretrained tags need not.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if (directory / WEIGHTS_FILE).exists() and not overwrite:
        raise MoECLIPError(f"{directory}: a checkpoint already exists there (use --overwrite to replace it)")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.adapter_state_dict().items()}
    model_doc = model.config.to_dict()
    if include_backbone:
        if getattr(model, "frozen_dtype", None) is not None:
            raise MoECLIPError(f"{directory}: cannot store the CLIP weights: they were cast to {model.frozen_dtype} "
                               "for low-precision running; save from a model that was not cast")
        clip_state = {k: v.detach().to("cpu").contiguous() for k, v in model.clip.state_dict().items()}
        atomic_write(directory / CLIP_WEIGHTS_FILE, lambda tmp: save_file(clip_state, tmp))
        src = Path(model.config.backbone.model)
        if src.suffix == ".json" and src.is_file():
            atomic_write_text(directory / CLIP_CONFIG_FILE, src.read_text())
            model_doc["backbone"]["model"] = CLIP_CONFIG_FILE
        model_doc["backbone"]["pretrained"] = CLIP_WEIGHTS_FILE
    doc = {"format": FORMAT, "version": __version__, "model": model_doc, "meta": meta or {}}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
    return directory


def read_checkpoint(path: str | Path) -> Tuple[ModelConfig, Dict[str, torch.Tensor], Dict[str, Any]]:
    """(config, adapter state, meta) of one of our checkpoints (a directory or its config.json)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file() and p.name == CONFIG_FILE:
        p = p.parent
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if not p.exists():
        raise MoECLIPError(f"{path}: checkpoint not found")
    cfg_path, w_path = p / CONFIG_FILE, p / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise MoECLIPError(f"{p}: not a moeclip checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise MoECLIPError(f"{cfg_path}: invalid JSON ({exc})") from None
    if doc.get("format") != FORMAT:
        raise MoECLIPError(f"{cfg_path}: not a moeclip checkpoint config (format={doc.get('format')!r})")
    config = ModelConfig.from_dict(doc.get("model", {}), str(cfg_path))
    # files stored inside the checkpoint are referenced relative to it
    for name in ("model", "pretrained"):
        value = getattr(config.backbone, name)
        if value and not Path(value).is_absolute() and (p / value).is_file():
            setattr(config.backbone, name, str(p / value))
    try:
        state = load_file(str(w_path))
    except Exception as exc:
        raise MoECLIPError(f"{w_path}: unreadable safetensors file ({exc})") from None
    return config, state, doc.get("meta", {})


def load_model(path: str | Path, backbone_overrides: Optional[Dict[str, Any]] = None,
               adapter: Optional[AdapterConfig] = None, device: str | torch.device = "cpu",
               adapter_overrides: Optional[Dict[str, Any]] = None):
    """Build an eval-mode model from our checkpoint, or from an official ``.pth`` + hyper-parameters.

    ``backbone_overrides`` replaces fields of the stored backbone config (e.g. a local
    weight file instead of the ``openai`` tag on an offline machine). ``adapter_overrides``
    replaces adapter fields: for an official file they complete ``adapter`` (default: the
    paper's values); for ours they override the stored values, with a warning.
    """
    import dataclasses
    import logging

    from .config import BackboneConfig
    from .moeclip import MoECLIP

    p = Path(path)
    overrides = dict(adapter_overrides or {})
    if p.suffix in (".pth", ".pt"):
        if not p.is_file():
            raise MoECLIPError(f"{p}: checkpoint not found")
        config = ModelConfig(dataclasses.replace(BackboneConfig(), **(backbone_overrides or {})),
                             dataclasses.replace(adapter or AdapterConfig(), **overrides))
        state = read_official(p)["state"]
    else:
        config, state, _ = read_checkpoint(p)
        if backbone_overrides:
            config.backbone = dataclasses.replace(config.backbone, **backbone_overrides)
        changed = {k: v for k, v in overrides.items() if getattr(config.adapter, k) != v}
        if changed:
            logging.getLogger(__name__).warning("%s: overriding trained hyper-parameters %s", p, changed)
            config.adapter = dataclasses.replace(config.adapter, **changed)
    model = MoECLIP.from_config(config)
    model.load_adapter_state_dict(state, str(p))
    return model.to(device).eval()
