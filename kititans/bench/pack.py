"""`kititans bench pack RUN --artifacts gguf:q4_k_m,onnx:int4 --out X.benchpack`: everything a device needs to
measure a run's artifacts with no torch and no kititans install, in one folder:

    manifest.json        format, pack_version, the run (weights_sha256, dims), eval (tokens_sha256), every
                         artifact (sha256, size, bits/weight) and the sha256 + size of every file below
    run.py               `python X.benchpack/run.py --label pi5 --out pi5.json` (bench/packrun.py)
    kititans.pyz         a zipapp of this package's torch-free modules (packrun.RUNNER_MODULES), copied from
                         the installed package at pack time: the runner is the same code `kititans bench` runs
    artifacts/           the exports, reused from RUN/export when their weights hash matches, else exported
    reference/           the torch fp32 reference log-probs as .npy files (float16 rows, memory-mapped there)
    eval/                chunks.npy (the scored token chunks), prompts.json (the speed tests' prompt ids)
    tokenizer/           tokenizer.model + tokenizer_config.json (the runner needs only the ids in the manifest)

The pack is built under a temporary name next to --out and renamed when complete; a failure (a full disk
included) removes it, so nothing half-written is left.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import kititans
from kititans.bench import artifact as art
from kititans.bench.evaldata import eval_chunks
from kititans.bench.exports import manifest_of, plan_artifacts, run_exports
from kititans.bench.harness import run_info, tokens_sha256
from kititans.bench.packrun import MANIFEST, PACK_FORMAT, PACK_VERSION, RUNNER_MODULES, ZIPAPP
from kititans.bench.pairs import REFERENCE, Pair, resolve_quant
from kititans.bench.speed import make_prompts
from kititans.bench.worker import run_job, worker_env
from kititans.checkpoint import read_meta
from kititans.errors import KititansError
from kititans.files import atomic_path, dir_size, sha256_file, write_json, write_text

Event = Callable[[dict[str, Any]], None]
# --artifacts names: export formats (kititans export --format) and runtime names
FORMAT_RUNTIMES = {
    "gguf": "llamacpp",
    "llamacpp": "llamacpp",
    "onnx": "onnx",
    "genai": "genai",
    "onnx-genai": "genai",
    "coreml": "coreml",
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same modules give the same zipapp bytes


@dataclass
class PackConfig:
    run: Path
    artifacts: list[str]
    out: Path
    eval_text: Path | None = None
    ppl_ctx: int = 0
    ppl_chunks: int = 16
    prompt_tokens: tuple[int, ...] = (128, 512)
    gen_tokens: int = 128
    seed: int = 0
    threads: int = 0  # the reference job's (0 = performance cores)
    reexport: bool = False
    timeout_s: float = 1800.0
    force: bool = False  # replace an existing pack at --out
    omp_wait_policy: str | None = None


def parse_artifacts(items: list[str]) -> list[Pair]:
    """`gguf:q4_k_m,onnx:int4,coreml:int4` (formats or runtime names) -> pairs, each level checked."""
    pairs: list[Pair] = []
    for item in items:
        fmt, _, q = (s.strip() for s in item.partition(":"))
        if fmt not in FORMAT_RUNTIMES or not q:
            raise KititansError(
                f"--artifacts {item!r}: use format:quant, e.g. gguf:q4_k_m, onnx:int4, coreml:int4 "
                f"(formats: {', '.join(sorted(set(FORMAT_RUNTIMES) - {'llamacpp', 'onnx-genai'}))})"
            )
        rt = FORMAT_RUNTIMES[fmt]
        quant = resolve_quant(rt, q)
        if quant is None:
            from kititans.bench.pairs import QUANTS

            raise KititansError(f"{fmt} has no quantization {q!r}; valid: {', '.join(QUANTS[rt])}")
        if Pair(rt, quant) not in pairs:
            pairs.append(Pair(rt, quant))
    if not pairs:
        raise KititansError("--artifacts: name at least one, e.g. gguf:q4_k_m,onnx:int4")
    return pairs


# ------------------------------------------------------------------------------------------ pieces


def build_zipapp(target: Path) -> list[str]:
    """PACK/kititans.pyz from the installed package's own sources of RUNNER_MODULES; the files it holds."""
    names = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        for mod in RUNNER_MODULES:
            spec = importlib.util.find_spec(mod)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                raise KititansError(
                    f"cannot build the pack's runner: {mod} has no source file in this install"
                )
            name = mod.replace(".", "/") + ("/__init__.py" if spec.submodule_search_locations else ".py")
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, Path(spec.origin).read_bytes())
            names.append(name)
        info = zipfile.ZipInfo("__main__.py", ZIP_DATE)
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, MAIN_PY)
    return names


