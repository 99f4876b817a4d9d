"""Plotting helpers shared by the benchmarks: grouped bars, target markers, PNG output.

Why a module of its own: every benchmark draws the same kind of picture - a few metrics,
voxrelay beside a baseline measured in the same run, sometimes a target - and should draw
it the same way. matplotlib runs with the Agg backend (no display, no GUI toolkit), so
plots render on a headless CI machine; it is imported lazily, so the benchmarks' other
code does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# One colour per series name, so voxrelay looks the same in every benchmark's plot.
SERIES_COLOURS: dict[str, str] = {
    "voxrelay": "#1f77b4",
    "naive": "#ff7f0e",
    "direct": "#7f7f7f",
}
_FALLBACK_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


class PlotError(Exception):
    """A plot cannot be drawn (matplotlib missing, or the file cannot be written)."""


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a PlotError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            "matplotlib is needed for the benchmark plot: pip install 'voxrelay[bench]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def colour_for(series: str, index: int) -> str:
    return SERIES_COLOURS.get(series, _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)])


def grouped_bars(
    axes: Any,
    groups: Sequence[str],
    values: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str,
    value_format: str = "{:.3g}",
) -> dict[str, list[tuple[float, float]]]:
    """Draw one bar per (group, series), series side by side within each group.

    ``values[series][g]`` is the value of ``series`` in group ``g`` (None leaves a gap).
    Returns, per series, each bar's (centre x, width), so callers can mark targets.
    """
    series_names = list(values)
    width = 0.8 / max(len(series_names), 1)
    placed: dict[str, list[tuple[float, float]]] = {}
    for s, name in enumerate(series_names):
        offsets = [g - 0.4 + width * (s + 0.5) for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values[name]]
        bars = axes.bar(offsets, heights, width * 0.92, label=name, color=colour_for(name, s))
        for bar, value in zip(bars, values[name], strict=True):
            if value is None:
                continue
            axes.annotate(
                value_format.format(value),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        placed[name] = [(x, width) for x in offsets]
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(groups)
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(ylabel)
    axes.margins(y=0.15)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    return placed


def target_marker(
    axes: Any,
    centre: float,
    width: float,
    level: float,
    label: str,
    *,
    bar_height: float | None,
    passed: bool | None,
) -> None:
    """A dashed line at ``level`` over one bar: the most that bar may reach.

    The label goes on the side of the line away from the bar's top, where the bar's own
    value label sits.
    """
    colour = {True: "#2ca02c", False: "#d62728", None: "#444444"}[passed]
    axes.hlines(
        level, centre - width / 2, centre + width / 2, colors=colour, linestyles="--", linewidth=1.5
    )
    above = bar_height is None or bar_height < level
    axes.annotate(
        label,
        (centre, level),
        ha="center",
        va="bottom" if above else "top",
        fontsize=7,
        color=colour,
        xytext=(0, 2 if above else -2),
        textcoords="offset points",
        bbox={
            "boxstyle": "round,pad=0.15",
            "facecolor": "white",
            "edgecolor": "none",
            "alpha": 0.85,
        },
    )


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as a PNG and close it (figures are not garbage collected)."""
    plt = pyplot()
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.tight_layout()
        figure.savefig(target, dpi=120)
    except OSError as exc:
        raise PlotError(f"cannot write the plot {target}: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)
    return target
