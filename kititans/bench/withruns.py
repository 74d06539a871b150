"""`kititans bench RUN --with QATRUN...`: rows for runs fine-tuned from RUN (kititans qat), measured at their
target level against RUN's own fp32 reference, so a QAT row's drift, KLD and same-top read beside the PTQ
row of the same level (each QAT row is placed right after it).

A `--with` run must share RUN's tokenizer (the reference log-probs are over RUN's vocabulary and held-out
tokens) and name its target in config.json (kititans.qat.target). Its artifact is exported into its own
run directory like any other, in its own worker process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kititans.bench.pairs import FORMATS, Pair, artifact_path
from kititans.checkpoint import read_meta
from kititans.errors import KititansError
from kititans.files import sha256_file

RUNTIME_OF = {fmt: rt for rt, fmt in FORMATS.items() if fmt in ("gguf", "onnx", "coreml")}


@dataclass(frozen=True)
class WithRun:
    run: Path
    name: str
    pair: Pair  # the target level, measured with its runtime
    target: str
    base: str | None


def with_runs(main: Path, runs: list[Path]) -> list[WithRun]:
    """Check each --with run (a QAT run with RUN's tokenizer) and the pair it is measured at."""
    sha = sha256_file(Path(main) / "tokenizer.model")
    out = []
    for run in runs:
        run = Path(run)
        meta = read_meta(run)
        qat = meta.get("qat") if isinstance(meta.get("qat"), dict) else None
        if qat is None or "target" not in qat:
            raise KititansError(
                f"--with {run}: not a QAT run (make one with: kititans qat {main} --target ...)"
            )
        if sha256_file(run / "tokenizer.model") != sha:
            raise KititansError(
                f"--with {run}: its tokenizer differs from {main}'s, so its quality is not comparable"
            )
        fmt, level = qat["target"].split(":")
        base = (meta.get("base_run") or {}).get("path")
        out.append(WithRun(run, run.resolve().name, Pair(RUNTIME_OF[fmt], level), qat["target"], base))
    names = [w.name for w in out]
    if len(set(names)) != len(names):
        raise KititansError("--with: two runs have the same folder name; give runs with distinct names")
    return out


def ptq_pairs(withs: list[WithRun]) -> list[Pair]:
    """The main run's pairs at the same levels (the PTQ rows the QAT rows are read against)."""
    return list(dict.fromkeys(w.pair for w in withs))


def export_task(w: WithRun) -> dict[str, Any]:
    fmt = FORMATS[w.pair.runtime]
    path = artifact_path(w.run, w.pair)
    return {
        "key": w.pair.key,
        "runtime": w.pair.runtime,
        "quant": w.pair.quant,
        "format": fmt,
        "out": str(path),
    }


def row_key(w: WithRun) -> str:
    return f"{w.pair.key}@{w.name}"


def qat_fields(w: WithRun, main: Path) -> dict[str, Any]:
    """What a QAT row records about where it comes from."""
    return {
        "run": str(w.run),
        "name": w.name,
        "target": w.target,
        "base": w.base,
        "base_is_bench_run": w.base is not None and Path(w.base).resolve() == Path(main).resolve(),
    }


def side_by_side(rows: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The main rows with each QAT row right after the main row of the same pair (else at the end)."""
    after: dict[str, list[dict[str, Any]]] = {}
    for r in extra:
        after.setdefault(f"{r['runtime']}:{r['quant']}", []).append(r)
    out = []
    for r in rows:
        out.append(r)
        out += after.pop(r["key"], [])
    for rest in after.values():
        out += rest
    return out
