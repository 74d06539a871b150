"""`kititans bench compare`: one table of rows from several reports, checked before they are merged.

Inputs: kititans bench.json files (from `kititans bench` or a bench pack's runner, any schema up to ours), and
speed-only imports: llama.cpp's `llama-bench -o json` / `-o jsonl`, and ExecuTorch benchmark-app JSON (the
Android/iOS apps' list of {benchmarkModel, metric, actualValue} and the v3 records {model, metric:
{name, benchmark_values}} its CI uploads).

Checks: every kititans report is compared with the first one. Rows whose weights (run.weights_sha256) or
scored text (eval.tokens_sha256) differ are refused with one line, or with `force` kept and marked in the
`check` column. A report too old to carry a hash is marked "unverified", and imported rows "speed only".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kititans.bench.cells import compare_cells, compare_headers, get, md_table, quant_label, report_lines
from kititans.bench.report import SCHEMA_VERSION, write_formats
from kititans.errors import KititansError


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KititansError(f"{path}: not a readable report ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:  # JSON lines (llama-bench -o jsonl)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise KititansError(f"{path}: not JSON or JSON lines ({e})") from None


def load_any(path: str | Path) -> dict[str, Any]:
    """A report dict from any supported file: ours, llama-bench's, or ExecuTorch's."""
    path = Path(path)
    data = _read(path)
    if isinstance(data, dict) and "results" in data and "schema_version" in data:
        if not isinstance(data["schema_version"], int) or data["schema_version"] > SCHEMA_VERSION:
            raise KititansError(
                f"{path}: written by a newer kititans (report schema {data['schema_version']}, this one reads "
                f"up to {SCHEMA_VERSION}): upgrade kititans to compare it"
            )
        data["_source"] = str(path)
        return data
    rows = data if isinstance(data, list) else [data]
    if rows and all(isinstance(r, dict) and "avg_ts" in r and "n_gen" in r for r in rows):
        return from_llama_bench(rows, path)
    if rows and all(
        isinstance(r, dict) and ("benchmarkModel" in r or "benchmark_values" in str(r)) for r in rows
    ):
        return from_executorch(rows, path)
    raise KititansError(
        f"{path}: not a kititans bench.json, llama-bench JSON (-o json/jsonl) or ExecuTorch benchmark JSON"
    )


def _imported(
    kind: str, path: Path, label: str, results: list[dict[str, Any]], device: dict
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "imported": kind,
        "_source": str(path),
        "created": None,
        "run": {"name": kind, "weights_sha256": None},
        "device": {"label": label, **device},
        "settings": {},
        "bandwidth": {},
        "eval": None,
        "results": results,
    }


def from_llama_bench(records: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """llama-bench tests (ppN: n_prompt only, tgN: n_gen only) grouped into one row per model and settings."""
    groups: dict[tuple, dict[str, Any]] = {}
    for t in records:
        key = tuple(t.get(k) for k in ("model_filename", "n_threads", "n_gpu_layers", "repack", "type_k"))
        name = Path(str(t.get("model_filename") or t.get("model_type") or "model")).name
        row = groups.setdefault(
            key,
            {
                "runtime": "llama-bench",
                "quant": str(t.get("model_type") or name),
                "key": f"llama-bench:{name}",
                "status": "ok",
                "size_bytes": t.get("model_size"),
                "speed": {"prefill": {}},
                "placement": _lb_placement(t),
                "settings": {k: t.get(k) for k in ("n_threads", "n_gpu_layers", "repack", "flash_attn")},
            },
        )
        stats = {"median": t.get("avg_ts"), "mean": t.get("avg_ts"), "stdev": t.get("stddev_ts")}
        stats["samples"] = t.get("samples_ts")
        if t.get("n_gen"):
            row["speed"]["decode"] = stats
            row["speed"]["gen_tokens"] = t["n_gen"]
        elif t.get("n_prompt"):
            row["speed"]["prefill"][str(t["n_prompt"])] = stats
    first = records[0] if records else {}
    label = " / ".join(str(first[k]) for k in ("cpu_info", "gpu_info") if first.get(k)) or "llama-bench"
    device = {"cpu": first.get("cpu_info"), "build": first.get("build_commit")}
    return _imported("llama-bench", path, label, list(groups.values()), device)


def _lb_placement(t: dict[str, Any]) -> str:
    """Where a llama-bench test ran: cpu, or its GPU backend with the layers offloaded."""
    backends = str(t.get("backends") or "CPU")
    if backends.upper() == "CPU" or not t.get("n_gpu_layers"):
        return "cpu"
    return f"{backends} (ngl {t['n_gpu_layers']})"


def from_executorch(records: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """ExecuTorch benchmark JSON: token_per_sec -> decode tokens/s, *load_time(ms) -> load_s; one row per
    model/backend/quantization."""
    rows: dict[tuple, dict[str, Any]] = {}
    label = "ExecuTorch"
    for r in records:
        if "benchmarkModel" in r:  # the benchmark app's own file
            m, metric, values = r["benchmarkModel"] or {}, r.get("metric"), [r.get("actualValue")]
            dev = r.get("deviceInfo") or {}
            label = " ".join(str(dev[k]) for k in ("device", "arch", "os") if dev.get(k)) or label
        else:  # v3 records: {"model": {...}, "metric": {"name", "benchmark_values"}, "runners": [...]}
            m, met = r.get("model") or {}, r.get("metric") or {}
            metric, values = met.get("name"), list(met.get("benchmark_values") or [])
            runner = (r.get("runners") or [{}])[0]
            label = str(runner.get("name") or runner.get("type") or label)
        name, backend, quant = m.get("name"), m.get("backend"), m.get("quantization") or m.get("dtype")
        row = rows.setdefault(
            (name, backend, quant),
            {
                "runtime": f"executorch {backend or ''}".strip(),
                "quant": str(quant or "?"),
                "key": f"executorch:{name}:{backend}:{quant}",
                "status": "ok",
                "speed": {"prefill": {}},
                "placement": backend,
            },
        )
        vals = [float(v) for v in values if isinstance(v, (int, float))]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        if metric and "token_per_sec" in metric:
            row["speed"]["decode"] = {"median": mean, "mean": mean, "samples": vals}
        elif metric and "load_time" in metric:
            row["load_s"] = mean / 1000.0
    return _imported("ExecuTorch", path, label, list(rows.values()), {})


# ------------------------------------------------------------------------------------------ checks


def _short(h: str | None) -> str:
    return h[:12] if h else "unrecorded"


def check(base: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    """What differs between a report and the baseline: 'weights', 'eval text' (empty when they match)."""
    diffs = []
    a, b = get(base, "run", "weights_sha256"), get(rep, "run", "weights_sha256")
    if a and b and a != b:
        diffs.append(f"weights {_short(a)} vs {_short(b)}")
    ea, eb = get(base, "eval", "tokens_sha256"), get(rep, "eval", "tokens_sha256")
    if ea and eb and ea != eb:
        diffs.append(f"eval text {_short(ea)} vs {_short(eb)}")
    return diffs


def row_check(base: dict[str, Any], rep: dict[str, Any], forced: list[str]) -> str:
    if rep.get("imported"):
        return f"speed only ({rep['imported']})"
    if forced:
        return "DIFFERS: " + "; ".join(forced)
    if rep is not base and not (get(rep, "run", "weights_sha256") and get(rep, "eval", "tokens_sha256")):
        return "unverified (no hashes in this report)"
    return "ok"


def compare_reports(reports: list[dict[str, Any]], force: bool = False) -> dict[str, Any]:
    """One table of every measured row of every report, checked against the first kititans report."""
    ours = [r for r in reports if not r.get("imported")]
    base = ours[0] if ours else reports[0]
    prompts = [set(get(r, "settings", "prompt_tokens") or []) for r in ours]
    common = sorted(set.intersection(*prompts)) if prompts else []
    pp = common[0] if common else None
    names = report_names(reports)
    rows = []
    for rep, name in zip(reports, names):
        diffs = [] if rep is base or rep.get("imported") else check(base, rep)
        if diffs and not force:
            raise KititansError(
                f"{rep['_source']} and {base['_source']} measured different things ({'; '.join(diffs)}): "
                "compare reports of the same weights and eval text, or pass --force to mark those rows"
            )
        mark = row_check(base, rep, diffs)
        for r in rep.get("results") or []:
            if not isinstance(r, dict) or r.get("status") != "ok":
                continue
            pp_row = pp or min((int(k) for k in get(r, "speed", "prefill") or {}), default=None)
            rows.append(
                {
                    "device": name,
                    "run": get(rep, "run", "name") or "?",
                    "runtime": r.get("runtime", "?"),
                    "quant": quant_label(r),
                    "ran_on": r.get("placement") or get(rep, "settings", "device") or "cpu",
                    "size_bytes": r.get("size_bytes"),
                    "bits_per_weight": r.get("bits_per_weight"),
                    "prefill_tps": get(r, "speed", "prefill", str(pp_row), "median") if pp_row else None,
                    "decode_tps": get(r, "speed", "decode", "median"),
                    "peak_rss_bytes": get(r, "memory", "peak_rss_bytes"),
                    "ppl_drift_pct": get(r, "quality", "ppl_drift_pct"),
                    "kld_mean": get(r, "quality", "kld_mean"),
                    "roofline_fraction": get(r, "roofline", "fraction"),
                    "check": mark,
                }
            )
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "compare",
        "prompt_tokens": pp,
        "forced": force,
        "reports": [
            {
                "name": name,
                "source": r["_source"],
                "imported": r.get("imported"),
                "device": r.get("device") or {},
                "run": r.get("run") or {},
                "settings": r.get("settings") or {},
                "bandwidth": r.get("bandwidth") or {},
                "created": r.get("created"),
                "eval_sha256": get(r, "eval", "tokens_sha256"),
            }
            for r, name in zip(reports, names)
        ],
        "rows": rows,
    }


def report_names(reports: list[dict[str, Any]]) -> list[str]:
    """Each report's device label; labels shared by several reports get the run name, then a number."""
    names = [str(get(r, "device", "label") or Path(r["_source"]).stem) for r in reports]
    runs = [str(get(r, "run", "name") or "?") for r in reports]
    names = [f"{n} [{run}]" if names.count(n) > 1 else n for n, run in zip(names, runs)]
    return [f"{n} #{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------------ rendering


def render_compare_markdown(cmp: dict[str, Any]) -> str:
    lines = ["# kititans bench: comparison", ""]
    lines += md_table(compare_headers(cmp), [compare_cells(r) for r in cmp["rows"]], numeric_from=5)
    if cmp.get("forced"):
        lines += ["", "Compared with --force: rows marked DIFFERS measured other weights or another text."]
    lines += ["", "## Devices", ""]
    for rep in cmp["reports"]:
        lines += [f"### {rep['name']} ({rep['source']})", ""]
        lines += [f"- {x}" for x in report_lines(rep)]
        lines.append("")
    return "\n".join(lines)


def write_compare(cmp: dict[str, Any], out: Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.html in `out`; their paths."""
    from kititans.bench.html import render_compare_html

    return write_formats(cmp, out, "compare", render_compare_markdown, render_compare_html)
