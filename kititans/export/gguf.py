"""GGUF export for stock llama.cpp (`general.architecture = llama`), following research/gguf_llamacpp.md:

- tensors from the family's map (`spec.support("gguf")`): HF name -> GGUF name, Q/K rows permuted from
  rotate-half to llama.cpp's interleaved RoPE (K with the KV head count); a tied lm_head is not written
  (llama.cpp reuses token_embd); 1-D tensors stay float32;
- the llama hyperparameters from the family's transformers LlamaConfig;
- the SentencePiece vocabulary with scores and types (chat tokens USER_DEFINED so llama.cpp keeps them
  whole), padded to the embedding rows; special ids, add_bos, add_space_prefix=false, the chat template;
- f32/f16/bf16/q8_0/q4_0 written directly with gguf-py; the K-quants (and imatrix-weighted q4_0) by
  llama.cpp's quantizer in a subprocess from a float32 GGUF, so every type starts from the fp32 weights.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kititans.checkpoint import Checkpoint, state_dict_for_save
from kititans.errors import KititansError, UnsupportedExport, require
from kititans.export import ExportOptions, ExportResult, QuantType, base_manifest, write_manifest
from kititans.export.card import ModelCard, model_card
from kititans.export.ollama import write_modelfile
from kititans.files import atomic_path
from kititans.quantize.gguf import F32, TYPE_NAMES, TYPES, GgufType, dequantize, llama_quantize, quantize
from kititans.quantize.qat import gguf_handoff

FORMAT = "gguf"
QUANTS = {n: QuantType(n, t.bits_per_weight, t.description) for n, t in TYPES.items()}
SHORTHANDS = {"q8": "q8_0", "q4": "q4_k_m"}
DEFAULT_QUANT = "f16"
MAX_PIECE_BYTES = 32  # llama-cpp-python's detokenize drops longer pieces (research §4.4)
PAD_SCORE, CONTROL, UNUSED = -1000.0, 3, 5


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (n_heads*hd, in): per head, half-split pairs (i, i+hd/2) -> adjacent (2i, 2i+1)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(name).replace(r"\{\}", r"(\d+)") + "$")


def gguf_tensors(ckpt: Checkpoint) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array as written) for every saved weight, via the family's tensor map."""
    tensor_map = ckpt.spec.support(FORMAT)
    rules = [(_pattern(hf), gg, heads) for hf, (gg, heads) in tensor_map.items()]
    out = []
    for name, t in state_dict_for_save(ckpt.model).items():
        for pat, gg, heads in rules:
            m = pat.match(name)
            if m:
                w = t.float().numpy()
                if heads is not None:
                    w = permute_rope(w, int(getattr(ckpt.config, heads)))
                out.append((gg.replace("{}", m.group(1)) if m.groups() else gg, np.ascontiguousarray(w)))
                break
        else:
            raise KititansError(f"{ckpt.spec.name}: tensor {name} has no slot in the GGUF tensor map")
    return out


def gguf_name_of(ckpt: Checkpoint) -> Any:
    """Canonical parameter name -> GGUF name (None when it is not written); for the importance matrix."""
    tensor_map = ckpt.spec.support(FORMAT)
    rules = [(_pattern(hf), gg) for hf, (gg, _) in tensor_map.items()]

    def name(param: str) -> str | None:
        for pat, gg in rules:
            m = pat.match(param)
            if m:
                return gg.replace("{}", m.group(1)) if m.groups() else gg
        return None

    return name


LLAMA_KEYS = (
    "max_position_embeddings",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
)


def hyperparameters(ckpt: Checkpoint) -> dict[str, Any]:
    """The llama hyperparameters, read from the family's config.json fields (LlamaConfig's names)."""
    hf = ckpt.spec.hf_config(ckpt.config) if ckpt.spec.hf_config else {}
    if not all(k in hf for k in LLAMA_KEYS):
        raise UnsupportedExport(f"gguf export of a {ckpt.spec.name} model needs a llama-compatible config")
    return hf


