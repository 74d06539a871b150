"""Bench packs end to end: `kititans bench` measures two artifacts of the debug model, `kititans bench pack`
ships the same artifacts, and the pack's run.py measures them again in a fresh virtualenv with numpy,
onnxruntime and llama-cpp-python only (`import torch` and `import kititans` fail there). The quality numbers
must be the same to 1e-6. About 35 s on 2 idle cores."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from kititans.cli import main

pytest.importorskip(
    "llama_cpp", reason="the pack test measures a GGUF row (pip install 'kititans[llamacpp]')"
)
pytest.importorskip("onnxruntime", reason="the pack test measures an ONNX row (pip install 'kititans[onnx]')")

SHORT = [
    "--prompt-tokens",
    "16",
    "--gen-tokens",
    "8",
    "--ppl-ctx",
    "64",
    "--ppl-chunks",
    "3",
    "--threads",
    "1",
]
# what `pip install numpy onnxruntime llama-cpp-python` puts in a device's environment
DEVICE_PACKAGES = (
    "numpy",
    "onnxruntime",
    "llama_cpp",
    "typing_extensions",
    "diskcache",
    "jinja2",
    "markupsafe",
)


def make_venv(path: Path, packages: tuple[str, ...]) -> Path:
    """A fresh virtualenv (no system site-packages) whose site-packages links only `packages` (and their
    dist-info) from this environment: a device that pip-installed just those. Its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    target = Path(
        subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
    )  # fmt: skip
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        name = entry.name.lower()
        if any(name == p or name.startswith((p + ".", p + "-")) for p in packages):
            (target / entry.name).symlink_to(entry)
    return py


def device_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run_pack(py: Path, pack: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(py), str(pack / "run.py"), *args],
        capture_output=True,
        text=True,
        env=device_env(),
        cwd=pack.parent,
    )


