"""A self-contained HTML evaluation report: metrics, curves, failure cases, score histograms, config.

Input structure of :func:`write_report` (everything nested dataset -> class, in display order)::

    results = {                         # metrics as fractions in [0, 1] (None = not applicable)
        "MVTec": {
            "bottle": {"pixel_auroc": 0.93, "pixel_ap": 0.51, ..., "image_auroc": 0.97,
                       "num_images": 83, "num_anomalous": 63},   # counts optional
            ...,
            "average": {...},           # optional; computed over the classes when absent
        },
    }
    per_class_data = {
        "MVTec": {
            "bottle": ClassData(
                scores=final_image_scores,  # (N,) what image AUROC/AP rank (see final_image_scores)
                labels=labels,              # (N,) 0 normal, 1 anomalous
                examples=[ExampleImage(path, raw_map, mask, score, label), ...],
                map_range=(lo, hi),         # optional: one colour scale for the class's overlays
            ),
        },
    }
    config = {...}                      # anything JSON-serialisable: shown as the run configuration

``ClassData``/``ExampleImage`` may also be plain dicts with the same keys. The report shows,
per class, the examples' highest-scored normal images and lowest-scored anomalous images
(``max_examples`` of each); :func:`pick_examples` tells a caller which images to keep maps
for. :func:`report_from_eval` builds all of this from ``moeclip.engine.evaluate`` results.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__

__all__ = [
    "ExampleImage",
    "ClassData",
    "write_report",
    "report_from_eval",
    "pick_examples",
    "final_image_scores",
    "roc_curve",
    "pr_curve",
]

REPORT_FILE = "report.html"
ASSET_DIR = "report_files"
#: Metric columns, in this order, when present in ``results``.
METRIC_COLUMNS = ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1_max", "image_auroc", "image_ap",
                  "image_f1_max")


@dataclass
class ExampleImage:
    """One image shown in the report with its anomaly map."""

    path: str
    anomaly_map: np.ndarray          # raw map (h, w), any resolution (stretched over the image)
    mask: Optional[np.ndarray] = None  # ground truth (h', w'), any resolution; None: no outline
    score: Optional[float] = None    # final image score (same scale as ClassData.scores)
    label: int = 0


@dataclass
class ClassData:
    """Per-image scores and labels of one class, plus a few images to show."""

    scores: np.ndarray
    labels: np.ndarray
    examples: Sequence[ExampleImage] = field(default_factory=list)
    map_range: Optional[Tuple[float, float]] = None


def _as_class_data(d: Union[ClassData, Mapping]) -> ClassData:
    if isinstance(d, ClassData):
        cd = d
    else:
        cd = ClassData(d["scores"], d["labels"], d.get("examples", ()), d.get("map_range"))
    examples = [e if isinstance(e, ExampleImage) else ExampleImage(**e) for e in cd.examples]
    return ClassData(np.asarray(cd.scores, dtype=np.float64).reshape(-1),
                     np.asarray(cd.labels).reshape(-1).astype(bool), examples, cd.map_range)


# --------------------------------------------------------------------------- numbers
def final_image_scores(image_scores, map_max, domain: str, map_range: Optional[Tuple[float, float]] = None):
    """The official per-class image score the metrics rank (:func:`moeclip.metrics.protocol.final_image_scores_`).

    Per-image map maxima are normalised with the class's map range ``(lo, hi)`` (default: the
    range of ``map_max``) when it leaves [0, 1]; raw image scores likewise with their own range.
    """
    from ..metrics.protocol import final_image_scores_, minmax_scale

    img = np.array(image_scores, dtype=np.float64).reshape(-1)
    mx = np.array(map_max, dtype=np.float64).reshape(-1)
    lo, hi = map_range if map_range is not None else (mx.min(), mx.max())
    return final_image_scores_(img, mx, domain, minmax_scale(mx, float(lo), float(hi)))


def pick_examples(scores, labels, n: int = 3) -> List[int]:
    """Indices of the ``n`` highest-scored normal and ``n`` lowest-scored anomalous images:
    the likeliest false alarms and misses, the images worth looking at."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    normal = np.flatnonzero(~labels)
    anomalous = np.flatnonzero(labels)
    top_normal = normal[np.argsort(-scores[normal], kind="stable")][:n]
    low_anomalous = anomalous[np.argsort(scores[anomalous], kind="stable")][:n]
    return [int(i) for i in np.concatenate([top_normal, low_anomalous])]


def roc_curve(scores, labels) -> Tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0); trapezoidal area = AUROC."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    P, N = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / N], np.r_[0.0, tp / P]


def pr_curve(scores, labels) -> Tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, from recall 0 / precision 1 (as
    scikit-learn draws it); ``sum(diff(recall) * precision[1:])`` = average precision."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / max(int(y.sum()), 1)
    return np.r_[0.0, recall], np.r_[1.0, precision]


def _auc(x, y) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


