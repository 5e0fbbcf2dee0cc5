"""Frozen CLIP through open_clip: architecture by name or JSON config, weights by tag or file."""
from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._imports import import_open_clip
from ..errors import MoECLIPError
from .config import BackboneConfig

log = logging.getLogger(__name__)

_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def _read_model_config(spec: str) -> Dict[str, Any]:
    """open_clip model config dict for an architecture name or a JSON file."""
    open_clip = import_open_clip()

    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.is_file():
            raise MoECLIPError(f"{spec}: model config file not found")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MoECLIPError(f"{spec}: not a readable JSON model config ({exc})") from None
        cfg = cfg.get("clip_config", cfg)  # also accept a file that nests the config
        if "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
            raise MoECLIPError(f"{spec}: an open_clip model config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
        return copy.deepcopy(cfg)
    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        known = ", ".join(n for n in open_clip.list_models() if n.startswith("ViT"))
        raise MoECLIPError(f"unknown CLIP architecture {spec!r} (open_clip ViT models: {known}; "
                           "or pass the path of a JSON model config)")
    return copy.deepcopy(cfg)


def _build_architecture(cfg: BackboneConfig) -> nn.Module:
    CLIP = import_open_clip().model.CLIP

    model_cfg = _read_model_config(cfg.model)
    vision = model_cfg["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise MoECLIPError(f"{cfg.model}: MoECLIP needs an open_clip ViT vision tower (got a timm/ResNet tower)")
    vision["image_size"] = cfg.image_size
    vision["patch_dropout"] = 0.0
    model_cfg["quick_gelu"] = bool(cfg.quick_gelu)
    model_cfg.pop("custom_text", None)
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        raise MoECLIPError(f"{cfg.model}: MoECLIP needs open_clip's own text transformer (got a HF text tower)")
    try:
        return CLIP(**model_cfg)
    except TypeError as exc:
        raise MoECLIPError(f"{cfg.model}: not a CLIP config open_clip can build ({exc})") from None


def read_weight_file(path: str | Path) -> Dict[str, torch.Tensor]:
    """State dict from an OpenAI ``.pt``, an open_clip checkpoint or ``.safetensors``, loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise MoECLIPError(f"{path}: CLIP weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise MoECLIPError(f"{path}: not a readable safetensors file ({exc})") from None
    elif _is_torchscript(path):
        obj = _try_torchscript(path)
        if obj is None:
            raise MoECLIPError(f"{path}: unreadable TorchScript archive")
        state = obj
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).splitlines()[0]
            raise MoECLIPError(f"{path}: cannot read as a weights-only torch file ({first})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise MoECLIPError(f"{path}: does not contain a CLIP state dict")
        state = obj
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    for key in _OPENAI_META_KEYS:
        state.pop(key, None)
    return state


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


def _try_torchscript(path: Path) -> Optional[Dict[str, torch.Tensor]]:
    """OpenAI's released ``.pt`` files are TorchScript archives; read their tensors only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception:
        return None
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def load_weights_into(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load a full CLIP state dict strictly, with a one-line error naming the first mismatch."""
    oc_model = import_open_clip().model
    resize_pos_embed, resize_text_pos_embed = oc_model.resize_pos_embed, oc_model.resize_text_pos_embed

    state = dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)  # bicubic, as open_clip's force_image_size does
    resize_text_pos_embed(state, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} parameter(s), e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
        raise MoECLIPError(f"{source}: weights do not match the architecture: " + "; ".join(parts))
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise MoECLIPError(f"{source}: weights do not match the architecture: {key} has shape "
                               f"{tuple(state[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict(state, strict=True)


def create_clip(cfg: BackboneConfig) -> nn.Module:
    """Build the frozen, eval-mode open_clip CLIP that MoECLIP wraps."""
    pretrained = cfg.pretrained
    is_file = pretrained is not None and (Path(pretrained).exists() or Path(pretrained).suffix in
                                          (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    if pretrained and not is_file:
        model = _create_from_tag(cfg)
    else:
        model = _build_architecture(cfg)
        if pretrained:
            load_weights_into(model, read_weight_file(pretrained), str(pretrained))
    freeze(model)
    return model


def _create_from_tag(cfg: BackboneConfig) -> nn.Module:
    """An open_clip pretrained tag: open_clip downloads (or finds in its cache) the weights."""
    open_clip = import_open_clip()

    if Path(cfg.model).suffix == ".json":
        raise MoECLIPError(f"pretrained tag {cfg.pretrained!r} needs an open_clip architecture name, "
                           f"not a config file ({cfg.model}); pass a weight file instead")
    _read_model_config(cfg.model)  # clear error for unknown names
    tags = open_clip.list_pretrained_tags_by_model(cfg.model)
    if cfg.pretrained not in tags:
        raise MoECLIPError(f"{cfg.pretrained!r} is neither a file nor an open_clip pretrained tag for "
                           f"{cfg.model} (tags: {', '.join(tags) or 'none'})")
    with warnings.catch_warnings():
        # open_clip warns that the OpenAI tag was trained with QuickGELU; MoECLIP's released
        # checkpoints were trained on the GELU model, so GELU is the faithful default.
        warnings.simplefilter("ignore")
        try:
            model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, force_image_size=cfg.image_size,
                                           force_quick_gelu=cfg.quick_gelu, force_patch_dropout=0.0)
        except RuntimeError as exc:
            raise MoECLIPError(f"could not load open_clip weights {cfg.model}/{cfg.pretrained}: "
                               f"{str(exc).splitlines()[0]}") from None
    if not cfg.quick_gelu:
        _set_gelu(model)
    return model


def _set_gelu(model: nn.Module) -> None:
    QuickGELU = import_open_clip().transformer.QuickGELU

    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, QuickGELU):
                setattr(module, name, nn.GELU())


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()


def vision_dims(clip: nn.Module) -> Dict[str, int]:
    """Widths and depths the adapters are sized from."""
    visual = clip.visual
    width = visual.conv1.out_channels
    return {
        "width": width,
        "depth": len(visual.transformer.resblocks),
        "embed_dim": int(visual.proj.shape[1]) if visual.proj is not None else width,
        "text_width": int(clip.ln_final.normalized_shape[0]),
        "patch_size": int(visual.conv1.kernel_size[0]),
    }


def create_vision_clip(cfg: BackboneConfig) -> nn.Module:
    """:func:`create_clip` for vision-only callers (MuSc): a weight file may hold just ``visual.*``.

    The text tower then keeps its random initialisation; nothing that reads only the vision tower
    can tell.
    """
    pretrained = cfg.pretrained
    if pretrained and Path(pretrained).is_file():
        state = read_weight_file(pretrained)
        if state and all(k.startswith("visual.") for k in state):
            model = _build_architecture(cfg)
            own = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
            load_weights_into(model, {**own, **state}, str(pretrained))
            freeze(model)
            return model
    return create_clip(cfg)


@torch.no_grad()
def extract_tokens(clip: nn.Module, images: torch.Tensor, levels: Sequence[int]
                   ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Frozen tower -> (per level the patch tokens (B, L, C) after that block, CLS dropped; the class embedding).

    ``levels`` are 1-based block outputs. Tokens are the residual stream as the block leaves it (no
    ``ln_post``), as MuSc (:mod:`moeclip.model.musc`) reads them. The class embedding is CLIP's image
    embedding (last block's CLS, ``ln_post``, ``proj``), L2-normalised, whatever levels are read.
    """
    visual = clip.visual if hasattr(clip, "visual") else clip
    blocks = visual.transformer.resblocks
    first = getattr(visual.transformer, "batch_first", True)
    wanted = set(int(v) for v in levels)
    x = visual._embeds(images.to(visual.conv1.weight.dtype))
    if not first:
        x = x.transpose(0, 1)
    out = []
    for i, block in enumerate(blocks):
        x = block(x)
        if i + 1 in wanted:
            out.append((x if first else x.transpose(0, 1))[:, 1:].float())
    x = x if first else x.transpose(0, 1)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return out, F.normalize(pooled.float(), dim=-1)
