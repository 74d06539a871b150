"""Task accuracy and flips as columns of `kititans bench RUN --tasks ...` (bench calls this; eval never
imports bench).

After the bench has measured its pairs, every pair that produced logits is scored on the same lm-eval
items with the run's torch fp32 model as the reference; each bench row gets an "accuracy" entry (per task:
metric, value, stderr, flips; the continuation KLD) and the report an "accuracy" section with the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kititans.eval.artifacts import RUNTIME_OF, Artifact

EVAL_RUNTIMES = set(RUNTIME_OF.values())  # genai has no eval backend (its own generator API)


def _artifact(row: dict[str, Any]) -> Artifact | None:
    if row.get("status") != "ok" or row["runtime"] not in EVAL_RUNTIMES or not row.get("artifact"):
        return None
    name = row["key"] if row.get("qat") else ""
    return Artifact(row["runtime"], row["quant"], Path(row["artifact"]), name)


def add_accuracy(
    report: dict[str, Any],
    run: Path,
    tasks: list[str],
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: list[Path] | None = None,
    out: Path | None = None,
    on_event: Any = None,
    builtin_tasks: bool = True,
) -> None:
    """Score the report's pairs on `tasks` and put the numbers in its rows (in place)."""
    from kititans.eval.sweep import EvalConfig, run_eval

    if report.get("task") == "embed":
        return
    reference = Artifact("torch", "fp32", Path(run))
    rows = {r["key"]: (r, a) for r in report["results"] if (a := _artifact(r)) is not None}
    arts = [reference, *(a for _, a in rows.values() if a != reference)]
    cfg = EvalConfig(
        target=Path(run),
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        include_path=list(include_path or []),
        builtin_tasks=builtin_tasks,
        threads=report.get("settings", {}).get("threads", 0) or 0,
        out=out,
        write=out is not None,
    )
    ev = run_eval(cfg, on_event, artifacts=arts)
    by_key = {e["key"]: e for e in ev["artifacts"]}
    for row, art in rows.values():
        e = by_key.get(art.key)
        if e is not None:
            row["accuracy"] = {"tasks": e["tasks"], "kld": e.get("kld"), "seconds": e["seconds"]}
    report["accuracy"] = {
        "tasks": list(ev["tasks"]),
        "reference": ev["reference"],
        "limit": limit,
        "num_fewshot": num_fewshot,
        "lm_eval_version": ev["lm_eval_version"],
        "report": ev.get("out"),
    }


def headers(report: dict[str, Any]) -> list[str]:
    """Column titles for the bench table: per task its score and its flips (right→wrong / wrong→right)."""
    acc = report.get("accuracy")
    if not acc:
        return []
    return [h for t in acc["tasks"] for h in (f"{t} %", f"{t} flips")]


def cells(report: dict[str, Any], row: dict[str, Any]) -> list[str]:
    acc = report.get("accuracy")
    if not acc:
        return []
    from kititans.eval.report import primary

    out = []
    for t in acc["tasks"]:
        task = (row.get("accuracy") or {}).get("tasks", {}).get(t)
        name, m = primary(task) if task else (None, None)
        out.append(f"{100 * m['value']:.1f} ± {100 * (m['stderr'] or 0):.1f}" if m else "–")
        f = (task or {}).get("flips", {}).get(name or "")
        out.append(f"{f['right_to_wrong']} / {f['wrong_to_right']}" if f else "–")
    return out
