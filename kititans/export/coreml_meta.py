"""What a CoreML package tells an app about itself, so nothing has to be hard-coded in Swift:

  author, shortDescription, versionString, license   Xcode's model page (MLModelDescription.metadata)
  userDefined (creatorDefinedKey in Swift)            kititans.* strings: bos/eos/end token ids, the stop
                                                      ids, vocab size, context length, family, stage, the
                                                      state layout (kind, inputs, states, prefill rule) as
                                                      JSON, and the Jinja chat template
  the tokenizer/ folder beside the package            tokenizer.json (swift-transformers), tokenizer_config.json
                                                      (chat template), tokenizer.model, generation_config.json

The package's spec (Data/com.apple.CoreML/model.mlmodel, a protobuf) is edited in place before the package is
moved to its final name, so the weights are untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kititans.errors import KititansError
from kititans.export.card import model_card
from kititans.export.hf_files import write_tokenizer_files
from kititans.files import atomic_path

PREFIX = "kititans."


def spec_file(package: Path) -> Path:
    """The root model spec of an .mlpackage (named in its Manifest.json)."""
    manifest = json.loads((package / "Manifest.json").read_text())
    item = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
    return package / "Data" / item["path"]


def user_defined(ckpt: Any, interface: dict[str, Any]) -> dict[str, str]:
    tok = ckpt.tokenizer
    layout = {
        k: interface[k]
        for k in ("kind", "inputs", "states", "prefill_exact", "prefill_len", "max_len", "mask", "position")
        if k in interface
    }
    values: dict[str, Any] = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "end_token_id": tok.end_id,
        "stop_token_ids": json.dumps(tok.stop_ids),
        "vocab_size": tok.vocab_size,
        "context_length": interface.get("context_length", ckpt.config.context_length),
        "family": ckpt.spec.name,
        "stage": ckpt.meta.get("stage") or "unknown",
        "state_layout": json.dumps(layout, separators=(",", ":")),
        "chat_template": tok.chat_template,
    }
    return {PREFIX + k: str(v) for k, v in values.items()}


def stamp_package(package: Path, ckpt: Any, interface: dict[str, Any], license: str | None) -> dict[str, Any]:
    """Write author / description / version / license / userDefined into the package's spec; returns them."""
    from coremltools.proto import Model_pb2

    card = model_card(ckpt, license)
    path = spec_file(package)
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    meta = spec.description.metadata
    meta.author = card.author
    meta.shortDescription = card.description
    meta.versionString = f"{card.name} (kititans {card.version})"
    if card.license:
        meta.license = card.license
    extra = user_defined(ckpt, interface)
    for k, v in extra.items():
        meta.userDefined[k] = v
    with atomic_path(path) as tmp:
        tmp.write_bytes(spec.SerializeToString())
    return {
        "author": meta.author,
        "short_description": meta.shortDescription,
        "version": meta.versionString,
        "license": meta.license or None,
        "user_defined": extra,
    }


def read_package_metadata(package: Path) -> dict[str, Any]:
    """The metadata `stamp_package` wrote, read back from the spec (what MLModel.modelDescription shows)."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file(Path(package)).read_bytes())
    m = spec.description.metadata
    return {
        "author": m.author,
        "short_description": m.shortDescription,
        "version": m.versionString,
        "license": m.license,
        "user_defined": dict(m.userDefined),
    }


def write_coreml_tokenizer(ckpt: Any, dest: Path) -> Path:
    """The tokenizer/ folder next to the packages, tokenizer.json included; one clear line if it fails."""
    try:
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            write_tokenizer_files(ckpt.path, tmp, int(ckpt.config.context_length))
    except KititansError as e:
        raise KititansError(f"CoreML export: the app's tokenizer files could not be written: {e}") from None
    return dest
