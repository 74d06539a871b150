"""Evaluation reports: eval.json (every number), eval.md (one table per task) and eval.html (the tables and
an accuracy / flips chart, inline SVG), written beside lm-eval's own per-artifact results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kititans.files import write_json, write_text


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def fmt_kld(x: float | None) -> str:
    if x is None:
        return "–"
    if x < 1e-5:
        return "<1e-5"  # float16 storage of the reference rows
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def primary(task: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The task's first metric (acc for multiple choice), as lm-eval lists it."""
    name = task.get("primary")
    metrics = task.get("metrics", {})
    if name not in metrics:
        name = next(iter(metrics), None)
    return name, metrics.get(name) if name else None


NOT_PERCENT = ("perplexity", "bits_per_byte", "bleu", "ter", "chrf", "rouge")


def is_fraction(metric: str | None) -> bool:
    """Metrics shown in percent (acc, exact_match, f1...); perplexities and corpus scores as they are."""
    return metric is not None and not any(s in metric for s in NOT_PERCENT)


def fmt_score(metric: str | None, x: float | None) -> str:
    if x is None:
        return "–"
    return fmt_pct(x) if is_fraction(metric) else f"{x:.4g}"


HEADERS = [
    "artifact",
    "score",
    "± stderr",
    "right→wrong",
    "wrong→right",
    "flip %",
    "KLD",
    "same top %",
    "truncated",
]
ARTIFACT_HEADERS = [
    "artifact",
    "runtime",
    "items",
    "s",
    "items/s",
    "tokens scored",
    "KLD",
    "same top %",
    "path",
]


def task_rows(report: dict[str, Any], task: str) -> tuple[str | None, list[list[str]]]:
    """The metric shown and one row per artifact for `task` (score in percent for fractions)."""
    rows, shown = [], None
    for e in report["artifacts"]:
        t = e["tasks"].get(task)
        if t is None:
            continue
        name, m = primary(t)
        shown = shown or name
        flips = (t.get("flips") or {}).get(name or "")
        kld = t.get("kld") or {}
        ref = report.get("reference") == e["key"]
        rows.append(
            [
                e["key"] + (" (reference)" if ref else ""),
                fmt_score(name, m["value"]) if m else "–",
                fmt_score(name, m["stderr"]) if m and m["stderr"] is not None else "–",
                str(flips["right_to_wrong"]) if flips else "–",
                str(flips["wrong_to_right"]) if flips else "–",
                fmt_pct((flips["right_to_wrong"] + flips["wrong_to_right"]) / max(flips["compared"], 1))
                if flips
                else "–",
                fmt_kld(kld.get("kld_mean")),
                fmt_pct(kld.get("same_top")),
                str(t.get("truncated", 0)),
            ]
        )
    return shown, rows


