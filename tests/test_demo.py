"""The README's first command: the offline demo, at its defaults, must show that training helps."""
from __future__ import annotations

import json

import pytest

from moeclip.cli import main


@pytest.mark.slow
def test_demo_trains_and_improves_heldout_localisation(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    doc = json.loads((out / "demo_results.json").read_text())
    for phase in ("before", "after"):
        assert set(doc[phase]) == {"pixel_auroc", "pixel_ap", "image_auroc", "image_ap"}
        assert all(0.0 <= v <= 1.0 for v in doc[phase].values())
    # the claim the demo makes: held-out pixel AUROC clearly above the untrained model's
    assert doc["after"]["pixel_auroc"] > doc["before"]["pixel_auroc"] + 0.12, doc
    assert (out / "checkpoint" / "adapters.safetensors").is_file()
    assert len(list((out / "overlays").glob("*.png"))) > 0
    printed = capsys.readouterr().out
    assert "before training" in printed and "after training" in printed
    # the checkpoint serves the other commands
    preds = tmp_path / "preds"
    assert main(["predict", "--checkpoint", str(out / "checkpoint"), str(out / "data" / "heldout" / "nut" / "test"),
                 "--out", str(preds)]) == 0
    lines = (preds / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(list((out / "data" / "heldout" / "nut" / "test").rglob("*.png")))
    # and refuses to clobber
    assert main(["demo", "--out", str(out)]) == 2
