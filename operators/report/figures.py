"""Drawing: numbers in, small self-contained SVG figures out. Pure functions, no I/O.

Each function returns a `Figure`: the SVG, a caption, and the same numbers as a table (to copy, and for screen
readers), so a chart and its table can never disagree. The SVG is written by hand rather than by matplotlib: the
charts are simple (bars, histograms, a heatmap, lines), a hand-written one is ~1-5 KB with real <text> (selectable,
searchable, readable by assistive tech) where matplotlib's is 20-60 KB of glyph paths, and drawing a whole report
takes milliseconds without a 40 MB plotting dependency or its ~1 s import in every report task.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PALETTE = ("#2563eb", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#4b5563",
           "#65a30d", "#7c3aed", "#0d9488")
KEPT, DROPPED, MUTED = "#16a34a", "#dc2626", "#94a3b8"
FONT = "font-family='system-ui,-apple-system,Segoe UI,Roboto,sans-serif'"


@dataclass(frozen=True)
class Figure:
    """One chart: its SVG, a caption, and its numbers as a table."""

    title: str
    caption: str
    svg: str
    headers: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...] = field(default_factory=tuple)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: float) -> str:
    """A number as people read it: thousands separators, at most 4 significant decimals."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _short(label: str, limit: int = 28) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _svg(width: int, height: int, body: str, title: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='{width}' "
            f"height='{height}' role='img' aria-label='{_e(title)}' {FONT} font-size='12'>"
            f"<title>{_e(title)}</title>{body}</svg>")


def _legend(names: Sequence[str], colors: Sequence[str], x: float, y: float) -> str:
    parts, cx = [], x
    for name, color in zip(names, colors, strict=True):
        parts.append(f"<rect x='{cx:.1f}' y='{y - 9:.1f}' width='10' height='10' fill='{color}'/>"
                     f"<text x='{cx + 14:.1f}' y='{y:.1f}'>{_e(_short(name, 24))}</text>")
        cx += 24 + 7 * min(len(name), 24)
    return "".join(parts)


def bar_chart(title: str, items: Sequence[tuple[str, float]], *, caption: str, value_header: str = "value",
              color: str = PALETTE[0], width: int = 640) -> Figure:
    """Horizontal bars, one per (label, value), largest scale = largest value."""
    row_h, left, right = 22, 190, 90
    height = max(1, len(items)) * row_h + 16
    top = max((v for _, v in items), default=0.0) or 1.0
    span = width - left - right
    body = []
    for i, (label, value) in enumerate(items):
        y = 8 + i * row_h
        w = max(0.0, value) / top * span
        body.append(f"<text x='{left - 8}' y='{y + 14}' text-anchor='end'>{_e(_short(label))}</text>"
                    f"<rect x='{left}' y='{y + 3}' width='{w:.1f}' height='{row_h - 6}' fill='{color}' rx='2'>"
                    f"<title>{_e(label)}: {fmt(value)}</title></rect>"
                    f"<text x='{left + w + 6:.1f}' y='{y + 14}'>{fmt(value)}</text>")
    if not items:
        body.append(f"<text x='{left}' y='20' fill='{MUTED}'>no data</text>")
    return Figure(title, caption, _svg(width, height, "".join(body), title), ("label", value_header),
                  tuple((label, value) for label, value in items))


def funnel_chart(title: str, steps: Sequence[tuple[str, int, int, int]], *, caption: str,
                 width: int = 720) -> Figure:
    """Per step (label, in, kept, merged), a bar of records in: kept in green, merged into another record in grey
    (not lost: e.g. the parts of a split conversation), dropped in red.

    Bars share one scale unless the steps' inputs differ more than 20-fold (a synthesis run samples a pool of
    thousands down to a few seeds); then each bar spans its own input, so every step's split stays readable."""
    row_h, left, right = 30, 170, 170
    height = max(1, len(steps)) * row_h + 40
    inputs = [n_in for _, n_in, _, _ in steps if n_in]
    own_scale = bool(inputs) and max(inputs) > 20 * min(inputs)
    span = width - left - right
    merges = any(m for *_, m in steps)
    names, colors = (["kept", "merged", "dropped"], [KEPT, MUTED, DROPPED]) if merges else \
        (["kept", "dropped"], [KEPT, DROPPED])
    body = [_legend(names, colors, left, 16)]
    for i, (label, n_in, kept, merged) in enumerate(steps):
        y = 28 + i * row_h
        dropped = max(0, n_in - kept - merged)
        top = (n_in if own_scale else max(inputs, default=0)) or 1
        x = float(left)
        for value, color, what in ((kept, KEPT, "kept"), (merged, MUTED, "merged"), (dropped, DROPPED, "dropped")):
            if what == "merged" and not merges:
                continue
            w = value / top * span
            body.append(f"<rect x='{x:.1f}' y='{y + 4}' width='{w:.1f}' height='{row_h - 8}' fill='{color}'>"
                        f"<title>{_e(label)}: {what} {fmt(value)}</title></rect>")
            x += w
        rate = f"{kept / n_in:.1%}" if n_in else "–"
        body.append(f"<text x='{left - 8}' y='{y + 17}' text-anchor='end'>{_e(_short(label, 24))}</text>"
                    f"<text x='{x + 6:.1f}' y='{y + 17}'>{fmt(kept)} / {fmt(n_in)} ({rate})</text>")
    return Figure(title, caption, _svg(width, height, "".join(body), title),
                  ("step", "in", "kept", "merged", "dropped"),
                  tuple((label, n_in, kept, merged, n_in - kept - merged) for label, n_in, kept, merged in steps))