def artifact_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per artifact: time, throughput and KLD over every task."""
    rows = []
    for e in report["artifacts"]:
        kld = e.get("kld") or {}
        rows.append(
            [
                e["key"],
                e["runtime"],
                str(e["items"]),
                f"{e['seconds']:.1f}",
                f"{e['items_per_s']:.2f}" if e.get("items_per_s") else "–",
                str(e["tokens_scored"]),
                fmt_kld(kld.get("kld_mean")),
                fmt_pct(kld.get("same_top")),
                e["path"],
            ]
        )
    return rows


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def summary_lines(report: dict[str, Any]) -> list[str]:
    s, h = report["settings"], report["host"]
    lines = [
        f"- target: `{report['target']}`; tasks: {', '.join(report['tasks'])}",
        f"- items per task: {s['limit'] if s['limit'] is not None else 'all'}; few-shot: "
        f"{s['num_fewshot'] if s['num_fewshot'] is not None else 'task default'}; chat template: "
        f"{'yes' if s['apply_chat_template'] else 'no'}; lm-eval {report['lm_eval_version']}",
        f"- host: {h['processor']} ({h['cpus']} CPUs), load average {h['loadavg_start'][0]} at start, "
        f"{h['loadavg_end'][0]} at the end; {report['seconds']:.0f} s in all",
    ]
    if report.get("reference"):
        lines.append(
            f"- flips and KLD against `{report['reference']}`: right→wrong and wrong→right count the items "
            "whose correctness changed; KLD is KL(reference ‖ artifact) per scored continuation token"
        )
    lines += [f"- {n}" for n in report.get("notes", [])]
    return lines


def markdown(report: dict[str, Any]) -> str:
    out = ["# kititans eval", "", *summary_lines(report), ""]
    out += ["## Artifacts", "", *md_table(ARTIFACT_HEADERS, artifact_rows(report)), ""]
    for task in task_names(report):
        shown, rows = task_rows(report, task)
        out += [f"## {task} ({shown})", "", *md_table(HEADERS, rows), ""]
    groups = {g for e in report["artifacts"] for g in e.get("groups", {})}
    for g in sorted(groups):
        head = ["artifact", "metric", "score", "± stderr"]
        rows = []
        for e in report["artifacts"]:
            for name, m in e.get("groups", {}).get(g, {}).get("metrics", {}).items():
                rows.append([e["key"], name, fmt_score(name, m["value"]), fmt_score(name, m["stderr"])])
        out += [f"## group {g}", "", *md_table(head, rows), ""]
    return "\n".join(out) + "\n"


def task_names(report: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(t for e in report["artifacts"] for t in e["tasks"]))


def chart(report: dict[str, Any]) -> str:
    """Grouped bars: each task's score per artifact with its stderr, flips stacked below (SVG)."""
    from kititans.htmlpage import pyplot, svg

    plt = pyplot()
    arts = report["artifacts"]
    tasks = [t for t in task_names(report) if is_fraction(primary(arts[0]["tasks"].get(t) or {})[0])]
    if not tasks:
        return ""
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(6.0, 1.6 * len(tasks) * max(1, len(arts)) / 3), 6.4))
    width = 0.8 / max(len(arts), 1)
    for j, e in enumerate(arts):
        xs, ys, errs, r2w, w2r = [], [], [], [], []
        for i, task in enumerate(tasks):
            t = e["tasks"].get(task)
            name, m = primary(t) if t else (None, None)
            if not m:
                continue
            xs.append(i + (j - (len(arts) - 1) / 2) * width)
            ys.append(100 * m["value"])
            errs.append(100 * (m["stderr"] or 0))
            f = (t.get("flips") or {}).get(name or "") or {}
            r2w.append(f.get("right_to_wrong", 0))
            w2r.append(f.get("wrong_to_right", 0))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=e["key"])
        bx.bar(xs, r2w, width, color="#c92a2a")
        bx.bar(xs, w2r, width, bottom=r2w, color="#2b8a3e")
    for a in (ax, bx):
        a.set_xticks(range(len(tasks)))
        a.set_xticklabels(tasks, fontsize=8.5)
    ax.set_ylabel("score % (± stderr)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    bx.set_ylim(bottom=0, top=max(1.0, bx.get_ylim()[1]))
    bx.yaxis.get_major_locator().set_params(integer=True)
    bx.set_ylabel("flips vs reference\n(red right→wrong, green wrong→right)")
    fig.tight_layout()
    return svg(fig)


def html(report: dict[str, Any]) -> str:
    from kititans.htmlpage import esc, page, table

    body = ["<h1>kititans eval</h1>", "<ul class='notes'>"]
    body += [f"<li>{esc(line[2:])}</li>" for line in summary_lines(report)]
    body.append("</ul>")
    try:
        plot = chart(report)
        if plot:
            body.append(
                f"<figure class='wide'>{plot}<figcaption>score and flips per task</figcaption></figure>"
            )
    except ImportError:
        body.append("<p class='sub'>(charts need matplotlib: pip install 'kititans[bench]')</p>")
    for task in task_names(report):
        shown, rows = task_rows(report, task)
        body += [f"<h2>{esc(task)} ({esc(shown)})</h2>", table(HEADERS, rows, numeric_from=1, color_col=None)]
    body += [
        "<h2>Artifacts</h2>",
        table(ARTIFACT_HEADERS, artifact_rows(report), numeric_from=2, color_col=None),
    ]
    return page("kititans eval", "\n".join(body))


def write_all(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    paths = {"json": folder / "eval.json", "md": folder / "eval.md", "html": folder / "eval.html"}
    write_json(paths["json"], report)
    write_text(paths["md"], markdown(report))
    write_text(paths["html"], html(report))
    return paths