MAIN_PY = '''"""python kititans.pyz worker JOB RESULT (one bench job) | python kititans.pyz [runner flags] (see run.py)."""
import sys

if sys.argv[1:2] == ["worker"]:
    from kititans.bench.worker import main

    sys.exit(main(sys.argv[2:]))
from kititans.bench.packrun import main

sys.exit(main(sys.argv[1:]))
'''

RUN_PY = '''#!/usr/bin/env python3
"""Measure this bench pack on this device: python run.py --label pi5 --trials 5 --out pi5.json (--help).
Needs Python 3.10+, numpy and the runtime packages of the rows to run (llama-cpp-python, onnxruntime,
coremltools on macOS); no torch and no kititans install. The code is kititans.pyz, beside this file."""
import os
import sys

if sys.version_info < (3, 10):
    sys.exit("error: this bench pack needs Python 3.10 or newer (this is %d.%d)" % sys.version_info[:2])
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "kititans.pyz"))
try:
    import numpy  # noqa: F401
except ImportError:
    sys.exit("error: this bench pack needs numpy: pip install numpy")
from kititans.bench.packrun import main  # noqa: E402

sys.exit(main(sys.argv[1:], HERE))
'''


def tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder as the sorted (relative path, file sha256) list."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def needed_bytes(paths: list[Path], ref_rows: int, vocab: int) -> int:
    """What the pack will take on disk: the artifacts, the float16 reference and a margin for the rest."""
    return sum(dir_size(p) for p in paths) + ref_rows * vocab * 2 + 16 * 2**20


def check_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if free < need:
        raise KititansError(
            f"not enough free space for the pack at {out}: it needs about {need / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free; free some or choose another --out"
        )


# ------------------------------------------------------------------------------------------ the pack


