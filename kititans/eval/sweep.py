"""`kititans eval`: lm-eval tasks on a run and its exports, each scored on the same items, with flips and
continuation KLD against the fp32 reference.

    check tasks (lm-eval's index) and artifacts -> for each artifact, reference first:
        KititansLM over its runtime -> lm_eval.simple_evaluate(model=lm, log_samples=True)
        the reference stores its continuation log-prob rows; the others measure KLD against them
        per-document correctness -> flips against the reference (right->wrong, wrong->right)
    -> OUT/eval.json, eval.md, eval.html and, per artifact, lm-eval's own results.json + samples_<task>.jsonl

Everything is written into a staging folder that replaces OUT only when the whole evaluation succeeded.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import kititans
from kititans.errors import KititansError
from kititans.eval.artifacts import Artifact, is_run_dir, select
from kititans.eval.kld import KldMeter, ReferenceRows
from kititans.eval.tasks import check_tasks_build, require_lm_eval, resolve_tasks, task_manager
from kititans.files import atomic_path, write_text

SCHEMA_VERSION = 1
Event = Callable[[dict[str, Any]], None]
# lm-eval's default seeds (random, numpy, torch, few-shot sampler): every artifact sees the same items
SEEDS = (0, 1234, 1234, 1234)


@dataclass
class EvalConfig:
    target: Path  # a run directory, or one artifact (.gguf, ONNX folder, .mlpackage)
    tasks: list[str]
    artifacts: list[str] | None = None  # None: the target alone; ["all"]; or ["gguf:q4_k_m", ...]
    limit: float | None = None  # items per task (a fraction below 1, as lm-eval reads it)
    num_fewshot: int | None = None
    include_path: list[Path] = field(default_factory=list)
    builtin_tasks: bool = True  # index lm-eval's own tasks (False: only include_path, a faster start)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    gen_kwargs: str | None = None
    batch_size: int = 8
    max_length: int | None = None
    threads: int = 0
    device: str = "cpu"
    runtime_options: dict[str, Any] = field(default_factory=dict)  # passed to every runtime (kv_type=f32)
    bootstrap_iters: int = 1000  # stderr of non-mean metrics (acc's is closed-form)
    out: Path | None = None  # default RUN/eval (an artifact: <artifact>.eval next to it)
    write: bool = True


def default_out(target: Path) -> Path:
    target = Path(target)
    return target / "eval" if is_run_dir(target) else target.with_name(target.name + ".eval")


def check_out(out: Path) -> None:
    """OUT is replaced as a whole: refuse a folder that is not an earlier evaluation's."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "eval.json").is_file())):
        raise KititansError(f"--out {out} exists and is not an evaluation folder: choose a new folder")


def check_language_model(target: Path) -> None:
    if not is_run_dir(target):
        return
    from kititans.checkpoint import read_meta
    from kititans.models.spec import get_family

    family = read_meta(target)["family"]
    if get_family(family).task != "lm":
        raise KititansError(
            f"{target} is an encoder run ({family}: embeddings, not next-token logits); lm-eval tasks need a "
            "language model (for an encoder, use kititans embed / search)"
        )


def run_eval(
    cfg: EvalConfig, on_event: Event | None = None, artifacts: list[Artifact] | None = None
) -> dict[str, Any]:
    """Evaluate every selected artifact (or the given ones, the reference first); returns the report (and
    writes it unless cfg.write is False)."""
    emit = on_event or (lambda e: None)
    require_lm_eval()
    target = Path(cfg.target)
    arts, notes = (artifacts, []) if artifacts else select(target, cfg.artifacts)
    check_language_model(target)
    tm = task_manager(cfg.include_path, cfg.builtin_tasks)
    tasks = resolve_tasks(tm, cfg.tasks)
    check_tasks_build(tm, tasks, cfg.builtin_tasks)
    out = Path(cfg.out) if cfg.out else default_out(target)
    if cfg.write:
        check_out(out)
    emit({"kind": "plan", "artifacts": [a.key for a in arts], "tasks": tasks, "notes": notes})
    started, load0 = time.time(), os.getloadavg()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kititans-eval-")))
        # the report is built in a staging folder that replaces OUT only once everything succeeded
        stage = stack.enter_context(atomic_path(out)) if cfg.write else work / "report"
        stage.mkdir()
        ref_rows = ReferenceRows(work / "reference.f16") if len(arts) > 1 else None
        entries, correct = [], []
        for i, art in enumerate(arts):
            emit({"kind": "start", "artifact": art.key, "index": i})
            entry, docs = evaluate_artifact(cfg, tm, tasks, art, stage, ref_rows, is_reference=i == 0)
            entries.append(entry)
            correct.append(docs)
            emit({"kind": "done", "entry": entry})
        for entry, docs in zip(entries[1:], correct[1:]):
            add_flips(entry, correct[0], docs)
        report = {
            "schema_version": SCHEMA_VERSION,
            "kititans_version": kititans.__version__,
            "lm_eval_version": _lm_eval_version(),
            "target": str(target),
            "tasks": tasks,
            "reference": entries[0]["key"] if len(arts) > 1 else None,
            "settings": settings(cfg),
            "host": host(load0),
            "seconds": time.time() - started,
            "artifacts": entries,
            "notes": notes,
        }
        if cfg.write:
            from kititans.eval.report import write_all

            write_all(report, stage)
            report["out"] = str(out)
    return report


def _lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "?")


def settings(cfg: EvalConfig) -> dict[str, Any]:
    s = asdict(cfg)
    s["target"] = str(s["target"])
    s["out"] = str(s["out"]) if s["out"] else None
    s["include_path"] = [str(p) for p in cfg.include_path]
    s["seeds"] = list(SEEDS)
    return s


