"""Self-contained HTML pages with inline SVG plots: the page frame, tables and matplotlib set-up shared by
the bench report (bench/html.py) and the training report (train/report.py)."""

from __future__ import annotations

import html
import io
from typing import Any

CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #212529;
       max-width: 1240px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.sub { color: #495057; margin-bottom: 16px; }
table { border-collapse: collapse; font-size: 13.5px; margin: 8px 0; }
th, td { padding: 5px 9px; border-bottom: 1px solid #dee2e6; white-space: nowrap; }
th { background: #f1f3f5; text-align: left; position: sticky; top: 0; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:hover td { background: #f8f9fa; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 18px; }
figure { margin: 0; border: 1px solid #e9ecef; border-radius: 6px; padding: 10px; }
figure svg { width: 100%; height: auto; }
figcaption { font-size: 13px; color: #495057; margin-top: 4px; }
figure.wide { grid-column: 1 / -1; } figure.wide svg { max-width: 900px; display: block; margin: auto; }
td.wrap { white-space: normal; min-width: 420px; }
ul.notes { color: #495057; font-size: 13.5px; padding-left: 20px; }
.fail td { color: #862e2e; } .wide { overflow-x: auto; }
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def table(
    head: list[str],
    rows: list[list[str]],
    numeric_from: int = 2,
    color_col: int | None = 0,
    wrap_last: bool = False,
    colors: dict[str, str] | None = None,
) -> str:
    """An HTML table; cells from numeric_from on are right-aligned; a cell of color_col found in `colors`
    gets a swatch of that color."""
    out = ["<div class='wide'><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = " class='n'" if i >= numeric_from else ""
            if wrap_last and i == len(row) - 1:
                cls = " class='wrap'"
            sw = ""
            if colors and i == color_col and c in colors:
                sw = f"<span class='swatch' style='background:{colors[c]}'></span>"
            cells.append(f"<td{cls}>{sw}{esc(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table></div>"


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend and the reports' style (ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.fonttype": "none",
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.color": "#e9ecef",
            "axes.axisbelow": True,
        }
    )
    return plt


def svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )
