"""Self-contained HTML bench reports: the tables of bench.md plus matplotlib plots inlined as SVG
(decode speed vs size, quality vs bits per weight, memory per runtime, prefill speed by prompt length)."""

from __future__ import annotations

import functools
from typing import Any

from kititans.bench.cells import (
    MiB,
    compare_cells,
    compare_headers,
    device_lines,
    get,
    headers,
    notes,
    quant_label,
    report_lines,
    result_cells,
    text_columns,
    unmeasured_rows,
)
from kititans.htmlpage import esc, page, svg
from kititans.htmlpage import pyplot as _plt
from kititans.htmlpage import table as _table

COLORS = {
    "torch": "#d9480f",
    "llamacpp": "#1c7ed6",
    "onnx": "#2b8a3e",
    "genai": "#7048e8",
    "coreml": "#868e96",
}
DEVICE_COLORS = ["#1c7ed6", "#d9480f", "#2b8a3e", "#7048e8", "#e8590c", "#0c8599", "#c2255c", "#5c940d"]


table = functools.partial(_table, colors=COLORS)  # tables whose runtime column shows its plot color


# ------------------------------------------------------------------------------------------ plots


def _label_points(
    ax: Any, xs: list[float], ys: list[float], labels: list[str], color: str = "#343a40"
) -> None:
    """Quant names next to their points; a label that would overlap an earlier one moves down a line."""
    placed: list[tuple[float, float]] = getattr(ax, "_kt_labels", [])
    for x, y, t in zip(xs, ys, labels):
        px, py = ax.transData.transform((x, y))
        dy = 4
        while any(abs(px - qx) < 42 and abs(py + dy * 1.4 - qy) < 13 for qx, qy in placed):
            dy -= 10
        placed.append((px, py + dy * 1.4))
        ax.annotate(t, (x, y), textcoords="offset points", xytext=(6, dy), fontsize=8.5, color=color)
    ax._kt_labels = placed


def _by_runtime(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Points per legend entry: each runtime, and its QAT rows apart (`llamacpp QAT`, drawn as stars)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["runtime"] + (" QAT" if r.get("qat") else ""), []).append(r)
    return groups


def _style(group: str) -> dict[str, Any]:
    """Color by runtime; QAT points are stars with a dark edge."""
    rt, _, qat = group.partition(" ")
    style: dict[str, Any] = {"color": COLORS.get(rt)}
    if qat:
        style.update(marker="*", edgecolors="#212529", linewidths=0.6)
    return style


def _log_if_wide(ax: Any, values: list[float], axis: str = "x") -> None:
    pos = [v for v in values if v and v > 0]
    if pos and max(pos) / min(pos) > 8:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def plot_speed_vs_size(plt: Any, rows: list[dict[str, Any]], gen: int) -> str | None:
    pts = [r for r in rows if get(r, "speed", "decode", "median") and r.get("size_bytes")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    groups = _by_runtime(pts)
    for rt, group in groups.items():
        xs = [r["size_bytes"] / MiB for r in group]
        ys = [r["speed"]["decode"]["median"] for r in group]
        err = [
            [y - r["speed"]["decode"]["min"] for y, r in zip(ys, group)],
            [r["speed"]["decode"]["max"] - y for y, r in zip(ys, group)],
        ]
        fmt = "*" if rt.endswith(" QAT") else "o"
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            fmt=fmt,
            ms=11 if fmt == "*" else 7,
            color=COLORS.get(rt.split()[0]),
            label=rt,
            capsize=3,
        )
    _log_if_wide(ax, [r["size_bytes"] / MiB for r in pts])
    ax.set_xlabel("file size on disk (MiB)")
    ax.set_ylabel(f"decode tokens/s (tg{gen}, median)")
    ax.set_ylim(bottom=0, top=max(r["speed"]["decode"]["max"] for r in pts) * 1.12)
    ax.legend(frameon=False)
    fig.canvas.draw()
    for rt, group in groups.items():
        xs = [r["size_bytes"] / MiB for r in group]
        ys = [r["speed"]["decode"]["median"] for r in group]
        _label_points(ax, xs, ys, [quant_label(r) for r in group], COLORS.get(rt.split()[0], "#343a40"))
    return svg(fig)