def host(load0: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evaluate_artifact(
    cfg: EvalConfig,
    tm: Any,
    tasks: list[str],
    art: Artifact,
    stage: Path,
    ref_rows: ReferenceRows | None,
    is_reference: bool,
) -> tuple[dict[str, Any], dict[tuple, dict[str, bool]]]:
    """Score one artifact; its report entry and per-document correctness."""
    import lm_eval

    from kititans.eval.backend import KititansLM

    meter = KldMeter(ref_rows) if ref_rows is not None and not is_reference else None
    hook = (ref_rows.add if is_reference else meter.add) if ref_rows is not None else None  # type: ignore[union-attr]
    lm = KititansLM(
        art.path,
        runtime=art.runtime,
        dtype=art.quant if art.runtime == "torch" else "fp32",
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        threads=cfg.threads,
        device=cfg.device,
        row_hook=hook,
        **cfg.runtime_options,
    )
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=tm,
        log_samples=True,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn,
        gen_kwargs=cfg.gen_kwargs,
        bootstrap_iters=cfg.bootstrap_iters,
        random_seed=SEEDS[0],
        numpy_random_seed=SEEDS[1],
        torch_random_seed=SEEDS[2],
        fewshot_random_seed=SEEDS[3],
    )
    seconds = time.perf_counter() - t0
    if is_reference and ref_rows is not None:
        ref_rows.finish()
    samples = res.pop("samples")
    if cfg.write:
        write_lm_eval_results(stage / art.slug, res, samples)
    entry = summarize(art, res, samples, lm.stats, seconds)
    if meter is not None:
        entry["kld"] = meter.summary()
        for task, t in entry["tasks"].items():
            t["kld"] = meter.summary(task)
    close = getattr(lm.rt, "close", None)
    del lm
    if close is not None:
        close()
    gc.collect()
    return entry, correctness(samples)


def write_lm_eval_results(folder: Path, res: dict[str, Any], samples: dict[str, list]) -> None:
    """lm-eval's own output: the results dict as its CLI writes it, and one JSON line per logged sample."""
    from lm_eval.utils import handle_non_serializable

    folder.mkdir(parents=True, exist_ok=True)
    dump = lambda x, **kw: json.dumps(x, default=handle_non_serializable, ensure_ascii=False, **kw)  # noqa: E731
    write_text(folder / "results.json", dump(res, indent=2) + "\n")
    for task, rows in samples.items():
        write_text(folder / f"samples_{task}.jsonl", "".join(dump(r) + "\n" for r in rows))


def task_metrics(block: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{'acc': {'value': .., 'stderr': ..}, 'exact_match,strict': ...} from one lm-eval results entry."""
    out: dict[str, dict[str, float | None]] = {}
    for key, value in block.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        err = block.get(f"{metric}_stderr,{filt}")
        name = metric if filt == "none" else key
        out[name] = {"value": float(value), "stderr": float(err) if isinstance(err, (int, float)) else None}
    return out


def summarize(
    art: Artifact, res: dict[str, Any], samples: dict[str, list], stats: dict[str, Any], seconds: float
) -> dict[str, Any]:
    tasks = {}
    groups = set(res.get("groups") or {})
    for task, block in res.get("results", {}).items():
        if task in groups:
            continue
        metric_list = (res.get("configs", {}).get(task) or {}).get("metric_list") or [{}]
        tasks[task] = {
            "metrics": task_metrics(block),
            "primary": metric_list[0].get("metric"),
            "n": len(samples.get(task, [])),
            "truncated": int(stats["truncated"].get(task, 0)),
        }
    items = sum(len(v) for v in samples.values())
    return {
        "key": art.key,
        "runtime": art.runtime,
        "quant": art.quant,
        "path": str(art.path),
        "seconds": seconds,
        "items": items,
        "items_per_s": items / seconds if seconds > 0 else None,
        "requests": stats["requests"],
        "backend_seconds": stats["seconds"],
        "tokens_scored": stats["tokens_scored"],
        "truncated": int(sum(stats["truncated"].values())),
        "tasks": tasks,
        "groups": {g: {"metrics": task_metrics(b)} for g, b in (res.get("groups") or {}).items()},
    }


def correctness(samples: dict[str, list]) -> dict[tuple, dict[str, bool]]:
    """(task, filter, doc_id, doc_hash) -> {metric: correct} for every 0/1 metric of every logged sample."""
    out: dict[tuple, dict[str, bool]] = {}
    for task, rows in samples.items():
        for s in rows:
            marks = {
                m: bool(s[m])
                for m in s.get("metrics", [])
                if isinstance(s.get(m), (bool, int, float)) and float(s[m]) in (0.0, 1.0)
            }
            if marks:
                out[(task, s.get("filter", "none"), s["doc_id"], s.get("doc_hash"))] = marks
    return out


def add_flips(
    entry: dict[str, Any], ref: dict[tuple, dict[str, bool]], mine: dict[tuple, dict[str, bool]]
) -> None:
    """Per task and 0/1 metric: items right in the reference and wrong here, and the reverse."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for key, marks in mine.items():
        base = ref.get(key)
        if base is None:
            continue
        task, filt = key[0], key[1]
        for metric, ok in marks.items():
            if metric not in base:
                continue
            name = metric if filt == "none" else f"{metric},{filt}"
            c = counts.setdefault(task, {}).setdefault(
                name, {"compared": 0, "right_to_wrong": 0, "wrong_to_right": 0}
            )
            c["compared"] += 1
            c["right_to_wrong"] += int(base[metric] and not ok)
            c["wrong_to_right"] += int(ok and not base[metric])
    for task, per_metric in counts.items():
        if task in entry["tasks"]:
            entry["tasks"][task]["flips"] = per_metric