def add_arch_keys(w: Any, layout: Any) -> None:
    """The architecture's own `<arch>.*` keys from the family's GgufLayout (typed by their Python value)."""
    for key, value in layout.kv.items():
        name = f"{layout.arch}.{key}"
        if isinstance(value, bool):
            w.add_bool(name, value)
        elif isinstance(value, int):
            w.add_uint32(name, value)
        elif isinstance(value, float):
            w.add_float32(name, value)
        else:
            w.add_string(name, str(value))


def output_matrix(names: list[str]) -> str:
    """The matrix llama.cpp multiplies the final hidden state with: output.weight, or the tied embedding."""
    return "output.weight" if "output.weight" in names else "token_embd.weight"


def check_shapes(tensors: list[tuple[str, np.ndarray]], quant: str) -> None:
    """Refuse row lengths the type cannot take (llama.cpp would silently fall back to another type)."""

    def bad(t: GgufType) -> list[tuple[str, int]]:
        return [(n, w.shape[-1]) for n, w in tensors if w.ndim == 2 and w.shape[-1] % t.block]

    offenders = bad(TYPES[quant])
    if offenders:
        works = [n for n, t in TYPES.items() if not bad(t)]
        name, ne0 = offenders[0]
        raise UnsupportedExport(
            f"gguf {quant} needs every weight row length to be a multiple of {TYPES[quant].block}, but "
            f"{name} has {ne0} (use model dims that are multiples of {TYPES[quant].block}); "
            f"types that work for this model: {', '.join(works)}"
        )


def vocabulary(ckpt: Checkpoint, rows: int) -> tuple[list[tuple[str, float, int]], list[int]]:
    """(piece, score, type) for every embedding row (padded with [PADi]); ids of pieces over 32 bytes.
    Chat tokens keep their USER_DEFINED type, so llama.cpp never splits them."""
    tok = ckpt.tokenizer
    pieces = tok.pieces()
    if tok.end_id >= 0:  # llama.cpp forces its end-of-turn token to CONTROL anyway (and warns if it must)
        pieces[tok.end_id] = (pieces[tok.end_id][0], pieces[tok.end_id][1], CONTROL)
    if len(pieces) > rows:
        raise KititansError(f"the tokenizer has {len(pieces)} tokens but the embedding only {rows} rows")
    pieces += [(f"[PAD{i}]", PAD_SCORE, UNUSED) for i in range(len(pieces), rows)]
    too_long = [i for i, (p, _, _) in enumerate(pieces) if len(p.encode("utf-8")) > MAX_PIECE_BYTES]
    return pieces, too_long


@contextlib.contextmanager
def _quiet_gguf_log() -> Iterator[None]:
    """gguf-py logs INFO lines naming our temporary files; keep its warnings only."""
    log = logging.getLogger("gguf")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def add_card(w: Any, card: ModelCard) -> None:
    """general.* (name, basename, size_label, description, license...) and kititans.* keys."""
    w.add_name(card.name)
    w.add_type("model")
    w.add_basename(card.basename)
    w.add_size_label(card.size_label)
    w.add_description(card.description)
    if card.stage:
        w.add_finetune(card.stage)
    if card.license:
        w.add_license(card.license)
    w.add_author(card.author)
    w.add_quantized_by(f"kititans {card.version}")
    w.add_string("kititans.family", card.family)
    w.add_string("kititans.stage", card.stage or "unknown")
    w.add_string("kititans.version", card.version)


