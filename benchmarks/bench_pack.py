"""Bench packs on this machine: pack size and time (exports made, then reused), the runner's start-up time and
peak memory in a torch-free virtualenv, and the same rows measured by `kititans bench` and by the pack's
run.py, interleaved round by round (speed ratios; quality must be identical).

usage: python benchmarks/bench_pack.py RUN --work DIR --phase pack   [--artifacts gguf:q4_k_m,gguf:q4_0,onnx:int4]
       /work/bin/timing-lock python benchmarks/bench_pack.py RUN --work DIR --phase speed [--rounds 2 --trials 5]

The pack phase copies RUN (without export/, checkpoints/, bench/) into DIR/run, packs it twice (cold: the
exports are made; warm: they are reused) and prints sizes and times. The speed phase makes DIR/venv (a fresh
virtualenv: `pip install numpy onnxruntime llama-cpp-python` from the --wheels folder, or without --wheels one
whose site-packages links only those packages and their dependencies from this environment),
times `run.py --help` and alternates `kititans bench` and `run.py` over the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

DEVICE_PACKAGES = (
    "numpy",
    "onnxruntime",
    "llama_cpp",
    "llama_cpp_python",
    "typing_extensions",
    "diskcache",
    "jinja2",
    "markupsafe",
)
FORMAT_RUNTIMES = {"gguf": "llamacpp", "onnx": "onnx", "coreml": "coreml"}


def sh(cmd: list[str], **kw: Any) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def phase_pack(args: argparse.Namespace) -> dict[str, Any]:
    run = args.work / "run"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("export", "checkpoints", "bench", "report"))
    out: dict[str, Any] = {"run": str(args.run), "artifacts": args.artifacts}
    for kind in ("cold", "warm"):
        pack = args.work / f"{kind}.benchpack"
        shutil.rmtree(pack, ignore_errors=True)
        cmd = ["kititans", "bench", "pack", str(run), "--artifacts", args.artifacts, "--out", str(pack), "-q"]
        cmd += ["--threads", str(args.threads)]
        seconds, r = sh(cmd)
        m = json.loads((pack / "manifest.json").read_text())
        out[kind] = {
            "seconds": seconds,
            "bytes": du(pack),
            "reference_bytes": m["reference"]["bytes"],
            "reused": [a["key"] for a in m["artifacts"] if a["export"].get("reused")],
            "artifacts": {a["key"]: a["size_bytes"] for a in m["artifacts"]},
            "command": " ".join(cmd),
        }
        print(f"{kind}: {du(pack) / 2**20:.1f} MiB in {seconds:.1f} s; {r.stdout.splitlines()[0]}")
    return out


def make_venv(path: Path, wheels: Path | None) -> Path:
    """A fresh virtualenv: with --wheels, `pip install numpy onnxruntime llama-cpp-python` from that folder
    (no index: what a device gets from pip, offline); else one whose site-packages links only DEVICE_PACKAGES
    from this environment."""
    if wheels and not (path / "bin" / "python").exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(path)], check=True, env=device_env())
        pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--find-links"]
        pkgs = ["numpy", "onnxruntime", "llama-cpp-python"]
        subprocess.run([*pip, str(wheels), *pkgs], check=True, env=device_env())
    if not (path / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
        py = path / "bin" / "python"
        code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        target = Path(subprocess.run([py, "-c", code], capture_output=True, text=True).stdout.strip())
        for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
            name = entry.name.lower()
            if any(name == p or name.startswith((p + ".", p + "-")) for p in DEVICE_PACKAGES):
                (target / entry.name).symlink_to(entry)
    return path / "bin" / "python"


def device_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def rows_of(path: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in json.loads(path.read_text())["results"] if r["status"] == "ok"}


def max_quality_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    diffs = [abs(a[k] - b[k]) for k in a if isinstance(a[k], float)]
    for k in ("kld_percentiles", "delta_p_percentiles"):
        diffs += [abs(a[k][p] - b[k][p]) for p in a[k]]
    return max(diffs)


def phase_speed(args: argparse.Namespace) -> dict[str, Any]:
    pack, run = args.work / "warm.benchpack", args.work / "run"
    py = make_venv(args.work / "venv", args.wheels)
    for mod in ("torch", "kititans"):
        r = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, env=device_env(), cwd=args.work)
        assert r.returncode != 0, f"{mod} imports in the device virtualenv"
    code = "import importlib.metadata as m; print(sorted(d.metadata['Name'] for d in m.distributions()))"
    venv_packages = subprocess.run([py, "-c", code], capture_output=True, text=True, env=device_env()).stdout
    helps = [sh([str(py), str(pack / "run.py"), "--help"], env=device_env())[0] for _ in range(5)]
    pairs = ",".join(
        f"{FORMAT_RUNTIMES[a.split(':')[0]]}:{a.split(':')[1]}" for a in args.artifacts.split(",")
    )
    pairs = ",".join(p for p in pairs.split(",") if not p.startswith("coreml"))
    common = ["--trials", str(args.trials), "--threads", str(args.threads)]
    rounds = []
    for i in range(args.rounds):
        desk = args.work / f"desk-{i}"
        cmd_d = ["kititans", "bench", str(run), "--runtimes", pairs, *common, "--out", str(desk), "-q"]
        t_d, _ = sh(cmd_d)
        out = args.work / f"pack-{i}.json"
        cmd_p = [str(py), str(pack / "run.py"), "--label", "venv", *common, "--out", str(out), "-q"]
        cmd_p += ["--rows", pairs]
        t_p, _ = sh(cmd_p, env=device_env())
        rep = json.loads(out.read_text())
        rounds.append({"desk": rows_of(desk / "bench.json"), "pack": rows_of(out), "runner": rep["runner"]})
        rounds[-1]["seconds"] = {"bench": t_d, "pack": t_p}
        print(f"round {i}: bench {t_d:.0f} s, pack {t_p:.0f} s")
    table = []
    for key in rounds[0]["pack"]:
        d = [r["desk"][key] for r in rounds]
        p = [r["pack"][key] for r in rounds]
        dec_d = [x["speed"]["decode"]["median"] for x in d]
        dec_p = [x["speed"]["decode"]["median"] for x in p]
        pp = str(min(int(n) for n in p[0]["speed"]["prefill"]))
        pre_d = [x["speed"]["prefill"][pp]["median"] for x in d]
        pre_p = [x["speed"]["prefill"][pp]["median"] for x in p]
        table.append(
            {
                "row": key,
                "bench tg": dec_d,
                "pack tg": dec_p,
                "tg ratio": statistics.median(b / a for a, b in zip(dec_d, dec_p)),
                f"bench pp{pp}": pre_d,
                f"pack pp{pp}": pre_p,
                "pp ratio": statistics.median(b / a for a, b in zip(pre_d, pre_p)),
                "bench RSS MiB": [x["memory"]["peak_rss_bytes"] / 2**20 for x in d],
                "pack RSS MiB": [x["memory"]["peak_rss_bytes"] / 2**20 for x in p],
                "max |quality diff|": max(max_quality_diff(a["quality"], b["quality"]) for a, b in zip(d, p)),
                "kld": p[0]["quality"]["kld_mean"],
                "ppl drift %": p[0]["quality"]["ppl_drift_pct"],
            }
        )
    return {
        "venv": {"wheels": str(args.wheels) if args.wheels else None, "packages": venv_packages.strip()},
        "help_s": helps,
        "runner": [r["runner"] for r in rounds],
        "table": table,
        "load_avg": os.getloadavg(),
        "commands": {"bench": " ".join(cmd_d), "pack": " ".join(cmd_p)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--phase", choices=("pack", "speed"), required=True)
    ap.add_argument("--artifacts", default="gguf:q4_k_m,gguf:q4_0,onnx:int4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--wheels", type=Path, help="pip-install the device packages from this wheel folder")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = phase_pack(args) if args.phase == "pack" else phase_speed(args)
    result["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text if args.phase == "pack" else json.dumps(result["table"], indent=1))


if __name__ == "__main__":
    main()
