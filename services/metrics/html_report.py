"""The HTML report: the recovery table and its charts, drawn as inline SVG.

The page is one self-contained file: inline CSS and SVG, no script, nothing
fetched (a Content-Security-Policy says so to the browser). Every string taken
from the data is escaped. The charts:

1. recovery times per scenario and strategy cell, one strip plot (a histogram
   past ``STRIP_MAX`` recoveries) per cell with its p50 and p95 marked;
2. the success rate of every cell, one bar chart;
3. the breakers' states over time, one lane per target;
4. the waterfall of the slowest recovery: its trace's spans, or when none are
   stored, its phases one after another.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from services.common.engines import engine_counts
from services.metrics.store import SummaryRow

Row = Mapping[str, Any]
Tables = Mapping[str, Sequence[Row]]

TABLES = ("recoveries", "recovery_phases", "breaker_transitions", "spans", "delivery_losses")
"""The tables the HTML report reads; others in ``tables`` are ignored."""

STRIP_MAX = 400
"""Most recoveries a cell's chart draws one dot each for; past it, a histogram."""

STATE_COLOURS = {"closed": "#2e7d32", "half_open": "#f9a825", "open": "#c62828"}
"""Breaker state -> its colour in the timeline; any other state is grey."""

OTHER_COLOUR = "#9e9e9e"
OK_COLOUR = "#2e7d32"
FAILED_COLOUR = "#c62828"
BAR_COLOUR = "#1565c0"

