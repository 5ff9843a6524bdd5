"""Shared pieces of the HTML reports: escaping, number formats, tables, the page shell and inline SVG plots."""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = "–"
# Colors of the top strategies, the same in every plot so a strategy keeps its color across the page.
RANK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
SLO_COLOR = "#c62828"

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg2:#f6f8fa;--accent:#0969da}
*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:#fff;
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1440px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.2em;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:1.02em;margin:16px 0 6px}
p{margin:6px 0}
.muted{color:var(--muted)}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0}
th,td{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:var(--bg2);font-weight:600}
th[scope=row]{background:var(--bg2);font-weight:600;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.winner td{background:#dafbe1}
tr.unmet td{background:#fff1f0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(270px,1fr));gap:12px;align-items:start}
.cards table{width:100%}
.cards th[scope=row]{white-space:normal}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:18px}
figure{margin:0}
figcaption{color:var(--muted);font-size:12px;margin-top:2px}
svg{max-width:100%;height:auto;display:block}
.callout{background:#ddf4ff;border-left:4px solid var(--accent);padding:10px 14px;margin:8px 0}
.warn{background:#fff8c5;border-left:4px solid #9a6700;padding:10px 14px;margin:8px 0}
details{margin:8px 0}
summary{cursor:pointer;font-weight:600}
td code{white-space:nowrap}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
footer{margin-top:32px;color:var(--muted);font-size:12px}
"""

# Nothing may load from anywhere: no scripts, no fetches, only the inline styles and data: images.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def esc(value: object) -> str:
    """HTML-escaped text of any value (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def number(value: object) -> float | None:
    """A finite float from an int or float (bools, None, strings and NaN give None)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def fmt(value: object, decimals: int = 1, *, missing: str = MISSING) -> str:
    """A number with thousands separators and fixed decimals, or ``missing``."""
    out = number(value)
    return missing if out is None else f"{out:,.{decimals}f}"


def fmt_pct(fraction: object, decimals: int = 0, *, missing: str = MISSING) -> str:
    """A fraction as a percentage."""
    out = number(fraction)
    return missing if out is None else f"{out * 100:.{decimals}f}%"


def plain(value: object) -> str:
    """Text shown as-is by Matplotlib (a dollar sign would start math mode)."""
    return str(value).replace("$", r"\$")


def slo_attainment(slo: Mapping[str, Any]) -> float:
    """The share of requests that must meet the SLOs (percentile wins over attainment, as in the planner)."""
    percentile = number(slo.get("percentile"))
    if percentile is not None:
        return percentile / 100.0
    attainment = number(slo.get("attainment"))
    return attainment if attainment is not None else 0.9


def spec_value(value: object) -> str:
    """Escaped text of a value as written in a spec: lists joined by commas, None as a dash."""
    if value is None:
        return MISSING
    if isinstance(value, list | tuple):
        return esc(", ".join(str(v) for v in value)) if value else MISSING
    if isinstance(value, Mapping):
        return esc(", ".join(f"{k}: {v}" for k, v in value.items())) if value else MISSING
    # A length distribution (lognormal:1500:800) may break after its colons in a narrow card.
    return esc(value).replace(":", ":<wbr>")


def mapping(value: object) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one (a malformed section renders as missing)."""
    return value if isinstance(value, Mapping) else {}


def table(
    headers: Sequence[str],
    rows: Iterable[tuple[str, Sequence[str]]],
    *,
    numeric: Sequence[bool] | None = None,
    cls: str = "",
) -> str:
    """A table; headers are plain text, cells already-escaped HTML; each row carries its own class."""
    flags = list(numeric) if numeric is not None else [False] * len(headers)
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = []
    for row_cls, cells in rows:
        tds = "".join(f'<td class="n">{c}</td>' if flags[i] else f"<td>{c}</td>" for i, c in enumerate(cells))
        body.append(f'<tr class="{esc(row_cls)}">{tds}</tr>' if row_cls else f"<tr>{tds}</tr>")
    cls_attr = f' class="{esc(cls)}"' if cls else ""
    return (
        f'<div class="scroll"><table{cls_attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def key_values(caption: str, rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table of named values (names plain text, values already-escaped HTML)."""
    body = "".join(f'<tr><th scope="row">{esc(name)}</th><td>{value}</td></tr>' for name, value in rows)
    return f"<div><h3>{esc(caption)}</h3><table>{body}</table></div>"


def page(title: str, body: str) -> str:
    """A whole self-contained HTML document."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # An empty data: icon, or the browser asks the server for /favicon.ico.
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def figure_html(svg: str, caption: str) -> str:
    """An inline SVG plot with its caption (plain text)."""
    return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"


_PROLOG = re.compile(r"^.*?(?=<svg[\s>])", re.DOTALL)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)


def svg_plot(draw: Callable[[Figure], None], *, size_in: tuple[float, float], salt: str, label: str) -> str:
    """Run ``draw`` on a fresh figure and return it as an inline <svg> element."""
    # Imported here: the CLI's other commands must not pay for Matplotlib. Figure (not pyplot) keeps no
    # global figure registry and needs no GUI backend.
    import matplotlib
    from matplotlib.figure import Figure

    # Text stays text (svg.fonttype none) so a plot weighs kilobytes, not the glyph outlines of every label; one
    # font name keeps each <text> element short, the browser falls back to its own sans-serif. A fixed salt per
    # plot keeps the element ids deterministic and distinct between the plots of one page. The keys are written
    # out here, not in a module-level dict, so they type-check against every Matplotlib's stubs.
    with matplotlib.rc_context(
        {
            "svg.fonttype": "none",
            "svg.hashsalt": salt,
            "font.family": "sans-serif",
            "font.sans-serif": ["DejaVu Sans"],
            "font.size": 9.0,
            "axes.grid": True,
            "grid.alpha": 0.35,
            "grid.linewidth": 0.6,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.fontsize": 8.0,
            "legend.frameon": False,
        }
    ):
        fig = Figure(figsize=size_in, layout="constrained")
        draw(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="svg")
    text = buf.getvalue().decode("utf-8")
    text = _METADATA.sub("", _PROLOG.sub("", text, count=1), count=1)
    return text.replace("<svg ", f'<svg role="img" aria-label="{esc(label)}" ', 1).strip()
