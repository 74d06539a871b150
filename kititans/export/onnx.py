"""ONNX export: a decoder step graph with an explicit KV cache, for ONNX Runtime (research §1, §2).

The family's wrapper (`FamilySpec.formats["onnx"]`, see kititans/models/lite_export.py) is traced with
`torch.onnx.export(dynamo=True)`: inputs `input_ids`, `attention_mask`, `position_ids` and the states
(`past_key_values.N.key/value` for a KV cache), outputs `logits` and the updated states
(`present.N.key/value`): the names optimum and onnxruntime-genai use. Batch, sequence and past length are
dynamic, so one graph does prefill and decode. The folder RUN/export/onnx/<quant>/ holds model.onnx
(+ model.onnx.data when the weights are large), the tokenizer files and manifest.json, which records the
state layout the runtime needs.

`export_genai` builds the onnxruntime-genai variant of a transformers-compatible (Lite) run with
onnxruntime-genai's own model builder, so the two can be compared on the same weights.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kititans.errors import KititansError, UnsupportedExport, require
from kititans.export import ExportOptions, ExportResult, QuantType, base_manifest
from kititans.export.hf_files import (
    TOKENIZER_FILES,
    ecosystem_hints,
    write_onnx_ecosystem_files,
    write_tokenizer_files,
)
from kititans.files import atomic_path, dir_size, write_json
from kititans.quantize.onnx import QUANTIZERS, op_histogram, quiet

FORMAT = "onnx"
QUANTS = {
    "fp32": QuantType("fp32", 32.0, "float32 weights and compute: the reference"),
    "fp16": QuantType("fp16", 16.0, "float16 weights and compute (for GPU providers; CPU inserts casts)"),
    "int8": QuantType("int8", 9.0, "int8 weights in blocks of 32 + fp32 scale, MatMulNBits (acc. level 4)"),
    "int8_dynamic": QuantType(
        "int8_dynamic", 8.0, "int8 per-channel weights, dynamic uint8 activations (quantize_dynamic)"
    ),
    "int4": QuantType("int4", 5.0, "int4 weights in blocks of 32 + fp32 scale, MatMulNBits (acc. level 4)"),
}
SHORTHANDS = {"q8": "int8", "q4": "int4"}
DEFAULT_QUANT = "fp32"

MODEL_FILE = "model.onnx"
PREFILL_FILE = "prefill.onnx"  # families with a separate chunk-prefill graph (Titans)
SHARED_DATA_FILE = "weights.onnx.data"  # the weights of a multi-graph export, stored once
INITIAL_STATE_FILE = "initial_state.safetensors"  # families whose state starts at learned values (Titans)
EXTERNAL_DATA_BYTES = 32 << 20  # weights above this go to model.onnx.data (protobuf caps a file at 2 GiB)
CHECK_TEXT = "Once upon a time, a little robot found a red ball in the garden and asked who had lost it."


def export(ckpt: Any, quant: str, out: Path, options: ExportOptions) -> ExportResult:
    """Trace the family's step wrapper, quantize, check against PyTorch, write the folder atomically.

    options.extra: opset (23 = fused Attention/RotaryEmbedding/RMSNormalization, the default; 18 = plain
    ops for older runtimes), external_data (True/False; default: by size).
    """
    onnx = require("onnx", "onnx", "ONNX export")
    require("onnxruntime", "onnx", "ONNX export")
    step_cls = ckpt.spec.support(FORMAT)
    if options.imatrix:
        raise UnsupportedExport("--imatrix applies to gguf only; ONNX quantization here is data-free")
    extra = dict(options.extra)
    opset = int(extra.get("opset", 23))
    if opset not in (18, 23):
        raise KititansError(f"onnx opset {opset} is not supported: use 23 (fused ops) or 18 (plain ops)")
    out = Path(out)
    stages = tqdm(total=4, desc=f"onnx {quant}", unit="stage", disable=not options.progress, leave=False)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        work = tmp / ".work"
        work.mkdir()
        step = step_cls(export_copy(ckpt.model, quant), fused=opset >= 23)
        graphs = graph_examples(step)
        details: dict[str, Any] = {"method": "none", "weights": quant}
        ops: dict[str, dict[str, int]] = {}
        stages.total = 2 + 3 * len(graphs)
        protos: dict[str, Any] = {}
        for name, graph in graphs.items():
            stages.set_postfix_str(f"torch.onnx.export {name}")
            trace(graph["module"], work / name, graph["example"], graph["dynamic_shapes"], graph["names"])
            stages.update()
            stages.set_postfix_str(f"quantize {name}")
            src = work / name
            if quant in QUANTIZERS:
                src = work / f"{Path(name).stem}.{quant}.onnx"
                details = QUANTIZERS[quant](work / name, src)
            stages.update()
            protos[name] = onnx.load(str(src))
            finish_graph(protos[name], step, ckpt, quant)
            ops[name] = op_histogram(protos[name])
            stages.update()
        ir_version = protos[MODEL_FILE].ir_version
        steps = None
        if hasattr(step, "step_table"):
            steps = [
                {**row, "ops": ops[row["file"]], "inplace": inplace_outputs(protos[row["file"]], row)}
                for row in step.step_table()
            ]
        stages.set_postfix_str("save")
        if len(protos) > 1:  # decode + prefill graphs read one weight file: every tensor stored once
            external_file: str | None = SHARED_DATA_FILE
            save_shared(protos, tmp, SHARED_DATA_FILE)
        else:
            weight_bytes = sum(len(t.raw_data) for t in protos[MODEL_FILE].graph.initializer)
            external = bool(extra.get("external_data", weight_bytes > EXTERNAL_DATA_BYTES))
            external_file = f"{MODEL_FILE}.data" if external else None
            save_graph(protos[MODEL_FILE], tmp / MODEL_FILE, external)
        del protos
        graph_info = {
            "kind": getattr(step, "kind", "kv_cache"),
            "opset": getattr(step, "opset", opset),
            "ir_version": ir_version,
            "ops": ops[MODEL_FILE],
            "external_data": external_file,
            "dtype": "float16" if quant == "fp16" else "float32",
            "inputs": list(step.input_names),
            "outputs": list(step.output_names),
            "states": [asdict(s) for s in step.states],
            "context_length": step.context_length,
        }
        if steps is not None:  # several step graphs; the runtime picks one per call
            graph_info["steps"] = steps
        elif len(graphs) > 1:  # a chunk-prefill graph beside the decode graph, same state layout
            graph_info["prefill"] = {
                "file": PREFILL_FILE,
                "tokens": int(step.chunk),
                "ops": ops[PREFILL_FILE],
            }
        if hasattr(step, "initial_state"):  # a recurrent state that does not start at zero
            from safetensors.torch import save_file

            save_file(step.initial_state(), str(tmp / INITIAL_STATE_FILE))
            graph_info["initial_state"] = INITIAL_STATE_FILE
        shutil.rmtree(work)
        # config.json (optimum), genai_config.json (onnxruntime-genai), tokenizer files incl. tokenizer.json
        ecosystem = write_onnx_ecosystem_files(ckpt, tmp, graph_info, MODEL_FILE)
        # the quantizers' and safetensors' files are 0600; a shipped artifact is readable
        for f in tmp.iterdir():
            f.chmod(0o644)
        stages.set_postfix_str("check")
        check = CHECKS[ckpt.spec.task](tmp, graph_info, ckpt)
        stages.update()
        manifest = base_manifest(ckpt, FORMAT, quant, out)
        manifest.update(
            size_bytes=dir_size(tmp),
            weights_bytes={p.name: p.stat().st_size for p in tmp.iterdir() if p.name.startswith("model.")},
            onnx=graph_info,
            quantization=details,
            check=check,
            tokenizer=[f for f in TOKENIZER_FILES if (tmp / f).is_file()],
            ecosystem=ecosystem,
            next=[
                *NEXT[ckpt.spec.task](out),
                *ecosystem_hints(out, ecosystem),
                f"kititans bench {ckpt.path}",
            ],
        )
        write_json(tmp / "manifest.json", manifest)
    stages.close()
    return ExportResult(out, out / "manifest.json", manifest)


def export_copy(model: nn.Module, quant: str) -> nn.Module:
    """The model as the graph should hold it: fp16 for fp16; for int8/int4 an untied lm_head, so that the
    head MatMul has its own weight initializer and gets quantized (onnxruntime-genai does the same)."""
    model = copy.deepcopy(model).eval()
    if quant == "fp16":
        return model.half()
    head = getattr(model, "lm_head", None)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if quant in QUANTIZERS and head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    return model


def graph_examples(step: nn.Module) -> dict[str, dict[str, Any]]:
    """File name -> {module, example, dynamic_shapes, names} of every graph the wrapper exports: its own
    `graphs()` (Titans: one graph per kind of call, each with its own module and input/output names), else
    one graph of the wrapper itself traced at batch 1 / one token / empty past."""
    names = (list(step.input_names), list(step.output_names))
    if not hasattr(step, "graphs"):
        example = step.example_inputs(1, 1, 0)
        return {
            MODEL_FILE: {
                "module": step,
                "example": example,
                "dynamic_shapes": step.dynamic_shapes(),
                "names": names,
            }
        }
    out = {}
    for file, g in step.graphs().items():
        if isinstance(g, tuple):  # (example, dynamic shapes) of the wrapper itself
            g = {"module": step, "example": g[0], "dynamic_shapes": g[1]}
        out[file] = {**g, "names": (g.get("inputs", names[0]), g.get("outputs", names[1]))}
    return out


def inplace_outputs(proto: Any, row: dict[str, Any]) -> list[str]:
    """The outputs of `row` (a step_table entry) a runtime may bind to their input's own buffer: those the
    wrapper offers whose input feeds only a ScatterND that yields exactly that output (so nothing reads the
    input after the scatter wrote it)."""
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ok = []
    for out in row.get("inplace", []):
        past = "past_" + out.removeprefix("present_")
        users = consumers.get(past, [])
        if len(users) == 1 and users[0].op_type == "ScatterND" and users[0].output[0] == out:
            ok.append(out)
    return ok


def trace(step: nn.Module, path: Path, example: tuple, shapes: Any, names: tuple | None = None) -> None:
    """torch.onnx.export(dynamo=True) of the step wrapper (names: graph input and output names)."""
    input_names, output_names = names or (list(step.input_names), list(step.output_names))
    with warnings.catch_warnings(), quiet(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                step,
                example,
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=shapes,
                opset_version=getattr(step, "opset", 18),
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # the exporter's errors are long; keep the first line for the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KititansError(f"torch.onnx.export failed: {first}") from e
        program.save(str(path), external_data=True)


def finish_graph(proto: Any, step: nn.Module, ckpt: Any, quant: str) -> None:
    """Name the grown state axes like optimum/genai ("total_sequence_length") and stamp metadata."""
    grow = {s.output: s.grow_axis for s in step.states}
    for out in proto.graph.output:
        axis = grow.get(out.name)
        if axis is not None:
            out.type.tensor_type.shape.dim[axis].dim_param = "total_sequence_length"
    meta = {"kititans.family": ckpt.spec.name, "kititans.quant": quant, "kititans.run": Path(ckpt.path).name}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def save_graph(proto: Any, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(path))


def save_shared(protos: dict[str, Any], folder: Path, data_name: str, align: int = 4096) -> None:
    """Save several graphs whose weights live in one external file `data_name`: a tensor with the same
    bytes in two graphs (the decode and prefill graphs share every weight, though the exporter names its
    folded transposes differently) is written once, at a page-aligned offset so onnxruntime can map it."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    written: dict[str, tuple[int, int]] = {}
    with open(folder / data_name, "wb") as f:
        for name, proto in protos.items():
            for t in proto.graph.initializer:
                raw = t.raw_data
                if t.data_location == onnx.TensorProto.EXTERNAL or len(raw) < 1024:
                    continue  # small tensors stay inline
                key = hashlib.sha256(raw).hexdigest()
                if key not in written:
                    f.write(b"\0" * (-f.tell() % align))
                    written[key] = (f.tell(), len(raw))
                    f.write(raw)
                set_external_data(t, location=data_name, offset=written[key][0], length=written[key][1])
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
            onnx.save_model(proto, str(folder / name))


