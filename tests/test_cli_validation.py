"""Bad input to generate / chat / serve ends in one clear line and exit 2 (never a traceback), before any
model loads; chatting with a pretrain-stage model prints a one-line warning."""

from __future__ import annotations

import io
import json

import pytest

from kititans.cli import main
from kititans.commands.common import model_stage

BAD = [
    (["--device", "ane"], "--device 'ane': the torch runtime runs on"),
    (["--device", "cuda:x"], "--device 'cuda:x'"),
    (["--runtime", "onnx", "--device", "mps"], "the onnx runtime runs on"),
    (["--threads", "-1"], "--threads must be 0 (all cores)"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--max-tokens", "-5"], "--max-tokens must be an integer >= 1"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--min-p", "1"], "--min-p must be in [0, 1)"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--seed", "-3"], "--seed must be an integer >= 0"),
    (["--runtime", "onnx", "--compile"], "--compile is for the torch runtime"),
]


# serve takes the sampling settings per request (checked there: tests/serve/), the runtime flags here
CASES = [(verb, flags, message) for verb in ("generate", "chat") for flags, message in BAD] + [
    ("serve", flags, message) for flags, message in BAD if flags[0] in ("--device", "--runtime", "--threads")
]


@pytest.mark.parametrize(("verb", "flags", "message"), CASES)
def test_bad_flags_are_one_line_errors(debug_run, capsys, monkeypatch, verb, flags, message):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    extra = ["--prompt", "Hi"] if verb == "generate" else []
    assert main([verb, str(debug_run), *extra, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_serve_flags(debug_run, capsys):
    assert main(["serve", str(debug_run), "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535" in capsys.readouterr().err
    assert main(["serve", str(debug_run), "--max-queue", "0"]) == 2
    assert "--max-queue must be at least 1" in capsys.readouterr().err


def test_chat_warns_on_a_pretrain_model(debug_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi!\n"))
    assert main(["chat", str(debug_run), "--max-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "pretrain-stage model" in warnings[0] and "kititans sft" in warnings[0]
    assert main(["generate", str(debug_run), "--prompt", "Tom", "--max-tokens", "3"]) == 0
    assert "warning:" not in capsys.readouterr().err  # plain completion of a base model is what it is for


def test_model_stage_of_runs_and_exports(tmp_path):
    run = tmp_path / "run"
    (run / "export" / "onnx" / "int4").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kititans": {"family": "lite", "stage": "sft"}}))
    assert model_stage(run) == "sft"
    assert model_stage(run / "export" / "onnx" / "int4") == "sft"
    assert model_stage(run / "export" / "model.q4_k_m.gguf") == "sft"

    class Gguf:  # a bare .gguf says it in its kititans.stage key
        def metadata(self, key):
            return {"kititans.stage": "pretrain"}.get(key)

    assert model_stage(tmp_path / "elsewhere" / "x.gguf", Gguf()) == "pretrain"
    assert model_stage(tmp_path / "elsewhere" / "x.gguf") is None
