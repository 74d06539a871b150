"""GGUF as the llama.cpp ecosystem reads it: the chat template renders to the same prompt ids in llama.cpp
without Jinja (its Phi-3 pattern, llama_chat_apply_template), in llama-cpp-python's Jinja formatter and, when
a llama-server binary is around, in llama.cpp's own Jinja engine (--jinja) and without it (--no-jinja); the
role tokens are control tokens; general.* metadata; the Ollama Modelfile next to each file."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="needs llama-cpp-python (pip install 'kititans[llamacpp]')"
)
gguf = pytest.importorskip("gguf", reason="needs gguf-py (pip install 'kititans[gguf]')")

from kititans.data.chat import render_prompt  # noqa: E402
from kititans.data.tokenizer import Tokenizer  # noqa: E402
from kititans.export import ExportOptions, export_model  # noqa: E402
from kititans.runtimes.llamacpp import LlamaCppRuntime, chat_prompt_ids, open_llama  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What does a cow say?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi there! 日本語も大丈夫?\nA second line."},
        {"role": "assistant", "content": "Hello! Yes."},
        {"role": "user", "content": "  Tell me about   the red ball.  "},
    ],
]


@pytest.fixture(scope="module")
def exported(debug_run):
    opts = ExportOptions(progress=False, extra={"license": "apache-2.0"})
    return {q: export_model(debug_run, "gguf", q, options=opts) for q in ("f32", "q4_k_m")}


def llama_cpp_no_jinja(rt: LlamaCppRuntime, messages: list[dict[str, str]]) -> str:
    """llama.cpp's built-in template rendering (llama_chat_apply_template: pattern-matched, no Jinja)."""
    arr = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        keep += [m["role"].encode(), m["content"].encode()]
        arr[i].role, arr[i].content = keep[-2], keep[-1]
    buf = ctypes.create_string_buffer(1 << 16)
    tmpl = rt.metadata("tokenizer.chat_template").encode()
    n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(messages), True, buf, len(buf))
    assert n > 0
    return buf.raw[:n].decode("utf-8")


def test_llamacpp_renders_the_same_prompt_ids(debug_run, exported):
    tok = Tokenizer.load(debug_run)
    path = exported["f32"].path
    rt = LlamaCppRuntime(path)
    llm = open_llama(path)
    for messages in CHATS:
        ours = render_prompt(tok, messages)
        text = llama_cpp_no_jinja(rt, messages)  # without --jinja: recognised as Phi-3
        assert text.startswith("<|") and text.endswith("<|assistant|>\n")
        assert rt.tokenize(text, add_bos=True, special=True) == ours  # llama.cpp adds BOS itself here
        assert (
            chat_prompt_ids(llm, messages) == ours
        )  # llama-cpp-python's Jinja rendering (create_chat_completion)
    llm.close()


def test_role_tokens_are_control_tokens(debug_run, exported):
    tok = Tokenizer.load(debug_run)
    rt = LlamaCppRuntime(exported["f32"].path)
    for piece in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        i = tok.sp.PieceToId(piece)
        assert llama_cpp.llama_vocab_get_attr(rt._vocab, i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, piece
        text = f"say {piece} now"
        assert rt.tokenize(text, special=False) == tok.encode(text) and i not in tok.encode(text)
        assert rt.tokenize(text, special=True) == tok.encode_special(text)


def llama_server() -> str | None:
    return os.environ.get("KITITANS_LLAMA_SERVER") or shutil.which("llama-server")


@pytest.mark.skipif(
    llama_server() is None,
    reason="needs a llama-server binary (set KITITANS_LLAMA_SERVER; build: docs/serve.md) for llama.cpp's Jinja",
)
def test_llama_server_with_and_without_jinja(debug_run, exported):
    tok = Tokenizer.load(debug_run)
    for flag in ("--jinja", "--no-jinja"):
        port = 18000 + os.getpid() % 1000
        proc = subprocess.Popen(
            [
                llama_server(),
                "-m",
                str(exported["f32"].path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                flag,
                "-t",
                "1",
                "--no-webui",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    urllib.request.urlopen(url + "/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.2)
            for messages in CHATS:
                prompt = post(url + "/apply-template", {"messages": messages})["prompt"]
                ids = post(url + "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})
                assert ids["tokens"] == render_prompt(tok, messages), flag
        finally:
            proc.terminate()
            proc.wait(10)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_general_metadata_and_modelfile(debug_run, exported):
    for quant, result in exported.items():
        fields = gguf.GGUFReader(str(result.path)).fields
        value = {k: f.contents() for k, f in fields.items() if k.startswith(("general.", "kititans."))}.get
        assert value("general.name") == debug_run.name and value("general.basename") == "kititans-lite"
        assert value("general.size_label") == "1.3M" and value("general.license") == "apache-2.0"
        assert "pretrained" in value("general.description") and value("kititans.stage") == "pretrain"
        modelfile = result.path.with_suffix(".Modelfile")
        assert result.manifest["modelfile"] == modelfile.name, quant
        text = modelfile.read_text()
        assert f"FROM ./{result.path.name}\n" in text and (modelfile.parent / result.path.name).is_file()
        assert 'PARAMETER stop "<|end|>"' in text and "PARAMETER temperature 0.8" in text
        assert "PARAMETER num_ctx 256" in text and 'LICENSE """apache-2.0"""' in text
        template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
        assert "<|{{ .Role }}|>\n{{ .Content }}" in template and "<|assistant|>\n" in template
        assert template.count("{{") == template.count("}}") and "<s>" not in template  # Ollama adds BOS
