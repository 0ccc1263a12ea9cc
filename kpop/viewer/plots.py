"""Inline SVG line plots (the viewer must work offline: no plotting library, no CDN)."""

from __future__ import annotations

from html import escape
from typing import Mapping, Sequence

Points = Sequence[tuple[float, float]]
# one colour per series of a panel, in order; distinct for the common colour-vision deficiencies
# (blue / orange / green / purple are told apart by lightness as well as hue)
SERIES_COLOURS = ("#3b6fd8", "#e8710a", "#1e8e3e", "#9334e6")


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi == lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def line_plot(points: Points, title: str, width: int = 360, height: int = 200) -> str:
    """An SVG document of `points` (x, y) joined by a line, with axes, ticks and a title."""
    return series_plot({title: points}, title, width, height)


def series_plot(series: Mapping[str, Points], title: str, width: int = 360, height: int = 200) -> str:
    """An SVG document of several named series on shared axes; a legend names them when there
    are more than one. Series without points are left out (a run may log only some metrics)."""
    named = [(name, sorted(pts)) for name, pts in series.items() if pts]
    if not named:
        raise ValueError("a plot needs at least one point")
    if len(named) > len(SERIES_COLOURS):
        raise ValueError(f"at most {len(SERIES_COLOURS)} series per plot, got {len(named)}")
    xs = [x for _, pts in named for x, _ in pts]
    ys = [y for _, pts in named for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y0 == y1:  # a flat series still gets a visible band
        y0, y1 = y0 - 0.5, y1 + 0.5
    legend = len(named) > 1
    left, right, top, bottom = 48, 10, 24 + (14 if legend else 0), 28
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (pw * (x - x0) / (x1 - x0) if x1 != x0 else pw / 2)

    def sy(y: float) -> float:
        return top + ph * (1 - (y - y0) / (y1 - y0))

    lines, keys, kx = [], [], left
    for (name, pts), colour in zip(named, SERIES_COLOURS):
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
        label = f"{escape(name)} " if legend else ""
        dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}">'
                       f"<title>{label}step {x:g}: {y:.4g}</title></circle>" for x, y in pts)
        lines.append(f'<path d="{path}" class="series" stroke="{colour}" data-series="{escape(name)}"/>{dots}')
        if legend:
            keys.append(f'<line x1="{kx}" x2="{kx + 14}" y1="30" y2="30" stroke="{colour}" stroke-width="3"/>'
                        f'<text x="{kx + 18}" y="34">{escape(name)}</text>')
            kx += 18 + 6 * len(name) + 12  # ~6 px per character at the 10 px legend font
    grid = "".join(f'<line x1="{left}" x2="{left + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
                   for v in _ticks(y0, y1))
    xt = "".join(f'<text x="{sx(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{v:.4g}</text>'
                 for v in _ticks(x0, x1, min(4, max(1, len(set(xs)) - 1))))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
            f'<text x="{left}" y="15" class="title">{escape(title)}</text>{"".join(keys)}{grid}{xt}'
            f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" class="axis"/>'
            f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>'
            f'{"".join(lines)}</svg>')
