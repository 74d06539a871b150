"""The llama.cpp runtime: a GGUF file through llama-cpp-python's C API (token ids in, logits out).

Settings (recorded in `settings`): weight repacking into extra buffer types (`use_extra_bufts`: the fast Q4_0/Q4_K
paths with AVX2, NEON dotprod/i8mm) is on by default unless the CPU or the build has AMX, whose repack path
segfaults on multi-token decode of quantized models (research §5.5; `repack=True/False` decides); layers
offloaded to a GPU backend (`n_gpu_layers`, 0 = CPU only, -1 = all; `placement` says where the model ran);
threads default to the performance cores (runtimes/host.py). Logits are computed for the last position only,
unless `forward(..., all_logits=True)` asks for all.

The codec is the run's own Tokenizer when the GGUF sits in RUN/export/ or next to a tokenizer.model with the
same vocabulary; otherwise an adapter over llama.cpp's tokenize/detokenize, so a bare .gguf file works.
`open_llama` / `chat_completion` give llama-cpp-python's own high-level API with the same safe defaults.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.runtimes.host import performance_threads, repack_default
from kititans.runtimes.llamacpp_lib import captured_stderr, last_error, library, set_verbose


def _free(lib: Any, batch: Any, ctx: Any, model: Any) -> None:
    # the context must go before its model
    if batch is not None:
        lib.llama_batch_free(batch)
    if ctx is not None:
        lib.llama_free(ctx)
    if model is not None:
        lib.llama_model_free(model)


EMBED_SEQS = 8  # sequences per llama_decode when embedding
EMBED_TOKENS = 2048  # tokens per llama_decode when embedding (the ubatch: non-causal needs it whole)


def _meta(lib: Any, model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8") if n >= 0 else None


def system_info() -> str:
    """llama.cpp's build features (`llama_print_system_info`: SIMD, REPACK, OpenMP, GPU backends)."""
    return library().llama_print_system_info().decode("utf-8", errors="replace").strip()


def repack_setting(repack: bool | None) -> tuple[bool, str]:
    """(use_extra_bufts, why): as asked, or on where it is safe (runtimes/host.py repack_default)."""
    if repack is not None:
        return bool(repack), f"{'on' if repack else 'off'}: as asked"
    return repack_default(system_info())


def model_params(lib: Any, repack: bool | None, n_gpu_layers: int) -> tuple[Any, bool, str]:
    """llama_model_params with our settings; (params, repack used, why)."""
    repack, why = repack_setting(repack)
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    if not any(f[0] == "use_extra_bufts" for f in type(mp)._fields_):
        repack, why = False, "unsupported by this llama-cpp-python (no use_extra_bufts)"
    mp.use_extra_bufts = repack
    return mp, repack, why


def placement(lib: Any, n_gpu_layers: int, n_layer: int) -> str:
    """Where the model runs: cpu, or gpu with the layers offloaded (llama.cpp counts the output as a layer)."""
    if n_gpu_layers == 0:
        return "cpu"
    if not lib.llama_supports_gpu_offload():
        return "cpu (this llama.cpp has no GPU backend)"
    k = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    return f"gpu ({k}/{n_layer + 1} layers)"


