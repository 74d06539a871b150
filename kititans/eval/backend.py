"""The KiTitans model backend for lm-evaluation-harness: any KiTitans runtime (torch, llama.cpp, ONNX Runtime,
CoreML) behind lm-eval's `LM` API, registered as model "kititans".

    import kititans.eval.backend                     # registers "kititans" with lm-eval
    lm = KititansLM("runs/my-run")                   # or a .gguf, an ONNX folder, a .mlpackage, a runtime
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)
    lm_eval.simple_evaluate(model="kititans", model_args="model=runs/my-run,batch_size=16", tasks=[...])

Tokenization follows lm-eval's `hf` backend so scores are comparable: text is encoded with the model's own
tokenizer (special tokens in the text, like a rendered chat template's, become their ids), BOS is added
unless the text already starts with it (the tokenizer's `add_bos_token`, true for KiTitans runs), a
continuation's tokens are those of context+continuation after the context's, and an empty context is BOS.
A rolling log-likelihood scores the text's tokens after one BOS (the model's document start), in windows of
the model's context. A context too long for the model is cut from the left, as `hf` does, and counted per
task in `stats["truncated"]` instead of failing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from kititans.errors import KititansError
from kititans.eval.scoring import Request, logit_source, score


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise KititansError(f"{name} must be an integer, got {value!r}") from None


def load_lm_runtime(model: Any, runtime: str | None = None, **options: Any) -> Any:
    """A runtime for `model` (a path or an already loaded runtime) that gives next-token logits."""
    from kititans.runtimes import load_runtime

    rt = model if hasattr(model, "forward") and hasattr(model, "codec") else None
    if rt is None:
        if model is None:
            raise KititansError(
                "no model given: pass model=<run directory, .gguf, ONNX folder or .mlpackage>"
            )
        rt = load_runtime(Path(model), runtime, **options)
    if getattr(rt, "task", "lm") != "lm":
        raise KititansError(
            f"{model} is an encoder (it gives embeddings, not next-token logits): lm-eval tasks need a "
            "language model (for an encoder, use kititans embed / search)"
        )
    return rt


@register_model("kititans")
class KititansLM(TemplateLM):
    """lm-eval's LM over a KiTitans runtime. `stats` counts requests, truncations and time per request type;
    `row_hook(task, window, start, rows)` sees the log-prob rows (n, vocab) of every scored continuation."""

    def __init__(
        self,
        model: Any = None,
        runtime: str | None = None,
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        add_bos_token: bool | str | None = None,
        max_gen_toks: int | str = 256,
        device: str | None = "cpu",
        dtype: str = "fp32",
        threads: int | str = 0,
        pretrained: Any = None,  # lm-eval's usual name for the model argument
        row_hook: Callable[[str, list[int], int, np.ndarray], None] | None = None,
        **options: Any,
    ):
        super().__init__()
        options.pop("max_batch_size", None)  # lm-eval passes these to every backend
        options = {k: v for k, v in options.items() if v is not None}
        self.rt = load_lm_runtime(
            model if model is not None else pretrained,
            runtime,
            device=device or "cpu",
            dtype=dtype,
            threads=_int(threads, "threads"),
            **options,
        )
        self.codec = self.rt.codec
        self.name = str(model if model is not None else pretrained)
        self.batch_size = (
            8 if batch_size in (None, "auto") else _int(str(batch_size).split(":")[0], "batch_size")
        )
        limit = int(self.rt.context_length)
        self._max_length = min(limit, _int(max_length, "max_length")) if max_length else limit
        self._max_gen_toks = _int(max_gen_toks, "max_gen_toks")
        config = getattr(self.codec, "config", None) or {}
        if add_bos_token is None:
            add_bos_token = config.get("add_bos_token", True)
        self.add_bos_token = (
            str(add_bos_token).lower() in ("1", "true", "yes")
            if isinstance(add_bos_token, str)
            else bool(add_bos_token)
        )
        self.source = logit_source(self.rt, self.batch_size)
        self.row_hook = row_hook
        self._tasks: list[str] = []
        self.stats: dict[str, Any] = {"requests": {}, "truncated": {}, "seconds": {}, "tokens_scored": 0}

    # ------------------------------------------------------------------ lm-eval's tokenizer interface
    @property
    def eot_token_id(self) -> int:
        return int(self.codec.eos_id)

    @property
    def prefix_token_id(self) -> int:
        bos = int(getattr(self.codec, "bos_id", -1))
        return bos if bos >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = list(self.codec.encode_special(string)) if string else []
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.prefix_token_id
        if add and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.codec.decode(list(tokens))

    # ------------------------------------------------------------------ scoring
    def _count(self, kind: str, n: int, seconds: float) -> None:
        self.stats["requests"][kind] = self.stats["requests"].get(kind, 0) + n
        self.stats["seconds"][kind] = self.stats["seconds"].get(kind, 0.0) + seconds

    def _truncated(self, task: str) -> None:
        self.stats["truncated"][task] = self.stats["truncated"].get(task, 0) + 1

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._tasks = [getattr(r, "task_name", None) or "?" for r in requests]
        t0 = time.perf_counter()
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._count("loglikelihood", len(requests), time.perf_counter() - t0)
            self._tasks = []

    def _task(self, i: int) -> str:
        """The task of the i-th request of the current call (lm-eval's Instance.task_name)."""
        return self._tasks[i] if i < len(self._tasks) else "?"

    def _windows(self, requests: list[tuple[Any, list[int], list[int]]]) -> list[Request]:
        L, out = self.max_length, []
        for i, (_, ctx, cont) in enumerate(requests):
            whole = list(ctx) + list(cont)
            if len(whole) > L + 1 or len(cont) > L:
                self._truncated(self._task(i))
            out.append(Request(whole[-(L + 1) :][:-1], list(cont)[-L:]))
        return out

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        reqs = self._windows(requests)
        bar = tqdm(total=len(reqs), desc="kititans loglikelihood", disable=disable_tqdm, leave=False)
        hook = None
        if self.row_hook is not None:
            row_hook = self.row_hook
            hook = lambda i, window, start, rows: row_hook(self._task(i), window, start, rows)  # noqa: E731
        scored = score(self.source, reqs, hook, bar.update)
        bar.close()
        self.stats["tokens_scored"] += sum(len(r.continuation) for r in reqs)
        out = []
        for (key, _, _), s in zip(requests, scored):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        t0 = time.perf_counter()
        windows, owner, tasks = [], [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            tokens = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
                tasks.append(getattr(req, "task_name", None) or "?")
        self._tasks = tasks
        try:
            scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        finally:
            self._tasks = []
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        self._count("loglikelihood_rolling", len(requests), time.perf_counter() - t0)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        t0 = time.perf_counter()
        eos = self.tok_decode([self.eot_token_id]) or None
        out = []
        for req in tqdm(requests, desc="kititans generate_until", disable=disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if s]
            text = self._generate(context, until, kwargs, getattr(req, "task_name", None) or "?")
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        self._count("generate_until", len(requests), time.perf_counter() - t0)
        return out

    def _generate(self, context: str, until: list[str], kwargs: dict[str, Any], task: str) -> str:
        from kititans.generate import Generation, SamplingConfig

        n_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        room = self.max_length - n_new
        if room < 1:
            raise KititansError(
                f"a task asks for {n_new} generated tokens, which leaves no room for a prompt in this "
                f"model's context of {self.max_length} tokens: lower max_gen_toks (--gen-kwargs)"
            )
        ids = self.tok_encode(context)
        if len(ids) > room:
            ids = ids[-room:]
            self._truncated(task)
        sampling = SamplingConfig(temperature=0.0, max_tokens=n_new)
        if kwargs.get("do_sample"):
            sampling = SamplingConfig(
                temperature=float(kwargs.get("temperature") or 1.0),
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
                seed=kwargs.get("seed"),
                max_tokens=n_new,
            ).check()
        gen, made = Generation(self.rt, ids, sampling, self.codec.stop_ids), []
        text = ""
        for tok in gen:
            made.append(tok)
            text = self.codec.decode(made)
            if any(s in text for s in until):
                break
        return postprocess_generated_text(text, until, None)

    # ------------------------------------------------------------------ chat
    @property
    def tokenizer_name(self) -> str:
        return "kititans-" + Path(self.name).name.replace("/", "_")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.codec.chat_template if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's chat template; without a generation prompt, the last (assistant) message is left
        open so its continuation can be scored (lm-eval's prefill)."""
        from kititans.data.chat import render_text

        template = self.codec.chat_template
        if add_generation_prompt or not chat_history or chat_history[-1]["role"] != "assistant":
            return render_text(template, chat_history, add_generation_prompt=add_generation_prompt)
        return (
            render_text(template, chat_history[:-1], add_generation_prompt=True) + chat_history[-1]["content"]
        )

    def get_model_info(self) -> dict[str, Any]:
        return {
            "kititans_model": self.name,
            "kititans_runtime": self.rt.name,
            "max_length": self.max_length,
            "add_bos_token": self.add_bos_token,
        }