def write_gguf(
    path: Path,
    ckpt: Checkpoint,
    tensors: list[tuple[str, np.ndarray]],
    pieces: list[tuple[str, float, int]],
    qtype: GgufType,
    progress: bool = False,
    card: ModelCard | None = None,
    types: dict[str, int] | None = None,
) -> None:
    """One GGUF file with the full metadata; 2-D weights in qtype's gguf-py type (or `types[name]`: a QAT
    run's own blocks, quantize/qat.py), 1-D in float32."""
    gguf = require("gguf", "gguf", "GGUF export")
    hf, tok, layout = hyperparameters(ckpt), ckpt.tokenizer, ckpt.spec.support(FORMAT)
    with _quiet_gguf_log():
        w = gguf.GGUFWriter(str(path), layout.arch)
    add_card(w, card or model_card(ckpt))
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf["rope_theta"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    w.add_rope_dimension_count(head_dim)
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    add_arch_keys(w, layout)
    w.add_vocab_size(len(pieces))
    w.add_file_type(qtype.file_type)
    if qtype.quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p for p, _, _ in pieces])
    w.add_token_scores([s for _, s, _ in pieces])
    w.add_token_types([t for _, _, t in pieces])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    if tok.pad_id >= 0:
        w.add_pad_token_id(tok.pad_id)
    if tok.end_id >= 0:
        w.add_eot_token_id(tok.end_id)
    w.add_add_bos_token(bool(tok.config.get("add_bos_token", True)))
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if layout.task == "lm":
        w.add_chat_template(tok.chat_template)
    out_name = output_matrix([n for n, _ in tensors])
    for name, arr in tensors:
        ggml_type = F32 if arr.ndim < 2 else qtype.weight_type
        if arr.ndim == 2 and name == out_name and qtype.output_type is not None:
            ggml_type = qtype.output_type
        if arr.ndim == 2 and types and name in types:
            ggml_type = types[name]
        data = quantize(arr, ggml_type)
        raw = None if ggml_type == F32 or data.dtype == np.float16 else gguf.GGMLQuantizationType(ggml_type)
        w.add_tensor(name, data, raw_dtype=raw)
    with _quiet_gguf_log():
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=progress)
        finally:
            w.close()


def tensor_report(
    path: Path, source: dict[str, np.ndarray], progress: bool = False
) -> dict[str, dict[str, Any]]:
    """Per tensor in the written file: type, shape (PyTorch order) and the error of its dequantized values
    against the float32 weights (max absolute, and relative to the largest weight)."""
    gguf = require("gguf", "gguf", "GGUF export")
    report = {}
    tensors = gguf.GGUFReader(str(path)).tensors
    for t in tqdm(tensors, desc="check", unit="tensor", disable=not progress, leave=False):
        ref = source[t.name]
        deq = dequantize(t.data, int(t.tensor_type)).reshape(ref.shape)
        err = float(np.abs(deq - ref).max()) if ref.size else 0.0
        report[t.name] = {
            "type": TYPE_NAMES.get(int(t.tensor_type), t.tensor_type.name),
            "shape": list(ref.shape),
            "bytes": int(t.n_bytes),
            "max_abs_error": err,
            "max_rel_error": err / max(float(np.abs(ref).max()), 1e-30),
        }
    return report


def _check_options(quant: str, options: ExportOptions) -> None:
    if options.imatrix and not TYPES[quant].imatrix:
        users = [n for n, t in TYPES.items() if t.imatrix]
        raise UnsupportedExport(
            f"--imatrix does not change gguf {quant} (its rounding ignores importance); "
            f"it applies to {', '.join(users)}"
        )