def plot_quality(plt: Any, rows: list[dict[str, Any]], metric: str) -> str | None:
    """Perplexity drift (metric "ppl_drift_pct") or mean KLD ("kld_mean", log scale) vs bits per weight."""
    pts = [r for r in rows if r.get("quality") and r.get("bits_per_weight")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    groups = _by_runtime(pts)
    for rt, group in groups.items():  # points first, so the scales are final when labels are placed
        xs = [r["bits_per_weight"] for r in group]
        ys = [
            r["quality"][metric] if metric != "kld_mean" else max(r["quality"][metric], 1e-7) for r in group
        ]
        style = _style(rt)
        ax.scatter(xs, ys, s=120 if "marker" in style else 46, label=rt, zorder=3, **style)
    if metric == "kld_mean":
        ax.set_yscale("log")
        ax.set_ylabel("mean KLD vs reference (nats; floor 1e-7)")
    else:
        ax.axhline(0, color="#adb5bd", lw=1)
        ax.set_ylabel("perplexity drift vs reference (%)")
    _log_if_wide(ax, [r["bits_per_weight"] for r in pts])
    ax.set_xlabel("bits per weight (weights read per token)")
    ax.legend(frameon=False, fontsize=8.5)
    fig.canvas.draw()
    for _rt, group in groups.items():
        xs = [r["bits_per_weight"] for r in group]
        ys = [
            r["quality"][metric] if metric != "kld_mean" else max(r["quality"][metric], 1e-7) for r in group
        ]
        _label_points(ax, xs, ys, [quant_label(r) for r in group])
    return svg(fig)


def plot_memory(plt: Any, rows: list[dict[str, Any]]) -> str | None:
    pts = [r for r in rows if get(r, "memory", "peak_rss_bytes")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 0.75 + 0.34 * len(pts)))
    names = [f"{r['runtime']} {quant_label(r)}" for r in pts][::-1]
    base = [r["memory"]["baseline_rss_bytes"] / MiB for r in pts][::-1]
    model = [max(r["memory"]["peak_rss_bytes"] - r["memory"]["baseline_rss_bytes"], 0) / MiB for r in pts][
        ::-1
    ]
    colors = [COLORS.get(r["runtime"], "#868e96") for r in pts][::-1]
    ax.barh(names, base, color=colors, alpha=0.35, label="process before loading")
    ax.barh(names, model, left=base, color=colors, label="added by load + run")
    for i, (b, m) in enumerate(zip(base, model)):
        ax.text(b + m, i, f" {b + m:,.0f}", va="center", fontsize=8.5)
    ax.set_xlabel("peak resident memory (MiB)")
    ax.grid(axis="y", visible=False)
    from matplotlib.patches import Patch

    handles = [Patch(color="#495057", alpha=0.35), Patch(color="#495057")]
    ax.legend(
        handles,
        ["process before loading", "added by load + run"],
        frameon=False,
        fontsize=8.5,
        loc="lower right",
    )
    ax.set_xlim(right=max(b + m for b, m in zip(base, model)) * 1.15)
    return svg(fig)


def plot_prefill(plt: Any, rows: list[dict[str, Any]], prompts: list[int]) -> str | None:
    pts = [r for r in rows if get(r, "speed", "prefill")]
    if not pts or not prompts:
        return None
    fig, ax = plt.subplots(figsize=(9.5, 0.9 + 0.3 * len(pts) * len(prompts) ** 0.5))
    h = 0.8 / len(prompts)
    shades = [1.0, 0.55, 0.3, 0.2][: len(prompts)]
    for j, (n, alpha) in enumerate(zip(prompts, shades)):
        ys = [i + (j - (len(prompts) - 1) / 2) * h for i in range(len(pts))]
        vals = [get(r, "speed", "prefill", str(n), "median") or 0 for r in pts]
        ax.barh(
            ys, vals, height=h, color=[COLORS.get(r["runtime"]) for r in pts], alpha=alpha, label=f"pp{n}"
        )
    ax.set_yticks(range(len(pts)), [f"{r['runtime']} {quant_label(r)}" for r in pts])
    ax.invert_yaxis()
    ax.set_xlabel("prefill tokens/s (median)")
    ax.grid(axis="y", visible=False)
    ax.legend(frameon=False, fontsize=8.5)
    return svg(fig)


