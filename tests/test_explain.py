"""Expert explanations and analysis: numbers against brute-force recomputation, figures, CLIs."""
from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moeclip.analysis import explain as X
from moeclip.cli import main
from moeclip.model.scoring import anomaly_map, patch_anomaly


@pytest.fixture(scope="module")
def model(tiny_clip_config):
    """Tiny model with random router gates and LoRA B, so that routing and experts differ."""
    from moeclip.model.config import AdapterConfig, BackboneConfig, ModelConfig
    from moeclip.model.moeclip import MoECLIP

    torch.manual_seed(0)
    m = MoECLIP.from_config(ModelConfig(BackboneConfig(model=str(tiny_clip_config), pretrained=None,
                                                       image_size=64), AdapterConfig())).eval()
    with torch.no_grad():
        for moe in m.moe:
            moe.router.gate.weight.normal_(0, 0.5)
            moe.experts.lora_B.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    from moeclip.model.checkpoint import save_checkpoint

    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "ck", include_backbone=True)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(5):
        a = (rng.random((72, 90, 3)) * 255).astype(np.uint8)
        a[20:40, 30:50] = 255
        Image.fromarray(a).save(d / f"img{i}.png")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(3)
    return torch.randn(3, 3, 64, 64)


def test_trace_matches_encode_image(model, images):
    trace = X.trace_tower(model, images)
    ref = model.encode_image(images, compute_losses=False)
    for a, b in zip(trace.vision.seg_features, ref.seg_features):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trace.vision.det_feature, ref.det_feature, atol=1e-5, rtol=1e-5)
    for a, b in zip(trace.vision.routing, ref.routing):
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-5)
    # the kept inputs are what each adapter receives: re-running the adapter gives the routing
    for moe, x, r in zip(model.moe, trace.moe_inputs, trace.vision.routing):
        assert x.shape == (3, 65, 64)
        torch.testing.assert_close(moe(x).routing.probs, r.probs)
    model.train()
    with pytest.raises(ValueError, match="eval-mode"):
        X.trace_tower(model, images)
    model.eval()


def test_selection_maps_partition_patches_and_weights(model, images):
    trace = X.trace_tower(model, images)
    E = model.adapter_config.num_experts
    for r in trace.vision.routing:
        top1 = X.top1_selection(r, trace.vision.grid)
        assert top1.shape == (3, 8, 8)
        masks = torch.stack([top1 == e for e in range(E)])
        assert torch.equal(masks.sum(0), torch.ones_like(top1))  # a partition of the grid
        st = X.selection_stats(r, trace.vision.grid, E)
        assert torch.equal(st["count"].sum(1), torch.full((3,), 64.0))
        w1 = r.weights[:, 1:, 0].reshape(3, 8, 8)
        for b, e in itertools.product(range(3), range(E)):
            sel = masks[e, b]
            if sel.any():
                assert st["mean_weight"][b, e].item() == pytest.approx(w1[b][sel].mean().item(), abs=1e-6)
                assert 1 / model.adapter_config.top_k - 1e-6 <= st["mean_weight"][b, e] <= 1 + 1e-6
            else:
                assert math.isnan(st["mean_weight"][b, e])
        ent = X.router_entropy(r, trace.vision.grid)
        p = r.probs[:, 1:].double()
        manual = -(p * p.log()).sum(-1).reshape(3, 8, 8)
        torch.testing.assert_close(ent.double(), manual, atol=1e-5, rtol=0)
        assert float(ent.max()) <= math.log(E) + 1e-6


def test_contributions_sum_to_the_anomaly_map(model, images):
    text = model.text_features("bottle")
    v = X.trace_tower(model, images).vision
    contrib = X.map_contributions(v.seg_features, text, v.grid)
    assert contrib.shape == (3, 12, 8, 8)
    before_blur = sum(patch_anomaly(f, text) for f in v.seg_features).reshape(3, 8, 8)
    torch.testing.assert_close(contrib.sum(1), before_blur, atol=1e-3, rtol=1e-5)
    smoothed = X.smooth_maps(contrib, (64, 64), "industrial")
    full = anomaly_map(v.seg_features, text, v.grid, (64, 64), "industrial")
    torch.testing.assert_close(smoothed.sum(1), full, atol=1e-3, rtol=1e-5)
    # explain_image agrees with the model's own prediction
    ex = X.explain_image(model, images[:1], text, "medical")
    pred = model.predict(images[:1], text, "medical")
    np.testing.assert_allclose(ex.anomaly_map, pred["anomaly_map"][0].numpy(), atol=1e-3)
    np.testing.assert_allclose(ex.smoothed.sum(0), ex.anomaly_map, atol=1e-3)
    assert ex.raw_score == pytest.approx(float(pred["image_score"][0]), abs=1e-5)
    assert ex.labels[:3] == ["L1 r1", "L1 r3", "L1 r5"] and len(ex.labels) == 12