def export(ckpt: Checkpoint, quant: str, out: Path, options: ExportOptions) -> ExportResult:
    """Write `out` (a .gguf) for `quant` plus its JSON manifest; nothing is left under `out` on failure."""
    t0 = time.perf_counter()
    out = Path(out)
    qtype = TYPES[quant]
    tensors = gguf_tensors(ckpt)  # also refuses families without a GGUF mapping
    hyperparameters(ckpt)
    check_shapes(tensors, quant)
    _check_options(quant, options)
    rows = next(w.shape[0] for n, w in tensors if n == "token_embd.weight")
    pieces, too_long = vocabulary(ckpt, rows)
    card = model_card(ckpt, options.extra.get("license"))
    imatrix = None
    if options.imatrix:
        from kititans.quantize.imatrix import collect_imatrix

        imatrix = collect_imatrix(
            ckpt,
            options.imatrix,
            gguf_name_of(ckpt),
            max_tokens=int(options.extra.get("imatrix_tokens", 32768)),
            progress=options.progress,
        )
    handoff = None if imatrix else gguf_handoff(ckpt, quant)  # a QAT run at its target: the trained blocks
    by_llamacpp = (qtype.needs_llamacpp or imatrix is not None) and handoff is None
    with atomic_path(out) as tmp:
        if by_llamacpp:
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-base-") as d:
                base = Path(d) / "base.f32.gguf"
                write_gguf(base, ckpt, tensors, pieces, TYPES["f32"], options.progress, card)
                llama_quantize(
                    base,
                    tmp,
                    qtype,
                    imatrix.data if imatrix else None,
                    output_type=qtype.output_type,
                    threads=int(options.extra.get("threads", 0)),
                )
        else:
            write_gguf(tmp, ckpt, tensors, pieces, qtype, options.progress, card, handoff)
        report = tensor_report(tmp, dict(tensors), options.progress)
    embed = ckpt.spec.support(FORMAT).task == "embed"
    modelfile = None if embed else write_modelfile(out, ckpt, card)  # Ollama's Modelfile is for chat models
    manifest = base_manifest(ckpt, FORMAT, quant, out)
    manifest.update(
        {
            "type": quant,
            "bits_per_weight": qtype.bits_per_weight,
            "quantizer": "llama.cpp llama_model_quantize" if by_llamacpp else "gguf-py",
            "qat_handoff": handoff is not None,  # blocks written from the QAT run's kernels (K-quants too)
            "size_mib": round(out.stat().st_size / 2**20, 3),
            "weight_bits_per_weight": _weight_bpw(report),
            "tied_embeddings": "output.weight" not in report,
            "vocab": {"tokens": len(pieces), "padded": len(pieces) - ckpt.tokenizer.vocab_size},
            "imatrix": None
            if imatrix is None
            else {"source": imatrix.source, "tokens": imatrix.tokens, "tensors": len(imatrix.data)},
            "tensor_types": _type_counts(report),
            "tensors": report,
            "warnings": [
                f"token {i} ({pieces[i][0]!r}) is longer than {MAX_PIECE_BYTES} UTF-8 bytes: "
                "llama-cpp-python's detokenize drops it"
                for i in too_long
            ],
            "card": card.as_dict(),
            "modelfile": modelfile.name if modelfile else None,
            "next": _embed_hints(out) if embed else _chat_hints(out, card.name, modelfile),
        }
    )
    path = write_manifest(out, manifest)
    return ExportResult(out, path, manifest, time.perf_counter() - t0)


def _chat_hints(out: Path, name: str, modelfile: Path | None) -> list[str]:
    return [
        f"llama-cli -m {out} -cnv --jinja",
        f"ollama create {name} -f {modelfile}",
        f"kititans chat {out}",
        f"kititans serve {out}",
        f"kititans generate {out} --prompt 'Once upon a time' --temperature 0",
    ]


def _embed_hints(out: Path) -> list[str]:
    return [
        f"llama-embedding -m {out} --pooling mean --embd-normalize 2 -p 'how do I reset my password?'",
        f"llama-server -m {out} --embeddings --pooling mean   # POST /v1/embeddings",
        f"kititans embed {out} --text 'how do I reset my password?'",
    ]


def _weight_bpw(report: dict[str, dict[str, Any]]) -> float:
    """Bits per weight actually stored for the 2-D weights (the mix llama.cpp chose, for K-quants)."""
    mats = [r for r in report.values() if len(r["shape"]) == 2]
    return round(8 * sum(r["bytes"] for r in mats) / sum(int(np.prod(r["shape"])) for r in mats), 3)


def _type_counts(report: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in report.values():
        counts[r["type"]] = counts.get(r["type"], 0) + 1
    return counts