def figures(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(caption, svg, full width) of each plot that has data."""
    ok = [r for r in report["results"] if r["status"] == "ok"]
    s = report["settings"]
    plt = _plt()
    qat_note = " (stars: QAT runs, against this run's reference)" if any(r.get("qat") for r in ok) else ""
    if report.get("task") == "embed":  # an encoder: no decode or perplexity, the memory plot applies
        return [
            (t, f, w) for t, f, w in [("Peak resident memory per pair", plot_memory(plt, ok), False)] if f
        ]
    made = [
        (
            "Decode speed vs file size (bars: min–max over trials). torch reads the run's float32 "
            "safetensors and casts at load.",
            plot_speed_vs_size(plt, ok, s["gen_tokens"]),
            False,
        ),
        ("Peak resident memory per pair", plot_memory(plt, ok), False),
        ("Perplexity drift vs bits per weight" + qat_note, plot_quality(plt, ok, "ppl_drift_pct"), False),
        (
            "Mean KL divergence from the reference vs bits per weight" + qat_note,
            plot_quality(plt, ok, "kld_mean"),
            False,
        ),
        ("Prefill speed by prompt length", plot_prefill(plt, ok, s["prompt_tokens"]), True),
    ]
    return [(t, f, wide) for t, f, wide in made if f]


def _figures_html(figs: list[tuple[str, str, bool]]) -> str:
    return (
        "<div class='plots'>"
        + "".join(
            f"<figure{' class=wide' if wide else ''}>{f}<figcaption>{esc(t)}</figcaption></figure>"
            for t, f, wide in figs
        )
        + "</div>"
    )


def _plots_or_note(make: Any) -> str:
    try:
        return _figures_html(make())
    except ImportError:
        return "<p class='sub'>Plots need matplotlib: pip install 'kititans[bench]'</p>"


def render_html(report: dict[str, Any]) -> str:
    run, dev = report["run"], report["device"]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    title = f"kititans bench: {run['name']} on {dev['label']}"
    parts = [
        f"<h1>{esc(title)}</h1>",
        f"<div class='sub'>Run <code>{esc(run['path'])}</code> · {esc(run['family'])} · "
        f"{run['params'] / 1e6:.2f} M parameters · step {esc(run.get('step'))} · {esc(report['created'])} · "
        f"kititans {esc(report['kititans_version'])} · {report['seconds']:.0f} s</div>",
        table(headers(report), [result_cells(report, r) for r in ok], numeric_from=text_columns(report)),
        "<ul class='notes'>" + "".join(f"<li>{esc(n)}</li>" for n in notes(report)) + "</ul>",
        _plots_or_note(lambda: figures(report)),
    ]
    unmeasured = unmeasured_rows(report)
    if unmeasured:
        parts += [
            "<h2>Not measured</h2>",
            table(["runtime", "quant", "reason"], unmeasured, numeric_from=3, wrap_last=True),
        ]
    parts += [
        "<h2>Device</h2>",
        "<ul class='notes'>" + "".join(f"<li>{esc(x)}</li>" for x in device_lines(dev)) + "</ul>",
    ]
    return page(title, "\n".join(parts))


# ------------------------------------------------------------------------------------------ compare


def plot_compare(plt: Any, cmp: dict[str, Any]) -> str | None:
    rows = [r for r in cmp["rows"] if r.get("decode_tps")]
    if not rows:
        return None
    devices = list(dict.fromkeys(r["device"] for r in rows))
    pairs = list(dict.fromkeys(f"{r['runtime']} {r['quant']}" for r in rows))
    fig, ax = plt.subplots(figsize=(9.5, 0.9 + 0.3 * len(pairs) * max(1, len(devices)) ** 0.6))
    h = 0.8 / len(devices)
    for j, d in enumerate(devices):
        val = {f"{r['runtime']} {r['quant']}": r["decode_tps"] for r in rows if r["device"] == d}
        ys = [i + (j - (len(devices) - 1) / 2) * h for i in range(len(pairs))]
        ax.barh(
            ys, [val.get(p, 0) for p in pairs], height=h, color=DEVICE_COLORS[j % len(DEVICE_COLORS)], label=d
        )
    ax.set_yticks(range(len(pairs)), pairs)
    ax.invert_yaxis()
    _log_if_wide(ax, [r["decode_tps"] for r in rows])
    ax.set_xlabel("decode tokens/s (median)")
    ax.grid(axis="y", visible=False)
    ax.legend(frameon=False, fontsize=8.5, loc="best")
    return svg(fig)


def render_compare_html(cmp: dict[str, Any]) -> str:
    title = "kititans bench: comparison"

    def figs() -> list[tuple[str, str]]:
        f = plot_compare(_plt(), cmp)
        return [("Decode tokens/s per pair and device", f, True)] if f else []

    parts = [
        f"<h1>{esc(title)}</h1>",
        f"<div class='sub'>{len(cmp['reports'])} reports</div>",
        table(compare_headers(cmp), [compare_cells(r) for r in cmp["rows"]], numeric_from=5, color_col=2),
        _plots_or_note(figs),
        "<h2>Devices</h2>",
    ]
    for rep in cmp["reports"]:
        parts.append(f"<h3>{esc(rep['name'])}</h3><div class='sub'>{esc(rep['source'])}</div>")
        parts.append(
            "<ul class='notes'>" + "".join(f"<li>{esc(x)}</li>" for x in report_lines(rep)) + "</ul>"
        )
    return page(title, "\n".join(parts))
