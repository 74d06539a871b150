"""Fair per-device settings and what a report records about the device, on fake /proc and /sys trees
(a big.LITTLE phone, an Intel hybrid CPU, a Raspberry Pi, a Jetson); the runner's modules without torch;
`bench compare` checks and imports. Fast: no model is run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kititans.bench.rows import RowOptions, rows_for
from kititans.cli import main
from kititans.runtimes.host import core_types, repack_default


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def fake_cpus(
    root: Path, caps: list[int], parts: list[str] | None = None, khz: list[int] | None = None
) -> None:
    n = len(caps)
    write(root, "sys/devices/system/cpu/online", f"0-{n - 1}")
    blocks = []
    for i, cap in enumerate(caps):
        if cap:
            write(root, f"sys/devices/system/cpu/cpu{i}/cpu_capacity", str(cap))
        if khz:
            write(root, f"sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq", str(khz[i]))
        write(root, f"sys/devices/system/cpu/cpu{i}/topology/thread_siblings_list", str(i))
        if parts:
            blocks.append(f"processor\t: {i}\nCPU implementer\t: 0x41\nCPU part\t: {parts[i]}\n")
    write(root, "proc/cpuinfo", "\n".join(blocks))


def test_big_little_performance_cores(tmp_path):
    # a Snapdragon-like phone: 4 Cortex-A55, 3 Cortex-A78, 1 Cortex-X1
    fake_cpus(tmp_path, [446] * 4 + [871] * 3 + [1024], ["0xd05"] * 4 + ["0xd41"] * 3 + ["0xd44"])
    c = core_types(tmp_path)
    assert c["performance_cores"] == 4 and c["physical_cores"] == 8 and c["method"] == "cpu_capacity"
    assert [(k["type"], k["cores"]) for k in c["clusters"]] == [
        ("Cortex-X1", 1),
        ("Cortex-A78", 3),
        ("Cortex-A55", 4),
    ]
    assert c["performance_cpus"] == [4, 5, 6, 7]


def test_one_core_type_and_frequency_fallback(tmp_path):
    fake_cpus(tmp_path / "pi", [0] * 4, ["0xd0b"] * 4)  # Raspberry Pi 5: 4 Cortex-A76, no capacity file
    c = core_types(tmp_path / "pi")
    assert c["performance_cores"] == 4 and c["clusters"][0]["type"] == "Cortex-A76"
    fake_cpus(tmp_path / "rk", [0] * 6, ["0xd05"] * 4 + ["0xd0b"] * 2, [1800000] * 4 + [2400000] * 2)
    c = core_types(tmp_path / "rk")  # a board without cpu_capacity: grouped by max clock
    assert c["performance_cores"] == 2 and c["method"] == "cpuinfo_max_freq"
    assert c["clusters"][0]["max_mhz"] == 2400


def test_intel_hybrid_counts_p_cores_once(tmp_path):
    fake_cpus(tmp_path, [0] * 8)
    for i in range(4):  # 2 P-cores with hyper-threading (0,1 and 2,3), 4 E-cores
        write(
            tmp_path,
            f"sys/devices/system/cpu/cpu{i}/topology/thread_siblings_list",
            f"{i // 2 * 2}-{i // 2 * 2 + 1}",
        )
    write(tmp_path, "sys/devices/cpu_core/cpus", "0-3")
    write(tmp_path, "sys/devices/cpu_atom/cpus", "4-7")
    c = core_types(tmp_path)
    assert c["performance_cores"] == 2 and c["physical_cores"] == 6
    assert [k["type"] for k in c["clusters"]] == ["P-core", "E-core"]


def test_repack_is_off_on_amx_only():
    on, why = repack_default("CPU : AVX2 = 1 | REPACK = 1 |", {"avx2", "fma"})
    assert on and why.startswith("on")
    on, why = repack_default("", {"avx512f", "amx_int8", "amx_tile"})
    assert not on and "amx_int8" in why
    assert repack_default("CPU : AMX_INT8 = 1 | REPACK = 1 |", set())[0] is False
    assert repack_default("", {"asimd", "asimddp", "i8mm"})[0] is True  # ARM: the dotprod/i8mm repack paths


def test_row_variants():
    assert [r.key for r in rows_for("llamacpp", "q4_0", RowOptions())] == ["llamacpp:q4_0"]
    both = rows_for("llamacpp", "q4_0", RowOptions(repack="both", n_gpu_layers=-1))
    assert [(r.key, r.settings) for r in both] == [
        ("llamacpp:q4_0@repack", {"n_gpu_layers": -1, "repack": True}),
        ("llamacpp:q4_0@no-repack", {"n_gpu_layers": -1, "repack": False}),
    ]
    assert [r.key for r in rows_for("coreml", "int4", RowOptions(coreml_units=("cpu", "cpu+ane")))] == [
        "coreml:int4@cpu",
        "coreml:int4@cpu+ane",
    ]
    for bad in (["--repack", "sometimes"], ["--coreml-units", "npu"]):
        with pytest.raises(SystemExit) as e:
            main(["bench", "runs/x", *bad])
        assert e.value.code == 2


def test_board_governor_and_temperatures(tmp_path):
    from kititans.bench.board import board, governors, temperatures

    write(tmp_path, "proc/device-tree/model", "Raspberry Pi 5 Model B Rev 1.0\x00")
    write(tmp_path, "proc/device-tree/compatible", "raspberrypi,5-model-b\x00brcm,bcm2712\x00")
    write(tmp_path, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.3, GCID: 1\n")
    write(tmp_path, "sys/devices/system/cpu/cpufreq/policy0/scaling_governor", "ondemand")
    write(tmp_path, "sys/devices/system/cpu/cpufreq/policy0/affected_cpus", "0 1 2 3")
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "51250")
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "unreadable")
    b = board(tmp_path)
    assert b["model"] == "Raspberry Pi 5 Model B Rev 1.0" and b["compatible"][1] == "brcm,bcm2712"
    assert b["jetson_l4t"].startswith("# R36")
    assert governors(tmp_path) == {"ondemand": [0, 1, 2, 3]}
    assert temperatures(tmp_path) == {"cpu-thermal": 51.25}


def test_runner_modules_import_without_torch():
    """DESIGN.md: the device-side runner is built from torch-free modules; import each with torch (and the
    desktop-only packages) blocked."""
    from kititans.bench.packrun import RUNNER_MODULES

    code = f"""
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "sentencepiece", "psutil", "tqdm", "gguf", "onnx", "safetensors",
                                  "transformers", "jinja2", "matplotlib", "coremltools"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
