"""One self-contained HTML page: inline CSS, figures as inline SVG, the input data as a JSON block.

Nothing is fetched: no fonts, scripts or images from the network. The page reads at 1280 px and on a phone
(390 px): one column, tables that scroll sideways inside their box, figures that shrink to the width.
"""

from __future__ import annotations

import html
import io
import json
import math

CSS = """
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:#1d2330;
       background:#fff; }
main { max-width:1180px; margin:0 auto; padding:16px 20px 48px; }
h1 { font-size:1.6em; margin:.4em 0 .2em; } h2 { font-size:1.3em; margin:1.6em 0 .4em;
     border-bottom:1px solid #d9dde5; padding-bottom:.2em; } h3 { font-size:1.05em; margin:1.2em 0 .3em; }
p.meta, .muted { color:#5c6474; }
.table-wrap { overflow-x:auto; max-width:100%; border:1px solid #d9dde5; border-radius:6px; margin:.5em 0 1em; }
table { border-collapse:collapse; width:100%; font-size:.92em; }
th, td { padding:5px 8px; border-bottom:1px solid #d9dde5; text-align:left; vertical-align:top; }
th { background:#f4f6f9; white-space:nowrap; } td.num { text-align:right; font-variant-numeric:tabular-nums;
     white-space:nowrap; }
td.text { min-width:16em; max-width:40em; }
figure { margin:.8em 0 1.2em; overflow-x:auto; } figure svg { width:100%; max-width:1100px; height:auto; display:block; }
figcaption { color:#5c6474; font-size:.9em; }
.bar { display:flex; align-items:center; gap:6px; min-width:9em; }
.bar span.fill { display:inline-block; height:.8em; border-radius:2px; }
.bar span.fill.pos { background:#1f77b4; } .bar span.fill.neg { background:#d62728; }
.query { background:#f7f8fb; border-left:4px solid #1f77b4; padding:8px 12px; margin:.6em 0; }
.tok { border-radius:3px; padding:0 1px; }
.seq { white-space:pre-wrap; overflow-wrap:anywhere; } .completion { background:#e8f0fa; padding:0 3px; }
.legend { display:flex; flex-wrap:wrap; align-items:center; gap:8px; margin:.4em 0 0; font-size:.92em; }
.legend .scale { display:inline-flex; align-items:center; gap:6px; white-space:nowrap; }
.legend .ramp { display:inline-block; width:120px; height:.9em; border:1px solid #d9dde5; border-radius:2px; }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(320px,1fr)); gap:12px; }
@media (max-width:600px) { main { padding:10px 10px 32px; } body { font-size:14px; }
  td.text { min-width:12em; } h1 { font-size:1.3em; }
  figure svg { min-width:680px; } /* panels stay legible: the figure scrolls sideways */ }
"""

SCRIPT = """
window.influentErrors = [];
window.addEventListener('error', function (e) {
  window.influentErrors.push(String(e.message));
  document.documentElement.setAttribute('data-js-errors', window.influentErrors.join(' | '));
});
document.addEventListener('DOMContentLoaded', function () {
  var block = document.getElementById('influent-data');
  var data = JSON.parse(block.textContent);
  var mark = document.getElementById('data-status');
  if (mark) { mark.textContent = 'Input data embedded: ' + Object.keys(data).length + ' top-level fields.'; }
  document.documentElement.setAttribute('data-ready', '1');
});
"""


def esc(value) -> str:
    """``value`` as HTML text."""
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 4) -> str:
    """A number for a table cell (``4 significant digits``), ``""`` for None, the text otherwise."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: list[str], rows: list[list], numeric: set[int] | None = None, text_cols: set[int] = frozenset()
          ) -> str:
    """An HTML table in a sideways-scrolling box; cells are escaped unless they are :class:`Raw`."""
    numeric = numeric if numeric is not None else set()
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else (' class="text"' if i in text_cols else "")
            content = cell.html if isinstance(cell, Raw) else esc(fmt(cell))
            cells.append(f"<td{cls}>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


class Raw:
    """HTML that :func:`table` puts in a cell as it is (already escaped by its maker)."""

    def __init__(self, html_text: str):
        self.html = html_text


def figure_svg(fig, caption: str = "") -> str:
    """A matplotlib figure as an inline ``<svg>`` in a ``<figure>`` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the page is HTML
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure>{svg}{cap}</figure>"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller files, searchable in the DOM
    return plt


def finite(value):
    """``value`` with every NaN / infinity replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def data_block(data) -> str:
    """``data`` as a ``<script type="application/json">`` block (``</`` escaped so it cannot end the tag)."""
    text = json.dumps(finite(data), allow_nan=False, default=str).replace("</", "<\\/")
    return f'<script type="application/json" id="influent-data">{text}</script>'


def page(title: str, subtitle: str, sections: list[str], data) -> str:
    """The whole HTML document."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style><script>{SCRIPT}</script></head><body><main>"
        f"<h1>{esc(title)}</h1><p class=\"meta\">{esc(subtitle)}</p>"
        + "".join(sections)
        + '<p class="muted" id="data-status"></p>'
        + data_block(data)
        + "</main></body></html>\n"
    )
