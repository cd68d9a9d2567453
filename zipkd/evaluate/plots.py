"""PNG plots of a report (matplotlib figures built without pyplot, so no display and no global state):
quality against measured speedup across a family with its Pareto front, and per-task retention bars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zipkd.evaluate.report import ModelEval, Report

PARETO_PNG = "pareto.png"
RETENTION_PNG = "retention.png"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (at least as fast and as good, better in one), sorted
    by the first coordinate."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _axes_values(report: Report) -> tuple[list[ModelEval], list[float], list[float], str, str]:
    """(models, x, y, xlabel, ylabel) of the quality-vs-speed plot, using what the report has."""
    models = [m for m in report.all_models() if m.mean_score is not None]
    with_base = report.base is not None
    if with_base and all(m.measured_speedup is not None for m in models):
        x = [float(m.measured_speedup) for m in models]
        xlabel = "measured speedup vs base (×)"
    elif all(m.speed for m in models):
        x = [float(m.speed["tokens_per_s"]) for m in models]
        xlabel = "measured throughput (tokens/s)"
    else:
        x = [float(i) for i in range(len(models))]
        xlabel = "model (no speed measured)"
    if with_base and all(m is report.base or m.mean_retention is not None for m in models):
        y = [100.0 if m is report.base else 100.0 * float(m.mean_retention) for m in models]
        ylabel = "mean retention of base quality (%)"
    else:
        y = [float(m.mean_score) for m in models]
        ylabel = "mean task score"
    return models, x, y, xlabel, ylabel


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def pareto_figure(report: Report) -> Any:
    """Quality vs measured speedup for every model of the report, the Pareto front drawn as a line."""
    models, x, y, xlabel, ylabel = _axes_values(report)
    fig = _figure()
    ax = fig.add_subplot()
    front = pareto_front(list(zip(x, y, strict=True)))
    for i, m in enumerate(models):
        on_front = i in front
        ax.scatter(
            x[i],
            y[i],
            s=60 if on_front else 35,
            marker="*" if m is report.base else "o",
            color="tab:red" if on_front else "tab:gray",
            zorder=3,
        )
        ax.annotate(
            m.name + (" (base)" if m is report.base else ""),
            (x[i], y[i]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    if len(front) > 1:
        ax.plot(
            [x[i] for i in front],
            [y[i] for i in front],
            color="tab:red",
            lw=1.2,
            ls="--",
            label="Pareto front",
            zorder=2,
        )
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    regime = report.regime or {}
    where = f" — {regime.get('device')} {regime.get('regime')}, batch {regime.get('batch')}" if regime else ""
    ax.set_title(f"Quality vs speed{where}")
    ax.grid(True, alpha=0.3)
    return fig


def retention_figure(report: Report) -> Any:
    """Per-task bars: retention of the base score (%) for each model, or raw scores when there is no base."""
    import numpy as np

    with_base = report.base is not None
    models = list(report.models) if with_base else report.all_models()
    tasks = list(report.tasks)
    fig = _figure(max(6.0, 1.1 * len(tasks) + 2), 4.5)
    ax = fig.add_subplot()
    pos = np.arange(len(tasks))
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        if with_base:
            vals = [100.0 * m.retention[t] if m.retention.get(t) is not None else np.nan for t in tasks]
        else:
            vals = [m.quality[t]["score"] if t in m.quality else np.nan for t in tasks]
        ax.bar(pos + (k - (len(models) - 1) / 2) * width, vals, width, label=m.name)
    if with_base:
        ax.axhline(100.0, color="black", lw=0.8, ls=":")
    ax.set_xticks(pos, tasks, rotation=30, ha="right")
    ax.set_xlabel("task")
    ax.set_ylabel("retention of base score (%)" if with_base else "score")
    ax.set_title("Per-task retention vs base" if with_base else "Per-task scores")
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def save_plots(report: Report, folder: str | os.PathLike) -> list[Path]:
    """Write pareto.png and retention.png into `folder`."""
    folder = Path(folder)
    out = []
    for name, build in ((PARETO_PNG, pareto_figure), (RETENTION_PNG, retention_figure)):
        fig = build(report)
        fig.savefig(folder / name, format="png")
        out.append(folder / name)
    return out
