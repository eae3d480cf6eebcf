"""Charts drawn as SVG on the server: no script, no library, readable with JavaScript off.

Pure functions of plain series to SVG text; the viewBox makes them scale to the page width.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

PALETTE = ("#2f6fb0", "#e0a030", "#c0392b", "#7a56a8", "#3a9b6a")
W, H, LEFT, BOTTOM, TOP = 480, 200, 48, 24, 10


def _axis(max_value: float, unit: str = "") -> list[str]:
    out = []
    for frac in (0.0, 0.5, 1.0):
        y = TOP + (H - TOP - BOTTOM) * (1 - frac)
        value = max_value * frac
        label = f"{value:.0f}{unit}" if max_value >= 10 or unit else f"{value:.1f}"
        out.append(f'<line x1="{LEFT}" x2="{W - 4}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    return out


def _x_labels(labels: Sequence[str], step_px: float) -> list[str]:
    every = max(1, -(-len(labels) // 6))
    return [
        f'<text x="{LEFT + step_px * (i + 0.5):.1f}" y="{H - 8}" text-anchor="middle" class="tick">'
        f"{escape(label)}</text>"
        for i, label in enumerate(labels) if i % every == 0
    ]


def _legend(names: Sequence[str]) -> str:
    items = "".join(
        f'<span class="key"><svg viewBox="0 0 10 10" class="swatch"><rect width="10" height="10" '
        f'fill="{PALETTE[i % len(PALETTE)]}"/></svg>{escape(n)}</span>'
        for i, n in enumerate(names)
    )
    return f'<div class="legend">{items}</div>'


def stacked_bars(title: str, labels: Sequence[str], series: dict[str, Sequence[float]]) -> str:
    """Bars per label, one stacked segment per series (e.g. per hour: found by webhook / history)."""
    n = max(1, len(labels))
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    top = max([*totals, 1.0])
    step = (W - LEFT - 4) / n
    parts = [f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}" class="chart">',
             f"<title>{escape(title)}</title>", *_axis(top)]
    for i in range(len(labels)):
        y: float = H - BOTTOM
        for s, values in enumerate(series.values()):
            h = (H - TOP - BOTTOM) * values[i] / top
            if h > 0:
                y -= h
                parts.append(
                    f'<rect x="{LEFT + step * i + step * 0.15:.1f}" y="{y:.1f}" width="{step * 0.7:.1f}" '
                    f'height="{h:.1f}" fill="{PALETTE[s % len(PALETTE)]}"/>')
    parts += _x_labels(labels, step)
    parts.append("</svg>")
    return f'<figure><figcaption>{escape(title)}</figcaption>{"".join(parts)}{_legend(list(series))}</figure>'


def line(title: str, labels: Sequence[str], values: Sequence[float | None], unit: str = "%",
         top: float = 100.0) -> str:
    """A line over labels; None leaves a hole (an hour with nothing to measure)."""
    n = max(1, len(labels))
    step = (W - LEFT - 4) / n
    parts = [f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}" class="chart">',
             f"<title>{escape(title)}</title>", *_axis(top, unit)]
    points: list[str] = []
    segments: list[list[str]] = []
    for i, value in enumerate(values):
        if value is None:
            if points:
                segments.append(points)
            points = []
            continue
        x = LEFT + step * (i + 0.5)
        y = TOP + (H - TOP - BOTTOM) * (1 - min(value, top) / top)
        points.append(f"{x:.1f},{y:.1f}")
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{PALETTE[0]}"/>')
    if points:
        segments.append(points)
    parts += [f'<polyline points="{" ".join(seg)}" fill="none" stroke="{PALETTE[0]}" stroke-width="2"/>'
              for seg in segments if len(seg) > 1]
    parts += _x_labels(labels, step)
    parts.append("</svg>")
    return f"<figure><figcaption>{escape(title)}</figcaption>{''.join(parts)}</figure>"
