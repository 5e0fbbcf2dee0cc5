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
    # the third stage ran (what it shows on the random tiny CLIP is reported, not asserted)
    assert doc["few_shot"]["shots"] == 4 and all(0.0 <= doc["few_shot"][k] <= 1.0 for k in doc["before"])
    # the fourth stage too (each held-out category's test images as one batch)
    assert doc["transductive"]["tokens"] == "adapted" and all(0.0 <= doc["transductive"][k] <= 1.0
                                                               for k in doc["before"])
    assert (out / "checkpoint" / "adapters.safetensors").is_file()
    assert len(list((out / "overlays").glob("*.png"))) > 0
    printed = capsys.readouterr().out
    assert "before training" in printed and "after training" in printed and "few-shot (4 refs)" in printed
    assert "transductive (zero-shot + mutual)" in printed and "   transductive" in printed
    # the checkpoint serves the other commands
    preds = tmp_path / "preds"
    assert main(["predict", "--checkpoint", str(out / "checkpoint"), str(out / "data" / "heldout" / "nut" / "test"),
                 "--out", str(preds)]) == 0
    lines = (preds / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(list((out / "data" / "heldout" / "nut" / "test").rglob("*.png")))
    # and refuses to clobber
    assert main(["demo", "--out", str(out)]) == 2


@pytest.mark.slow
def test_demo_few_shot_stage_uses_extra_normals_and_leaves_zero_shot_untouched(tmp_path):
    """Third stage: K references per held-out class from extra train/good normals, never test images."""
    import math
    from pathlib import Path

    from moeclip.engine.demo import SUMMARY_KEYS, DemoConfig, run_demo

    def demo(name, shots):
        lines = []
        cfg = DemoConfig(out=tmp_path / name, train_per_category=4, heldout_per_category=4, steps=2, batch_size=4,
                         shots=shots, progress=False)
        return run_demo(cfg, say=lambda *a: lines.append(" ".join(map(str, a)))), "\n".join(lines)

    doc, printed = demo("fs", 4)
    plain, _ = demo("zs", 0)
    fs = doc["few_shot"]
    assert fs["shots"] == 4
    for k in SUMMARY_KEYS:
        assert math.isfinite(fs[k]) and 0.0 <= fs[k] <= 1.0, fs
    assert json.loads((tmp_path / "fs" / "demo_results.json").read_text())["few_shot"] == fs
    assert "few-shot (4 refs)" in printed
    # four references per held-out class, all from its train/good folder, none a test image
    heldout = tmp_path / "fs" / "data" / "heldout"
    tests = {p.resolve() for p in heldout.glob("*/test/**/*.png")}
    assert set(fs["references"]) == set(doc["heldout_categories"])
    for cls, refs in fs["references"].items():
        assert len(set(refs)) == 4
        for r in map(Path, refs):
            assert r.parent == heldout / cls / "train" / "good" and r.is_file() and r.resolve() not in tests
    # the extra normals change neither the test images nor the zero-shot numbers
    assert "few_shot" not in plain and not list((tmp_path / "zs" / "data" / "heldout").glob("*/train"))
    for p in sorted(heldout.glob("*/test/**/*.png")):
        assert p.read_bytes() == (tmp_path / "zs" / p.relative_to(tmp_path / "fs")).read_bytes()
    assert doc["before"] == plain["before"] and doc["per_class"]["before"] == plain["per_class"]["before"]


def test_demo_refuses_negative_shots(tmp_path):
    from moeclip.engine.demo import DemoConfig, run_demo
    from moeclip.errors import MoECLIPError

    with pytest.raises(MoECLIPError, match="--shots"):
        run_demo(DemoConfig(out=tmp_path / "d", shots=-1))
    assert not (tmp_path / "d").exists()


def test_demo_transductive_stage_is_moeclip_test_transductive(tmp_path, capsys):
    """Fourth stage: its numbers are those of ``moeclip test --transductive`` on the demo's own outputs."""
    from moeclip.engine.demo import SUMMARY_KEYS, DemoConfig, run_demo

    out = tmp_path / "d"
    doc = run_demo(DemoConfig(out=out, train_per_category=4, heldout_per_category=6, steps=2, batch_size=4, shots=0,
                              progress=False), say=lambda *a: None)
    assert "few_shot" not in doc and doc["transductive"]["batch"] == "class test split"
    data = out / "data"
    assert main(["test", "--checkpoint", str(out / "checkpoint"), "--data", f"folder={data / 'heldout'}",
                 "--descriptions", str(data / "shared-description.json"), "--transductive", "--device", "cpu",
                 "--out", str(tmp_path / "t")]) == 0
    res = json.loads((tmp_path / "t" / "results.json").read_text())["datasets"][0]
    for k in SUMMARY_KEYS:
        assert doc["transductive"][k] == pytest.approx(res["average"][k], abs=1e-6)
    for cls, m in res["per_class"].items():
        assert doc["per_class"]["transductive"][cls]["pixel_auroc"] == pytest.approx(m["pixel_auroc"], abs=1e-6)
    # and the stage can be skipped
    skipped = run_demo(DemoConfig(out=tmp_path / "s", train_per_category=4, heldout_per_category=4, steps=1,
                                  batch_size=4, shots=0, transductive=False, progress=False), say=lambda *a: None)
    assert "transductive" not in skipped
