"""The model reproduces every tensor the official code computed on the golden fixture.

Facts from tests/golden/README.md: tolerances 1e-5 absolute on features, text features
and router probabilities; 1e-4 absolute on anomaly maps; 1e-4 relative on losses and
gradients; routing indices exact. Router tensors are flattened sequence-major
(index = token * B + image), as the official code flattens its (L, B, D) stream.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moeclip.model.checkpoint import load_model, ours_to_official
from moeclip.model.config import AdapterConfig

pytestmark = pytest.mark.usefixtures("golden_dir")


def adapter_config(moe: dict, **extra) -> AdapterConfig:
    """The official argument names -> our config."""
    return AdapterConfig(
        num_experts=moe["moe_num_experts"], top_k=moe["moe_top_k"], rank=moe["moe_r"],
        alpha=moe["moe_lora_alpha"], moe_layers=moe["moe_layers"], levels=moe["levels"],
        image_adapt_weight=moe["image_adapt_weight"], fofs=moe["use_fofs"], paa=moe["use_paa"],
        seg_proj=moe["seg_proj_sharing_strategy"], relu=moe["relu"], **extra)


@pytest.fixture(scope="module")
def golden(golden_dir):
    cfg = json.loads((golden_dir / "config.json").read_text())
    inputs = load_file(str(golden_dir / "inputs.safetensors"))
    expected = load_file(str(golden_dir / "expected.safetensors"))
    return cfg, inputs, expected


def build(golden_dir, cfg, **extra):
    torch.manual_seed(0)  # FOFS init is overwritten by the checkpoint anyway
    return load_model(
        golden_dir / "official_checkpoint.pth",
        backbone_overrides={"model": str(golden_dir / "config.json"),
                            "pretrained": str(golden_dir / "clip_tiny.safetensors"),
                            "image_size": cfg["image_size"]},
        adapter=adapter_config(cfg["moeclip_config"], **extra),
    )


@pytest.fixture(scope="module")
def model(golden, golden_dir):
    return build(golden_dir, golden[0])


def seq_major(t: torch.Tensor) -> torch.Tensor:
    """(B, L, E) -> (L * B, E) in the official flattening order."""
    return t.transpose(0, 1).reshape(-1, t.shape[-1])


def test_tokenizer_matches(model, golden):
    cfg, inputs, _ = golden
    tokens, n_normal = model.text.tokenize(cfg["object_description"])
    assert n_normal == 6
    assert torch.equal(tokens, inputs["prompt_tokens"].to(tokens.dtype))


def test_text_features(model, golden):
    cfg, _, exp = golden
    with torch.no_grad():
        t = model.text_features(cfg["object_description"])
        u = model.text.unadapted(cfg["object_description"])
    torch.testing.assert_close(t, exp["text_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(u, exp["text_features_unadapted"], atol=1e-5, rtol=0)


def test_vision_features_and_routing(model, golden):
    _, inputs, exp = golden
    with torch.no_grad():
        out = model.encode_image(inputs["images"], compute_losses=False)
    assert len(out.seg_features) == 12
    for j, f in enumerate(out.seg_features):
        torch.testing.assert_close(f, exp[f"seg_tokens.{j}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.det_feature, exp["det_token"], atol=1e-5, rtol=0)
    exempt = 0
    for i, r in enumerate(out.routing):
        torch.testing.assert_close(seq_major(r.probs), exp[f"router_probs.{i}"], atol=1e-5, rtol=0)
        exempt += check_top_k(seq_major(r.indices), exp[f"router_topk.{i}"], exp[f"router_probs.{i}"], f"layer {i}")
        assert torch.allclose(r.weights.sum(-1), torch.ones(()))
    # the fixture has one near-tie (layer 1, row 59: experts 0 and 3 at 0.21116309 vs 0.21116289, a gap of
    # 2e-7 against our measured probability error of up to 3e-7 in that layer); more would mean a fixture
    # whose routing the check no longer pins down
    assert exempt <= 2, exempt


#: Two router probabilities are a tie when the official gap is below twice the tolerance the probabilities
#: are held to (1e-5 each): within it, float32 rounding of another CPU may order them either way.
ROUTING_TIE = 2e-5


def check_top_k(ours: torch.Tensor, official: torch.Tensor, official_probs: torch.Tensor, what: str) -> int:
    """Routing indices equal the official ones exactly where the official top-k gap is clear; inside a
    near-tie (gap below :data:`ROUTING_TIE`) either of the tied experts is accepted at that rank. Returns the
    number of tie-exempt entries."""
    official = official.to(ours.dtype)
    assert ours.shape == official.shape, what
    exempt = 0
    for n in range(official.shape[0]):
        p = official_probs[n].double()
        assert len(set(ours[n].tolist())) == ours.shape[1], (what, n)  # k distinct experts
        for j, e in enumerate(official[n].tolist()):
            tied = {int(x) for x in torch.nonzero((p - p[e]).abs() < ROUTING_TIE).ravel()}
            exempt += len(tied) > 1
            assert int(ours[n, j]) in tied, (what, n, j, ours[n].tolist(), official[n].tolist())
    return exempt


@pytest.mark.parametrize("domain", ["Industrial", "Medical"])
def test_anomaly_maps_and_scores(model, golden, domain):
    cfg, inputs, exp = golden
    res = model.predict(inputs["images"], cfg["object_description"], domain=domain.lower())
    torch.testing.assert_close(res["anomaly_map"], exp[f"anomaly_map.{domain}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(res["image_score"], exp["image_score_raw"], atol=1e-5, rtol=0)


def test_training_losses_and_gradients(golden, golden_dir):
    cfg, inputs, exp = golden
    weights = cfg["train_loss_weights"]
    model = build(golden_dir, cfg, lora_dropout=0.0, etf_weight=weights["etf"], balance_weight=weights["balance"])
    model.train()
    assert not model.clip.training
    model.text.clear_cache()
    text = model.text_features(cfg["object_description"])
    losses = model.compute_losses(inputs["images"], inputs["masks"], inputs["labels"], text)
    for name, key in [("ce", "loss_ce"), ("seg", "loss_seg"), ("balance", "loss_balance"),
                      ("etf", "loss_etf"), ("total", "loss_total")]:
        torch.testing.assert_close(losses[name], exp[f"train.{key}"], rtol=1e-4, atol=1e-7)
    losses["total"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    official = ours_to_official(grads, relu=cfg["moeclip_config"]["relu"])
    expected = {k[len("grad."):]: v for k, v in exp.items() if k.startswith("grad.")}
    assert set(official) == set(expected)
    for name, g in official.items():
        e = expected[name]
        scale = e.abs().max().clamp_min(1e-12)
        assert (g - e).abs().max() / scale < 1e-4, name
