"""`kititans bench` end to end on the debug model: one shared run of the real command (exports, one worker
process per pair, reference log-probs, reports), then checks of what it wrote. About 60 s on 2 idle cores."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest

from kititans.cli import main

PAIRS = "torch:fp32,torch:bf16,llamacpp:f32,llamacpp:f16,llamacpp:q8_0,llamacpp:q4_0,onnx:int8,genai:int4,coreml:fp16"


@pytest.fixture(scope="module")
def bench(debug_run, tmp_path_factory):
    """(run dir, report dict, out dir, exit code) of one bench over PAIRS with short tests."""
    run = tmp_path_factory.mktemp("bench") / "debug"
    shutil.copytree(debug_run, run)  # bench writes exports into RUN/export
    out = run / "report"
    argv = ["bench", str(run), "--runtimes", PAIRS, "--trials", "1", "--prompt-tokens", "16,32"]
    argv += ["--gen-tokens", "8", "--ppl-ctx", "128", "--ppl-chunks", "6", "--out", str(out), "-q"]
    code = main(argv)
    return run, json.loads((out / "bench.json").read_text()), out, code


def rows(report):
    return {r["key"]: r for r in report["results"]}


def test_the_command_succeeds_and_reports_every_pair(bench):
    run, report, out, code = bench
    assert code == 0
    assert report["schema_version"] == 1
    assert [r["key"] for r in report["results"]] == PAIRS.split(",")
    ok = [k for k, r in rows(report).items() if r["status"] == "ok"]
    assert set(ok) >= {
        "torch:fp32",
        "torch:bf16",
        "llamacpp:f32",
        "llamacpp:f16",
        "llamacpp:q8_0",
        "llamacpp:q4_0",
    }
    assert not (out / ".work").exists() and not (out / "reference.npz").exists()
    for q in ("f32", "f16", "q8_0", "q4_0"):  # the missing exports were written where export puts them
        assert (run / "export" / f"model.{q}.gguf").is_file()
        assert (run / "export" / f"model.{q}.gguf.json").is_file()


def test_failures_are_recorded_with_a_reason(bench):
    r = rows(bench[1])
    if platform.system() != "Darwin":
        assert r["coreml:fp16"]["status"] == "failed" and "macOS" in r["coreml:fp16"]["reason"]
    # the debug model's vocab (512) equals its FFN width: onnxruntime-genai's builder refuses it
    genai = r["genai:int4"]
    assert genai["status"] == "failed" and genai["reason"] and "\n" not in genai["reason"]
    md = (bench[2] / "bench.md").read_text()
    assert "## Not measured" in md and genai["reason"].split(":")[0] in md


def test_speed_and_memory_fields(bench):
    _, report, _, _ = bench
    assert report["settings"]["prompt_tokens"] == [16, 32] and report["settings"]["trials"] == 1
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        sp = r["speed"]
        assert set(sp["prefill"]) == {"16", "32"} and set(sp["ttft_ms"]) == {"16", "32"}
        for s in [*sp["prefill"].values(), sp["decode"]]:
            assert s["n"] == 1 and s["min"] <= s["median"] <= s["max"] and s["median"] > 0
        # TTFT of a 32-token prompt = its prefill time (+ argmax), in milliseconds
        assert sp["ttft_ms"]["32"]["median"] >= 1000 * 32 / sp["prefill"]["32"]["median"] * 0.99
        mem = r["memory"]
        assert 0 < mem["baseline_rss_bytes"] < mem["peak_rss_bytes"] < 4 * 2**30
        assert mem["model_rss_bytes"] == mem["peak_rss_bytes"] - mem["baseline_rss_bytes"]
        assert r["size_bytes"] > 0 and r["load_s"] > 0
        roof = r["roofline"]
        assert roof["bound_tps"] > 0 and roof["fraction"] == pytest.approx(
            sp["decode"]["median"] / roof["bound_tps"]
        )
    ll = rows(report)["llamacpp:q4_0"]["runtime_settings"]
    from kititans.runtimes.llamacpp import repack_setting

    # repacking is on by default unless the CPU has AMX; the row says which and why
    assert ll["use_extra_bufts"] is repack_setting(None)[0] and ll["repack"] == repack_setting(None)[1]
    assert ll["threads"] == report["settings"]["threads"] and ll["placement"] == "cpu"


def test_sizes_and_bits_per_weight(bench):
    run, report, _, _ = bench
    r = rows(report)
    assert r["llamacpp:f16"]["size_bytes"] == (run / "export" / "model.f16.gguf").stat().st_size
    assert r["torch:fp32"]["bits_per_weight"] == pytest.approx(32.0)
    assert r["torch:bf16"]["bits_per_weight"] == pytest.approx(16.0)
    assert r["llamacpp:f32"]["bits_per_weight"] == pytest.approx(32.0, rel=1e-3)
    assert 15.9 < r["llamacpp:f16"]["bits_per_weight"] < 16.2  # norms stay f32
    assert 8.4 < r["llamacpp:q8_0"]["bits_per_weight"] < 8.7
    assert r["llamacpp:q4_0"]["bits_per_weight"] < 6.5
    # the ONNX int8 file keeps a float32 embedding for lookups: the file is large, the bytes per token are not
    onnx = r["onnx:int8"]
    assert onnx["size_bytes"] * 8 / onnx["params"] > 12 and onnx["bits_per_weight"] < 10
    assert r["llamacpp:f32"]["weight_bytes_per_token"] == r["torch:fp32"]["weight_bytes_per_token"]


def test_quality_drift_is_zero_for_float_and_grows_with_fewer_bits(bench):
    _, report, _, _ = bench
    ev = report["eval"]
    assert ev["n_ctx"] == 128 and ev["chunks"] == 6 and ev["scored_tokens"] == 6 * 63
    assert ev["source"]["kind"] == "validation split" and ev["reference"]["status"] == "ok"
    r = {k: v["quality"] for k, v in rows(report).items() if v.get("quality")}
    for k in ("torch:fp32", "llamacpp:f32", "llamacpp:f16"):
        assert abs(r[k]["ppl_drift_pct"]) < 0.05 and r[k]["kld_mean"] < 1e-4 and r[k]["same_top"] > 0.99
    assert r["torch:fp32"]["ppl"] == pytest.approx(r["torch:fp32"]["ppl_base"], rel=1e-3)
    assert r["llamacpp:q8_0"]["kld_mean"] < r["llamacpp:q4_0"]["kld_mean"]
    assert r["llamacpp:f16"]["kld_mean"] < r["llamacpp:q8_0"]["kld_mean"]
    assert r["llamacpp:q4_0"]["kld_mean"] > 1e-4
    for q in r.values():
        assert q["tokens"] == ev["scored_tokens"] and 1 < q["ppl"] < 512


def test_device_record_and_units(bench):
    report = bench[1]
    dev = report["device"]
    for key in (
        "cpu",
        "physical_cores",
        "logical_cores",
        "threads_used",
        "ram_bytes",
        "os",
        "python",
        "label",
    ):
        assert dev[key]
    assert dev["versions"]["torch"] and "llama-cpp-python" in dev["versions"]
    assert report["bandwidth"]["cpu_gbs"] > 0.1
    assert "speed.decode" in report["units"] and report["run"]["params"] > 1e6


def test_markdown_and_html_reports(bench):
    out = bench[2]
    md = (out / "bench.md").read_text()
    assert "| runtime | quant | ran on | size MiB | bits/w | pp16 t/s | pp32 t/s | tg8 t/s |" in md
    assert "| llamacpp | q4_0 | cpu |" in md and "| torch | bf16 | cpu |" in md
    page = (out / "bench.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("<svg") >= 4
    assert "src=" not in page and "<link" not in page  # self-contained: nothing to fetch
    assert "llamacpp" in page and "Not measured" in page


def test_compare_merges_reports_from_devices(bench, tmp_path):
    _, report, out, _ = bench
    other = dict(report, device={**report["device"], "label": "Raspberry Pi 5 Model B Rev 1.0"})
    (tmp_path / "pi.json").write_text(json.dumps(other))
    cmp_out = tmp_path / "cmp"
    assert (
        main(["bench", "compare", str(out / "bench.json"), str(tmp_path / "pi.json"), "--out", str(cmp_out)])
        == 0
    )
    cmp = json.loads((cmp_out / "compare.json").read_text())
    n_ok = sum(r["status"] == "ok" for r in report["results"])
    assert len(cmp["rows"]) == 2 * n_ok and cmp["prompt_tokens"] == 16
    assert {r["device"] for r in cmp["rows"]} == {report["device"]["label"], "Raspberry Pi 5 Model B Rev 1.0"}
    assert "Raspberry Pi 5" in (cmp_out / "compare.md").read_text()
    assert "<svg" in (cmp_out / "compare.html").read_text()
    assert main(["bench", "--compare", str(tmp_path / "pi.json"), "--out", str(tmp_path / "c2")]) == 0


def test_reference_file_and_its_own_quality(debug_run, tmp_path):
    """The reference stores float16 rows plus exact next-token log-probs; measuring the reference runtime
    against it shows only the float16 rounding, and its drift is exactly zero."""
    from kititans.bench.quality import chunk_logprobs, make_chunks, measure, write_reference
    from kititans.runtimes import load_runtime

    rt = load_runtime(debug_run)
    ids = rt.codec.encode("The little robot found a red ball in the garden. " * 40)
    chunks = make_chunks(ids, 32, rt.codec.bos_id, max_chunks=3)
    own = write_reference(tmp_path / "a.npz", chunks, rt)
    a = np.load(tmp_path / "a.npz")
    lp = np.concatenate(list(chunk_logprobs(rt, chunks)))
    assert np.array_equal(a["logprobs"], np.maximum(lp, -16).astype(np.float16))
    again = measure(rt, tmp_path / "a.npz").to_dict()
    for k, v in own.to_dict().items():
        assert again[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
    assert own.same_top == 1.0 and abs(own.kld_mean) < 1e-4 and own.tokens == 3 * 15  # float16 storage
    y = np.concatenate([c[17:] for c in chunks])
    assert np.allclose(a["target_logprobs"], lp[np.arange(len(y)), y], atol=1e-5)
    assert own.ppl == pytest.approx(own.ppl_base, rel=1e-6) and abs(own.ppl_drift_pct) < 1e-4


def test_drift_uses_the_unclipped_reference(tmp_path):
    """A next token below the -16 log-prob floor: the clipped rows would understate the reference PPL."""
    from kititans.bench.quality import compare, log_softmax, with_exact_base

    rng = np.random.default_rng(0)
    base = log_softmax(rng.normal(size=(40, 30)) * 2).astype(np.float32)
    base[0] = log_softmax(np.r_[40.0, np.zeros(29)])  # token 1 has ln p of about -40
    y = np.where(np.arange(40) == 0, 1, rng.integers(0, 30, 40))
    stored = np.maximum(base, -16.0).astype(np.float16)
    np.savez(
        tmp_path / "ref.npz", tokens=np.zeros((1, 4)), logprobs=stored, target_logprobs=base[np.arange(40), y]
    )
    clipped = compare(stored.astype(np.float32), base, y)  # the same model measured against itself
    assert clipped.ppl_drift_pct > 50
    exact = with_exact_base(clipped, tmp_path / "ref.npz")
    assert abs(exact.ppl_drift_pct) < 0.01 and exact.kld_mean == clipped.kld_mean


def test_a_run_named_compare_is_still_a_run():
    from argparse import Namespace

    from kititans.commands.bench import compare_targets

    assert compare_targets(Namespace(targets=["compare"], compare=False)) is None
    assert compare_targets(Namespace(targets=["compare", "a.json", "b.json"], compare=False)) == [
        "a.json",
        "b.json",
    ]
    assert compare_targets(Namespace(targets=["x.json"], compare=True)) == ["x.json"]
    assert compare_targets(Namespace(targets=["runs/tiny"], compare=False)) is None


def test_cli_errors_are_one_line(debug_run, capsys):
    assert main(["bench", str(debug_run), "--runtimes", "llamacpp:q3"]) == 2
    assert "llamacpp has no quantization 'q3'" in capsys.readouterr().err
    assert main(["bench", str(debug_run), "--runtimes", "tensorrt"]) == 2
    assert main(["bench", str(Path(debug_run) / "nope")]) == 2
