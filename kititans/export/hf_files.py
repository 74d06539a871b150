"""The files the ecosystem's own loaders read, written beside our artifacts so they load as they are:

  tokenizer files    tokenizer.model + tokenizer_config.json (chat template, model_max_length = the context) +
                     tokenizer.json (built with `tokenizers`) + generation_config.json: every export has them
  config.json        transformers' LlamaConfig (what optimum's ORTModelForCausalLM reads: model_type, heads,
                     KV heads, use_cache), plus a "kititans" section (family, stage, source run)
  genai_config.json  onnxruntime-genai's model description of our ONNX step graph (file, I/O names, the
                     past/present KV layout, search defaults from generation_config.json)

The ONNX graph already has what both expect (research §1.2, wave2 §4): inputs input_ids, attention_mask,
position_ids and past_key_values.N.key/value shaped (batch, kv_heads, past, head_dim); outputs logits and
present.N.key/value; a first step with a zero-length past.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kititans.errors import KititansError
from kititans.files import write_json

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "generation_config.json")
GENAI_CONFIG = "genai_config.json"


def write_tokenizer_files(
    run_dir: str | Path, dest: str | Path, context_length: int | None = None
) -> list[str]:
    """The run's tokenizer files into `dest` (tokenizer.json is rebuilt, so exports of runs made before it
    have one too); fails with one line if any cannot be written."""
    from kititans.data.tokenizer import Tokenizer

    run_dir, dest = Path(run_dir), Path(dest)
    tok = Tokenizer.load(run_dir)
    try:
        tok.save(dest, context_length=context_length)
        if (run_dir / "generation_config.json").is_file():
            shutil.copyfile(run_dir / "generation_config.json", dest / "generation_config.json")
    except OSError as e:
        raise KititansError(f"cannot write the tokenizer files into {dest}: {e}") from None
    written = [f for f in TOKENIZER_FILES if (dest / f).is_file()]
    if "tokenizer.json" not in written:
        raise KititansError(f"tokenizer.json was not written into {dest}")
    return written


def kititans_section(ckpt: Any) -> dict[str, Any]:
    import kititans

    return {
        "family": ckpt.spec.name,
        "stage": ckpt.meta.get("stage"),
        "step": ckpt.meta.get("step"),
        "source_run": str(Path(ckpt.path).resolve()),
        "version": kititans.__version__,
    }


def hf_config(ckpt: Any, dtype: str) -> dict[str, Any]:
    """config.json of an export: the family's transformers config (Lite: LlamaConfig) with the token ids,
    use_cache and the weights' dtype; a family without one gets only its kititans section."""
    tok = ckpt.tokenizer
    cfg: dict[str, Any] = dict(ckpt.spec.hf_config(ckpt.config)) if ckpt.spec.hf_config else {}
    if cfg:
        cfg.update(
            bos_token_id=tok.bos_id,
            eos_token_id=tok.stop_ids if len(tok.stop_ids) > 1 else tok.eos_id,
            use_cache=True,
            torch_dtype=dtype,
        )
        if tok.pad_id >= 0:
            cfg["pad_token_id"] = tok.pad_id
    cfg["kititans"] = kititans_section(ckpt)
    return cfg


def genai_config(ckpt: Any, graph: dict[str, Any], file: str) -> dict[str, Any] | None:
    """onnxruntime-genai's genai_config.json for a KV-cache step graph (None for other graphs: genai runs
    decoder-only transformers with a KV cache, not a recurrent memory)."""
    hf = ckpt.spec.hf_config(ckpt.config) if ckpt.spec.hf_config else None
    if graph.get("kind", "kv_cache") != "kv_cache" or not hf:
        return None
    tok = ckpt.tokenizer
    gen = ckpt.generation_config
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in graph.get("inputs", []):
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.stop_ids,
            "pad_token_id": tok.pad_id if tok.pad_id >= 0 else tok.eos_id,
            "context_length": int(graph["context_length"]),
            "vocab_size": int(hf["vocab_size"]),
            "type": hf["model_type"],
            "decoder": {
                "filename": file,
                "head_size": int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
                "hidden_size": int(hf["hidden_size"]),
                "num_attention_heads": int(hf["num_attention_heads"]),
                "num_hidden_layers": int(hf["num_hidden_layers"]),
                "num_key_value_heads": int(hf["num_key_value_heads"]),
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {
                    **inputs,
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(graph["context_length"]),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # our graph concatenates past and new K/V into present (it does not write into a shared buffer)
            "past_present_share_buffer": False,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 1)),
            "top_p": float(gen.get("top_p", 1.0)),
        },
    }


def write_onnx_ecosystem_files(ckpt: Any, folder: Path, graph: dict[str, Any], file: str) -> dict[str, Any]:
    """config.json, genai_config.json (KV-cache graphs) and the tokenizer files into an ONNX export folder;
    returns what was written and which loaders it serves, for the manifest."""
    dtype = graph.get("dtype", "float32")
    write_json(folder / "config.json", hf_config(ckpt, dtype))
    tokenizer = write_tokenizer_files(ckpt.path, folder, int(ckpt.config.context_length))
    loaders: dict[str, Any] = {}
    genai = genai_config(ckpt, graph, file)
    if genai is not None:
        write_json(folder / GENAI_CONFIG, genai)
        loaders["onnxruntime_genai"] = f"og.Model('{folder.name}')"
    else:
        loaders["onnxruntime_genai"] = None
        loaders["onnxruntime_genai_reason"] = (
            "onnxruntime-genai runs decoder-only transformers with a KV cache; this graph's state is "
            f"{graph.get('kind')}"
        )
    hf = ckpt.spec.hf_config(ckpt.config) if ckpt.spec.hf_config else {}
    if hf.get("model_type") == "llama" and graph.get("kind", "kv_cache") == "kv_cache":
        loaders["optimum"] = "ORTModelForCausalLM.from_pretrained(folder)"
    else:
        loaders["optimum"] = None
        loaders["optimum_reason"] = (
            "optimum's ORTModelForCausalLM drives transformers decoders with a KV cache; this graph is "
            f"a {hf.get('model_type', ckpt.spec.name)} model with a {graph.get('kind')} state"
        )
    return {"files": ["config.json", *([GENAI_CONFIG] if genai else []), *tokenizer], "loaders": loaders}


def ecosystem_hints(out: Path, ecosystem: dict[str, Any]) -> list[str]:
    """Manifest `next` lines: how the ecosystem's own loaders open this folder."""
    hints = []
    if ecosystem["loaders"].get("optimum"):
        hints.append(
            f"python -c \"from optimum.onnxruntime import ORTModelForCausalLM as M; M.from_pretrained('{out}')\""
        )
    if ecosystem["loaders"].get("onnxruntime_genai"):
        hints.append(f"python -c \"import onnxruntime_genai as og; og.Model('{out}')\"")
    return hints
