"""Backbone loading (names, JSON configs, weight files) and checkpoint formats, with their errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moeclip.errors import MoECLIPError
from moeclip.model.backbone import create_clip, read_weight_file
from moeclip.model.checkpoint import load_model, read_checkpoint, read_official, save_checkpoint
from moeclip.model.config import AdapterConfig, BackboneConfig, ModelConfig
from moeclip.model.moeclip import MoECLIP


def tiny(cfg_path, size=64, pretrained=None, **kw):
    return create_clip(BackboneConfig(model=str(cfg_path), pretrained=pretrained, image_size=size, **kw))


def test_unknown_architecture_is_one_line_error():
    with pytest.raises(MoECLIPError, match="unknown CLIP architecture 'ViT-Q-99'"):
        create_clip(BackboneConfig(model="ViT-Q-99", pretrained=None))


def test_unknown_tag_names_the_tags():
    with pytest.raises(MoECLIPError, match="neither a file nor an open_clip pretrained tag"):
        create_clip(BackboneConfig(model="ViT-B-16", pretrained="no-such-tag"))


@pytest.mark.parametrize("fmt", ["safetensors", "openclip", "openai_jit"])
def test_weight_files_load_and_resize_position_embedding(tiny_clip_config, tmp_path, fmt):
    torch.manual_seed(0)
    src = tiny(tiny_clip_config, size=64)
    state = src.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "openclip":
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:  # a TorchScript archive like OpenAI's released .pt files (CLIP names + metadata keys)
        path = tmp_path / "openai.pt"
        bag = _TensorBag({**state, "input_resolution": torch.tensor(64)})
        with pytest.warns(FutureWarning):
            torch.jit.save(torch.jit.script(bag), str(path))
    same = tiny(tiny_clip_config, size=64, pretrained=str(path))
    for k, v in same.state_dict().items():
        assert torch.equal(v, state[k]), k
    bigger = tiny(tiny_clip_config, size=96, pretrained=str(path))  # 8x8 -> 12x12 patches, bicubic
    assert bigger.visual.positional_embedding.shape == (1 + 12 * 12, 64)
    assert torch.equal(bigger.visual.positional_embedding[0], state["visual.positional_embedding"][0])


class _TensorBag(torch.nn.Module):
    """A scripted module whose state_dict keys are dotted like CLIP's (via nested modules)."""

    def __init__(self, tensors):
        super().__init__()
        for key, value in tensors.items():
            parts = key.split(".")
            mod = self
            for p in parts[:-1]:
                if not hasattr(mod, p):
                    mod.add_module(p, torch.nn.Module())
                mod = getattr(mod, p)
            mod.register_buffer(parts[-1], value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_mismatched_weight_file_names_parameter_and_shapes(tiny_clip_config, tmp_path):
    other = json.loads(tiny_clip_config.read_text())
    other["vision_cfg"]["width"] = 96
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny(other_path).state_dict().items()}, str(path))
    with pytest.raises(MoECLIPError) as err:
        tiny(tiny_clip_config, pretrained=str(path))
    msg = str(err.value)
    assert str(path) in msg and "expected" in msg and "\n" not in msg


def test_missing_and_corrupt_weight_files(tiny_clip_config, tmp_path):
    with pytest.raises(MoECLIPError, match="not found"):
        tiny(tiny_clip_config, pretrained=str(tmp_path / "absent.safetensors"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MoECLIPError, match="bad.pt"):
        read_weight_file(bad)


def test_quick_gelu_switch(tiny_clip_config):
    from open_clip.transformer import QuickGELU

    gelu = tiny(tiny_clip_config)
    quick = tiny(tiny_clip_config, quick_gelu=True)
    assert not any(isinstance(m, QuickGELU) for m in gelu.modules())
    assert any(isinstance(m, QuickGELU) for m in quick.modules())


def test_our_checkpoint_round_trip(tiny_clip_config, tmp_path):
    cfg = ModelConfig(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64),
                      AdapterConfig(num_experts=3, top_k=1))
    torch.manual_seed(0)
    model = MoECLIP.from_config(cfg)
    for m in model.moe:
        torch.nn.init.normal_(m.experts.lora_B)
    out = save_checkpoint(model, tmp_path / "ck", meta={"epoch": 3})
    with pytest.raises(MoECLIPError, match="--overwrite"):
        save_checkpoint(model, out)
    config, state, meta = read_checkpoint(out)
    assert meta == {"epoch": 3} and config.adapter.num_experts == 3
    assert config.adapter.moe_layers == [0, 1, 2, 3]  # resolved values are stored
    torch.manual_seed(0)  # the CLIP is random here: same seed, same CLIP
    loaded = load_model(out)
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.predict(x, "part")["anomaly_map"], model.eval().predict(x, "part")["anomaly_map"])
    assert not list(tmp_path.glob("ck/*.tmp"))


def test_official_checkpoint_shape_mismatch_is_clear(golden_dir):
    with pytest.raises(MoECLIPError) as err:
        load_model(golden_dir / "official_checkpoint.pth",
                   backbone_overrides={"model": str(golden_dir / "config.json"),
                                       "pretrained": str(golden_dir / "clip_tiny.safetensors"), "image_size": 72},
                   adapter=AdapterConfig(rank=4, moe_layers=[1, 3, 5, 7], levels=[2, 4, 6, 8]))
    msg = str(err.value)
    assert "official_checkpoint.pth" in msg and "lora_A" in msg and "(4, 8, 64)" in msg and "(4, 4, 64)" in msg


def test_official_reader(golden_dir):
    ck = read_official(golden_dir / "official_checkpoint.pth")
    assert ck["epoch"] == 1 and ck["state"]["moe.0.experts.lora_A"].shape == (4, 8, 64)


@pytest.mark.slow
def test_vit_l_14_336_at_518_forward_shapes():
    """The paper's backbone, random weights: 37x37 patches, 12 maps of 768-d features."""
    torch.manual_seed(0)
    clip = create_clip(BackboneConfig(model="ViT-L-14-336", pretrained=None, image_size=518))
    model = MoECLIP(clip, AdapterConfig()).eval()
    assert model.adapter_config.moe_layers == [5, 11, 17, 23]
    assert clip.visual.positional_embedding.shape == (1 + 37 * 37, 1024)
    res = model.predict(torch.randn(1, 3, 518, 518), "metal nut")
    vision = res["vision"]
    assert len(vision.seg_features) == 12 and vision.seg_features[0].shape == (1, 37 * 37, 768)
    assert vision.det_feature.shape == (1, 768)
    assert res["anomaly_map"].shape == (1, 518, 518) and res["image_score"].shape == (1,)
    assert model.text_features("metal nut").shape == (768, 2)
    assert torch.isfinite(res["anomaly_map"]).all()


def test_checkpoint_with_backbone_is_self_contained(tiny_clip_config, tmp_path):
    cfg = ModelConfig(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64), AdapterConfig())
    torch.manual_seed(5)
    model = MoECLIP.from_config(cfg).eval()
    out = save_checkpoint(model, tmp_path / "ck", include_backbone=True)
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    tiny_clip_config_copy = moved / "clip_config.json"
    assert tiny_clip_config_copy.is_file()
    torch.manual_seed(123)  # a different seed: the CLIP must come from the file
    loaded = load_model(moved)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.predict(x, "a")["anomaly_map"], model.predict(x, "a")["anomaly_map"])