def check_against_torch(
    folder: Path, graph_info: dict[str, Any], ckpt: Any, decode_steps: int = 4
) -> dict[str, Any]:
    """Prefill a fixed sentence and decode greedily through the ONNX runtime (closed loop, its own state),
    then compare every position's logits with the fp32 PyTorch model's parallel forward on the same ids."""
    from kititans.runtimes.onnx import OnnxRuntime

    rt = OnnxRuntime(folder, info=graph_info, spin=False)
    ids = [ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode(CHECK_TEXT)][: rt.context_length - decode_steps]
    got = [rt.forward(ids, all_logits=True)]
    seq = list(ids)
    for _ in range(decode_steps):
        seq.append(int(got[-1][-1].argmax()))
        got.append(rt.forward(seq[-1:], all_logits=True))
    got_all = np.concatenate(got)  # (len(seq), V)
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([seq]))[0].float().numpy()
    return {
        "tokens": len(seq),
        "prefill": len(ids),
        "max_abs_logit_diff": float(np.abs(got_all - ref).max()),
        "top1_agreement": float((got_all.argmax(-1) == ref.argmax(-1)).mean()),
    }


def check_embeddings(folder: Path, graph_info: dict[str, Any], ckpt: Any) -> dict[str, Any]:
    """An encoder export: the graph's vectors for a padded batch of sentences against the fp32 PyTorch
    model's, by cosine similarity (the graph pools and normalises itself)."""
    from kititans.embedding import embed_texts
    from kititans.runtimes.onnx import OnnxRuntime
    from kititans.runtimes.pytorch import TorchRuntime

    texts = [CHECK_TEXT, "How do I reset my password?", "x", CHECK_TEXT[:40] + " and a dog"]
    got = embed_texts(OnnxRuntime(folder, info=graph_info, spin=False), texts, batch_size=len(texts))
    ref = embed_texts(TorchRuntime(Path(ckpt.path)), texts, batch_size=1)  # unpadded: padding must not matter
    cos = (got * ref).sum(1)
    return {"texts": len(texts), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


CHECKS = {"lm": check_against_torch, "embed": check_embeddings}  # by FamilySpec.task
NEXT = {
    "lm": lambda out: [
        f"kititans generate {out} --prompt 'Once upon a time' --temperature 0 --stats",
        f"kititans chat {out}",
        f"kititans serve {out}",
    ],
    "embed": lambda out: [f"kititans embed {out} --text 'how do I reset my password?'"],
}


# ----------------------------------------------------------------------------- onnxruntime-genai

GENAI_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int4"}


def genai_output(run_dir: Path, quant: str) -> Path:
    return Path(run_dir) / "export" / "onnx-genai" / quant


def export_genai(
    run_dir: str | Path, quant: str = "int4", out: str | Path | None = None, progress: bool = True
) -> ExportResult:
    """Build the onnxruntime-genai model of a transformers-compatible run with its own model builder
    (`python -m onnxruntime_genai.models.builder`, CPU, int4/int8 with block 32, symmetric, accuracy
    level 4): the reference our own graph is compared with on the same weights."""
    from kititans.checkpoint import load_checkpoint, read_meta
    from kititans.models.spec import get_family

    run_dir = Path(run_dir)
    spec = get_family(read_meta(run_dir)["family"])
    if spec.hf_config is None or spec.run_files is not None:  # none, or remote code the builder cannot read
        raise UnsupportedExport(
            f"onnxruntime-genai's builder reads transformers' built-in architectures; a {spec.name} model is "
            "not one (use kititans export --format onnx)"
        )
    if quant not in GENAI_PRECISION:
        raise UnsupportedExport(
            f"onnx-genai has no quantization {quant!r}; valid: {', '.join(GENAI_PRECISION)}"
        )
    require("onnxruntime_genai", "genai", "the onnxruntime-genai export")
    require("transformers", "genai", "the onnxruntime-genai export")
    ckpt = load_checkpoint(run_dir)
    vocab = ckpt.config.vocab_size
    clash = [
        n
        for n, m in ckpt.model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == vocab and n != "lm_head"
    ]
    if clash:  # its builder takes every Linear with vocab_size outputs for the LM head (0.18)
        raise UnsupportedExport(
            f"onnxruntime-genai's builder would mistake {clash[0]} ({vocab} outputs = the vocab size) for the "
            "LM head; use a vocab size that differs from the model's layer widths"
        )
    out = Path(out) if out else genai_output(run_dir, quant)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(run_dir.resolve()),
            "-o",
            str(tmp.resolve()),
            "-p",
            GENAI_PRECISION[quant],
            "-e",
            "cpu",
            "-c",
            str((tmp / ".cache").resolve()),
            "--extra_options",
            "block_size=32",
            "accuracy_level=4",
            "is_symmetric=true",
        ]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        bar = tqdm(total=1, desc=f"onnx-genai {quant}", disable=not progress, leave=False)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        bar.update()
        bar.close()
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise KititansError(f"onnxruntime-genai's builder failed: {tail[0]}")
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        tok_dir = tmp / "tokenizer"  # ours (with tokenizer.json), apart from the builder's HF tokenizer files
        write_tokenizer_files(run_dir, tok_dir, int(ckpt.config.context_length))
        import onnxruntime_genai

        manifest = base_manifest(ckpt, "onnx-genai", quant, out)
        manifest.update(
            size_bytes=dir_size(tmp),
            genai={
                "builder": f"onnxruntime_genai.models.builder {onnxruntime_genai.__version__}",
                "precision": GENAI_PRECISION[quant],
                "execution_provider": "cpu",
                "extra_options": {"block_size": 32, "accuracy_level": 4, "is_symmetric": True},
            },
            next=[
                f"kititans generate {out} --runtime genai --prompt 'Once upon a time' --temperature 0 --stats",
                f"kititans serve {out} --runtime genai",
                f"python -c \"import onnxruntime_genai as og; og.Model('{out}')\"",
            ],
        )
        write_json(tmp / "manifest.json", manifest)
    return ExportResult(out, out / "manifest.json", manifest)