for m in {list(RUNNER_MODULES)!r}:
    importlib.import_module(m)
import kititans.bench.worker as w
assert "torch" not in sys.modules
print("ok", len({list(RUNNER_MODULES)!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr


# ------------------------------------------------------------------------------------------ compare


def report(label: str, weights: str = "w" * 64, tokens: str | None = "e" * 64) -> dict:
    return {
        "schema_version": 1,
        "kititans_version": "0.1.0",
        "created": "2026-01-01T00:00:00",
        "run": {"name": "tiny", "weights_sha256": weights},
        "device": {"label": label, "cpu": "x"},
        "settings": {
            "prompt_tokens": [128, 512],
            "gen_tokens": 128,
            "trials": 5,
            "threads": 4,
            "device": "cpu",
        },
        "bandwidth": {"cpu_gbs": 10.0, "cpu_method": "copy"},
        "eval": {"tokens_sha256": tokens} if tokens else {"source": {"kind": "validation split"}},
        "results": [
            {
                "runtime": "llamacpp",
                "quant": "q4_0",
                "key": "llamacpp:q4_0",
                "status": "ok",
                "speed": {"prefill": {"128": {"median": 900.0}}, "decode": {"median": 300.0}},
                "quality": {"ppl_drift_pct": 0.5, "kld_mean": 0.003},
            },
            {"runtime": "coreml", "quant": "int4", "key": "coreml:int4@cpu+ane", "status": "skipped"},
        ],
    }


# real `llama-bench -o json` output (this repo's llama.cpp, -p 32 -n 16 -r 2 on the debug model's q4_0 GGUF)
LLAMA_BENCH = json.loads((Path(__file__).parent / "data" / "llama-bench.json").read_text())
# the ExecuTorch Android benchmark app's benchmark_results.json (BenchmarkMetric.kt)
EXECUTORCH = [
    {"benchmarkModel": {"name": "tiny", "backend": "xnnpack", "quantization": "8da4w"}, "metric": "token_per_sec",
     "actualValue": 95.5, "targetValue": 0.0, "deviceInfo": {"device": "samsung", "arch": "SM-S921B", "os": "Android 14"}},
    {"benchmarkModel": {"name": "tiny", "backend": "xnnpack", "quantization": "8da4w"},
     "metric": "llm_model_load_time(ms)", "actualValue": 420.0, "targetValue": 0.0, "deviceInfo": {}},
]  # fmt: skip


def test_compare_refuses_or_marks_different_weights_and_text(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report("desk")))
    b.write_text(json.dumps(report("pi5", weights="v" * 64)))
    assert main(["bench", "compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "different things (weights wwwwwwwwwwww vs vvvvvvvvvvvv)" in err[0]
        and "--force" in err[0]
    )
    assert not (tmp_path / "c").exists()
    b.write_text(json.dumps(report("pi5", tokens="f" * 64)))
    assert main(["bench", "compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 2
    assert "eval text" in capsys.readouterr().err
    assert main(["bench", "compare", str(a), str(b), "--force", "--out", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())["rows"]
    assert [r["check"] for r in rows] == ["ok", "DIFFERS: eval text eeeeeeeeeeee vs ffffffffffff"]
    assert "DIFFERS" in (tmp_path / "c" / "compare.md").read_text()


def test_compare_reads_old_reports_and_imports_other_tools(tmp_path):
    old = report("old laptop", tokens=None)
    old["device"] = {"label": "old laptop"}  # a version-1 report from before the device extras
    del old["results"][0]["quality"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(report("desk")))
    (tmp_path / "lb.json").write_text(json.dumps(LLAMA_BENCH))
    (tmp_path / "lb.jsonl").write_text("\n".join(json.dumps(r) for r in LLAMA_BENCH))
    (tmp_path / "et.json").write_text(json.dumps(EXECUTORCH))
    files = [str(tmp_path / f) for f in ("new.json", "old.json", "lb.json", "lb.jsonl", "et.json")]
    assert main(["bench", "compare", *files, "--out", str(tmp_path / "c")]) == 0
    cmp = json.loads((tmp_path / "c" / "compare.json").read_text())
    by = {(r["device"], r["runtime"]): r for r in cmp["rows"]}
    assert by[("desk", "llamacpp")]["check"] == "ok" and by[("old laptop", "llamacpp")]["check"].startswith(
        "unverified"
    )
    lb = by[("AMD EPYC [llama-bench] #3", "llama-bench")]
    tg = next(t["avg_ts"] for t in LLAMA_BENCH if t["n_gen"])
    assert by[("AMD EPYC [llama-bench] #4", "llama-bench")]["decode_tps"] == tg  # the same file as JSON lines
    assert lb["decode_tps"] == tg and lb["check"] == "speed only (llama-bench)" and lb["prefill_tps"] is None
    assert lb["quant"] == "llama ?B Q4_0" and lb["size_bytes"] == 807936 and lb["ran_on"] == "cpu"
    et = by[("samsung SM-S921B Android 14", "executorch xnnpack")]
    assert et["decode_tps"] == 95.5 and et["quant"] == "8da4w"
    assert len(cmp["rows"]) == 5  # skipped rows are not compared
    assert "<svg" in (tmp_path / "c" / "compare.html").read_text()


def test_compare_refuses_newer_and_foreign_files(tmp_path, capsys):
    (tmp_path / "new.json").write_text(json.dumps({**report("x"), "schema_version": 7}))
    (tmp_path / "what.json").write_text(json.dumps({"hello": 1}))
    assert main(["bench", "compare", str(tmp_path / "new.json"), "--out", str(tmp_path / "c")]) == 2
    assert "newer kititans (report schema 7" in capsys.readouterr().err
    assert main(["bench", "compare", str(tmp_path / "what.json"), "--out", str(tmp_path / "c")]) == 2
    assert "not a kititans bench.json, llama-bench JSON" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["bench", "pack", "runs/none", "--artifacts", "gguf:q4_0"]])
def test_pack_cli_errors_are_one_line(cmd, tmp_path, capsys, debug_run):
    assert main(cmd) == 2
    assert main(["bench", "pack", str(debug_run), "--artifacts", "gguf:q9"]) == 2
    assert "gguf has no quantization 'q9'" in capsys.readouterr().err
    assert main(["bench", "pack", str(debug_run), "--artifacts", "tflite:int8"]) == 2
    assert main(["bench", "pack", str(debug_run)]) == 2
    assert "needs --artifacts" in capsys.readouterr().err
    (tmp_path / "p.benchpack").mkdir()
    assert (
        main(
            [
                "bench",
                "pack",
                str(debug_run),
                "--artifacts",
                "gguf:q4_0",
                "--out",
                str(tmp_path / "p.benchpack"),
            ]
        )
        == 2
    )
    assert "exists: pass --force" in capsys.readouterr().err


def test_omp_wait_policy_option_reaches_the_worker():
    from kititans.bench.worker import worker_env

    code = "import os, kititans; print(os.environ.get('OMP_WAIT_POLICY'))"
    for policy, seen in (("passive", "PASSIVE"), ("active", "ACTIVE"), ("unset", "None")):
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(policy)
        )
        assert r.stdout.strip() == seen, policy  # `unset`: kititans does not default it to PASSIVE
