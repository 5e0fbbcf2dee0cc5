"""The HTML evaluation report: curves and scores against the metrics, page content, images load."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from moeclip.analysis.report import (
    ClassData,
    ExampleImage,
    final_image_scores,
    pick_examples,
    pr_curve,
    report_from_eval,
    roc_curve,
    write_report,
)
from moeclip.metrics import auroc, average_precision, evaluate_class

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _class(rng, root: Path, name: str, n_normal=6, n_anom=8, size=32, domain="industrial"):
    """Random maps/masks/scores of one class, its image files, and its official metrics."""
    n = n_normal + n_anom
    labels = np.r_[np.zeros(n_normal), np.ones(n_anom)].astype(int)
    maps = (rng.random((n, size, size)) * 4).astype(np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(labels):
        masks[i, 8:16, 10:20] = True
        maps[i, 8:16, 10:20] += rng.random() * 3
    raw = (rng.random(n) * 0.3 + 0.4 + 0.1 * labels).astype(np.float32)
    paths = []
    for i in range(n):
        p = root / name / ("good" if labels[i] == 0 else "defect") / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    metrics = evaluate_class(maps, masks, raw, labels, domain)
    metrics.update(num_images=n, num_anomalous=int(labels.sum()))
    return SimpleNamespace(labels=labels, maps=maps, masks=masks, raw=raw, paths=paths, metrics=metrics)


@pytest.mark.parametrize("ties", [False, True])
def test_curves_match_the_metrics(ties):
    rng = np.random.default_rng(0)
    s = rng.random(200)
    if ties:
        s = np.round(s, 1)
    y = rng.random(200) < 0.3
    fpr, tpr = roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(auroc(s, y), abs=1e-12)
    rec, prec = pr_curve(s, y)
    assert rec[0] == 0 and prec[0] == 1 and rec[-1] == 1
    assert np.sum(np.diff(rec) * prec[1:]) == pytest.approx(average_precision(s, y), abs=1e-12)


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_final_scores_follow_the_official_rule(domain, tmp_path):
    rng = np.random.default_rng(1)
    c = _class(rng, tmp_path, "x", domain=domain)
    final = final_image_scores(c.raw, c.maps.max((1, 2)), domain, (c.maps.min(), c.maps.max()))
    assert auroc(final, c.labels) == pytest.approx(c.metrics["image_auroc"], abs=1e-9)
    assert average_precision(final, c.labels) == pytest.approx(c.metrics["image_ap"], abs=1e-9)


def test_pick_examples():
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.8, 0.05, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    assert pick_examples(scores, labels, 2) == [1, 2, 5, 3]
    assert pick_examples(scores, np.zeros(7), 2) == [1, 4]


def _report_inputs(tmp_path):
    rng = np.random.default_rng(2)
    results, data = {"Synth": {}}, {"Synth": {}}
    for name in ("bottle", "cable"):
        c = _class(rng, tmp_path / "data", name)
        rng_ = (float(c.maps.min()), float(c.maps.max()))
        final = final_image_scores(c.raw, c.maps.max((1, 2)), "industrial", rng_)
        ex = [ExampleImage(c.paths[i], c.maps[i], c.masks[i], float(final[i]), int(c.labels[i]))
              for i in pick_examples(final, c.labels, 2)]
        results["Synth"][name] = c.metrics
        data["Synth"][name] = ClassData(final, c.labels, ex, rng_)
    # a class without pixel ground truth and with anomalies only: n/a everywhere it must be
    results["Synth"]["polyps"] = {"pixel_auroc": None, "image_auroc": None, "num_images": 3, "num_anomalous": 3}
    data["Synth"]["polyps"] = {"scores": [0.2, 0.4, 0.3], "labels": [1, 1, 1], "examples": [
        {"path": str(tmp_path / "missing.png"), "anomaly_map": np.ones((8, 8)), "score": 0.2, "label": 1}]}
    config = {"model": {"experts": 4}, "note": "<script>alert(1)</script>"}
    return results, data, config


def _img_srcs(page: str):
    return re.findall(r"<img src='([^']+)'", page)


def test_report_embedded_is_self_contained(tmp_path):
    results, data, config = _report_inputs(tmp_path)
    path = write_report(tmp_path / "out", results, data, config)
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text()
    srcs = _img_srcs(page)
    # per class with both labels: curves, histogram, normals, anomalous; polyps: histogram, anomalous
    assert len(srcs) == 4 + 4 + 2
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
    assert "<script>" not in page and "&lt;script&gt;" in page  # config is escaped
    bottle = results["Synth"]["bottle"]
    assert f"{100 * bottle['image_auroc']:.1f}" in page and f"{100 * bottle['pixel_ap']:.1f}" in page
    row = re.search(r"polyps</a></td>(.*?)</tr>", page).group(1)
    assert "n/a" in row
    assert "average" in page and "highest-scored normal" in page and "lowest-scored anomalous" in page
    assert not list((tmp_path / "out").glob("report_files"))


def test_report_with_linked_files(tmp_path):
    results, data, config = _report_inputs(tmp_path)
    path = write_report(tmp_path / "linked", results, data, config, embed=False, filename="r.html")
    srcs = _img_srcs(path.read_text())
    assert srcs and all(s.startswith("report_files/") for s in srcs)
    for s in srcs:
        assert (path.parent / s).stat().st_size > 2000


def test_report_from_eval_results(tmp_path):
    rng = np.random.default_rng(4)
    c = _class(rng, tmp_path / "data", "wood", domain="medical")
    outputs = SimpleNamespace(image_scores=c.raw, map_max=c.maps.max((1, 2)), labels=c.labels, paths=c.paths,
                              maps=c.maps, masks=c.masks)
    r = SimpleNamespace(source="Mine", domain="medical", per_class={"wood": c.metrics},
                        average=dict(c.metrics), outputs={"wood": outputs})
    path = report_from_eval(tmp_path / "ev", [r], {"x": 1}, max_examples=2)
    page = path.read_text()
    assert len(_img_srcs(page)) == 4
    assert "Mine / wood" in page and "8 anomalous" in page
    assert f"{100 * c.metrics['image_auroc']:.1f}" in page


def _loaded_images_playwright(url: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url, wait_until="load", timeout=30000)
            return page.evaluate("() => Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        finally:
            browser.close()


def _loaded_images_dump_dom(page_path: Path):
    """Without Playwright: a copy of the page whose script records each image's state in the DOM."""
    probe = page_path.with_name("_probe.html")
    script = ("<script>addEventListener('load',()=>{document.body.setAttribute('data-imgs',"
              "JSON.stringify(Array.from(document.images).map(i=>[i.complete,i.naturalWidth])))})</script>")
    probe.write_text(page_path.read_text().replace("</body>", script + "</body>"))
    out = subprocess.run([CHROMIUM, *CHROMIUM_ARGS, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=90)
    m = re.search(r'data-imgs="([^"]*)"', out.stdout)
    assert m, f"chromium printed no DOM: {out.stderr[-500:]}"
    import html
    import json

    return json.loads(html.unescape(m.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
@pytest.mark.parametrize("embed", [True, False])
def test_report_images_load_in_chromium(tmp_path, embed):
    results, data, config = _report_inputs(tmp_path)
    path = write_report(tmp_path / "out", results, data, config, embed=embed)
    try:
        states = _loaded_images_playwright(path.as_uri())
    except ImportError:
        states = _loaded_images_dump_dom(path)
    except Exception as exc:  # a Playwright that cannot drive this Chromium: use the plain CLI
        if "playwright" not in type(exc).__module__:
            raise
        states = _loaded_images_dump_dom(path)
    assert len(states) == 10
    assert all(complete and width > 0 for complete, width in states), states
