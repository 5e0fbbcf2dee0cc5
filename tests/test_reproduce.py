"""``moeclip reproduce``: plan, dry run, train -> test over two seeds, resume after a stop, the report."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeclip.cli import main
from moeclip.data.synth import generate_dataset
from moeclip.engine import reproduce as R
from moeclip.errors import MoECLIPError
from moeclip.model.checkpoint import ours_to_official


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """MVTec and VisA under their registry names (VisA as a converted ``<class>/test`` tree)."""
    root = tmp_path_factory.mktemp("repro_data")
    generate_dataset(root / "MVTec", ["wood", "tile"], n_normal=2, n_anomalous=2, image_size=64, seed=0)
    generate_dataset(root / "visa", ["stripes", "disc"], n_normal=2, n_anomalous=2, image_size=64, seed=1)
    (root / "visa" / "stripes").rename(root / "visa" / "candle")
    (root / "visa" / "disc").rename(root / "visa" / "capsules")
    (root / "notes").mkdir()  # not a dataset: ignored
    return root


def tiny(clip_config) -> list:
    return ["--clip-model", str(clip_config), "--clip-weights", "none", "--image-size", "64"]


def args(data_root, out, clip_config, *extra) -> list:
    return ["reproduce", "--data-root", str(data_root), "--out", str(out), "--protocol", "industrial",
            "--skip-missing", "--seeds", "1,2", "--max-steps", "2", "--lr", "1e-3", "--eval-batch-size", "4",
            *tiny(clip_config), *extra]


def test_paper_numbers_are_consistent():
    ref = R.paper_results()
    for metric, avg in ref["averages"].items():
        values = [ref["datasets"][k][metric]["value"] for k in avg["over"]]
        assert abs(statistics.fmean(values) - avg["value"]) <= 0.05, metric  # the table's rounding
        assert sorted(avg["over"]) == sorted(k for k, d in ref["datasets"].items() if metric in d)
    assert ref["datasets"]["MVTec"]["image_auroc"]["value"] == 93.9
    assert "pixel_auroc" not in ref["datasets"]["headct"] and "image_auroc" not in ref["datasets"]["Endo"]
    assert all(e["source"] for d in ref["datasets"].values() for e in d.values())
    assert ref["independent"]["averages"]["image_auroc"]["value"] == 86.59


def test_dry_run_lists_found_and_missing(data_root, tmp_path, tiny_clip_config, capsys):
    out = tmp_path / "run"
    base = ["reproduce", "--data-root", str(data_root), "--out", str(out), "--protocol", "industrial", "--dry-run"]
    assert main(base) == 2  # missing data without --skip-missing
    text = capsys.readouterr().out
    found = text.split("datasets found:")[1].split("datasets missing:")[0]
    missing = text.split("datasets missing:")[1].split("stages:")[0]
    assert "MVTec" in found and "VisA" in found and "(8 images, 4 anomalous, 2 classes" in found
    assert "BTAD" in missing and "BTech_Dataset_transformed" in missing and "DTD-Synthetic" in missing
    assert "notes" not in text and "error: missing: BTAD" in text
    # paper model at 518 on CPU: the estimate is the benchmark figure times the images. By hand:
    # benchmarks/README.md, target 2a, measured 12.45 s per image (ViT-L-14-336 at 518, batch 1, fp32, CPU);
    # 8 images x 12.45 s = 99.6 s, shown in whole minutes (>= 90 s): "2 min"
    test_figure = next(f for f in R.benchmark_figures()["figures"]
                       if f["task"] == "test" and f["precision"] == "fp32" and f["image_size"] == 518)
    assert (test_figure["seconds_per_batch"], test_figure["batch_size"]) == (12.45, 1)
    line = next(x for x in text.splitlines() if "test/MVTec/seed-111" in x)
    assert "expected 2 min" in line, line
    assert main(base + ["--skip-missing", "--seeds", "5"] + tiny(tiny_clip_config)) == 0
    text = capsys.readouterr().out
    assert "train/VisA/seed-5" in text and "test/VisA/seed-5" in text and "expected unknown" in text
    assert "nothing was run" in text and not out.exists()
    # the same plan from Python
    plan = R.build_plan(data_root, out, R.ReproduceConfig(protocol="industrial", seeds=(1,), skip_missing=True))
    assert [s.path for s in plan.stages] == ["train/VisA/seed-1", "test/MVTec/seed-1", "train/MVTec/seed-1",
                                             "test/VisA/seed-1"]
    assert sorted(plan.missing) == ["BTAD", "DTD-Synthetic", "RSDD"] and plan.found["VisA"].images == 8
    with pytest.raises(MoECLIPError, match="each seed once"):
        R.build_plan(data_root, out, R.ReproduceConfig(seeds=(1, 1)))


def _counting(monkeypatch, stop_at=None):
    calls = {"train": [], "test": []}
    real_train, real_test = R._run_train, R._run_test

    def train(plan, stage, *a, **k):
        calls["train"].append(stage.path)
        return real_train(plan, stage, *a, **k)

    def test(plan, stage, *a, **k):
        calls["test"].append(stage.path)
        if stop_at is not None and len(calls["test"]) == stop_at:
            raise KeyboardInterrupt  # the user stops the run between stages
        return real_test(plan, stage, *a, **k)

    monkeypatch.setattr(R, "_run_train", train)
    monkeypatch.setattr(R, "_run_test", test)
    return calls


def _markers(out: Path) -> dict:
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob(R.DONE_FILE)}


def test_two_seeds_resume_and_report(data_root, tmp_path, tiny_clip_config, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        calls = _counting(m, stop_at=2)
        assert main(args(data_root, out, tiny_clip_config)) == 130
    assert calls == {"train": ["train/VisA/seed-1", "train/VisA/seed-2"],
                     "test": ["test/MVTec/seed-1", "test/MVTec/seed-2"]}
    first = _markers(out)
    assert sorted(first) == ["test/MVTec/seed-1", "train/VisA/seed-1", "train/VisA/seed-2"]
    assert not (out / "reproduction.md").exists()

    with monkeypatch.context() as m:  # continue: the finished stages are not redone
        calls = _counting(m)
        assert main(args(data_root, out, tiny_clip_config)) == 0
    assert calls == {"train": ["train/MVTec/seed-1", "train/MVTec/seed-2"],
                     "test": ["test/MVTec/seed-2", "test/VisA/seed-1", "test/VisA/seed-2"]}
    printed = capsys.readouterr().out
    assert "test/MVTec/seed-1: complete, skipped" in printed
    markers = _markers(out)
    assert len(markers) == 8 and all(markers[k] == v for k, v in first.items())
    assert not list(out.rglob("*.partial"))

    # the report: mean and sample std over the seeds' results.json, beside the paper
    doc = json.loads((out / "reproduction.json").read_text())
    assert doc["replicates"] == ["seed-1", "seed-2"] and "ddof=1" in doc["std"]
    per_seed = {(ds, s): json.loads((out / "test" / ds / f"seed-{s}" / "results.json").read_text())
                ["datasets"][0]["average"] for ds in ("MVTec", "VisA") for s in (1, 2)}
    rows = {d["key"]: d for d in doc["datasets"]}
    assert list(rows) == ["MVTec", "VisA"] and rows["VisA"]["trained_on"] == "MVTec"
    for ds in ("MVTec", "VisA"):
        for metric in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro"):
            values = [100 * per_seed[ds, s][metric] for s in (1, 2)]
            cell = rows[ds]["metrics"][metric]
            assert cell["n"] == 2
            assert cell["mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)
            assert cell["std"] == pytest.approx(statistics.stdev(values), abs=1e-9)
    paper = R.paper_results()["datasets"]
    mv = rows["MVTec"]["metrics"]["pixel_ap"]
    assert mv["paper"] == paper["MVTec"]["pixel_ap"]["value"] and mv["diff"] == pytest.approx(mv["mean"] - mv["paper"])
    assert mv["independent"] == 45.30 and rows["VisA"]["metrics"]["pixel_ap"]["independent"] is None
    avg = doc["average"]["image_auroc"]
    seed_avgs = [statistics.fmean(100 * per_seed[ds, s]["image_auroc"] for ds in ("MVTec", "VisA")) for s in (1, 2)]
    assert avg["mean"] == pytest.approx(statistics.fmean(seed_avgs)) and avg["std"] == pytest.approx(
        statistics.stdev(seed_avgs))
    assert avg["paper"] == pytest.approx((93.9 + 83.6) / 2) and avg["independent"] is None  # not the paper's set
    md = (out / "reproduction.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| MVTec AD | VisA |"))
    cell = rows["MVTec"]["metrics"]["image_auroc"]
    assert f"{cell['mean']:.1f} ± {cell['std']:.2f}" in line and "| 93.9 |" in line
    assert "Not run: BTAD" in md
    with open(out / "reproduction.csv", newline="") as f:
        table = list(csv.DictReader(f))
    row = next(r for r in table if r["dataset"] == "VisA" and r["metric"] == "pixel_auroc")
    assert float(row["ours_mean"]) == pytest.approx(rows["VisA"]["metrics"]["pixel_auroc"]["mean"], abs=1e-4)
    assert row["independent"] == "n/a" and float(row["seed-2"]) == pytest.approx(
        100 * per_seed["VisA", 2]["pixel_auroc"], abs=1e-4)

    # an interrupted training resumes from its saved state; the tests of its model are redone
    ckpt = out / "train" / "MVTec" / "seed-2" / "checkpoint" / "adapters.safetensors"
    before = ckpt.stat().st_mtime_ns
    (out / "train" / "MVTec" / "seed-2" / R.DONE_FILE).unlink()
    with monkeypatch.context() as m:
        calls = _counting(m)
        assert main(args(data_root, out, tiny_clip_config)) == 0
    assert calls == {"train": ["train/MVTec/seed-2"], "test": ["test/VisA/seed-2"]}
    assert "resumed at epoch 1, step 2" in capsys.readouterr().out and ckpt.stat().st_mtime_ns == before

    # a folder that is not a reproduce run is not written into
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert main(args(data_root, other, tiny_clip_config)) == 2
    assert "not a reproduce run folder" in capsys.readouterr().err and sorted(other.iterdir()) == [other / "mine.txt"]

    # other settings into the same run folder are refused
    assert main(args(data_root, out, tiny_clip_config, "--lr", "5e-4")) == 2
    assert "made with other settings (train differ)" in capsys.readouterr().err

    # --checkpoint: no training, the given model gives the numbers of the stage that trained it
    out2 = tmp_path / "given"
    ours = out / "train" / "VisA" / "seed-1" / "checkpoint"
    with monkeypatch.context() as m:
        calls = _counting(m)
        assert main(["reproduce", "--data-root", str(data_root), "--out", str(out2), "--protocol", "industrial",
                     "--datasets", "MVTec", "--checkpoint", f"VisA={ours}", "--eval-batch-size", "4"]) == 0
    assert calls == {"train": [], "test": ["test/MVTec/ckpt-1"]}
    given = json.loads((out2 / "test" / "MVTec" / "ckpt-1" / "results.json").read_text())["datasets"][0]
    assert given["average"] == per_seed["MVTec", 1]
    one = json.loads((out2 / "reproduction.json").read_text())["datasets"][0]["metrics"]["image_auroc"]
    assert one["n"] == 1 and one["std"] is None
    assert "± n/a" in (out2 / "reproduction.md").read_text()

    # the same weights as an official .pth, described by the model flags (backbone: a local weight file)
    official = ours_to_official(load_file(str(ours / "adapters.safetensors")))
    pth = tmp_path / "visa.pth"
    torch.save({"epoch": 1, **{part: {k.split(".", 1)[1]: v for k, v in official.items() if k.startswith(part)}
                               for part in ("image_adapter", "text_adapter")}}, pth)
    out3 = tmp_path / "official"
    assert main(["reproduce", "--data-root", str(data_root), "--out", str(out3), "--protocol", "industrial",
                 "--datasets", "MVTec", "--checkpoint", str(pth), "--clip-model", str(tiny_clip_config),
                 "--clip-weights", str(ours / "clip.safetensors"), "--image-size", "64"]) == 0
    assert json.loads((out3 / "test" / "MVTec" / "ckpt-1" / "results.json").read_text())["datasets"][0][
        "average"] == per_seed["MVTec", 1]


def test_summary_undefined_metrics_are_na_not_zero():
    collected = {"headct": {"seed-1": {m: None for m in R.REPORT_METRICS} | {"image_auroc": 90.0, "image_ap": 80.0}},
                 "Endo": {"seed-1": {m: None for m in R.REPORT_METRICS} | {"pixel_auroc": 70.0, "pixel_ap": 20.0}}}
    s = R.summarise(collected, ["seed-1"], {"headct": "VisA", "Endo": "VisA"})
    rows = {d["key"]: d["metrics"] for d in s["datasets"]}
    assert rows["headct"]["pixel_auroc"]["mean"] is None and rows["headct"]["pixel_auroc"]["n"] == 0
    assert rows["headct"]["image_auroc"]["paper"] == 96.6 and rows["Endo"]["image_auroc"]["paper"] is None
    assert s["average"]["image_auroc"]["datasets"] == ["headct"] and s["average"]["image_auroc"]["mean"] == 90.0
    assert s["average"]["pixel_auroc"]["datasets"] == ["Endo"] and s["average"]["pixel_auroc"]["paper"] == 91.0
    table = R.report_csv(s)
    assert "headct,VisA,pixel_auroc,0,n/a,n/a,n/a,n/a,n/a,n/a" in table
    assert ",0.0000," not in table


def test_protocols_and_checkpoint_names():
    legs = dict(R.protocol_legs("all"))
    assert legs["MVTec"] == ("VisA",) and legs["VisA"][:4] == ("MVTec", "BTAD", "RSDD", "DTD-Synthetic")
    assert len(legs["VisA"]) == 13 and "VisA" not in legs["VisA"]
    assert R.protocol_legs("medical", ["kvasir"]) == [("VisA", ("Colon_Kvasir",))]
    with pytest.raises(MoECLIPError, match="not tested in the medical protocol"):
        R.protocol_legs("medical", ["MVTec"])


def test_seeds_with_given_checkpoints_is_refused(tmp_path, capsys):
    """Given checkpoints are the replicates: --seeds would be silently ignored, so it is an error."""
    assert main(["reproduce", "--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--seeds", "1,2",
                 "--checkpoint", str(tmp_path / "visa.pth")]) == 2
    err = capsys.readouterr().err
    assert "--seeds 1,2 does not apply with --checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_musc_figures_are_the_published_ones():
    musc = R.musc_results()
    assert "ICLR 2024" in musc["method"]["venue"] and "Table 1" in musc["method"]["table"]
    mv, va = musc["datasets"]["MVTec"], musc["datasets"]["VisA"]
    assert (mv["image_auroc"]["value"], mv["pixel_auroc"]["value"], mv["pixel_ap"]["value"],
            mv["pixel_aupro"]["value"]) == (97.8, 97.3, 62.7, 93.8)
    assert (va["image_auroc"]["value"], va["pixel_auroc"]["value"], va["pixel_ap"]["value"]) == (92.8, 98.8, 45.1)
    assert all(e["source"].startswith("MuSc, ICLR 2024, Table 1") for d in musc["datasets"].values()
               for e in d.values())


def test_transductive_adds_musc_protocol_beside_the_zero_shot_one(data_root, tmp_path, tiny_clip_config):
    out = tmp_path / "run"
    assert main(["reproduce", "--data-root", str(data_root), "--out", str(out), "--protocol", "industrial",
                 "--skip-missing", "--seeds", "1", "--max-steps", "1", "--eval-batch-size", "4", "--datasets", "MVTec",
                 "--transductive", *tiny(tiny_clip_config)]) == 0
    zs = json.loads((out / "test" / "MVTec" / "seed-1" / "results.json").read_text())["datasets"][0]["average"]
    tr = json.loads((out / "transductive" / "MVTec" / "seed-1" / "results.json").read_text())["datasets"][0]
    # the stage is `moeclip test --transductive` on the same checkpoint
    ck = out / "train" / "VisA" / "seed-1" / "checkpoint"
    assert main(["test", "--checkpoint", str(ck), "--data", f"MVTec={data_root / 'MVTec'}", "--transductive",
                 "--device", "cpu", "--batch-size", "4", "--out", str(tmp_path / "t")]) == 0
    direct = json.loads((tmp_path / "t" / "results.json").read_text())["datasets"][0]["average"]
    for k, v in direct.items():
        assert tr["average"][k] == pytest.approx(v, abs=1e-9) if v is not None else tr["average"][k] is None
    doc = json.loads((out / "reproduction.json").read_text())
    cell = doc["transductive"]["datasets"][0]["metrics"]["pixel_auroc"]
    assert cell["mean"] == pytest.approx(100 * tr["average"]["pixel_auroc"])
    assert cell["zero_shot"] == pytest.approx(100 * zs["pixel_auroc"]) and cell["musc"] == 97.3
    assert cell["paper"] == 92.5 and cell["diff_musc"] == pytest.approx(cell["mean"] - 97.3)
    assert doc["transductive"]["datasets"][0]["metrics"]["image_ap"]["musc"] is None  # not published
    md = (out / "reproduction.md").read_text()
    assert "## Transductive (MuSc's protocol)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| MVTec AD | pixel AUROC |"))
    assert "| 97.3 | 92.5 |" in line
