"""An Ollama Modelfile next to each GGUF (`ollama create NAME -f model.q4_k_m.Modelfile`).

FROM the GGUF beside it; TEMPLATE the model's chat format in Ollama's Go-template syntax (Phi-3's
"<|role|>\\n{content}<|end|>\\n" per message and "<|assistant|>\\n" to generate, or the template of a run made
before, which has no newline after the role tag); the chat tokens as stop parameters; default sampling and
the context from the run's generation_config.json and config. Ollama's runner adds BOS itself (the GGUF says
add_bos_token), so the template has none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kititans.data.tokenizer import CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE
from kititans.files import write_text

SUFFIX = ".Modelfile"


def _go_template(newline: str) -> str:
    """Every message as <|role|>{nl}content<|end|>, then <|assistant|>{nl} unless the last message is the
    assistant's (a reply to continue)."""
    return (
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        f"<|{{{{ .Role }}}}|>{newline}{{{{ .Content }}}}"
        '{{- if or (ne .Role "assistant") (not $last) }}<|end|>\n{{ end }}'
        '{{- if and (ne .Role "assistant") $last }}'
        f"<|assistant|>{newline}"
        "{{ end }}"
        "{{- end }}"
    )


def modelfile_path(gguf: Path) -> Path:
    """RUN/export/model.q4_k_m.gguf -> RUN/export/model.q4_k_m.Modelfile"""
    return gguf.with_suffix(SUFFIX)


def modelfile_text(
    gguf: Path,
    chat_template: str,
    stop_texts: list[str],
    generation: dict[str, Any],
    context_length: int,
    card: Any,
) -> str:
    """The Modelfile for `gguf`; None-valued settings are left to Ollama's defaults."""
    newline = "" if chat_template == LEGACY_CHAT_TEMPLATE else "\n"
    if chat_template not in (CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE):
        newline = "\n"  # a custom template: Phi-3's format is the closest Ollama knows
    lines = [
        f"# Ollama Modelfile for {gguf.name}: {card.description}",
        f"# ollama create {card.name} -f {modelfile_path(gguf).name} && ollama run {card.name}",
        f"FROM ./{gguf.name}",
        f'TEMPLATE """{_go_template(newline)}"""',
    ]
    lines += [f'PARAMETER stop "{s}"' for s in stop_texts]
    params = {
        "temperature": generation.get("temperature") if generation.get("do_sample", True) else 0.0,
        "top_k": generation.get("top_k"),
        "top_p": generation.get("top_p"),
        "repeat_penalty": generation.get("repetition_penalty"),
        "num_predict": generation.get("max_new_tokens"),
        "num_ctx": context_length,
    }
    lines += [f"PARAMETER {k} {v}" for k, v in params.items() if v is not None]
    if card.license:
        lines.append(f'LICENSE """{card.license}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf: Path, ckpt: Any, card: Any) -> Path:
    tok = ckpt.tokenizer
    stops = [p for p in ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>") if p in tok.chat_tokens]
    text = modelfile_text(
        Path(gguf), tok.chat_template, stops, ckpt.generation_config, int(ckpt.config.context_length), card
    )
    path = modelfile_path(Path(gguf))
    write_text(path, text)
    return path
