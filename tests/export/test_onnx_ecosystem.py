"""An ONNX export folder loads as it is in the ecosystem's own loaders: onnxruntime-genai (genai_config.json,
tokenizer.json, the chat template) and optimum's ORTModelForCausalLM (config.json, position_ids, the
past_key_values.N.key convention), each greedy-decoding exactly what KiTitans' own runtime decodes; and
`kititans export --format onnx --runtime genai` (onnxruntime-genai's builder) as a first-class export."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'kititans[onnx]')")

from kititans.checkpoint import load_checkpoint, save_checkpoint
from kititans.cli import main
from kititans.data.chat import render_prompt
from kititans.export import ExportOptions, export_model
from kititans.generate import Generation, SamplingConfig
from kititans.models.lite import SPEC, LiteConfig, LiteModel
from kititans.runtimes import load_runtime

PROMPT = "Once upon a time, Tom"
MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What does a cow say?"}]


@pytest.fixture(scope="module")
def folder(debug_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-eco") / "fp32"
    return export_model(debug_run, "onnx", "fp32", out, ExportOptions(progress=False)).path


def ours(folder, ids, n=20):
    rt = load_runtime(folder, "onnx")
    return list(Generation(rt, ids, SamplingConfig(temperature=0, max_tokens=n), stop_ids=()))


def test_the_folder_has_the_ecosystem_files(folder):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["use_cache"] and cfg["kititans"]["stage"] == "pretrain"
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["filename"] == "model.onnx" and genai["context_length"] == 256
    assert genai["decoder"]["inputs"]["position_ids"] == "position_ids"
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 256 and "<|assistant|>" in tok_cfg["chat_template"]
    assert (folder / "tokenizer.json").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (
        manifest["ecosystem"]["loaders"]["optimum"] and manifest["ecosystem"]["loaders"]["onnxruntime_genai"]
    )


def test_onnxruntime_genai_loads_the_folder_as_it_is(folder):
    og = pytest.importorskip(
        "onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'kititans[genai]')"
    )
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    codec = load_runtime(folder, "onnx").codec
    ids = [codec.bos_id, *codec.encode(PROMPT)]
    assert (
        list(tok.encode(PROMPT)) == ids[1:]
    )  # its tokenizer (tokenizer.json) gives our ids; no BOS on plain text
    chat = tok.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
    assert list(tok.encode(chat)) == render_prompt(codec, MESSAGES)  # and our chat template
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    got = []
    while not gen.is_done() and len(got) < 20:
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == ours(folder, ids)
    genai_rt = load_runtime(folder, "genai")  # `kititans generate FOLDER --runtime genai`
    assert list(Generation(genai_rt, ids, SamplingConfig(temperature=0, max_tokens=20), stop_ids=())) == got


def test_optimum_loads_the_folder_as_it_is(folder):
    ort = pytest.importorskip(
        "optimum.onnxruntime",
        reason="optimum-onnx pins transformers<4.58: install it in a separate venv to run this (docs/serve.md)",
    )
    model = ort.ORTModelForCausalLM.from_pretrained(str(folder))
    assert model.can_use_cache and "position_ids" in model.input_names
    codec = load_runtime(folder, "onnx").codec
    ids = [codec.bos_id, *codec.encode(PROMPT)]
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False, eos_token_id=None
    )
    assert out[0, len(ids) :].tolist() == ours(folder, ids)


@pytest.fixture(scope="module")
def wide_run(debug_run, tmp_path_factory):
    """A Lite model whose FFN width differs from its vocab (the builder takes any Linear with vocab_size
    outputs for the LM head), random weights, the debug tokenizer."""
    tok = load_checkpoint(debug_run).tokenizer
    cfg = LiteConfig(vocab_size=tok.vocab_size, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wide-eco") / "run"
    save_checkpoint(out, LiteModel(cfg).eval(), SPEC, cfg, tok)
    return out


def test_export_runtime_genai_is_first_class(wide_run, capsys):
    og = pytest.importorskip(
        "onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'kititans[genai]')"
    )
    pytest.importorskip("transformers", reason="onnxruntime-genai's builder reads the run with transformers")
    assert main(["export", str(wide_run), "--format", "onnx", "--runtime", "genai", "--q4", "-q"]) == 0
    out = wide_run / "export" / "onnx-genai" / "int4"
    assert str(out) in capsys.readouterr().out
    assert (out / "genai_config.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    og.Model(str(out))  # loads as it is
    rt = load_runtime(out, "genai")
    assert rt.codec.chat_template and rt.context_length == 512  # LiteConfig default
    assert main(["export", str(wide_run), "--format", "gguf", "--runtime", "genai"]) == 2
    assert "--runtime genai applies to --format onnx only" in capsys.readouterr().err


@pytest.mark.parametrize("runtime", ["onnx", "genai"])
def test_kititans_serve_serves_the_folder(folder, runtime, capsys):
    """`kititans serve FOLDER [--runtime genai]` answers what `kititans generate` answers with the same seed."""
    openai = pytest.importorskip("openai", reason="the serve tests talk to the server with the openai client")
    if runtime == "genai":
        pytest.importorskip(
            "onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'kititans[genai]')"
        )
    from kititans.serve import ServeConfig, Server, model_info

    args = [
        "--runtime",
        runtime,
        "--chat",
        "--prompt",
        "What does a cow say?",
        "--seed",
        "4",
        "--max-tokens",
        "12",
    ]
    assert main(["generate", str(folder), *args]) == 0
    expected = capsys.readouterr().out[:-1]
    rt = load_runtime(folder, runtime)
    with Server(rt, model_info(folder, rt), ServeConfig(port=0)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What does a cow say?"}]
        out = client.chat.completions.create(
            model=server.info.id, messages=messages, seed=4, max_tokens=12, temperature=0.8, top_p=0.95
        )
    assert out.choices[0].message.content == expected and server.info.runtime == runtime
