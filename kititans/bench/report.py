"""Bench reports: bench.json (every number, `schema_version`), bench.md (tables) and bench.html (plots). The
tables' cells and lines are bench/cells.py; the comparison of reports from several devices is bench/compare.py.
Every reader here tolerates reports from older versions and other machines: a missing field shows as '–', never
as a KeyError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kititans.bench.cells import (
    MiB,
    bandwidth_line,
    device_lines,
    drift,
    fmt,
    get,
    headers,
    kld,
    md_table,
    notes,
    quant_label,
    result_cells,
    speed_columns,
    text_columns,
    unmeasured_rows,
)
from kititans.files import write_json, write_text

# the cells' names stay importable from here, where callers and tests have long found them
__all__ = [
    "SCHEMA_VERSION",
    "MiB",
    "bandwidth_line",
    "device_lines",
    "drift",
    "fmt",
    "get",
    "headers",
    "kld",
    "md_table",
    "notes",
    "quant_label",
    "render_markdown",
    "result_cells",
    "speed_columns",
    "text_columns",
    "write_formats",
    "write_reports",
]

SCHEMA_VERSION = 1


def render_markdown(report: dict[str, Any]) -> str:
    run, dev = report["run"], report["device"]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    lines = [
        f"# kititans bench: {run['name']} on {dev['label']}",
        "",
        f"Run `{run['path']}` ({run['family']}, {run['params'] / 1e6:.2f} M parameters, step {run.get('step')}), "
        f"{report['created']}, kititans {report['kititans_version']}, {report['seconds']:.0f} s.",
        "",
    ]
    lines += md_table(
        headers(report), [result_cells(report, r) for r in ok], numeric_from=text_columns(report)
    )
    lines.append("")
    lines += [f"- {n}" for n in notes(report)]
    unmeasured = unmeasured_rows(report)
    if unmeasured:
        lines += ["", "## Not measured", ""]
        lines += md_table(["runtime", "quant", "reason"], unmeasured, numeric_from=3)
    lines += ["", "## Device", ""] + [f"- {x}" for x in device_lines(dev)]
    return "\n".join(lines) + "\n"


def write_formats(
    data: dict[str, Any],
    out: Path,
    stem: str,
    markdown: Callable[[dict[str, Any]], str],
    html: Callable[[dict[str, Any]], str],
) -> dict[str, Path]:
    """STEM.json, STEM.md and STEM.html of `data` in `out`, written in that order; their paths."""
    out = Path(out)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "html": out / f"{stem}.html"}
    write_json(paths["json"], data)
    write_text(paths["md"], markdown(data))
    write_text(paths["html"], html(data))
    return paths


def write_reports(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """bench.json, bench.md and bench.html in `out`; their paths."""
    from kititans.bench.html import render_html  # matplotlib's plots: not part of a bench pack's runner

    return write_formats(report, out, "bench", render_markdown, render_html)
