"""Metric vs latency scatter with the Pareto front."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ..result import Result  # noqa: E402
from .markdown import batch_key, primary_metric, runtimes  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P"]
LOWER_IS_BETTER = ("loss", "error", "rmse", "mse", "mae")
BASE_COLOR = "#d62728"


def _preferred_runtime(result: Result) -> str | None:
    rts = runtimes(result)
    for rt in ("onnxruntime", "torch"):
        if rt in rts:
            return rt
    return rts[0] if rts else None


def _pareto(points: list[tuple[float, float]], lower_better: bool) -> list[tuple[float, float]]:
    """Points not beaten by a faster point, scanning from the lowest latency."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if lower_better else -p[1])):
        if not front or (y < front[-1][1] if lower_better else y > front[-1][1]):
            front.append((x, y))
    return front


def _crowding(placed: list, points: list, x: float, y: float) -> int:
    """How many already-labelled points sit close to (x, y), so labels can be stacked apart."""
    xs, ys = [q[0] for q in points], [q[1] for q in points]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    return sum(abs(px - x) / dx < 0.25 and abs(py - y) / dy < 0.05 for px, py in placed)


def pareto_plot(result: Result, path: str | Path) -> Path:
    path = Path(path)
    metric = primary_metric(result)
    lower_better = any(s in metric.lower() for s in LOWER_IS_BETTER)
    rows = result.variant_rows()
    pref = _preferred_runtime(result)
    batches = sorted({b for v in rows for b in v.latency_ms.get(pref, {})}, key=batch_key)
    batch = batches[-1] if batches else None
    max_size = max((v.size_bytes for v in rows), default=0) or 1

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    handles, points, labels = [], [], []
    palette = [c for k, c in enumerate(plt.get_cmap("tab10").colors) if k != 3]  # 3 is red
    for i, rt in enumerate(runtimes(result)):
        marker = MARKERS[i % len(MARKERS)]
        drawn = False
        for j, v in enumerate(rows):
            p = v.latency_ms.get(rt, {}).get(batch) if batch is not None else None
            y = v.metrics.get(metric)
            if p is None or y is None:
                continue
            is_base = v is result.baseline
            color = BASE_COLOR if is_base else palette[(j - 1) % len(palette)]
            ax.scatter(p.p50, y, s=30 + 400 * v.size_bytes / max_size, marker=marker,
                       c=[color], alpha=0.8, edgecolors="black", linewidths=2 if is_base else 0.6,
                       zorder=3)
            labels.append((p.p50, y, v.name + (f" [{rt}]" if len(runtimes(result)) > 1 else ""), is_base))
            points.append((p.p50, y))
            drawn = True
        if drawn:
            handles.append(Line2D([], [], marker=marker, color="grey", linestyle="", label=rt))

    placed: list[tuple[float, float]] = []
    for x, y, text, bold in labels:
        ax.annotate(text, (x, y), xytext=(7, 7 - 11 * _crowding(placed, points, x, y)),
                    textcoords="offset points", fontsize=8, fontweight="bold" if bold else "normal",
                    zorder=4)
        placed.append((x, y))
    if points:
        front = _pareto(points, lower_better)
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1, zorder=2)
        handles.append(Line2D([], [], color="black", linestyle="--", label="Pareto front"))
        handles.append(Line2D([], [], marker="o", color=BASE_COLOR, markeredgecolor="black",
                              markeredgewidth=2, linestyle="", label="baseline"))
        ax.margins(0.15)
    else:
        ax.text(0.5, 0.5, "nothing to plot: no variant has both latency and metric", ha="center", va="center",
                transform=ax.transAxes)
    handles.append(Line2D([], [], linestyle="", label=f"marker area ∝ size on disk "
                          f"(largest {max_size / 1e6:.2f} MB)"))
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_xlabel(f"p50 latency (ms), batch size {batch or '?'}")
    direction = "lower is better" if lower_better else "higher is better"
    ax.set_ylabel(f"{metric or 'metric'} ({direction})")
    ax.set_title(f"{result.task} / {result.dataset}: {metric} vs latency "
                 f"(batch {batch or '?'}, {result.threads} threads)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
