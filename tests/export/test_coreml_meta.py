"""What a CoreML package tells an app: author, description, version, license and kititans.* userDefined
entries (token ids, context, family, state layout, chat template) in its spec; tokenizer.json always beside
it (or the export fails with one line); every file readable (0644). One fp16 conversion (~15 s)."""

from __future__ import annotations

import json

import pytest

ct = pytest.importorskip("coremltools", reason="needs coremltools (pip install 'kititans[coreml]')")

from kititans.data.tokenizer import Tokenizer  # noqa: E402
from kititans.errors import KititansError  # noqa: E402
from kititans.export import ExportOptions, export_model  # noqa: E402
from kititans.export.coreml_meta import read_package_metadata  # noqa: E402
from kititans.files import process_umask  # noqa: E402


@pytest.fixture(scope="module")
def package(debug_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml-meta") / "model.fp16.mlpackage"
    opts = ExportOptions(progress=False, extra={"license": "apache-2.0"})
    return export_model(debug_run, "coreml", "fp16", out, opts)


def test_metadata_an_app_can_read(package, debug_run):
    meta = read_package_metadata(package.path)
    tok = Tokenizer.load(debug_run)
    assert meta["author"] == "KiTitans" and meta["license"] == "apache-2.0"
    assert "lite" in meta["short_description"] and debug_run.name in meta["version"]
    ud = meta["user_defined"]
    assert int(ud["kititans.bos_token_id"]) == tok.bos_id and int(ud["kititans.eos_token_id"]) == tok.eos_id
    assert (
        int(ud["kititans.end_token_id"]) == tok.end_id
        and json.loads(ud["kititans.stop_token_ids"]) == tok.stop_ids
    )
    assert ud["kititans.context_length"] == "256" and ud["kititans.family"] == "lite"
    assert ud["kititans.chat_template"] == tok.chat_template and ud["kititans.stage"] == "pretrain"
    layout = json.loads(ud["kititans.state_layout"])
    assert layout["kind"] == "kv_cache" and layout["states"] == ["key_cache", "value_cache"]
    assert (
        layout["inputs"] == {"input_ids": "int32", "causal_mask": "float16"} and layout["prefill_len"] == 128
    )
    assert package.manifest["metadata"]["user_defined"] == ud
    # the package still loads as a spec (and validated before it was stamped)
    spec = ct.models.MLModel(str(package.path), skip_model_load=True).get_spec()
    assert spec.description.metadata.author == "KiTitans"


def test_tokenizer_json_beside_and_files_readable(package, debug_run):
    folder = package.path.parent / "tokenizer"
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = Tokenizer.load(debug_run)
    assert hf.encode("Lily saw a cat.", add_special_tokens=False).ids == tok.encode("Lily saw a cat.")
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 256
    files = [p for p in [*package.path.rglob("*"), *folder.iterdir(), package.manifest_path] if p.is_file()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~process_umask()}


def test_export_fails_in_one_line_without_tokenizer_json(debug_run, tmp_path, monkeypatch):
    import kititans.data.tokenizer_json as tj

    def broken(tok):
        raise KititansError("writing tokenizer.json needs the 'tokenizers' package: pip install tokenizers")

    monkeypatch.setattr(tj, "build", broken)
    out = tmp_path / "model.fp16.mlpackage"
    with pytest.raises(KititansError, match="tokenizer files could not be written") as e:
        export_model(debug_run, "coreml", "fp16", out, ExportOptions(progress=False))
    assert "\n" not in str(e.value) and not out.exists()  # nothing half-written under the final name