class LlamaCppRuntime:
    name = "llamacpp"

    def __init__(
        self,
        path: Path,
        threads: int = 0,
        n_ctx: int = 0,
        n_batch: int = 512,
        repack: bool | None = None,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        verbose: bool = False,
        n_gpu_layers: int = 0,
        codec: Any = None,
        **_: Any,
    ):
        """`repack` None = on where safe (see repack_setting); `codec` replaces the tokenizer lookup."""
        lib = library()
        self.path = Path(path)
        if not self.path.is_file():
            raise KititansError(f"no such GGUF file: {self.path}")
        set_verbose(verbose)
        mp, repack, repack_why = model_params(lib, repack, n_gpu_layers)
        with captured_stderr(not verbose) as log:
            model = lib.llama_model_load_from_file(str(self.path).encode(), mp)
        if not model:
            raise KititansError(f"llama.cpp could not load {self.path}: {last_error(log)}")
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(model))
        arch = _meta(lib, model, "general.architecture") or "llama"
        # a pooling GGUF (an encoder) gives vectors, not logits: "embed" (what the CLI verbs ask)
        self.task = "embed" if int(_meta(lib, model, f"{arch}.pooling_type") or 0) else "lm"
        cp = lib.llama_context_default_params()
        cp.n_ctx = min(n_ctx or self.n_ctx_train, self.n_ctx_train)
        cp.n_batch = cp.n_ubatch = min(n_batch, cp.n_ctx)
        cp.n_seq_max = 1
        if self.task == "embed":  # non-causal: a whole sequence in one ubatch; EMBED_SEQS sequences per call
            cp.embeddings = True
            cp.n_seq_max = EMBED_SEQS
            cp.kv_unified = True  # one cache for all sequences (split per sequence, the pooling is wrong)
            cp.n_ctx = cp.n_ctx * EMBED_SEQS
            cp.n_batch = cp.n_ubatch = max(cp.n_batch, min(cp.n_ctx, EMBED_TOKENS))
        cp.n_threads = cp.n_threads_batch = threads or performance_threads()
        cp.no_perf = True
        kv_types = {"f16": lib.GGML_TYPE_F16, "f32": lib.GGML_TYPE_F32, "q8_0": lib.GGML_TYPE_Q8_0}
        if kv_type not in kv_types:
            lib.llama_model_free(model)
            raise KititansError(f"unknown KV cache type {kv_type!r}; valid: {', '.join(kv_types)}")
        cp.type_k = cp.type_v = kv_types[kv_type]
        if flash_attn is not None:
            cp.flash_attn_type = (
                lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        with captured_stderr(not verbose) as log:
            ctx = lib.llama_init_from_model(model, cp)
        if not ctx:
            lib.llama_model_free(model)
            raise KititansError(f"llama.cpp could not create a context for {self.path}: {last_error(log)}")
        self.n_batch = int(cp.n_batch)
        batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._lib, self._model, self._ctx, self._batch = lib, model, ctx, batch
        self._finalizer = weakref.finalize(self, _free, lib, batch, ctx, model)
        self._vocab = lib.llama_model_get_vocab(model)
        self._mem = lib.llama_get_memory(ctx)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        self.context_length = min(self.n_ctx_train, int(lib.llama_n_ctx(ctx)))
        self.settings = {
            "threads": int(cp.n_threads),
            "use_extra_bufts": repack,
            "repack": repack_why,
            "n_gpu_layers": n_gpu_layers,
            "placement": placement(lib, n_gpu_layers, int(lib.llama_model_n_layer(model))),
            "type_k": kv_type,
            "flash_attn": flash_attn,
            "n_batch": self.n_batch,
        }
        self._n_past = 0
        self.n_embd = int(lib.llama_model_n_embd(model))
        if self.task == "embed":
            self.context_length = self.n_ctx_train
        self.codec = codec or run_tokenizer(self.path, self) or GGUFCodec(self)

    def close(self) -> None:
        self._finalizer()

    @property
    def n_past(self) -> int:
        return self._n_past

    def reset(self) -> None:
        self._lib.llama_memory_clear(self._mem, True)
        self._n_past = 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Logits (vocab,) of the last position, or (len(ids), vocab) with all_logits; continues the cache."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("forward() needs at least one token")
        if self._n_past + len(ids) > self.context_length:
            raise ValueError(
                f"sequence of {self._n_past + len(ids)} tokens exceeds the context of {self.context_length}"
            )
        lib, b, rows = self._lib, self._batch, []
        for start in range(0, len(ids), self.n_batch):
            part = ids[start : start + self.n_batch]
            last_part = start + len(part) == len(ids)
            b.n_tokens = len(part)
            for j, tok in enumerate(part):
                b.token[j] = tok
                b.pos[j] = self._n_past + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = all_logits or (last_part and j == len(part) - 1)
            rc = lib.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self._n_past += len(part)
            if all_logits:
                ptr = lib.llama_get_logits(self._ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(len(part), self.vocab_size)).copy())
        if all_logits:
            return np.concatenate(rows)  # (T, V)
        ptr = lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()

    def sequences(self, max_sequences: int = 16) -> Any:
        """Several sequences in one context of their own, batched into each llama_decode (llamacpp_batch.py)."""
        from kititans.runtimes.llamacpp_batch import LlamaCppSequences

        return LlamaCppSequences(self, max_sequences)

    def embed_batch(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit vectors (N, n_embd) from llama.cpp's own pooling (the GGUF's pooling type), several
        sequences per llama_decode; each call starts from an empty cache."""
        if self.task != "embed":
            raise KititansError(f"{self.path} is a language model: it has no pooled embeddings")
        lib, b, out, at = self._lib, self._batch, [], 0
        while at < len(rows):
            group: list[Sequence[int]] = []
            total = 0
            while at < len(rows) and len(group) < EMBED_SEQS and total + len(rows[at]) <= self.n_batch:
                group.append(rows[at])
                total += len(rows[at])
                at += 1
            if not group or any(len(r) > self.context_length for r in group):
                raise ValueError(
                    f"a text of {len(rows[at])} tokens exceeds the context of {self.context_length}"
                )
            j = 0
            for s, row in enumerate(group):
                for p, tok in enumerate(row):
                    b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = int(tok), p, 1, True
                    b.seq_id[j][0] = s
                    j += 1
            b.n_tokens = j
            rc = lib.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for s in range(len(group)):
                ptr = lib.llama_get_embeddings_seq(self._ctx, s)
                out.append(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy())
            lib.llama_memory_clear(self._mem, True)
        vecs = np.stack(out).astype(np.float32)
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)

    # vocabulary access for the codecs
    def token_text(self, i: int) -> str:
        return self._lib.llama_vocab_get_text(self._vocab, i).decode("utf-8", errors="replace")

    def metadata(self, key: str) -> str | None:
        return _meta(self._lib, self._model, key)

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            out = (ctypes.c_int32 * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), out, cap, add_bos, special)
            if n >= 0:
                return list(out[:n])
            cap = -n

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        arr = (ctypes.c_int32 * len(ids))(*[int(i) for i in ids])
        cap = 64 + 16 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, cap, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n + 1


class GGUFCodec:
    """The Codec protocol over the GGUF's own vocabulary (llama.cpp tokenize/detokenize)."""

    def __init__(self, rt: LlamaCppRuntime):
        lib, vocab = rt._lib, rt._vocab
        self._rt = rt
        self.vocab_size = rt.vocab_size
        self.bos_id = int(lib.llama_vocab_bos(vocab))
        self.eos_id = int(lib.llama_vocab_eos(vocab))
        self.end_id = int(lib.llama_vocab_eot(vocab))
        # every end-of-generation token llama.cpp knows (eos, eot, and <|end|>-like names)
        self.stop_ids = [i for i in range(rt.vocab_size) if lib.llama_vocab_is_eog(vocab, i)]
        template = rt.metadata("tokenizer.chat_template")
        if template is None:
            from kititans.data.tokenizer import CHAT_TEMPLATE

            template = CHAT_TEMPLATE
        self.chat_template = template
        # the strings a rendered template turns into ids (control, unknown and user-defined tokens)
        special = (
            lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_USER_DEFINED | lib.LLAMA_TOKEN_ATTR_UNKNOWN
        )
        self.special_tokens = {
            rt.token_text(i): i for i in range(rt.vocab_size) if lib.llama_vocab_get_attr(vocab, i) & special
        }

    def encode(self, text: str) -> list[int]:
        """Like Tokenizer.encode (llama.cpp special=False): control tokens, <s> and </s> stay text."""
        return self._rt.tokenize(text, add_bos=False, special=False) if text else []

    def encode_special(self, text: str) -> list[int]:
        return self._rt.tokenize(text, add_bos=False, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self._rt.detokenize(ids, special=False)

    def id_to_piece(self, i: int) -> str:
        return self._rt.token_text(i)


def run_tokenizer(path: Path, rt: LlamaCppRuntime) -> Any:
    """The run's Tokenizer for RUN/export/x.gguf (or a tokenizer.model beside the file), if its pieces are
    exactly the GGUF's; None otherwise (also without sentencepiece, as on a device running a bench pack)."""
    try:
        from kititans.data.tokenizer import Tokenizer
    except ImportError:
        return None

    path = Path(path).resolve()
    dirs = [path.parent] + ([path.parent.parent] if path.parent.name == "export" else [])
    for d in dirs:
        if not (d / "tokenizer.model").is_file():
            continue
        try:
            tok = Tokenizer.load(d)
        except KititansError:
            continue
        if tok.vocab_size <= rt.vocab_size and all(
            tok.id_to_piece(i) == rt.token_text(i) for i in range(tok.vocab_size)
        ):
            return tok
    return None


# ----------------------------------------------------------------------------- llama-cpp-python's Llama

_PARAMS = threading.Lock()


@contextlib.contextmanager
def _model_defaults(repack: bool) -> Iterator[None]:
    """Llama() has no keyword for use_extra_bufts: it starts from llama_model_default_params(), so hand it
    defaults with our setting while it is constructed, and restore the function right after."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def defaults() -> Any:
        p = original()
        p.use_extra_bufts = repack
        return p

    with _PARAMS:
        lib.llama_model_default_params = defaults
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def open_llama(path: str | Path, repack: bool | None = None, verbose: bool = False, **kwargs: Any) -> Any:
    """A llama_cpp.Llama for `path` with the runtime's defaults (n_ctx = the model's context, repacking on
    where it is safe)."""
    llama_cpp = library()
    repack = repack_setting(repack)[0]
    kwargs.setdefault("n_ctx", 0)
    with _model_defaults(repack):
        llm = llama_cpp.Llama(model_path=str(path), verbose=verbose, **kwargs)
    if bool(llm.model_params.use_extra_bufts) != repack:
        raise RuntimeError("could not set use_extra_bufts on this llama-cpp-python version")
    return llm


def chat_completion(model: str | Path | Any, messages: list[dict[str, str]], **kwargs: Any) -> dict[str, Any]:
    """llama-cpp-python's own create_chat_completion (the template embedded in the GGUF, its stop rules)."""
    if not isinstance(model, (str, Path)):
        return model.create_chat_completion(messages=messages, **kwargs)
    llm = open_llama(model)
    try:
        return llm.create_chat_completion(messages=messages, **kwargs)
    finally:
        llm.close()


def chat_prompt_ids(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids create_chat_completion feeds the model: the embedded template rendered with the
    GGUF's bos/eos text, tokenized with add_bos=False and special=True (llama_chat_format)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()),
    )
    prompt = fmt(messages=messages).prompt
    return llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