def build_pack(cfg: PackConfig, on_event: Event | None = None) -> dict[str, Any]:
    """Write the pack at cfg.out; a summary (path, bytes, seconds, rows, reference bytes)."""
    emit = on_event or (lambda e: None)
    t0 = time.perf_counter()
    cfg.run, cfg.out = Path(cfg.run), Path(cfg.out)
    meta = read_meta(cfg.run)  # a clear error for a path that is not a run
    from kititans.models.spec import get_family

    if get_family(meta["family"]).task != "lm":
        raise KititansError(f"{cfg.run} is an encoder: bench packs measure language models (perplexity, KLD)")
    pairs = parse_artifacts(cfg.artifacts)
    if cfg.out.exists() and not cfg.force:
        raise KititansError(f"{cfg.out} exists: pass --force to replace it, or choose another --out")
    chunks, source = eval_chunks(cfg.run, cfg.eval_text, cfg.ppl_ctx, cfg.ppl_chunks)
    failed: dict[str, str] = {}
    info, tasks = plan_artifacts(cfg, pairs, failed, run_here=False)
    if failed:
        key, why = next(iter(failed.items()))
        raise KititansError(f"{key}: {why}")
    with tempfile.TemporaryDirectory(prefix="kititans-pack-") as work:
        run_exports(cfg, tasks, info, failed, Path(work), emit)
        if failed:
            key, why = next(iter(failed.items()))
            raise KititansError(f"{key}: {why}")
        from kititans.data.tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.run)
        n_scored = len(chunks) * (len(chunks[0]) - 1 - len(chunks[0]) // 2)
        need = needed_bytes([Path(info[p.key]["path"]) for p in pairs], n_scored, tok.vocab_size)
        check_space(cfg.out, need)
        try:
            with atomic_path(cfg.out) as tmp:
                tmp.mkdir()
                manifest = _write(cfg, tmp, pairs, info, chunks, source, tok, Path(work), emit)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise KititansError(
                    f"the disk filled up while writing the pack at {cfg.out} (it needs about "
                    f"{need / 2**20:.0f} MiB): nothing was kept; free some space or choose another --out"
                ) from None
            raise
    return {
        "path": str(cfg.out),
        "bytes": dir_size(cfg.out),
        "seconds": time.perf_counter() - t0,
        "artifacts": [a["key"] for a in manifest["artifacts"]],
        "reused": [a["key"] for a in manifest["artifacts"] if a["export"].get("reused")],
        "reference_bytes": manifest["reference"]["bytes"],
        "files": len(manifest["files"]),
    }


def _write(cfg: PackConfig, tmp: Path, pairs, info, chunks, source, tok, work: Path, emit: Event) -> dict:
    """Fill the pack folder `tmp`; its manifest (written last)."""
    artifacts = []
    for p in pairs:
        src = Path(info[p.key]["path"])
        rel = Path("artifacts") / (f"onnx-{p.quant}" if p.runtime == "onnx" else src.name)
        if p.runtime == "genai":
            rel = Path("artifacts") / f"genai-{p.quant}"
        emit({"kind": "stage", "job": "pack", "stage": f"copy {p.key}"})
        _copy(src, tmp / rel)
        if src.is_file() or src.suffix == ".mlpackage":  # a file artifact's manifest sits beside it
            side = src.with_name(src.name + ".json")
            if side.is_file():
                _copy(side, tmp / rel.with_name(rel.name + ".json"))
        entry = {"key": p.key, "runtime": p.runtime, "quant": p.quant, "path": rel.as_posix()}
        entry.update(art.describe(cfg.run, p.runtime, p.quant, src))
        entry["sha256"] = tree_sha256(tmp / rel)
        entry["export"] = {k: v for k, v in info[p.key].items() if k != "path"}
        entry["export"]["source_manifest"] = (manifest_of(src) or {}).get("created")
        artifacts.append(entry)
    for name in TOKENIZER_FILES:
        if (cfg.run / name).is_file():
            _copy(cfg.run / name, tmp / "tokenizer" / name)
    (tmp / "eval").mkdir()
    np.save(tmp / "eval" / "chunks.npy", np.asarray(chunks, dtype=np.int64))
    prompts = make_prompts(cfg.prompt_tokens, cfg.gen_tokens, tok.vocab_size, tok.bos_id, cfg.seed)
    write_json(tmp / "eval" / "prompts.json", prompts)
    emit({"kind": "stage", "job": "pack", "stage": "reference log-probs (torch fp32)"})
    ref = _reference(cfg, tmp, work, emit)
    build_zipapp(tmp / ZIPAPP)
    write_text(tmp / "run.py", RUN_PY)
    (tmp / "run.py").chmod(0o755)
    from kititans.bench.quality import reference_info

    run = run_info(cfg.run)
    evald = {
        "source": {**source, "path": Path(str(source.get("path", ""))).name},
        "n_ctx": len(chunks[0]),
        "chunks": len(chunks),
        "scored_tokens": len(chunks) * (len(chunks[0]) - 1 - len(chunks[0]) // 2),
        "reference": {"runtime": REFERENCE[0], "quant": REFERENCE[1], "status": "ok", "quality": ref},
        "definitions": "llama-perplexity: BOS-led chunks, second half scored, KL(reference || pair)",
        "tokens_sha256": tokens_sha256(chunks),
    }
    files = {
        f.relative_to(tmp).as_posix(): {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(tmp.rglob("*"))
        if f.is_file()
    }
    manifest = {
        "format": PACK_FORMAT,
        "pack_version": PACK_VERSION,
        "kititans_version": kititans.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": {**run, "path": run["name"]},
        "task": "lm",
        "tokenizer": {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "vocab_size": tok.vocab_size},
        "eval": evald,
        "reference": {"path": "reference", **reference_info(tmp / "reference")},
        "speed": {
            "prompt_tokens": list(cfg.prompt_tokens),
            "gen_tokens": cfg.gen_tokens,
            "seed": cfg.seed,
            "prompts": "eval/prompts.json",
        },
        "artifacts": artifacts,
        "runner": {"run": "run.py", "zipapp": ZIPAPP, "modules": list(RUNNER_MODULES), "python": ">=3.10"},
        "files": files,
    }
    write_json(tmp / MANIFEST, manifest)
    return manifest


def _reference(cfg: PackConfig, tmp: Path, work: Path, emit: Event) -> dict[str, Any]:
    """The torch fp32 reference log-probs of the chunks, written by a worker into PACK/reference/."""
    from kititans.bench.device import default_threads

    job = {
        "mode": "measure",
        "runtime": REFERENCE[0],
        "quant": REFERENCE[1],
        "artifact": str(cfg.run),
        "threads": cfg.threads or default_threads(),
        "device": "cpu",
        "settings": {},
        "speed": None,
        "quality": {"reference": str(tmp / "reference"), "make_reference": str(tmp / "eval" / "chunks.npy")},
    }
    res = run_job(job, work, "reference", cfg.timeout_s, emit, env=worker_env(cfg.omp_wait_policy))
    if res.get("status") != "ok" or "quality" not in res:
        why = res.get("reason") or res.get("quality_error") or "no result"
        raise KititansError(f"the fp32 reference could not be computed: {why}")
    return res["quality"]


def pack_summary_lines(s: dict[str, Any]) -> list[str]:
    return [
        f"wrote {s['path']}: {s['bytes'] / 2**20:.1f} MiB, {s['files']} files, in {s['seconds']:.1f} s",
        f"  artifacts: {', '.join(s['artifacts'])}"
        + (f" (reused from the run's exports: {', '.join(s['reused'])})" if s["reused"] else ""),
        f"  reference: {s['reference_bytes'] / 2**20:.1f} MiB of float16 log-probs (memory-mapped on the device)",
        f"  on the device: python {Path(s['path']).name}/run.py --label NAME --out NAME.json",
    ]
