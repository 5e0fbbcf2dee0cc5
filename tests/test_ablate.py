"""``moeclip ablate``: one run per switch value, same seed, one table."""
from __future__ import annotations

import json

import pytest

from moeclip.analysis.ablate import parse_switches, settings
from moeclip.cli import main
from moeclip.data.synth import generate_dataset
from moeclip.errors import MoECLIPError


def test_settings_one_at_a_time_and_grid():
    sw = parse_switches(["fofs=on,off", "experts=4,2,8"])
    assert sw == [("fofs", [True, False]), ("experts", [4, 2, 8])]
    one = settings(sw)
    assert one == [{"fofs": True, "experts": 4}, {"fofs": False, "experts": 4},
                   {"fofs": True, "experts": 2}, {"fofs": True, "experts": 8}]
    assert len(settings(sw, "grid")) == 6
    with pytest.raises(MoECLIPError, match="NAME=V1,V2"):
        parse_switches(["nonsense=1,2"])
    with pytest.raises(MoECLIPError, match="at least two"):
        parse_switches(["fofs=on"])


def test_ablate_cli_runs_each_setting(tmp_path, tiny_clip_config, capsys):
    generate_dataset(tmp_path / "train", ["stripes", "disc"], n_normal=2, n_anomalous=2, image_size=64, seed=0)
    generate_dataset(tmp_path / "held", ["wood"], n_normal=2, n_anomalous=2, image_size=64, seed=1)
    out = tmp_path / "abl"
    code = main(["ablate", "--data", f"folder={tmp_path / 'train'}", "--test-data", f"folder={tmp_path / 'held'}",
                 "--out", str(out), "--steps", "2", "--batch-size", "4", "--clip-model", str(tiny_clip_config),
                 "--clip-weights", "none", "--image-size", "64", "--switch", "fofs=on,off", "--switch", "experts=4,2"])
    assert code == 0
    doc = json.loads((out / "ablation.json").read_text())
    names = [r["setting"] for r in doc["runs"]]
    assert names == ["baseline", "fofs=off", "experts=2"]
    for r in doc["runs"]:
        assert 0 <= r["pixel_auroc"] <= 1
    cfg = json.loads((out / "runs" / "02" / "checkpoint" / "config.json").read_text())
    assert cfg["model"]["adapter"]["num_experts"] == 2
    assert (out / "ablation.md").read_text().count("\n") == 2 + 3
    assert "| fofs=off |" in capsys.readouterr().out