# --------------------------------------------------------------------------- images
class _Assets:
    """Turns figures into ``<img>`` sources: data URIs, or PNG files beside the report."""

    def __init__(self, out_dir: Path, embed: bool, dpi: int):
        self.out_dir, self.embed, self.dpi = out_dir, embed, dpi
        self.count = 0

    def add(self, fig, stem: str) -> str:
        from .viz import figure_png, save_figure

        self.count += 1
        if self.embed:
            return "data:image/png;base64," + base64.b64encode(figure_png(fig, self.dpi)).decode("ascii")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
        name = f"{self.count:03d}_{safe}.png"
        save_figure(fig, self.out_dir / ASSET_DIR / name, self.dpi)
        return f"{ASSET_DIR}/{name}"


def _load_display_image(path: str, shape: Tuple[int, int]) -> Tuple[np.ndarray, Optional[str]]:
    """The image resized to the map's shape (what the model saw), or a grey tile if unreadable."""
    from PIL import Image

    from ..data.imageio import load_image
    from ..errors import MoECLIPError

    try:
        img = load_image(path).resize((shape[1], shape[0]), Image.BICUBIC)
        return np.asarray(img), None
    except (MoECLIPError, OSError) as exc:
        return np.full((*shape, 3), 128, np.uint8), str(exc).splitlines()[0]


def _examples_figure(examples: Sequence[ExampleImage], title: str, vmin, vmax):
    from .viz import examples_figure

    images, maps, titles = [], [], []
    for ex in examples:
        amap = np.asarray(ex.anomaly_map, dtype=np.float32)
        image, err = _load_display_image(ex.path, amap.shape[:2])
        score = "" if ex.score is None else f"score {ex.score:.3f}\n"
        name = f"{_short(Path(ex.path).parent.name)}/{_short(Path(ex.path).name)}"
        images.append(image)
        maps.append(amap)
        titles.append(score + name + ("\n(unreadable)" if err else ""))
    return examples_figure(images, maps, [ex.mask for ex in examples], titles, title, vmin, vmax)


