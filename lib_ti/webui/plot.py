"""The tab's loss plot as inline SVG: no plotting package, nothing to install, and it renders the
same in gradio 3 and 4 (an HTML component). Training loss is noisy by nature (random timesteps),
so it is drawn faint with a smoothed line over it; the validation loss (fixed batch) is points."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

W, H = 560, 220
PAD_L, PAD_R, PAD_T, PAD_B = 52, 12, 12, 28
MAX_RAW = 1500  # more raw points than pixels only slows the browser down


def _finite(points: Sequence[tuple[int, float | None]]) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in points if v is not None and math.isfinite(v)]


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Bias-corrected EMA (TensorBoard's smoothing); the weight grows with the run length so a
    long run is as readable as a short one."""
    if weight is None:
        weight = min(0.98, max(0.6, 1.0 - 10.0 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _thin(points: list[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    if len(points) <= n:
        return points
    stride = len(points) / n
    return [points[int(i * stride)] for i in range(n)] + [points[-1]]


def _nice(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def loss_svg(losses: Sequence[tuple[int, float | None]], val_losses: Sequence[tuple[int, float | None]] = (),
             title: str = "loss") -> str:
    """`<svg>` with a faint raw polyline, a smoothed polyline and validation circles.
    Empty input gives a placeholder box, so the layout does not jump when a run starts."""
    raw, val = _finite(losses), _finite(val_losses)
    head = (f'<svg class="ti-trainer-plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" '
            f'width="100%" role="img" aria-label="{html.escape(title)}">')
    frame = (f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
             'fill="none" stroke="currentColor" stroke-opacity="0.3"/>')
    if not raw and not val:
        msg = f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="currentColor" opacity="0.6">no loss yet</text>'
        return head + frame + msg + "</svg>"

    steps = [s for s, _ in raw + val]
    ys = [v for _, v in raw + val]
    s0, s1 = min(steps), max(steps)
    y0, y1 = min(ys), max(ys)
    if s1 == s0:
        s1 = s0 + 1
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5 * abs(y0 or 1), y1 + 0.5 * abs(y1 or 1)
    margin = (y1 - y0) * 0.05
    y0, y1 = y0 - margin, y1 + margin

    def x_of(s: float) -> float:
        return PAD_L + (s - s0) / (s1 - s0) * (W - PAD_L - PAD_R)

    def y_of(v: float) -> float:
        return PAD_T + (y1 - v) / (y1 - y0) * (H - PAD_T - PAD_B)

    def polyline(pts: list[tuple[int, float]], cls: str, style: str) -> str:
        coords = " ".join(f"{x_of(s):.1f},{y_of(v):.1f}" for s, v in pts)
        return f'<polyline class="{cls}" points="{coords}" fill="none" {style}/>'

    parts = [head, frame]
    for frac in (0.0, 0.5, 1.0):  # three y labels and two x labels are enough to read a trend
        v = y0 + margin + frac * (y1 - y0 - 2 * margin)
        parts.append(f'<text x="{PAD_L - 4}" y="{y_of(v) + 4:.1f}" text-anchor="end" font-size="11" '
                     f'fill="currentColor">{_nice(v)}</text>')
    for s, anchor in ((s0, "start"), (s1, "end")):
        parts.append(f'<text x="{x_of(s):.1f}" y="{H - 8}" text-anchor="{anchor}" font-size="11" '
                     f'fill="currentColor">step {s}</text>')
    if raw:
        thin = _thin(raw, MAX_RAW)
        parts.append(polyline(thin, "ti-raw", 'stroke="#4f8fdc" stroke-opacity="0.3" stroke-width="1"'))
        sm = list(zip([s for s, _ in raw], smooth([v for _, v in raw])))
        parts.append(polyline(_thin(sm, MAX_RAW), "ti-smooth", 'stroke="#1f6fd0" stroke-width="2"'))
    for s, v in val:
        parts.append(f'<circle class="ti-val" cx="{x_of(s):.1f}" cy="{y_of(v):.1f}" r="3.5" fill="#e0702a">'
                     f'<title>step {s}: validation {v:.4f}</title></circle>')
    legend = [("#1f6fd0", "training (smoothed)")] + ([("#e0702a", "validation")] if val else [])
    x = PAD_L + 8
    for color, label in legend:
        parts.append(f'<rect x="{x}" y="{PAD_T + 6}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14}" y="{PAD_T + 15}" font-size="11" fill="currentColor">{label}</text>')
        x += 14 + 7 * len(label) + 12
    parts.append("</svg>")
    return "".join(parts)


def norms_table(norms: dict[str, list[float]]) -> str:
    """Per slot, the current norm of each vector: a quick check that training moves them and that
    none explodes (A1111's own embeddings sit around 0.3-0.5 per vector on SD1)."""
    if not norms:
        return '<p class="ti-trainer-muted">vector norms appear once training starts</p>'
    n = max(len(v) for v in norms.values())
    head = "".join(f"<th>v{i}</th>" for i in range(n))
    rows = "".join(
        f"<tr><th>{html.escape(slot)}</th>" + "".join(f"<td>{x:.3f}</td>" for x in vals) + "</tr>"
        for slot, vals in norms.items()
    )
    return f'<table class="ti-trainer-norms"><tr><th>slot</th>{head}</tr>{rows}</table>'