WIDTH = 720
"""Every chart's width in SVG units; the page scales it to the column."""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #212121; background: #fafafa; }
main { max-width: 960px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta, .note { color: #616161; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
thead th { background: #eeeeee; }
figure.chart { margin: 1.2em 0; background: #fff; border: 1px solid #e0e0e0; padding: 8px; }
figure.chart svg { display: block; width: 100%; height: auto; }
figcaption { color: #424242; margin-top: 4px; }
svg text { font: 11px system-ui, sans-serif; fill: #424242; }
svg .axis { stroke: #757575; stroke-width: 1; }
svg .grid { stroke: #eeeeee; stroke-width: 1; }
svg .mark { stroke-width: 1.5; stroke-dasharray: 4 3; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px;
  vertical-align: -2px; }
"""


@dataclass(frozen=True)
class _Scale:
    """A linear map from values in [lo, hi] to SVG x (or y) in [start, stop]."""

    lo: float
    hi: float
    start: float
    stop: float

    def __call__(self, value: float) -> float:
        span = self.hi - self.lo or 1.0
        return self.start + (value - self.lo) / span * (self.stop - self.start)


@dataclass(frozen=True)
class _Bar:
    """One waterfall bar: where it starts and how long it lasts, in ms."""

    label: str
    offset_ms: float
    duration_ms: float
    colour: str


def render_html(run_id: str, summary: Sequence[SummaryRow], tables: Tables) -> bytes:
    """The report as one self-contained HTML page (UTF-8).

    ``summary`` is the recovery summary grouped by scenario and strategy;
    ``tables`` maps table names (see ``TABLES``) to their rows, as
    ``MetricsStore.rows`` returns them. A missing table counts as empty.
    """
    recoveries = list(tables.get("recoveries", ()))
    title = f"webshard recovery report{f' — run {run_id}' if run_id else ''}"
    sections = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">Generated {escape(_iso(dt.datetime.now(dt.UTC)))}.</p>',
        "<h2>Recoveries by scenario and strategy</h2>",
        summary_table(summary),
    ]
    if summary:
        sections += [
            "<h2>Recovery time per cell</h2>",
            *(cell_chart(row, _cell_rows(row, recoveries)) for row in summary),
            "<h2>Success rate</h2>",
            success_chart(summary),
        ]
    else:
        sections.append(
            '<p class="empty">No recoveries recorded: nothing to show '
            "(no recovery-time, success-rate or waterfall charts).</p>"
        )
    sections += [
        "<h2>Circuit breakers</h2>",
        breaker_timeline(tables.get("breaker_transitions", ())),
        "<h2>Delivery</h2>",
        delivery_losses(tables.get("delivery_losses", ())),
    ]
    if summary:
        sections += [
            "<h2>Slowest recovery</h2>",
            waterfall(recoveries, tables.get("recovery_phases", ()), tables.get("spans", ())),
        ]
    return _page(title, "\n".join(sections)).encode()


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n"
        '<link rel="icon" href="data:,">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _cell(row: SummaryRow) -> tuple[str, str]:
    return row.group.get("scenario", ""), row.group.get("strategy", "")


def _cell_rows(row: SummaryRow, recoveries: Iterable[Row]) -> list[Row]:
    """The recoveries of ``row``'s cell that have a duration."""
    scenario, strategy = _cell(row)
    return [
        r
        for r in recoveries
        if str(r.get("scenario")) == scenario
        and str(r.get("strategy")) == strategy
        and r.get("duration_ms") is not None
    ]


def engines(row: SummaryRow) -> str:
    """The engines a cell's recoveries ran on, with their counts; a dash when unknown."""
    return engine_counts(row.engines) or "—"


def ms(value: float | None) -> str:
    """Milliseconds to one decimal; a dash for a figure that has no value."""
    return "—" if value is None else f"{value:.1f}"


def summary_table(summary: Sequence[SummaryRow]) -> str:
    """The Markdown report's table, in HTML: one row per scenario and strategy."""
    head = (
        "<thead><tr><th>scenario</th><th>strategy</th><th>recoveries</th>"
        "<th>success rate</th><th>p50 ms</th><th>p95 ms</th><th>max ms</th>"
        "<th>redundancy restored p50 ms</th><th>p95 ms</th><th>engines</th></tr></thead>"
    )
    rows = [
        f"<tr><td>{escape(scenario)}</td><td>{escape(strategy)}</td><td>{row.count}</td>"
        f"<td>{row.success_rate:.1%}</td><td>{row.p50_ms:.1f}</td><td>{row.p95_ms:.1f}</td>"
        f"<td>{row.max_ms:.1f}</td><td>{ms(row.redundancy_restored_p50_ms)}</td>"
        f"<td>{ms(row.redundancy_restored_p95_ms)}</td><td>{escape(engines(row))}</td></tr>"
        for row in summary
        for scenario, strategy in [_cell(row)]
    ]
    if not rows:
        rows = ['<tr><td colspan="10">(no recoveries recorded)</td></tr>']
    return f'<table class="summary">{head}<tbody>{"".join(rows)}</tbody></table>'


# --- SVG pieces ------------------------------------------------------------------


def _svg(height: float, label: str, parts: Iterable[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.0f}" '
        f'role="img" aria-label="{escape(label)}">{"".join(parts)}</svg>'
    )


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def _title(text: str) -> str:
    return f"<title>{escape(text)}</title>"


def _rect(x: float, y: float, width: float, height: float, *, colour: str, tip: str) -> str:
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width, 1.0):.1f}" height="{height:.1f}" '
        f'fill="{colour}">{_title(tip)}</rect>'
    )


def _short(text: str, limit: int = 36) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Ticks from 0 at a 1, 2 or 5 times 10^k step, the last at or above ``high``."""
    high = high if high > 0 and math.isfinite(high) else 1.0
    raw = high / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    steps = max(1, math.ceil(high / step - 1e-9))
    return [i * step for i in range(steps + 1)]


def _tick_label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


def _x_axis(
    scale: _Scale,
    ticks: Sequence[float],
    *,
    y: float,
    top: float,
    label: str,
    fmt: Callable[[float], str] = _tick_label,
) -> str:
    """A horizontal axis at ``y`` with grid lines up to ``top`` and a label below."""
    parts = [f'<line class="axis" x1="{scale.start:.1f}" y1="{y}" x2="{scale.stop:.1f}" y2="{y}"/>']
    for tick in ticks:
        x = scale(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y}"/>')
        parts.append(f'<line class="axis" x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}"/>')
        parts.append(_text(x, y + 16, fmt(tick), "middle"))
    parts.append(_text((scale.start + scale.stop) / 2, y + 32, label, "middle"))
    return "".join(parts)


# --- 1. recovery time per cell ------------------------------------------------------


def cell_chart(row: SummaryRow, recoveries: Sequence[Row]) -> str:
    """One cell's recovery times in ms (dots, or a histogram when many), p50/p95 marked."""
    scenario, strategy = _cell(row)
    durations = [float(r["duration_ms"]) for r in recoveries]
    ticks = nice_ticks(max([*durations, row.max_ms, row.p95_ms]))
    top, bottom = 36.0, 126.0
    scale = _Scale(0.0, ticks[-1], 50.0, WIDTH - 24.0)
    if len(recoveries) <= STRIP_MAX:
        marks = _strip(recoveries, scale, top, bottom)
        kind = "each dot one recovery, red when it failed"
    else:
        marks = _histogram(recoveries, ticks, scale, top, bottom)
        kind = "a histogram of the recoveries, failed ones in red"
    parts = [
        _x_axis(scale, ticks, y=bottom + 6, top=top, label="recovery time (ms)"),
        marks,
        _percentile(scale, row.p50_ms, "p50", top=top, bottom=bottom, label_y=top - 20),
        _percentile(scale, row.p95_ms, "p95", top=top, bottom=bottom, label_y=top - 6),
    ]
    failed = sum(1 for r in recoveries if not r.get("succeeded"))
    label = f"{scenario} / {strategy}"
    return (
        f'<figure class="chart cell-chart" data-scenario="{escape(scenario)}" '
        f'data-strategy="{escape(strategy)}">'
        f"{_svg(bottom + 44, f'recovery times, {label}', parts)}"
        f"<figcaption><strong>{escape(label)}</strong>: {row.count} recoveries, "
        f"{failed} failed; p50 {row.p50_ms:.1f} ms, p95 {row.p95_ms:.1f} ms, "
        f"max {row.max_ms:.1f} ms ({kind}).</figcaption></figure>"
    )


def _strip(recoveries: Sequence[Row], scale: _Scale, top: float, bottom: float) -> str:
    """A dot per recovery at its duration, spread over the height by a fixed sequence."""
    dots = []
    for i, r in enumerate(recoveries):
        ms = float(r["duration_ms"])
        y = top + 6 + ((i * 0.6180339887) % 1.0) * (bottom - top - 12)
        colour = OK_COLOUR if r.get("succeeded") else FAILED_COLOUR
        outcome = "succeeded" if r.get("succeeded") else "failed"
        tip = f"{r.get('recovery_id', '')}: {ms:.1f} ms, {outcome}"
        dots.append(
            f'<circle cx="{scale(ms):.1f}" cy="{y:.1f}" r="4" fill="{colour}" '
            f'fill-opacity="0.7">{_title(tip)}</circle>'
        )
    return "".join(dots)


def _histogram(
    recoveries: Sequence[Row], ticks: Sequence[float], scale: _Scale, top: float, bottom: float
) -> str:
    """Counts in 40 bins over the axis; each bar's failed part drawn in red on top."""
    bins = 40
    width = ticks[-1] / bins
    totals, failures = [0] * bins, [0] * bins
    for r in recoveries:
        index = min(bins - 1, int(float(r["duration_ms"]) / width))
        totals[index] += 1
        failures[index] += 0 if r.get("succeeded") else 1
    height = _Scale(0.0, max(totals), 0.0, bottom - top)
    bars = []
    for i, (total, failed) in enumerate(zip(totals, failures, strict=True)):
        if not total:
            continue
        x, w = scale(i * width), scale((i + 1) * width) - scale(i * width) - 1
        tip = f"{i * width:g} to {(i + 1) * width:g} ms: {total} recoveries, {failed} failed"
        bars.append(_rect(x, bottom - height(total), w, height(total), colour=BAR_COLOUR, tip=tip))
        if failed:
            bars.append(
                _rect(x, bottom - height(failed), w, height(failed), colour=FAILED_COLOUR, tip=tip)
            )
    return "".join(bars)


def _percentile(
    scale: _Scale, value: float, name: str, *, top: float, bottom: float, label_y: float
) -> str:
    """A dashed line at ``value``, labelled at ``label_y`` on whichever side has room."""
    x = scale(value)
    anchor, dx = ("start", 3) if x + 80 < WIDTH else ("end", -3)
    return (
        f'<line class="mark" x1="{x:.1f}" y1="{label_y - 10}" x2="{x:.1f}" y2="{bottom}" '
        f'stroke="#6a1b9a"/>{_text(x + dx, label_y, f"{name} {value:.1f}", anchor)}'
    )


# --- 2. success rate ----------------------------------------------------------------


def success_chart(summary: Sequence[SummaryRow]) -> str:
    """A horizontal bar per cell: the share of its recoveries that succeeded."""
    lane, top, left = 22.0, 10.0, 230.0
    scale = _Scale(0.0, 1.0, left, WIDTH - 60.0)
    bottom = top + lane * len(summary)
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
    parts = [
        _x_axis(scale, ticks, y=bottom + 4, top=top, label="success rate", fmt="{:.0%}".format)
    ]
    for i, row in enumerate(summary):
        scenario, strategy = _cell(row)
        label = f"{scenario} / {strategy}"
        y = top + i * lane
        colour = OK_COLOUR if row.success_rate >= 1.0 else FAILED_COLOUR
        tip = f"{label}: {row.success_rate:.1%} of {row.count}"
        parts.append(_text(left - 8, y + 15, _short(label), "end"))
        parts.append(
            _rect(left, y + 4, scale(row.success_rate) - left, lane - 8, colour=colour, tip=tip)
        )
        parts.append(_text(scale(row.success_rate) + 4, y + 15, f"{row.success_rate:.1%}"))
    svg = _svg(bottom + 40, "success rate per scenario and strategy", parts)
    return (
        f'<figure class="chart success-chart">{svg}'
        "<figcaption>Share of recoveries that succeeded, per scenario / strategy."
        "</figcaption></figure>"
    )


# --- delivery losses -------------------------------------------------------------


def delivery_losses(losses: Sequence[Row]) -> str:
    """The records services reported they could not deliver, per service and reason."""
    totals = loss_totals(losses)
    if not totals:
        return '<p class="delivery">No service reported records it could not deliver.</p>'
    rows = "".join(
        f"<tr><td>{escape(service)}</td><td>{escape(reason)}</td><td>{count}</td></tr>"
        for (service, reason), count in totals.items()
    )
    dropped = sum(totals.values())
    return (
        f'<p class="delivery missing">{dropped} record(s) never reached the metrics service: '
        "the tables and charts above are missing them.</p>"
        '<table class="delivery"><thead><tr><th>service</th><th>reason</th><th>dropped</th>'
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )


def loss_totals(losses: Iterable[Row]) -> dict[tuple[str, str], int]:
    """Dropped records summed per (service, reason), in first-seen order."""
    totals: dict[tuple[str, str], int] = {}
    for loss in losses:
        key = (str(loss.get("service") or ""), str(loss.get("reason") or ""))
        totals[key] = totals.get(key, 0) + int(loss.get("dropped") or 0)
    return {key: count for key, count in totals.items() if count}


# --- 3. breaker timeline ------------------------------------------------------------


def breaker_timeline(transitions: Sequence[Row]) -> str:
    """One lane per breaker target, coloured by its state between transitions."""
    timed = [t for t in transitions if t.get("changed_at") is not None]
    if not timed:
        return '<p class="empty">No breaker transitions recorded.</p>'
    t0 = min(t["changed_at"] for t in timed)
    last = max(_seconds(t["changed_at"], t0) for t in timed)
    end = last * 1.05 if last > 0 else 1.0
    lanes: dict[str, list[Row]] = {}
    for t in sorted(timed, key=lambda t: t["changed_at"]):
        lanes.setdefault(str(t.get("target_id", "")), []).append(t)
    lane, top, left = 24.0, 8.0, 180.0
    ticks = nice_ticks(end)
    scale = _Scale(0.0, ticks[-1], left, WIDTH - 24.0)
    bottom = top + lane * len(lanes)
    parts = [_x_axis(scale, ticks, y=bottom + 4, top=top, label=f"seconds since {_iso(t0)}")]
    for i, (target, rows) in enumerate(sorted(lanes.items())):
        parts.append(_lane(target, rows, t0=t0, end=end, scale=scale, y=top + i * lane, h=lane - 6))
    legend = "".join(
        f'<span style="background:{colour}"></span>{escape(state.replace("_", "-"))}'
        for state, colour in [*STATE_COLOURS.items(), ("other", OTHER_COLOUR)]
    )
    return (
        f'<figure class="chart breaker-chart">'
        f"{_svg(bottom + 40, 'breaker states over time', parts)}"
        f"<figcaption>Breaker state per target over time ({len(timed)} transitions). "
        f'<span class="legend">{legend}</span></figcaption></figure>'
    )


def _lane(
    target: str,
    rows: Sequence[Row],
    *,
    t0: dt.datetime,
    end: float,
    scale: _Scale,
    y: float,
    h: float,
) -> str:
    """One target's lane: its known state before the first transition, then after each."""
    first = _seconds(rows[0]["changed_at"], t0)
    spans: list[tuple[float, float, str, str]] = []
    if first > 0 and rows[0].get("from_state") in STATE_COLOURS:
        spans.append((0.0, first, str(rows[0].get("from_state", "")), "before the first record"))
    for i, row in enumerate(rows):
        start = _seconds(row["changed_at"], t0)
        stop = _seconds(rows[i + 1]["changed_at"], t0) if i + 1 < len(rows) else end
        spans.append((start, stop, str(row.get("to_state", "")), str(row.get("reason") or "")))
    parts = [
        f'<g class="lane" data-target="{escape(target)}">',
        _text(scale.start - 8, y + h / 2 + 4, _short(target, 28), "end"),
    ]
    for start, stop, state, reason in spans:
        colour = STATE_COLOURS.get(state, OTHER_COLOUR)
        tip = f"{target}: {state} from {start:.3f} s to {stop:.3f} s" + (
            f" ({reason})" if reason else ""
        )
        parts.append(_rect(scale(start), y, scale(stop) - scale(start), h, colour=colour, tip=tip))
    parts.append("</g>")
    return "".join(parts)


# --- 4. waterfall of the slowest recovery ---------------------------------------------


def waterfall(recoveries: Sequence[Row], phases: Sequence[Row], spans: Sequence[Row]) -> str:
    """The slowest recovery's trace as bars by start offset and duration.

    Drawn from the spans stored under its trace id; when there are none, from
    its phases laid end to end (phases record durations, not start times).
    """
    timed = [r for r in recoveries if r.get("duration_ms") is not None]
    if not timed:
        return '<p class="empty">No recoveries recorded: no waterfall to show.</p>'
    slowest = max(timed, key=lambda r: float(r["duration_ms"]))
    trace_id = str(slowest.get("trace_id") or "")
    about = (
        f"the slowest recovery, {slowest.get('recovery_id', '')} "
        f"({slowest.get('scenario', '')} / {slowest.get('strategy', '')}, "
        f"{float(slowest['duration_ms']):.1f} ms)"
    )
    traced = [s for s in spans if trace_id and s.get("trace_id") == trace_id]
    if traced:
        bars = _span_bars(traced)
        caption = f"Trace {trace_id} of {about}: {len(bars)} spans by start offset."
        return _waterfall_figure(bars, caption, "spans")
    why = f"no spans are stored for its trace {trace_id}" if trace_id else "it has no trace id"
    own = [p for p in phases if p.get("recovery_id") == slowest.get("recovery_id")]
    if not own:
        return (
            f'<p class="empty">{escape(f"Waterfall of {about}: {why}, and no phases either.")}</p>'
        )
    bars = _phase_bars(own)
    caption = (
        f"Waterfall of {about}, drawn from its {len(bars)} recorded phases laid end to end, "
        f"because {why}."
    )
    return _waterfall_figure(bars, caption, "phases")


def _span_bars(spans: Sequence[Row]) -> list[_Bar]:
    starts = [s["started_at"] for s in spans if s.get("started_at") is not None]
    t0 = min(starts) if starts else None
    bars = [
        _Bar(
            label=f"{s.get('name') or '(unnamed)'} · {s.get('service') or '?'}",
            offset_ms=(
                _seconds(s["started_at"], t0) * 1000
                if t0 is not None and s.get("started_at") is not None
                else 0.0
            ),
            duration_ms=float(s.get("duration_ms") or 0.0),
            colour=BAR_COLOUR,
        )
        for s in spans
    ]
    return sorted(bars, key=lambda b: (b.offset_ms, -b.duration_ms))


def _phase_bars(phases: Sequence[Row]) -> list[_Bar]:
    bars, offset = [], 0.0
    for p in sorted(phases, key=lambda p: int(p.get("position") or 0)):
        ms = float(p.get("duration_ms") or 0.0)
        level = f" · {p['level']}" if p.get("level") else ""
        ok = p.get("ok") is not False
        colour = BAR_COLOUR if ok else FAILED_COLOUR
        bars.append(_Bar(f"{p.get('name') or '(unnamed)'}{level}", offset, ms, colour))
        offset += ms
    return bars


def _waterfall_figure(bars: Sequence[_Bar], caption: str, source: str) -> str:
    lane, top, left = 20.0, 8.0, 260.0
    ticks = nice_ticks(max(b.offset_ms + b.duration_ms for b in bars))
    scale = _Scale(0.0, ticks[-1], left, WIDTH - 24.0)
    bottom = top + lane * len(bars)
    parts = [_x_axis(scale, ticks, y=bottom + 4, top=top, label="ms since the first bar starts")]
    for i, bar in enumerate(bars):
        y = top + i * lane
        tip = f"{bar.label}: starts at {bar.offset_ms:.1f} ms, lasts {bar.duration_ms:.1f} ms"
        parts.append(_text(left - 8, y + 14, _short(bar.label), "end"))
        width = scale(bar.offset_ms + bar.duration_ms) - scale(bar.offset_ms)
        parts.append(
            _rect(scale(bar.offset_ms), y + 3, width, lane - 6, colour=bar.colour, tip=tip)
        )
    return (
        f'<figure class="chart waterfall" data-source="{source}">'
        f"{_svg(bottom + 40, 'waterfall of the slowest recovery', parts)}"
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


# --- times ----------------------------------------------------------------------------


def _seconds(at: dt.datetime, origin: dt.datetime) -> float:
    return (at - origin).total_seconds()


def _iso(at: dt.datetime) -> str:
    naive = at.astimezone(dt.UTC).replace(tzinfo=None) if at.tzinfo else at
    return naive.isoformat(timespec="milliseconds") + "Z"
