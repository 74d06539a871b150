"""Decode tokens/s with the KV cache: KiTitans' torch runtime (+ the shared sampler) vs transformers
`generate` on the same weights, greedy, EOS disabled, interleaved trials in one run.   target >= 1.5x

usage: python benchmarks/decode_speed.py [--models tiny,lite-42m] [--prompt 32] [--gen 128] [--trials 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from benchmarks.common import interleaved, machine, md_table, median, write_json
from kititans.generate import Generation, SamplingConfig
from kititans.models.lite import SPEC, LiteModel
from kititans.models.spec import count_params


def save_run(preset: str, out: str):
    """A run directory with random weights and a byte-level tokenizer stand-in is not needed: the
    runtime is loaded from a real checkpoint written by save_checkpoint with a trained tokenizer."""
    from kititans.checkpoint import save_checkpoint
    from kititans.data.builtin import generate_corpus
    from kititans.data.tokenizer import train_tokenizer

    cfg = SPEC.make_config(preset)
    vocab = min(cfg.vocab_size, 4096)  # the built-in corpus supports ~4k pieces; pad the model vocab
    tok = train_tokenizer(generate_corpus(0, 2_000_000), out, vocab)
    torch.manual_seed(0)
    model = LiteModel(SPEC.make_config(preset, {"vocab_size": tok.vocab_size}))
    save_checkpoint(out, model, SPEC, model.config, tok)
    return tok


def bench_one(preset: str, args: argparse.Namespace) -> dict:
    from transformers import LlamaForCausalLM

    from kititans.runtimes import load_runtime

    with tempfile.TemporaryDirectory() as d:
        save_run(preset, d)
        rt = load_runtime(d)
        hf = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
        prompt = torch.randint(5, rt.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        greedy = SamplingConfig(temperature=0, max_tokens=args.gen)

        def ours() -> None:
            gen = Generation(rt, prompt[0].tolist(), greedy, stop_ids=())  # EOS disabled
            assert len(list(gen)) == args.gen

        @torch.inference_mode()
        def theirs() -> None:
            out = hf.generate(
                prompt,
                max_new_tokens=args.gen,
                min_new_tokens=args.gen,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            assert out.shape[1] == args.prompt + args.gen

        times = interleaved({"kititans": ours, "transformers": theirs}, repeats=args.trials, warmup=1)
        t_ours, t_hf = median(times["kititans"]), median(times["transformers"])
        return {
            "model": preset,
            "params": f"{count_params(rt.model) / 1e6:.1f}M",
            "kititans tok/s": round(args.gen / t_ours, 1),
            "transformers tok/s": round(args.gen / t_hf, 1),
            "ratio": round(t_hf / t_ours, 2),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,lite-42m")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", default="bench_out/decode_speed.json")
    args = ap.parse_args()
    rows = []
    for preset in args.models.split(","):
        rows.append(bench_one(preset, args))
        print(md_table(rows[-1:], list(rows[-1])), flush=True)
    print(md_table(rows, list(rows[0])))
    write_json(args.out, {"machine": machine(), "prompt": args.prompt, "gen": args.gen, "rows": rows})


if __name__ == "__main__":
    main()
