"""Matplotlib figures for explanations, expert analysis and evaluation reports.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never
through ``pyplot``: no global figure registry to leak memory in long runs, no interactive
backend picked up from the environment, and safe from worker threads. Every function
returns a Figure; :func:`save_figure` / :func:`figure_png` write it and release it.

Heat maps at patch-grid resolution are drawn with ``extent`` over the image and nearest
interpolation, so each patch shows as the square of pixels it covers.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

__all__ = [
    "expert_colors",
    "save_figure",
    "figure_png",
    "show_heat",
    "expert_selection_figure",
    "entropy_figure",
    "contributions_figure",
    "similarity_figure",
    "load_figure",
    "curves_figure",
    "histogram_figure",
    "examples_figure",
]

HEAT_CMAP = "jet"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colorbar(fig: Figure, im, **kwargs):
    """Colour bar drawn opaque even when the heat map it describes is translucent."""
    cb = fig.colorbar(im, **kwargs)
    cb.solids.set_alpha(1.0)
    return cb


def expert_colors(n: int) -> list:
    """One distinct RGBA colour per expert (tab10, then tab20)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def save_figure(fig: Figure, path, dpi: int = 100) -> Path:
    """Write a PNG and drop the figure's canvas buffers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    fig.clear()
    return path


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (for embedding in HTML)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    fig.clear()
    return buf.getvalue()


def _extent(image: np.ndarray):
    h, w = image.shape[:2]
    return (-0.5, w - 0.5, h - 0.5, -0.5)


def _nearest_resize(a: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize by index mapping (masks: keeps 0/1 exactly)."""
    if a.shape[:2] == tuple(shape):
        return a
    rows = (np.arange(shape[0]) * a.shape[0] // shape[0]).clip(0, a.shape[0] - 1)
    cols = (np.arange(shape[1]) * a.shape[1] // shape[1]).clip(0, a.shape[1] - 1)
    return a[rows][:, cols]


def _show_image(ax, image: np.ndarray, title: Optional[str] = None) -> None:
    ax.imshow(image, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def show_heat(ax, image: np.ndarray, heat: np.ndarray, vmin=None, vmax=None, cmap: str = HEAT_CMAP,
              alpha: float = 0.5, title: Optional[str] = None):
    """Image with a heat map on top (any heat resolution, stretched over the image)."""
    _show_image(ax, image, title)
    nearest = heat.shape[0] < image.shape[0]
    return ax.imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, extent=_extent(image),
                     interpolation="nearest" if nearest else "bilinear")


# --------------------------------------------------------------------------- explain
def expert_selection_figure(image: np.ndarray, top1: np.ndarray, counts: Sequence[int],
                            mean_weight: Sequence[float], title: str = "") -> Figure:
    """One MoE layer: all experts' top-1 regions together, then one panel per expert.

    Patches an expert does not win are dimmed, so each panel reads as "what this expert
    is responsible for"; the title gives the patch count and the mean renormalised weight
    the router gives the expert on those patches.
    """
    E = len(counts)
    colors = expert_colors(E)
    total = max(int(np.sum(counts)), 1)
    fig = _new_figure(2.3 * (E + 1), 2.75)
    axes = fig.subplots(1, E + 1, squeeze=False)[0]
    assign = np.array([colors[e] for e in range(E)])[top1]          # (H, W, 4)
    assign[..., 3] = 0.55
    _show_image(axes[0], image, "top-1 expert per patch")
    axes[0].imshow(assign, extent=_extent(image), interpolation="nearest")
    for e in range(E):
        sel = top1 == e
        rgba = np.zeros(top1.shape + (4,))
        rgba[~sel] = (0, 0, 0, 0.7)
        rgba[sel] = to_rgba(colors[e], 0.3)
        w = mean_weight[e]
        wtxt = "-" if w is None or np.isnan(w) else f"{w:.2f}"
        _show_image(axes[e + 1], image, f"expert {e}: {int(counts[e])} patches ({100 * counts[e] / total:.0f}%)\n"
                                        f"mean weight {wtxt}")
        axes[e + 1].imshow(rgba, extent=_extent(image), interpolation="nearest")
        for side in axes[e + 1].spines.values():
            side.set_edgecolor(colors[e])
            side.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def entropy_figure(image: np.ndarray, entropies: Sequence[np.ndarray], titles: Sequence[str],
                   max_entropy: float) -> Figure:
    """Router entropy per patch for each MoE layer, on one fixed scale [0, log E]."""
    n = len(entropies)
    fig = _new_figure(2.6 * n + 0.8, 2.9)
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, ent, t in zip(axes, entropies, titles):
        im = show_heat(ax, image, ent, 0.0, max_entropy, cmap="magma", alpha=0.75,
                       title=f"{t}\nmean {float(np.mean(ent)):.2f} nats")
    if im is not None:
        cb = _colorbar(fig, im, ax=list(axes), shrink=0.85)
        cb.set_label(f"entropy (nats; uniform = {max_entropy:.2f})", fontsize=8)
    fig.suptitle("router entropy (low: confident routing)", fontsize=11)
    return fig


def contributions_figure(image: np.ndarray, anomaly_map: np.ndarray, smoothed: np.ndarray,
                         labels: Sequence[str], n_radii: int, peak=None) -> Figure:
    """The anomaly map and the share each feature map adds to it.

    Row 0: input, anomaly map, and each map's value at the peak as bars (they add up to
    the peak value). Below: the blurred, upsampled per-map scores, one row per level and
    one column per PAA radius, all on one colour scale so their sizes compare.
    """
    M = len(labels)
    n_rows = -(-M // n_radii)
    cols = max(n_radii, 3)
    fig = _new_figure(2.6 * cols + 0.8, 2.55 * (n_rows + 1))
    grid = fig.add_gridspec(n_rows + 1, cols)
    ax = fig.add_subplot(grid[0, 0])
    _show_image(ax, image, "input")
    ax = fig.add_subplot(grid[0, 1])
    im = show_heat(ax, image, anomaly_map, title=f"anomaly map (max {float(anomaly_map.max()):.1f})")
    _colorbar(fig, im, ax=ax, location="bottom", shrink=0.8, aspect=30)
    if peak is None:
        peak = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    ax.plot([peak[1]], [peak[0]], marker="+", color="white", markersize=12, mew=2)
    ax = fig.add_subplot(grid[0, 2:] if cols > 3 else grid[0, 2])
    at_peak = smoothed[:, peak[0], peak[1]]
    ax.barh(range(M), at_peak, color=["C%d" % (j // n_radii) for j in range(M)])
    ax.set_yticks(range(M), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_title(f"contribution at the peak (sum {float(at_peak.sum()):.1f})", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    vmin, vmax = float(smoothed.min()), float(smoothed.max())
    axes = []
    for j in range(M):
        ax = fig.add_subplot(grid[1 + j // n_radii, j % n_radii])
        im = show_heat(ax, image, smoothed[j], vmin, vmax,
                       title=f"{labels[j]}: mean {float(smoothed[j].mean()):.1f}")
        axes.append(ax)
    _colorbar(fig, im, ax=axes, shrink=0.6, label="per-map score")
    return fig


# --------------------------------------------------------------------------- analyze
def similarity_figure(sim: np.ndarray, title: str) -> Figure:
    """E x E cosine similarity of expert outputs, annotated, on the fixed scale [-1, 1]."""
    E = sim.shape[0]
    size = 1.2 + 0.6 * E
    fig = _new_figure(size + 1.0, size)
    ax = fig.subplots()
    im = ax.imshow(np.nan_to_num(sim, nan=0.0), cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(E):
        for j in range(E):
            v = sim[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v + 0.0:.2f}".replace("-0.00", "0.00"),
                    ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(v) and abs(v) > 0.6 else "black")
    ax.set_xticks(range(E))
    ax.set_yticks(range(E))
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    return fig


def load_figure(top1: Sequence[np.ndarray], topk: Sequence[np.ndarray], titles: Sequence[str], k: int) -> Figure:
    """Per layer, each expert's share of tokens as top-1 and within the top-k."""
    n = len(top1)
    E = len(top1[0]) if n else 0
    fig = _new_figure(max(2.8 * n, 4), 2.8)
    axes = fig.subplots(1, max(n, 1), squeeze=False)[0]
    x = np.arange(E)
    for ax, a, b, t in zip(axes, top1, topk, titles):
        ax.bar(x - 0.2, a, 0.4, label="top-1")
        ax.bar(x + 0.2, np.asarray(b) / k, 0.4, label=f"top-{k} / {k}")
        ax.axhline(1.0 / E, color="k", ls="--", lw=0.8)
        ax.set_xticks(x)
        ax.set_xlabel("expert")
        ax.set_title(t, fontsize=9)
    axes[0].set_ylabel("share of tokens")
    axes[0].legend(fontsize=7)
    fig.suptitle("expert load (dashed: uniform)", fontsize=10)
    return fig


# --------------------------------------------------------------------------- report
def curves_figure(roc: tuple, pr: tuple, title: str, auroc: Optional[float] = None,
                  ap: Optional[float] = None, prevalence: Optional[float] = None) -> Figure:
    """ROC (fpr, tpr) and precision-recall (recall, precision) side by side."""
    fig = _new_figure(6.4, 3.0)
    a, b = fig.subplots(1, 2)
    a.plot(*roc, lw=1.5)
    a.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    a.set_xlabel("false positive rate")
    a.set_ylabel("true positive rate")
    a.set_title("ROC" + (f" (AUROC {100 * auroc:.1f})" if auroc is not None else ""), fontsize=9)
    b.plot(*pr, lw=1.5, drawstyle="steps-post")
    if prevalence is not None:
        b.axhline(prevalence, color="grey", ls=":", lw=0.8)
    b.set_xlabel("recall")
    b.set_ylabel("precision")
    b.set_title("precision-recall" + (f" (AP {100 * ap:.1f})" if ap is not None else ""), fontsize=9)
    for ax in (a, b):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    fig.suptitle(title, fontsize=10)
    return fig


def histogram_figure(scores: np.ndarray, labels: np.ndarray, title: str, bins: int = 30) -> Figure:
    """Image scores of normal vs anomalous images, on shared bins."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    fig = _new_figure(4.6, 2.8)
    ax = fig.subplots()
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    ax.hist(scores[~labels], bins=edges, alpha=0.6, label=f"normal ({int((~labels).sum())})", color="tab:blue")
    ax.hist(scores[labels], bins=edges, alpha=0.6, label=f"anomalous ({int(labels.sum())})", color="tab:red")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def examples_figure(images: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                    masks: Sequence[Optional[np.ndarray]], titles: Sequence[str], suptitle: str = "",
                    vmin: Optional[float] = None, vmax: Optional[float] = None) -> Figure:
    """A row of anomaly-map overlays on one colour scale, ground truth outlined in green."""
    n = len(images)
    fig = _new_figure(2.5 * n, 2.9)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, image, amap, mask, title in zip(axes, images, maps, masks, titles):
        show_heat(ax, image, np.asarray(amap, dtype=np.float32), vmin, vmax, title=title)
        if mask is not None and np.any(mask):
            ax.contour(_nearest_resize(np.asarray(mask, dtype=float), image.shape[:2]), levels=[0.5],
                       colors="lime", linewidths=1.0)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig
