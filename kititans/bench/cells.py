"""The cells and lines of bench tables, formatted once for bench.md (report.py), bench.html (html.py) and the
comparison of several reports (compare.py). Every reader here tolerates reports from older versions and other
machines: a missing field shows as '–', never as a KeyError. Torch-free: a bench pack's runner ships it."""

from __future__ import annotations

import math
from typing import Any

from kititans.bench import embed as embed_bench

MiB = 2**20


def fmt(x: Any, digits: int = 3) -> str:
    """A number with about `digits` significant figures ('1,234', '12.3', '0.0123', '4.17e-05'); '–' if None."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits - 1 - math.floor(math.log10(abs(x)))}f}"


def drift(pct: float | None) -> str:
    """A perplexity change in percent with its sign; 0.000 when it rounds to zero."""
    if pct is None:
        return "–"
    return "0.000" if abs(pct) < 5e-4 else f"{pct:+.3f}"


def kld(x: float | None) -> str:
    """Mean KLD; below 1e-5 it is float16 storage noise of the reference (it can even be slightly < 0)."""
    if x is None:
        return "–"
    return "<1e-5" if x < 1e-5 else fmt(x)


def mib(n: float | None) -> str:
    """Bytes as MiB; '–' when unrecorded (or zero)."""
    return fmt(n / MiB) if n else "–"


def percent(fraction: float | None, digits: int = 1) -> str:
    """A fraction as a percentage with `digits` decimals; '–' if None."""
    return f"{100 * fraction:.{digits}f}" if fraction is not None else "–"


def get(d: Any, *keys: Any) -> Any:
    """d[k1][k2]... or None when any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def speed_columns(report: dict[str, Any]) -> list[tuple[str, tuple]]:
    """(header, path into a result) for the speed columns of this report's settings."""
    s = report["settings"]
    cols = [(f"pp{n} t/s", ("speed", "prefill", str(n), "median")) for n in s["prompt_tokens"]]
    cols.append((f"tg{s['gen_tokens']} t/s", ("speed", "decode", "median")))
    n0 = s["prompt_tokens"][0] if s["prompt_tokens"] else None
    if n0 is not None:
        cols.append((f"TTFT{n0} ms", ("speed", "ttft_ms", str(n0), "median")))
    return cols


def quant_label(r: dict[str, Any]) -> str:
    """The level, marked for a row of a --with QAT run (`q4_0 QAT`) or with the row's variant
    (`int4 @cpu+ane`, `q4_0 @no-repack`)."""
    if r.get("qat"):
        return f"{r.get('quant', '?')} QAT"
    variant = str(r.get("key") or "").partition("@")[2]
    return f"{r.get('quant', '?')} @{variant}" if variant else str(r.get("quant", "?"))


def result_cells(report: dict[str, Any], r: dict[str, Any]) -> list[str]:
    """One row of the main table (the same cells in Markdown and HTML)."""
    if report.get("task") == "embed":
        return embed_bench.result_cells(report, r, fmt)
    mem = r.get("memory", {})
    q = r.get("quality") or {}
    roof = r.get("roofline") or {}
    decode = get(r, "speed", "decode")
    cells = [
        r["runtime"],
        quant_label(r),
        str(r.get("placement") or get(report, "settings", "device") or "–"),
    ]
    cells.append(mib(r.get("size_bytes")))
    cells.append(fmt(r.get("bits_per_weight")))
    for _, path in speed_columns(report):
        v = get(r, *path)
        if path[1] == "decode" and decode and decode["n"] > 1:
            cells.append(f"{fmt(v)} ({fmt(decode['min'])}–{fmt(decode['max'])})")
        else:
            cells.append(fmt(v))
    cells.append(mib(mem.get("peak_rss_bytes")))
    cells.append(fmt(mem["model_rss_bytes"] / MiB) if mem.get("model_rss_bytes") is not None else "–")
    cells.append(fmt(q.get("ppl")))
    cells.append(drift(q.get("ppl_drift_pct")))
    cells.append(kld(q.get("kld_mean")))
    cells.append(percent(q.get("same_top"), 2))
    cells.append(percent(roof.get("fraction")))
    return cells + _accuracy(report, "cells", r)


def _accuracy(report: dict[str, Any], what: str, *row: dict[str, Any]) -> list[str]:
    """`bench --tasks` accuracy columns (kititans.eval.bench), imported only for a report that has them: a
    bench pack's torch-free runner ships this module without the eval package."""
    if not report.get("accuracy"):
        return []
    from kititans.eval import bench as eval_columns

    return getattr(eval_columns, what)(report, *row)


def text_columns(report: dict[str, Any]) -> int:
    """How many leading columns of the main table are text (runtime, quant, ran on)."""
    return 2 if report.get("task") == "embed" else 3


def headers(report: dict[str, Any]) -> list[str]:
    if report.get("task") == "embed":
        return embed_bench.headers(report)
    return [
        "runtime",
        "quant",
        "ran on",
        "size MiB",
        "bits/w",
        *(h for h, _ in speed_columns(report)),
        "peak RSS MiB",
        "model MiB",
        "PPL",
        "drift %",
        "KLD",
        "same top %",
        "roofline %",
        *_accuracy(report, "headers"),
    ]


def unmeasured_rows(report: dict[str, Any]) -> list[list[str]]:
    """The "Not measured" table's rows (runtime, quant, reason): failed pairs, then pairs without quality."""
    rows = [
        [r["runtime"], quant_label(r), r.get("reason", "")] for r in report["results"] if r["status"] != "ok"
    ]
    partial = [r for r in report["results"] if r["status"] == "ok" and r.get("quality_error")]
    return rows + [[r["runtime"], quant_label(r), f"quality: {r['quality_error']}"] for r in partial]


def md_table(head: list[str], rows: list[list[str]], numeric_from: int = 2) -> list[str]:
    align = ["---" if i < numeric_from else "--:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _clusters(dev: dict[str, Any]) -> str:
    """'4x Cortex-A76 + 4x Cortex-A55' from the core types, '' when there is one unnamed type."""
    parts = []
    for c in get(dev, "core_types", "clusters") or []:
        if c.get("type") or c.get("max_mhz"):
            mhz = f" {c['max_mhz']} MHz" if c.get("max_mhz") else ""
            parts.append(f"{c.get('cores', '?')}x {c.get('type') or 'core'}{mhz}")
    return " + ".join(parts) if len(parts) > 1 or any("x " in p for p in parts[:1]) else ""


def device_lines(dev: dict[str, Any]) -> list[str]:
    ram = dev.get("ram_bytes")
    lines = [
        f"CPU: {dev.get('cpu', '?')} ({dev.get('arch', '?')}), {dev.get('physical_cores', '?')} cores / "
        f"{dev.get('logical_cores', '?')} threads, {dev.get('threads_used', '?')} threads used",
        f"RAM: {ram / 2**30:.1f} GiB" if ram else "RAM: –",
    ]
    lines[1] += f"; OS: {dev.get('os', '?')}; Python {dev.get('python', '?')}"
    if _clusters(dev):
        lines.append(f"Core types: {_clusters(dev)} ({dev.get('performance_cores')} performance cores)")
    if dev.get("cache_bytes"):
        sizes = ", ".join(
            f"{k} {v / 2**20:g} MiB" if v >= 2**20 else f"{k} {v // 2**10} KiB"
            for k, v in dev["cache_bytes"].items()
        )
        lines[0] += f"; caches {sizes}"
    for g in dev.get("gpus", []):
        mem = f", {g['memory_bytes'] / 2**30:.0f} GiB" if g.get("memory_bytes") else ""
        lines.append(f"GPU: {g['name']} (driver {g['driver']}{mem})")
    if dev.get("apple_chip"):
        lines.append(f"Apple chip: {dev['apple_chip']} ({dev.get('mac_model', '')})")
    soc = dev.get("soc") or {}
    if dev.get("board"):
        extra = f", L4T {soc['jetson_l4t']}" if soc.get("jetson_l4t") else ""
        lines.append(f"Board: {dev['board']}{extra}")
    if soc.get("android"):
        lines.append("Android: " + ", ".join(f"{k} {v}" for k, v in soc["android"].items()))
    if dev.get("governors"):
        lines.append("Governor: " + ", ".join(f"{g} ({len(c)} CPUs)" for g, c in dev["governors"].items()))
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in (dev.get("versions") or {}).items()))
    if dev.get("llama_system_info"):
        lines.append(f"llama.cpp: {dev['llama_system_info']}")
    if dev.get("onnx_providers"):
        lines.append("onnxruntime providers: " + ", ".join(dev["onnx_providers"]))
    return lines


def bandwidth_line(bw: dict[str, Any]) -> str:
    if bw.get("given_gbs"):
        return f"Memory bandwidth: {bw['given_gbs']:.1f} GB/s (given)"
    text = f"Memory bandwidth: {bw['cpu_gbs']:.1f} GB/s ({bw['cpu_method']})"
    if bw.get("gpu_gbs"):
        text += f"; GPU {bw['gpu_gbs']:.0f} GB/s ({bw['gpu_method']})"
    return text


def notes(report: dict[str, Any]) -> list[str]:
    """What the numbers mean, in the report's own settings."""
    if report.get("task") == "embed":
        return embed_bench.notes(report)
    s, ev = report["settings"], report.get("eval")
    ids = "the pack's stored" if s.get("prompt_ids") else "random"
    out = [
        f"Speeds are medians of {s.get('trials')} trials after {s.get('warmup')} warm-up, {ids} prompt tokens "
        f"(BOS first), EOS never stops decoding; decode shows (min–max). {s.get('threads')} threads, "
        f"device {s.get('device')}, OpenMP wait policy {s.get('omp_wait_policy', '?')}"
        + (f", {s['delay_s']:g} s rest before each trial" if s.get("delay_s") else "")
        + ".",
        "peak RSS: the worker process's high-water mark while loading and timing; model MiB: peak minus the "
        "process's size before loading (Python and the runtime's libraries).",
    ]
    if ev:
        ref = ev["reference"]
        out.append(
            f"Quality against {ref['runtime']} {ref['quant']} on {ev['scored_tokens']} scored tokens "
            f"({ev['chunks']} chunks of {ev['n_ctx']}, {ev['source']['kind']}: {ev['source']['path']}); "
            "drift = PPL change in percent, KLD = mean KL(reference || pair) in nats."
        )
        if ref.get("status") == "failed":
            out.append(f"The reference failed ({ref.get('reason')}): no quality numbers.")
    for w in report.get("with", []):
        out.append(
            f"QAT rows ({w['target']}): {w['name']} ({w['run']}), fine-tuned from {w['base'] or 'an unknown run'}; "
            "measured on the same tokens against this run's reference, so they read beside the PTQ row above them."
        )
    if any((get(r, "roofline", "fraction") or 0) > 1 for r in report["results"]):
        out.append(
            "A roofline above 100% means the weights are served from CPU caches (the model is smaller than "
            "the last-level cache), so main-memory bandwidth does not bound that pair."
        )
    out.append(
        "roofline: decode tokens/s as a fraction of bandwidth / (weight + KV bytes read per token); "
        + bandwidth_line(report["bandwidth"])
        + "."
    )
    return out


# ------------------------------------------------------------------------------------------ compare


def compare_headers(cmp: dict[str, Any]) -> list[str]:
    pp = cmp.get("prompt_tokens")
    return [
        "device",
        "run",
        "runtime",
        "quant",
        "ran on",
        "size MiB",
        f"pp{pp} t/s" if pp else "pp t/s",
        "tg t/s",
        "peak RSS MiB",
        "drift %",
        "KLD",
        "roofline %",
        "check",
    ]


def compare_cells(row: dict[str, Any]) -> list[str]:
    return [
        row["device"],
        row["run"],
        row["runtime"],
        row["quant"],
        str(row.get("ran_on") or "–"),
        mib(row.get("size_bytes")),
        fmt(row.get("prefill_tps")),
        fmt(row.get("decode_tps")),
        mib(row.get("peak_rss_bytes")),
        drift(row.get("ppl_drift_pct")),
        kld(row.get("kld_mean")),
        percent(row.get("roofline_fraction")),
        row.get("check", "–"),
    ]


def report_lines(rep: dict[str, Any]) -> list[str]:
    """The device and settings lines of one compared report."""
    if rep.get("imported"):
        dev = rep["device"]
        return [f"imported from {rep['imported']}: speed columns only"] + [
            f"{k}: {v}" for k, v in dev.items() if v and k != "label"
        ]
    lines = device_lines(rep["device"])
    if rep.get("bandwidth"):
        lines.append(bandwidth_line(rep["bandwidth"]))
    s = rep.get("settings") or {}
    lines.append(
        f"{s.get('trials', '?')} trials, {s.get('threads', '?')} threads, device {s.get('device', '?')}, "
        f"OpenMP wait {s.get('omp_wait_policy', '?')}, {rep.get('created') or '?'}"
    )
    return lines