def _short(name: str, n: int = 22) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1300px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}
th{background:#f2f2f2}td.name{text-align:left}tr.avg td{font-weight:bold;background:#fafafa}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}section.cls{border-top:1px solid #ddd;margin-top:1.2em}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}pre{background:#f6f6f6;padding:1em;overflow:auto}
.note{color:#666;font-size:90%}
"""


def _pct(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * float(v):.1f}"


def _averaged(classes: Mapping[str, Mapping]) -> Dict[str, Any]:
    from ..metrics import average_results

    rows = [{k: m.get(k) for k in METRIC_COLUMNS if k in m} for m in classes.values()]
    return average_results(rows) if rows else {}


def _metrics_table(dataset: str, classes: Mapping[str, Mapping], anchors: Mapping[str, str]) -> str:
    e = html.escape
    per_class = {k: v for k, v in classes.items() if k != "average"}
    average = classes.get("average") or _averaged(per_class)
    cols = [k for k in METRIC_COLUMNS if any(k in m for m in per_class.values()) or k in average]
    counts = any("num_images" in m for m in per_class.values())
    head = "<tr><th>class</th>" + ("<th>images</th><th>anomalous</th>" if counts else "") + \
           "".join(f"<th>{e(c.replace('_', ' '))}</th>" for c in cols) + "</tr>"
    rows = []
    for name, m in per_class.items():
        link = f"<a href='#{anchors[name]}'>{e(name)}</a>" if name in anchors else e(name)
        cnt = f"<td>{m.get('num_images', '')}</td><td>{m.get('num_anomalous', '')}</td>" if counts else ""
        rows.append(f"<tr><td class='name'>{link}</td>{cnt}" + "".join(f"<td>{_pct(m.get(c))}</td>" for c in cols)
                    + "</tr>")
    cnt = "<td></td><td></td>" if counts else ""
    rows.append("<tr class='avg'><td class='name'>average</td>" + cnt +
                "".join(f"<td>{_pct(average.get(c))}</td>" for c in cols) + "</tr>")
    return f"<h3>{e(dataset)}</h3><table>{head}{''.join(rows)}</table>"


def write_report(out_dir, results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 per_class_data: Mapping[str, Mapping[str, Union[ClassData, Mapping]]],
                 config: Mapping[str, Any], *, title: str = "MoECLIP evaluation report", embed: bool = True,
                 filename: str = REPORT_FILE, max_examples: int = 3, dpi: int = 90) -> Path:
    """Write ``out_dir/filename`` and return its path (input structure in the module docstring).

    ``embed=True`` puts every figure into the HTML as a base64 PNG (one file to share);
    ``embed=False`` writes them to ``out_dir/report_files/`` and links them (smaller page).
    Metric values are percentages in the page; ``None`` shows as "n/a".
    """
    from .viz import curves_figure, histogram_figure

    e = html.escape
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = _Assets(out_dir, embed, dpi)
    datasets = list(dict.fromkeys(list(results) + list(per_class_data)))
    anchors: Dict[str, Dict[str, str]] = {}
    for di, ds in enumerate(datasets):
        anchors[ds] = {c: f"d{di}c{ci}" for ci, c in enumerate(per_class_data.get(ds, {}))}

    body = [f"<h1>{e(title)}</h1><p class='note'>moeclip {e(__version__)}, written "
            f"{_dt.datetime.now().isoformat(timespec='seconds')}. Metrics in percent; n/a where undefined "
            "(no anomalous or no normal images, or no pixel ground truth).</p>", "<h2>Metrics</h2>"]
    for ds in datasets:
        if ds in results:
            body.append(_metrics_table(ds, results[ds], anchors[ds]))

    for ds in datasets:
        classes = per_class_data.get(ds, {})
        if not classes:
            continue
        body.append(f"<h2>{e(ds)}: per class</h2>")
        for name, raw in classes.items():
            cd = _as_class_data(raw)
            metrics = results.get(ds, {}).get(name, {})
            body.append(_class_section(ds, name, cd, metrics, anchors[ds][name], assets, max_examples,
                                       curves_figure, histogram_figure))

    body.append("<h2>Run configuration</h2><pre>" +
                e(json.dumps(config, indent=2, sort_keys=False, default=str)) + "</pre>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    path = out_dir / filename
    from ..fileio import atomic_write_text

    atomic_write_text(path, page)
    return path


def _class_section(ds, name, cd: ClassData, metrics, anchor, assets: _Assets, max_examples,
                   curves_figure, histogram_figure) -> str:
    e = html.escape
    parts = [f"<section class='cls' id='{anchor}'><h3>{e(ds)} / {e(name)}</h3>"]
    n_pos, n_neg = int(cd.labels.sum()), int((~cd.labels).sum())
    parts.append(f"<p>{cd.labels.size} images: {n_neg} normal, {n_pos} anomalous.</p><div class='row'>")
    if n_pos and n_neg:
        auroc = metrics.get("image_auroc")
        ap = metrics.get("image_ap")
        roc, pr = roc_curve(cd.scores, cd.labels), pr_curve(cd.scores, cd.labels)
        fig = curves_figure(roc, pr, f"{name}: image level", auroc if auroc is not None else _auc(*roc),
                            ap if ap is not None else float(np.sum(np.diff(pr[0]) * pr[1][1:])),
                            n_pos / cd.labels.size)
        parts.append(f"<img src='{assets.add(fig, f'{ds}_{name}_curves')}' alt='ROC and PR curves, {e(name)}'>")
    else:
        parts.append("<p class='note'>ROC/PR curves need both normal and anomalous images.</p>")
    if cd.scores.size:
        fig = histogram_figure(cd.scores, cd.labels, f"{name}: image scores")
        parts.append(f"<img src='{assets.add(fig, f'{ds}_{name}_hist')}' alt='score histogram, {e(name)}'>")
    parts.append("</div>")

    examples = list(cd.examples)
    if examples:
        maps = [np.asarray(x.anomaly_map, dtype=np.float32) for x in examples]
        lo, hi = cd.map_range if cd.map_range is not None else (min(float(m.min()) for m in maps),
                                                                 max(float(m.max()) for m in maps))
        key = lambda x: -np.inf if x.score is None else x.score  # noqa: E731
        normal = sorted((x for x in examples if not x.label), key=key, reverse=True)[:max_examples]
        anomalous = sorted((x for x in examples if x.label), key=key)[:max_examples]
        for group, what in ((normal, "highest-scored normal images (false-alarm candidates)"),
                            (anomalous, "lowest-scored anomalous images (miss candidates; green: ground truth)")):
            if group:
                fig = _examples_figure(group, f"{name}: {what}", lo, hi)
                parts.append(f"<div><img src='{assets.add(fig, f'{ds}_{name}_examples')}' alt='{e(what)}, "
                             f"{e(name)}'></div>")
        parts.append(f"<p class='note'>Overlays share one colour scale: raw map values {lo:.3g} to {hi:.3g}.</p>")
    parts.append("</section>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- from the evaluator
def report_from_eval(out_dir, eval_results: Sequence[Any], config: Mapping[str, Any],
                     max_examples: int = 3, **kwargs) -> Path:
    """:func:`write_report` from ``moeclip.engine.evaluate.EvalResult`` objects.

    Uses each class's ``outputs`` (raw image scores, per-image map maxima, labels, paths; maps
    and masks when the evaluation kept them) and the official score rule.
    """
    results: Dict[str, Dict[str, Any]] = {}
    data: Dict[str, Dict[str, ClassData]] = {}
    for r in eval_results:
        results[r.source] = {**r.per_class, "average": r.average}
        data[r.source] = {}
        for name, o in r.outputs.items():
            maps = getattr(o, "maps", None)
            map_range = (float(maps.min()), float(maps.max())) if maps is not None else None
            final = final_image_scores(o.image_scores, o.map_max, r.domain, map_range)
            labels = np.asarray(o.labels).reshape(-1)
            examples = []
            if maps is not None:
                masks = getattr(o, "masks", None)
                for i in pick_examples(final, labels, max_examples):
                    examples.append(ExampleImage(o.paths[i], maps[i], None if masks is None else masks[i],
                                                 float(final[i]), int(labels[i] > 0.5)))
            data[r.source][name] = ClassData(final, labels, examples, map_range)
    return write_report(out_dir, results, data, config, max_examples=max_examples, **kwargs)
