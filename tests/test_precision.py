"""bf16 runs with the frozen CLIP weights cast once: the same numbers as plain autocast."""
from __future__ import annotations

import pytest
import torch

from moeclip.errors import MoECLIPError
from moeclip.model.backbone import create_clip
from moeclip.model.checkpoint import save_checkpoint
from moeclip.model.config import AdapterConfig, BackboneConfig
from moeclip.model.moeclip import MoECLIP
from moeclip.precision import autocast

CPU = torch.device("cpu")


def _model(tiny_clip_config, seed=0):
    torch.manual_seed(seed)
    clip = create_clip(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64))
    model = MoECLIP(clip, AdapterConfig())
    with torch.no_grad():
        for m in model.moe:
            m.experts.lora_B.normal_(0, 0.05)
            m.router.gate.weight.normal_(0, 0.5)
    return model.eval()


def _train_step(model, images, masks, labels, text):
    model.zero_grad()
    model.train()
    torch.manual_seed(7)  # LoRA dropout masks
    with autocast(CPU, "bf16"):
        losses = model.compute_losses(images, masks, labels, text)
    losses["total"].backward()
    model.eval()
    return losses["total"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cast_frozen_weights_is_bit_identical_under_autocast(tiny_clip_config):
    model = _model(tiny_clip_config)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=g)
    masks = (torch.rand(3, 1, 64, 64, generator=g) > 0.8).float()
    labels = torch.tensor([0, 1, 1])
    text = model.text_features("widget").detach()

    with autocast(CPU, "bf16"):
        before = model.predict(images, text)
    loss0, grads0 = _train_step(model, images, masks, labels, text)
    trainable_before = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}

    model.cast_frozen_weights("bf16")
    visual = model.clip.visual
    assert visual.conv1.weight.dtype == torch.bfloat16
    block = visual.transformer.resblocks[0]
    assert block.attn.in_proj_weight.dtype == torch.bfloat16 and block.mlp.c_fc.weight.dtype == torch.bfloat16
    # what autocast runs in fp32 keeps its fp32 weights; the text tower and adapters are untouched
    assert block.ln_1.weight.dtype == torch.float32 and visual.positional_embedding.dtype == torch.float32
    assert model.clip.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float32
    assert {n: p.dtype for n, p in model.named_parameters() if p.requires_grad} == trainable_before

    with autocast(CPU, "bf16"):
        after = model.predict(images, text)
    assert torch.equal(before["anomaly_map"], after["anomaly_map"])
    assert torch.equal(before["image_score"], after["image_score"])
    loss1, grads1 = _train_step(model, images, masks, labels, text)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    assert all(torch.equal(grads0[k], grads1[k]) for k in grads0)


def test_cast_model_refuses_fp32_runs_and_backbone_saving(tiny_clip_config, tmp_path):
    model = _model(tiny_clip_config).cast_frozen_weights("bf16")
    with pytest.raises(MoECLIPError, match="stored in torch.bfloat16"):
        model.predict(torch.randn(1, 3, 64, 64), "thing")
    with pytest.raises(MoECLIPError, match="cannot store the CLIP weights"):
        save_checkpoint(model, tmp_path / "ck", include_backbone=True)
    save_checkpoint(model, tmp_path / "adapters_only")  # adapters are fp32 and can be saved
    model.cast_frozen_weights("bf16")  # idempotent
    with pytest.raises(MoECLIPError, match="reload the model"):
        model.cast_frozen_weights("fp16")
    assert _model(tiny_clip_config).cast_frozen_weights("fp32").frozen_dtype is None


def test_detector_bf16_casts_and_matches_autocast(tiny_clip_config, tmp_path):
    from conftest import make_tiny_checkpoint

    from moeclip.inference.detector import Detector

    ckpt = make_tiny_checkpoint(tiny_clip_config, tmp_path / "ck", seed=2)
    images = torch.randn(2, 3, 64, 64)
    ref = Detector.from_checkpoint(ckpt, device="cpu")
    text = ref.text_features("part")  # the Detector computes text features outside autocast
    with autocast(CPU, "bf16"):
        expected = ref.model.predict(images, text)
    det = Detector.from_checkpoint(ckpt, device="cpu", precision="bf16")
    assert det.model.frozen_dtype == torch.bfloat16
    got = det.predict_tensors(images, "part")
    assert torch.equal(got["anomaly_map"], expected["anomaly_map"].float())
    assert torch.equal(got["image_score"], expected["image_score"].float())