def stacked_bars(title: str, rows: Sequence[tuple[str, dict[str, float]]], *, caption: str,
                 width: int = 720) -> Figure:
    """One horizontal bar per row, split into coloured segments (e.g. drops by reason per step)."""
    segments: list[str] = []
    for _, parts in rows:
        segments.extend(k for k in parts if k not in segments)
    others = iter(PALETTE * (1 + len(segments) // len(PALETTE)))
    colors = {s: KEPT if s == "kept" else next(others) for s in segments}  # "kept" is green in every chart
    row_h, left, right = 26, 240, 60
    legend_rows = math.ceil(len(segments) / 4) if segments else 1
    head = 10 + 18 * legend_rows
    height = head + max(1, len(rows)) * row_h + 8
    top = max((sum(p.values()) for _, p in rows), default=0.0) or 1.0
    span = width - left - right
    body = []
    for i in range(0, len(segments), 4):
        chunk = segments[i:i + 4]
        body.append(_legend(chunk, [colors[s] for s in chunk], 10, 16 + 18 * (i // 4)))
    for i, (label, parts) in enumerate(rows):
        y, x = head + i * row_h, float(left)
        body.append(f"<text x='{left - 8}' y='{y + 16}' text-anchor='end'>{_e(_short(label, 34))}</text>")
        for seg, value in parts.items():
            w = value / top * span
            body.append(f"<rect x='{x:.1f}' y='{y + 4}' width='{w:.1f}' height='{row_h - 8}' fill='{colors[seg]}'>"
                        f"<title>{_e(label)} / {_e(seg)}: {fmt(value)}</title></rect>")
            x += w
        body.append(f"<text x='{x + 6:.1f}' y='{y + 16}'>{fmt(sum(parts.values()))}</text>")
    table = tuple((label, seg, value) for label, parts in rows for seg, value in parts.items())
    return Figure(title, caption, _svg(width, height, "".join(body), title), ("row", "segment", "value"), table)


def grouped_bars(title: str, categories: Sequence[str], series: dict[str, Sequence[float]], *, caption: str,
                 width: int = 640) -> Figure:
    """Vertical bars, one group per category and one bar per series (e.g. domain mix before and after)."""
    names = list(series)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    left, bottom, top_pad, height = 50, 40, 30, 260
    plot_h = height - bottom - top_pad
    top = max((v for vals in series.values() for v in vals), default=0.0) or 1.0
    group_w = (width - left - 10) / max(1, len(categories))
    bar_w = min(40.0, group_w * 0.8 / max(1, len(names)))
    body = [_legend(names, colors, left, 16),
            f"<line x1='{left}' y1='{height - bottom}' x2='{width - 10}' y2='{height - bottom}' stroke='{MUTED}'/>"]
    for ci, cat in enumerate(categories):
        gx = left + ci * group_w + (group_w - bar_w * len(names)) / 2
        for si, name in enumerate(names):
            v = series[name][ci]
            h = max(0.0, v) / top * plot_h
            x = gx + si * bar_w
            body.append(f"<rect x='{x:.1f}' y='{height - bottom - h:.1f}' width='{bar_w - 2:.1f}' height='{h:.1f}' "
                        f"fill='{colors[si]}'><title>{_e(cat)} / {_e(name)}: {fmt(v)}</title></rect>"
                        f"<text x='{x + bar_w / 2 - 1:.1f}' y='{height - bottom - h - 4:.1f}' text-anchor='middle' "
                        f"font-size='10'>{fmt(v)}</text>")
        body.append(f"<text x='{left + ci * group_w + group_w / 2:.1f}' y='{height - bottom + 16}' "
                    f"text-anchor='middle'>{_e(_short(cat, 18))}</text>")
    rows = tuple((cat, *(series[n][ci] for n in names)) for ci, cat in enumerate(categories))
    return Figure(title, caption, _svg(width, height, "".join(body), title), ("category", *names), rows)


def histogram(title: str, bins: Sequence[tuple[str, float]], *, caption: str, color: str = PALETTE[0],
              width: int = 480, height: int = 200) -> Figure:
    """Vertical bars over ordered bins (labels under the first, middle and last bar)."""
    left, bottom, top_pad = 10, 34, 14
    plot_h = height - bottom - top_pad
    top = max((v for _, v in bins), default=0.0) or 1.0
    bw = (width - 2 * left) / max(1, len(bins))
    body = [f"<line x1='{left}' y1='{height - bottom}' x2='{width - left}' y2='{height - bottom}' stroke='{MUTED}'/>"]
    marks = set(range(len(bins))) if len(bins) <= 10 else {0, len(bins) // 2, len(bins) - 1}
    for i, (label, v) in enumerate(bins):
        h = max(0.0, v) / top * plot_h
        x = left + i * bw
        body.append(f"<rect x='{x:.1f}' y='{height - bottom - h:.1f}' width='{max(1.0, bw - 1):.1f}' "
                    f"height='{h:.1f}' fill='{color}'><title>{_e(label)}: {fmt(v)}</title></rect>")
        if i in marks:
            body.append(f"<text x='{x + bw / 2:.1f}' y='{height - bottom + 14}' text-anchor='middle' "
                        f"font-size='10'>{_e(_short(label, 14))}</text>")
    body.append(f"<text x='{width - left}' y='{top_pad - 2}' text-anchor='end' font-size='10'>max {fmt(top)}</text>")
    return Figure(title, caption, _svg(width, height, "".join(body), title), ("bin", "count"), tuple(bins))


def _heat(value: float, lo: float, hi: float) -> str:
    t = 0.5 if hi <= lo else (value - lo) / (hi - lo)
    # red (low) -> amber -> green (high), readable with dark text at every stop
    r = int(239 + (134 - 239) * t) if t > 0.5 else 248
    g = int(113 + (239 - 113) * min(1.0, t * 2)) if t <= 0.5 else 239
    b = int(113 + (172 - 113) * t)
    return f"rgb({r},{g},{b})"


def heatmap(title: str, rows: Sequence[str], cols: Sequence[str], values: dict[tuple[str, str], float], *,
            caption: str, lo: float | None = None, hi: float | None = None) -> Figure:
    """A grid of coloured cells with their values (missing cells stay blank), e.g. ability x model scores."""
    cell_w, cell_h, left, head = 110, 24, 230, 36
    width, height = left + cell_w * max(1, len(cols)) + 10, head + cell_h * max(1, len(rows)) + 8
    present = list(values.values())
    lo = min(present, default=0.0) if lo is None else lo
    hi = max(present, default=1.0) if hi is None else hi
    body = [f"<text x='{left + ci * cell_w + cell_w / 2}' y='{head - 10}' text-anchor='middle'>{_e(_short(c, 16))}"
            f"</text>" for ci, c in enumerate(cols)]
    for ri, r in enumerate(rows):
        y = head + ri * cell_h
        body.append(f"<text x='{left - 8}' y='{y + 16}' text-anchor='end'>{_e(_short(r, 31))}</text>")
        for ci, c in enumerate(cols):
            if (r, c) not in values:
                continue
            v = values[(r, c)]
            body.append(f"<rect x='{left + ci * cell_w}' y='{y}' width='{cell_w - 2}' height='{cell_h - 2}' "
                        f"fill='{_heat(v, lo, hi)}'><title>{_e(r)} / {_e(c)}: {fmt(v)}</title></rect>"
                        f"<text x='{left + ci * cell_w + cell_w / 2 - 1}' y='{y + 16}' text-anchor='middle'>{fmt(v)}"
                        f"</text>")
    table = tuple((r, *(values.get((r, c), "") for c in cols)) for r in rows)
    return Figure(title, caption, _svg(width, height, "".join(body), title), ("row", *cols), table)


def line_chart(title: str, series: dict[str, Sequence[tuple[float, float]]], *, caption: str,
               x_label: str = "step", y_label: str = "value", width: int = 640, height: int = 260) -> Figure:
    """Lines with point markers, one per series, on shared axes (e.g. training loss per stage)."""
    left, right, top_pad, bottom = 56, 16, 30, 36
    pts = [p for s in series.values() for p in s]
    x0, x1 = min((p[0] for p in pts), default=0.0), max((p[0] for p in pts), default=1.0)
    y0, y1 = min((p[1] for p in pts), default=0.0), max((p[1] for p in pts), default=1.0)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = width - left - right, height - top_pad - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top_pad + (1 - (y - y0) / (y1 - y0)) * ph

    names = list(series)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    body = [_legend(names, colors, left, 16),
            f"<line x1='{left}' y1='{top_pad + ph}' x2='{left + pw}' y2='{top_pad + ph}' stroke='{MUTED}'/>",
            f"<line x1='{left}' y1='{top_pad}' x2='{left}' y2='{top_pad + ph}' stroke='{MUTED}'/>",
            f"<text x='{left - 6}' y='{top_pad + 4}' text-anchor='end' font-size='10'>{fmt(y1)}</text>",
            f"<text x='{left - 6}' y='{top_pad + ph}' text-anchor='end' font-size='10'>{fmt(y0)}</text>",
            f"<text x='{left}' y='{height - 8}' font-size='10'>{_e(x_label)} {fmt(x0)}</text>",
            f"<text x='{left + pw}' y='{height - 8}' text-anchor='end' font-size='10'>{fmt(x1)}</text>",
            f"<text x='12' y='{top_pad + ph / 2}' font-size='10' transform='rotate(-90 12 {top_pad + ph / 2})' "
            f"text-anchor='middle'>{_e(y_label)}</text>"]
    for name, color in zip(names, colors, strict=True):
        s = sorted(series[name])
        if len(s) > 1:
            d = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(s))
            body.append(f"<path d='{d}' fill='none' stroke='{color}' stroke-width='2'/>")
        body.extend(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='2.5' fill='{color}'>"
                    f"<title>{_e(name)} {x_label} {fmt(x)}: {fmt(y)}</title></circle>" for x, y in s)
    table = tuple((name, x, y) for name in names for x, y in sorted(series[name]))
    return Figure(title, caption, _svg(width, height, "".join(body), title), ("series", x_label, y_label), table)


def scatter_chart(title: str, points: Sequence[tuple[str, float, float, bool]], *, caption: str, x_label: str,
                  y_label: str, width: int = 640, height: int = 320) -> Figure:
    """Labelled points on shared axes; the points flagged True are joined in the given order (a curve, e.g. a
    sweep), the others stand alone (reference points)."""
    left, right, top_pad, bottom = 64, 24, 20, 40
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = min(xs, default=0.0), max(xs, default=1.0)
    y0, y1 = min(ys, default=0.0), max(ys, default=1.0)
    pad_x, pad_y = (x1 - x0) * 0.08 or 0.5, (y1 - y0) * 0.08 or 0.5
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    pw, ph = width - left - right, height - top_pad - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top_pad + (1 - (y - y0) / (y1 - y0)) * ph

    body = [f"<line x1='{left}' y1='{top_pad + ph}' x2='{left + pw}' y2='{top_pad + ph}' stroke='{MUTED}'/>",
            f"<line x1='{left}' y1='{top_pad}' x2='{left}' y2='{top_pad + ph}' stroke='{MUTED}'/>",
            f"<text x='{left - 6}' y='{top_pad + 4}' text-anchor='end' font-size='10'>{fmt(y1)}</text>",
            f"<text x='{left - 6}' y='{top_pad + ph}' text-anchor='end' font-size='10'>{fmt(y0)}</text>",
            f"<text x='{left}' y='{height - 22}' font-size='10'>{fmt(x0)}</text>",
            f"<text x='{left + pw}' y='{height - 22}' text-anchor='end' font-size='10'>{fmt(x1)}</text>",
            f"<text x='{left + pw / 2}' y='{height - 6}' text-anchor='middle' font-size='11'>{_e(x_label)}</text>",
            f"<text x='14' y='{top_pad + ph / 2}' font-size='11' transform='rotate(-90 14 {top_pad + ph / 2})' "
            f"text-anchor='middle'>{_e(y_label)}</text>"]
    curve = [(px(x), py(y)) for _, x, y, joined in points if joined]
    if len(curve) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(curve))
        body.append(f"<path d='{d}' fill='none' stroke='{PALETTE[0]}' stroke-width='2'/>")
    for label, x, y, joined in points:
        color = PALETTE[0] if joined else PALETTE[1]
        body.append(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='4' fill='{color}'>"
                    f"<title>{_e(label)}: {fmt(x)}, {fmt(y)}</title></circle>"
                    f"<text x='{px(x) + 6:.1f}' y='{py(y) - 6:.1f}' font-size='10'>{_e(_short(label))}</text>")
    rows = tuple((label, x, y) for label, x, y, _ in points)
    return Figure(title, caption, _svg(width, height, "".join(body), title), ("point", x_label, y_label), rows)