@pytest.fixture(scope="module")
def packed(debug_run, tmp_path_factory):
    """(run, desktop report, pack dir, device report, runner stdout, venv python)."""
    base = tmp_path_factory.mktemp("pack")
    run = base / "debug"
    shutil.copytree(debug_run, run)
    rows = ["--runtimes", "llamacpp:q4_0,onnx:int8", "--repack", "both", "--trials", "1"]
    assert main(["bench", str(run), *rows, *SHORT, "--out", str(base / "desk"), "-q"]) == 0
    desk = json.loads((base / "desk" / "bench.json").read_text())
    pack = base / "debug.benchpack"
    art = ["--artifacts", "gguf:q4_0,onnx:int8"]
    assert main(["bench", "pack", str(run), *art, *SHORT, "--out", str(pack), "-q"]) == 0
    py = make_venv(base / "venv", DEVICE_PACKAGES)
    out = base / "pi.json"
    res = run_pack(
        py, pack, "--label", "venv", "--trials", "1", "--threads", "1", "--repack", "both", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    return run, desk, pack, json.loads(out.read_text()), res.stdout, py


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


def test_the_device_venv_has_no_torch_and_no_kititans(packed):
    py = packed[5]
    for mod in ("torch", "kititans", "sentencepiece"):
        r = subprocess.run(
            [str(py), "-c", f"import {mod}"],
            capture_output=True,
            text=True,
            env=device_env(),
            cwd=packed[2].parent,
        )
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, mod


def test_pack_rows_equal_the_desktop_bench(packed):
    _, desk, _, dev, _, _ = packed
    assert_same_rows(desk, dev, "venv")
    assert dev["runner"]["startup_s"] > 0 and dev["runner"]["verified"]["files"] > 5


def assert_same_rows(desk: dict, dev: dict, label: str) -> None:
    """The pack's rows are the desktop's rows: identical quality, the same artifact facts, speed present."""
    d = {r["key"]: r for r in desk["results"]}
    p = {r["key"]: r for r in dev["results"]}
    assert set(p) == {"llamacpp:q4_0@repack", "llamacpp:q4_0@no-repack", "onnx:int8"} <= set(d)
    for key, row in p.items():
        assert row["status"] == "ok" and d[key]["status"] == "ok", key
        _close(d[key]["quality"], row["quality"], key)  # the same reference, the same runtime: identical
        assert row["speed"]["decode"]["median"] > 0 and set(row["speed"]["prefill"]) == {"16"}
        assert row["speed"]["prompt_ids"] == "stored" and row["memory"]["peak_rss_bytes"] > 0
        for k in ("size_bytes", "weight_bytes_per_token", "bits_per_weight"):
            assert row[k] == d[key][k], (key, k)
        assert row["roofline"]["bound_tps"] > 0 and row["placement"] == d[key]["placement"]
    ll = {k: p[k]["runtime_settings"] for k in ("llamacpp:q4_0@repack", "llamacpp:q4_0@no-repack")}
    assert ll["llamacpp:q4_0@repack"]["use_extra_bufts"] is True
    assert ll["llamacpp:q4_0@no-repack"]["use_extra_bufts"] is False
    assert all(s["threads"] == 1 and s["placement"] == "cpu" for s in ll.values())
    assert dev["run"]["weights_sha256"] == desk["run"]["weights_sha256"]
    assert dev["eval"]["tokens_sha256"] == desk["eval"]["tokens_sha256"]
    assert dev["device"]["label"] == label and "REPACK" in dev["device"]["llama_system_info"]
    assert "CPUExecutionProvider" in dev["device"]["onnx_providers"]
    assert "torch" not in dev["device"]["versions"] and "kititans" not in dev["device"]["versions"]


def test_bench_compare_accepts_the_device_report(packed, tmp_path):
    run = packed[0]
    desk_json, dev_json = run.parent / "desk" / "bench.json", run.parent / "pi.json"
    assert main(["bench", "compare", str(desk_json), str(dev_json), "--out", str(tmp_path / "c")]) == 0
    cmp = json.loads((tmp_path / "c" / "compare.json").read_text())
    rows = [r for r in cmp["rows"] if r["device"] == "venv"]
    assert len(rows) == 3 and all(r["check"] == "ok" and r["decode_tps"] > 0 for r in rows)
    ran_on = {r["quant"]: r["ran_on"] for r in rows}
    assert ran_on == {"q4_0 @repack": "cpu", "q4_0 @no-repack": "cpu", "int8": "CPUExecutionProvider"}
    assert "venv" in (tmp_path / "c" / "compare.md").read_text()


@pytest.mark.slow
def test_pack_in_a_pip_installed_venv(packed, tmp_path):
    """A device's own install: `python -m venv`, then `pip install numpy onnxruntime llama-cpp-python` (from
    the wheels in $KITITANS_DEVICE_WHEELS: tests never download), then the pack measures the same rows as the
    desktop and `bench compare` takes its report. About 60 s beyond the fixture."""
    wheels = os.environ.get("KITITANS_DEVICE_WHEELS", "")
    if not wheels or not Path(wheels).is_dir():
        pytest.skip(
            "set KITITANS_DEVICE_WHEELS to a folder with wheels of numpy, onnxruntime, llama-cpp-python and "
            "their dependencies (pip download -d DIR ...) to run the pack in a pip-installed virtualenv"
        )
    run, desk, pack = packed[:3]
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(tmp_path / "venv")], check=True, env=device_env())
    py = tmp_path / "venv" / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels]
    r = subprocess.run([*pip, "numpy", "onnxruntime", "llama-cpp-python"], capture_output=True, text=True,
                       env=device_env())  # fmt: skip
    assert r.returncode == 0, r.stderr
    for mod in ("torch", "kititans"):
        r = subprocess.run(
            [str(py), "-c", f"import {mod}"], capture_output=True, env=device_env(), cwd=tmp_path
        )
        assert r.returncode != 0, mod
    out = tmp_path / "pip.json"
    args = ("--label", "pip-venv", "--trials", "1", "--threads", "1", "--repack", "both", "--out", str(out))
    res = run_pack(py, pack, *args)
    assert res.returncode == 0, res.stderr
    assert_same_rows(desk, json.loads(out.read_text()), "pip-venv")
    desk_json = run.parent / "desk" / "bench.json"
    assert main(["bench", "compare", str(desk_json), str(out), "--out", str(tmp_path / "c")]) == 0


def test_manifest_hashes_and_reference_map(packed):
    from kititans.files import sha256_file

    run, desk, pack, _, stdout, _ = packed
    m = json.loads((pack / "manifest.json").read_text())
    assert m["run"]["weights_sha256"] == sha256_file(run / "model.safetensors")
    assert (
        m["eval"]["tokens_sha256"] == desk["eval"]["tokens_sha256"] and m["eval"]["scored_tokens"] == 3 * 31
    )
    for a in m["artifacts"]:
        assert a["export"]["reused"] is True  # `kititans bench` exported them; the pack reused them
        assert (pack / a["path"]).exists() and len(a["sha256"]) == 64
    for rel, f in m["files"].items():
        assert sha256_file(pack / rel) == f["sha256"]
    assert {
        "run.py",
        "kititans.pyz",
        "reference/logprobs.npy",
        "eval/chunks.npy",
        "eval/prompts.json",
    } <= set(m["files"])
    assert m["reference"]["bytes"] == (pack / "reference" / "logprobs.npy").stat().st_size
    assert "memory-mapped" in stdout and f"{m['reference']['bytes'] / 2**20:.1f} MiB" in stdout
    import zipfile

    names = zipfile.ZipFile(pack / "kititans.pyz").namelist()
    assert "kititans/bench/packrun.py" in names and not any(
        "pytorch" in n or "checkpoint" in n for n in names
    )


