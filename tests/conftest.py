"""Shared fixtures: the golden fixture of the official code (tests/golden/) and a tiny open_clip config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: The official code's outputs on a tiny random CLIP; data kept in the repository (see its README.md).
GOLDEN = REPO / "tests" / "golden"

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to a busy machine


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    # part of the repository: a missing file is a broken checkout, so fail rather than skip
    missing = [name for name in ("config.json", "clip_tiny.safetensors", "official_checkpoint.pth",
                                 "inputs.safetensors", "expected.safetensors", "metrics_inputs.safetensors")
               if not (GOLDEN / name).is_file()]
    if missing:
        pytest.fail(f"{GOLDEN}: golden fixture incomplete, missing {', '.join(missing)}")
    return GOLDEN


#: A small open_clip ViT config (random weights) for end-to-end tests.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clipcfg") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def make_tiny_checkpoint(clip_config: Path, directory: Path, seed: int) -> Path:
    """A tiny random checkpoint whose experts and routers are non-trivial (the CLIP is stored in it)."""
    from moeclip.model.checkpoint import save_checkpoint
    from moeclip.model.config import AdapterConfig, BackboneConfig, ModelConfig
    from moeclip.model.moeclip import MoECLIP

    torch.manual_seed(seed)
    model = MoECLIP.from_config(ModelConfig(BackboneConfig(model=str(clip_config), pretrained=None, image_size=64),
                                            AdapterConfig()))
    with torch.no_grad():
        for moe in model.moe:
            moe.experts.lora_B.normal_(0, 0.05)
            moe.router.gate.weight.normal_(0, 0.5)
    return save_checkpoint(model, directory, include_backbone=True)