def _brute_force_similarity(moe, x):
    outs = X.expert_outputs(moe, x).double()
    E = outs.shape[1]
    sim = np.zeros((E, E))
    for i, j in itertools.product(range(E), range(E)):
        sim[i, j] = torch.nn.functional.cosine_similarity(outs[:, i], outs[:, j], dim=-1).mean().item()
    return sim


def test_expert_similarity_and_load_against_brute_force(model, images):
    acc = X.ExpertStatsAccumulator(model)
    traces = [acc.update(images[:2]), acc.update(images[2:])]
    stats = acc.result()
    k, E = model.adapter_config.top_k, model.adapter_config.num_experts
    assert [s.block for s in stats] == model.adapter_config.moe_layers
    for li, s in enumerate(stats):
        x = torch.cat([t.moe_inputs[li].reshape(-1, 64) for t in traces])
        brute = _brute_force_similarity(model.moe[li], x)
        np.testing.assert_allclose(s.similarity, brute, atol=1e-6)
        np.testing.assert_allclose(np.diag(s.similarity), 1.0, atol=1e-9)
        np.testing.assert_allclose(s.similarity, s.similarity.T, atol=0)
        off = brute[~np.eye(E, dtype=bool)].mean()
        assert s.mean_off_diagonal == pytest.approx(off, abs=1e-6)
        assert s.tokens == 3 * 65
        assert s.top1_fraction.sum() == pytest.approx(1.0)
        assert s.topk_fraction.sum() == pytest.approx(k)
        assert s.mean_probability.sum() == pytest.approx(1.0)
        idx = torch.cat([t.vision.routing[li].indices.reshape(-1, k) for t in traces])
        np.testing.assert_allclose(s.top1_fraction, np.bincount(idx[:, 0].numpy(), minlength=E) / len(idx))
        d = s.to_dict()
        assert d["load"]["top1"] == pytest.approx(list(s.top1_fraction))


def test_untrained_experts_have_undefined_similarity(tiny_clip_config):
    from moeclip.model.config import AdapterConfig, BackboneConfig, ModelConfig
    from moeclip.model.moeclip import MoECLIP

    m = MoECLIP.from_config(ModelConfig(BackboneConfig(model=str(tiny_clip_config), pretrained=None,
                                                       image_size=64), AdapterConfig(moe_layers=[1]))).eval()
    acc = X.ExpertStatsAccumulator(m, tokens="patches")
    acc.update(torch.randn(1, 3, 64, 64))
    (s,) = acc.result()
    assert np.isnan(s.similarity).all() and s.mean_off_diagonal is None  # lora_B = 0: no direction
    assert s.tokens == 64
    assert s.to_dict()["similarity"][0][0] is None
    assert s.top1_fraction.sum() == pytest.approx(1.0)


def _check_png(path: Path, min_size=(200, 150)):
    assert path.is_file() and path.stat().st_size > 2000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5, f"{path} looks blank"