def _one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr


def test_damaged_or_newer_packs_are_refused(packed, tmp_path):
    pack, py = packed[2], packed[5]
    bad = tmp_path / "bad.benchpack"
    shutil.copytree(pack, bad)
    with open(bad / "eval" / "chunks.npy", "ab") as f:
        f.write(b"\0")
    _one_line_error(
        run_pack(py, bad, "--out", str(tmp_path / "x.json")), "does not match the pack's manifest"
    )
    shutil.copy2(pack / "eval" / "chunks.npy", bad / "eval" / "chunks.npy")
    (bad / "eval" / "prompts.json").unlink()
    _one_line_error(run_pack(py, bad, "--out", str(tmp_path / "x.json")), "missing from the pack")
    shutil.rmtree(bad)
    shutil.copytree(pack, bad)
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "pack_version": 99, "kititans_version": "9.0"}))
    _one_line_error(run_pack(py, bad, "--out", str(tmp_path / "x.json")), "made by a newer kititans (9.0")
    assert not (tmp_path / "x.json").exists()


def test_a_missing_runtime_skips_its_rows_or_is_an_error_when_named(packed, tmp_path):
    pack = packed[2]
    py = make_venv(tmp_path / "venv", ("numpy", "onnxruntime"))  # no llama-cpp-python on this device
    out = tmp_path / "r.json"
    r = run_pack(py, pack, "--trials", "1", "--threads", "1", "--no-quality", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = {x["key"]: x for x in json.loads(out.read_text())["results"]}
    assert (
        rows["llamacpp:q4_0"]["status"] == "skipped"
        and "pip install llama-cpp-python" in rows["llamacpp:q4_0"]["reason"]
    )
    assert rows["onnx:int8"]["status"] == "ok" and "quality" not in rows["onnx:int8"]
    assert "skip" in r.stdout and "llama_cpp is not installed" in r.stdout
    _one_line_error(
        run_pack(py, pack, "--rows", "llamacpp:q4_0", "--out", str(out)), "llama_cpp is not installed"
    )
    _one_line_error(run_pack(py, pack, "--rows", "gguf:q9", "--out", str(out)), "this pack has no such row")


def test_kititans_bench_points_a_pack_to_its_runner(packed, capsys):
    assert main(["bench", str(packed[2])]) == 2
    assert "is a bench pack: run it with python" in capsys.readouterr().err


def test_coreml_rows_off_macos():
    from kititans.bench.packrun import plan_rows
    from kititans.bench.rows import RowOptions
    from kititans.errors import KititansError

    m = {"artifacts": [{"runtime": "coreml", "quant": "int4"}, {"runtime": "onnx", "quant": "int8"}]}
    plan = plan_rows(m, RowOptions(), None)
    assert [p["row"].key for p in plan] == [
        "coreml:int4@cpu",
        "coreml:int4@cpu+gpu",
        "coreml:int4@cpu+ane",
        "coreml:int4@all",
        "onnx:int8",
    ]
    if sys.platform == "darwin":
        return
    assert all("only on macOS" in p["skip"] for p in plan[:4])
    with pytest.raises(KititansError, match="only on macOS"):
        plan_rows(m, RowOptions(coreml_units=("cpu+ane",)), ["coreml"])
    with pytest.raises(KititansError, match="no row of this pack can run here: CoreML"):
        plan_rows({"artifacts": m["artifacts"][:1]}, RowOptions(), None)


def test_full_disk_leaves_nothing(packed, tmp_path, monkeypatch, capsys):
    import kititans.bench.pack as pk

    run = packed[0]
    out = tmp_path / "x.benchpack"
    argv = ["bench", "pack", str(run), "--artifacts", "gguf:q4_0", *SHORT, "--out", str(out), "-q"]

    class Usage:
        free = 2**20

    monkeypatch.setattr(pk.shutil, "disk_usage", lambda p: Usage)
    assert main(argv) == 2
    assert "not enough free space" in capsys.readouterr().err and not out.exists()
    monkeypatch.undo()

    def full(src, dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"x" * 1000)  # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pk, "_copy", full)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk filled up" in err[0] and "nothing was kept" in err[0]
    assert list(tmp_path.iterdir()) == []  # no pack, no temporary folder
