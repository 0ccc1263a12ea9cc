"""Inline SVG line plots (the viewer must work offline: no plotting library, no CDN)."""

from __future__ import annotations

from html import escape
from typing import Sequence


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi == lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def line_plot(points: Sequence[tuple[float, float]], title: str, width: int = 360, height: int = 200) -> str:
    """An SVG document of `points` (x, y) joined by a line, with axes, ticks and a title."""
    if not points:
        raise ValueError("line_plot needs at least one point")
    pts = sorted(points)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y0 == y1:  # a flat series still gets a visible band
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 48, 10, 24, 28
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (pw * (x - x0) / (x1 - x0) if x1 != x0 else pw / 2)

    def sy(y: float) -> float:
        return top + ph * (1 - (y - y0) / (y1 - y0))

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5"><title>step {x:g}: {y:.4g}</title></circle>'
                   for x, y in pts)
    grid = "".join(f'<line x1="{left}" x2="{left + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
                   for v in _ticks(y0, y1))
    xt = "".join(f'<text x="{sx(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{v:.4g}</text>'
                 for v in _ticks(x0, x1, min(4, max(1, len(set(xs)) - 1))))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
            f'<text x="{left}" y="15" class="title">{escape(title)}</text>{grid}{xt}'
            f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" class="axis"/>'
            f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>'
            f'<path d="{path}" class="series"/>{dots}</svg>')