def test_explain_cli_writes_figures_page_and_numbers(model, checkpoint, image_dir, tmp_path, capsys):
    from moeclip.data.imageio import load_image
    from moeclip.data.transforms import preprocess_image

    out = tmp_path / "explain"
    img = image_dir / "img0.png"
    args = ["explain", "--checkpoint", str(checkpoint), "--object", "bottle", str(img), "--out", str(out),
            "--device", "cpu"]
    assert main(args) == 0
    doc = json.loads((out / "explain.json").read_text())
    files = doc["files"]
    assert len(files["experts"]) == len(model.moe)
    for name in files["experts"] + [files["entropy"], files["contributions"]]:
        _check_png(out / name)
    page = (out / "index.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert sorted(srcs) == sorted(files["experts"] + [files["entropy"], files["contributions"]])

    # the numbers equal a recomputation
    ex = X.explain_image(model, preprocess_image(load_image(img), 64)[None], model.text_features("bottle"))
    ref = ex.to_dict()
    assert doc["grid"] == [8, 8] and doc["num_experts"] == 4 and doc["top_k"] == 2
    for got, want in zip(doc["layers"], ref["layers"]):
        assert sum(e["top1_patches"] for e in got["experts"]) == 64
        assert [e["top1_patches"] for e in got["experts"]] == [e["top1_patches"] for e in want["experts"]]
        for a, b in zip(got["experts"], want["experts"]):
            assert (a["mean_weight"] is None) == (b["mean_weight"] is None)
            if a["mean_weight"] is not None:
                assert a["mean_weight"] == pytest.approx(b["mean_weight"], abs=1e-5)
        assert got["entropy"]["mean"] == pytest.approx(want["entropy"]["mean"], abs=1e-5)
    maps = doc["anomaly"]["maps"]
    assert len(maps) == 12
    assert sum(m["at_peak"] for m in maps) == pytest.approx(doc["anomaly"]["map_max"], abs=1e-3)
    assert doc["anomaly"]["map_max"] == pytest.approx(ref["anomaly"]["map_max"], abs=1e-3)
    arrays = np.load(out / "explain.npz")
    assert arrays["top1"].shape == (4, 8, 8) and arrays["smoothed"].shape == (12, 64, 64)
    np.testing.assert_allclose(arrays["smoothed"].sum(0), arrays["anomaly_map"], atol=1e-3)

    assert main(args) == 2  # refuses to overwrite
    assert "overwrite" in capsys.readouterr().err


def test_analyze_cli_matches_accumulator(model, checkpoint, image_dir, tmp_path):
    from moeclip.cli.analyze import collect_images, spread
    from moeclip.data.imageio import load_image
    from moeclip.data.transforms import preprocess_image

    out = tmp_path / "analyze"
    assert main(["analyze", "experts", "--checkpoint", str(checkpoint), "--images", str(image_dir),
                 "--max-images", "4", "--batch-size", "3", "--out", str(out), "--device", "cpu"]) == 0
    doc = json.loads((out / "experts.json").read_text())
    assert doc["images"] == 4 and doc["num_experts"] == 4 and len(doc["layers"]) == 4
    paths = spread(collect_images([], [str(image_dir)]), 4)
    acc = X.ExpertStatsAccumulator(model)
    acc.update(torch.stack([preprocess_image(load_image(p), 64) for p in paths]))
    for layer, want in zip(doc["layers"], acc.result()):
        sim = np.array(layer["similarity"], dtype=float)
        assert np.allclose(np.diag(sim), 1) and np.array_equal(sim, sim.T)
        np.testing.assert_allclose(sim, want.similarity, atol=1e-6)
        assert layer["mean_off_diagonal_similarity"] == pytest.approx(want.mean_off_diagonal, abs=1e-6)
        assert sum(layer["load"]["top1"]) == pytest.approx(1.0)
        assert sum(layer["load"]["topk"]) == pytest.approx(2.0)
        _check_png(out / layer["figure"], (250, 200))
    _check_png(out / doc["load_figure"])
    offs = [layer["mean_off_diagonal_similarity"] for layer in doc["layers"]]
    assert doc["mean_off_diagonal_similarity"] == pytest.approx(np.mean(offs))


def test_analyze_cli_data_argument_and_errors(checkpoint, tmp_path, capsys):
    from moeclip.cli.analyze import spread
    from moeclip.data.synth import generate_dataset

    generate_dataset(tmp_path / "synth", ["dots"], n_normal=2, n_anomalous=2, image_size=64)
    out = tmp_path / "a"
    assert main(["analyze", "experts", "--checkpoint", str(checkpoint), "--data", f"folder={tmp_path / 'synth'}",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "experts.json").read_text())["images"] == 4
    assert main(["analyze", "experts", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")]) == 2
    assert main(["analyze", "experts", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "nope*.png"),
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "matches nothing" in err
    assert spread(list("abcdefghij"), 3) == ["a", "d", "g"] and spread(list("ab"), 0) == ["a", "b"]


def test_explain_and_analyze_run_in_bf16(checkpoint, image_dir, tmp_path):
    """bf16 casts the frozen CLIP (Detector); both commands must still run under autocast."""
    img = image_dir / "img0.png"
    out = tmp_path / "explain16"
    assert main(["explain", "--checkpoint", str(checkpoint), "--object", "bottle", str(img), "--out", str(out),
                 "--device", "cpu", "--precision", "bf16"]) == 0
    assert json.loads((out / "explain.json").read_text())["files"]["experts"]
    out = tmp_path / "analyze16"
    assert main(["analyze", "experts", "--checkpoint", str(checkpoint), "--images", str(image_dir),
                 "--max-images", "3", "--out", str(out), "--device", "cpu", "--precision", "bf16"]) == 0
    assert json.loads((out / "experts.json").read_text())["images"] == 3
