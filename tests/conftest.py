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


#: The object the export tests (ONNX, OpenVINO) describe.
EXPORT_OBJECT = "metal nut"


@pytest.fixture(scope="session")
def export_ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    """The export tests' tiny random checkpoint (experts and routers non-trivial: no routing ties)."""
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=3)


@pytest.fixture(scope="module")
def export_detector(export_ckpt):
    from moeclip.inference.detector import Detector
    from moeclip.model.checkpoint import load_model

    return Detector(load_model(export_ckpt), device="cpu", object=EXPORT_OBJECT)


@pytest.fixture(scope="session")
def export_deploy_file(export_ckpt, tmp_path_factory) -> Path:
    """A deployment for :data:`EXPORT_OBJECT` with a threshold, a pixel threshold and a normalisation."""
    from moeclip.inference.deploy import Deployment

    dep = Deployment(object=EXPORT_OBJECT, threshold=0.4, pixel_threshold=12.0, checkpoint=str(export_ckpt),
                     normalization={"map_min": -10.0, "map_max": 40.0, "score_min": 0.4, "score_max": 0.6})
    return dep.save(tmp_path_factory.mktemp("dep") / "deploy.json")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Synthetic folder data: ``train`` (two classes) and ``held`` (one unseen class), 3 + 3 images each."""
    from moeclip.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root / "train", ["stripes", "disc"], n_normal=3, n_anomalous=3, image_size=64, seed=0)
    generate_dataset(root / "held", ["wood"], n_normal=3, n_anomalous=3, image_size=64, seed=1)
    return root


def train_args(data: Path, clip_config: Path, out: Path, *extra: str, batch_size: int = 4) -> list:
    """``moeclip train`` on ``data/train`` with the tiny CLIP (random weights), 64 px, lr 1e-3."""
    return ["train", "--data", f"folder={data / 'train'}", "--out", str(out), "--clip-model", str(clip_config),
            "--clip-weights", "none", "--image-size", "64", "--batch-size", str(batch_size), "--lr", "1e-3", *extra]
