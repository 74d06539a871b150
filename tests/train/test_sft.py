"""Chat fine-tuning: the loss mask, padding that never leaks across examples, a real SFT of the debug model
that then ends its replies with <|end|>, exact resume with both optimizers, the CLI and the chat REPL."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kititans.checkpoint import load_checkpoint, read_meta
from kititans.data.builtin import generate_chat_examples
from kititans.data.chat import conversation_ids, render_conversation, render_prompt, trim_history
from kititans.data.chatdata import Conversation
from kititans.data.tokenizer import Tokenizer
from kititans.errors import KititansError
from kititans.generate import Generation, SamplingConfig
from kititans.runtimes.pytorch import TorchRuntime
from kititans.train.sft import collate, encode_conversations, sft, sft_config, sft_eval

FAST = [("train.compile", "off"), ("train.dtype", "fp32"), ("train.batch_size", 8)]
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What sound does a cow make?"},
    {"role": "assistant", "content": "A cow says moo."},
    {"role": "user", "content": "And a dog?"},
    {"role": "assistant", "content": "A dog says woof.\nWoof!"},
]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(debug_run, tmp_path_factory) -> Path:
    """A copy of the session's pretrained debug run (the fixture's own directory is never written)."""
    dst = tmp_path_factory.mktemp("sft") / "base"
    shutil.copytree(debug_run, dst, ignore=shutil.ignore_patterns("data", "train_state"))
    return dst


@pytest.fixture(scope="module")
def tuned(base, debug_run):
    """SFT of the debug model on built-in chat examples (about 20 s of CPU)."""
    before = tree_digest(base), tree_digest(debug_run)
    layers = [*FAST, ("train.steps", 120), ("train.eval_every", 60), ("sft.builtin_examples", 2000)]
    cfg = sft_config(base, layers)
    result = sft(cfg, progress=False)
    assert (tree_digest(base), tree_digest(debug_run)) == before  # the base is untouched, byte for byte
    return cfg, result


def test_loss_mask_covers_exactly_the_assistant_turns(debug_run):
    tok = Tokenizer.load(debug_run)
    ids, mask = render_conversation(tok, MULTI_TURN)
    assert ids[0] == tok.bos_id and len(ids) == len(mask)
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans, cur = [*spans, cur], []
    assert len(spans) == 2 and not cur
    for span, msg in zip(spans, [MULTI_TURN[2], MULTI_TURN[4]]):
        assert span[-1] == tok.end_id and tok.end_id not in span[:-1]
        assert tok.decode(span[:-1]) == msg["content"]
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "cow make" in unmasked and "moo" not in unmasked and "<|assistant|>" in unmasked
    # the batch shifts by one: the mask marks the targets, never the inputs
    x, y, m = collate([(torch.tensor(ids), torch.tensor(mask, dtype=torch.bool))], tok.pad_id, 256)
    n = len(ids) - 1
    assert x.shape[1] % 8 == 0 and x[0, :n].tolist() == ids[:-1] and y[0, :n].tolist() == ids[1:]
    assert y[0][m[0]].tolist() == [i for i, k in zip(ids[1:], mask[1:]) if k]
    assert not m[0, n:].any() and (x[0, n:] == tok.pad_id).all()


def test_a_short_run_gets_a_warmup_it_finishes(debug_run):
    """SFT's default warmup (20) shrinks to half of a shorter run; a warmup the user sets is kept (and then
    refused by the schedule if the run never finishes it)."""
    assert sft_config(debug_run, [("train.steps", 3)]).optim.warmup_steps == 1
    assert sft_config(debug_run, [("train.steps", 600)]).optim.warmup_steps == 20
    cfg = sft_config(debug_run, [("train.steps", 3), ("optim.warmup_steps", 5)])
    assert cfg.optim.warmup_steps == 5


def test_overlong_conversations_are_truncated_or_skipped_and_counted(debug_run):
    tok = Tokenizer.load(debug_run)
    convs = [Conversation(MULTI_TURN, "a"), Conversation(MULTI_TURN[1:3], "b")]
    full = render_conversation(tok, MULTI_TURN)[0]
    short = len(render_conversation(tok, MULTI_TURN[1:3])[0])
    exs, st = encode_conversations(tok, convs, len(full) - 3)
    assert (st.truncated, st.skipped, st.conversations) == (1, 0, 2)
    assert exs[0][0].tolist() == full[: len(full) - 3]  # the start is kept
    exs, st = encode_conversations(tok, convs, len(full) - 3, overlong="skip")
    assert (st.truncated, st.skipped, len(exs)) == (0, 1, 1) and len(exs[0][0]) == short
    _, st = encode_conversations(tok, convs, 12)  # no assistant token left in the kept start
    assert st.skipped >= 1


def test_right_padding_never_changes_an_example(debug_run):
    ckpt = load_checkpoint(debug_run)
    tok = ckpt.tokenizer
    short = [MULTI_TURN[1], MULTI_TURN[2]]
    exs = [
        tuple(
            torch.tensor(v, dtype=dt) for v, dt in zip(render_conversation(tok, c), (torch.long, torch.bool))
        )
        for c in (short, MULTI_TURN)
    ]
    x, _, _ = collate(exs, tok.pad_id, 256)
    with torch.no_grad():
        batched = ckpt.model(x)
        alone = ckpt.model(exs[0][0][:-1][None])
    n = len(exs[0][0]) - 1
    assert x.shape[1] > n  # the short example really is padded
    torch.testing.assert_close(batched[0, :n], alone[0], rtol=1e-4, atol=1e-4)


def test_sft_run_learns_the_format_and_records_its_origin(tuned, base):
    cfg, r = tuned
    out = Path(cfg.out)
    assert out == base.with_name("base-sft") and r.step == 120
    rows = [m for m in metrics(out) if "val_loss" in m]
    assert [m["step"] for m in rows] == [0, 60, 120]
    before, after = rows[0]["val_loss"], rows[-1]["val_loss"]
    assert r.extra["initial_val_loss"] == pytest.approx(before, abs=1e-5)
    assert after < 0.5 * before, (before, after)
    meta = read_meta(out)
    assert (
        meta["stage"] == "sft" and meta["base_run"]["path"] == str(base) and meta["base_run"]["step"] == 200
    )
    data = meta["sft_data"]
    assert list(data["sources"]) == ["builtin-chat:v1:seed0:n2000"] and data["val_conversations"] > 10
    assert meta["run"]["sft"]["base"] == str(base) and meta["run"]["optim"]["lr"] == 1e-3
    # measuring the base on the same val split gives the step-0 number; the tuned model gives the last one
    assert sft_eval(cfg, base).val_loss == pytest.approx(before, abs=1e-4)
    assert sft_eval(cfg, out).val_loss == pytest.approx(after, abs=1e-4)


def test_held_out_replies_end_with_the_end_token(tuned):
    cfg, _ = tuned
    rt = TorchRuntime(Path(cfg.out))
    tok = rt.codec
    ended, reasons = 0, []
    for conv in generate_chat_examples(seed=12345, n=20):  # another seed than training
        prompt = render_prompt(tok, conv[:-1])
        budget = rt.context_length - len(prompt) - 1
        gen = Generation(rt, prompt, SamplingConfig(temperature=0, max_tokens=budget), tok.stop_ids)
        list(gen)
        ended += gen.tokens[-1] == tok.end_id
        reasons.append(gen.stats.finish_reason)
    assert ended >= 19, reasons
    assert "length" not in reasons and "context" not in reasons


# Muon's exact resume stays in the default run through Titans (tests/models/test_titans_train.py, muon-mag)
@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=pytest.mark.slow)])
def test_resume_is_exact_with_both_optimizers(base, tmp_path, optimizer):
    layers = [
        *FAST,
        ("train.batch_size", 4),
        ("train.steps", 6),
        ("train.save_every", 3),
        ("train.eval_every", 3),
        ("train.log_every", 1),
        ("sft.builtin_examples", 300),
        ("optim.name", optimizer),
        ("optim.warmup_steps", 2),
    ]
    whole = sft(sft_config(base, [*layers, ("out", str(tmp_path / "whole"))]), progress=False)

    def crash(step, loss):
        if step == 4:
            raise RuntimeError("simulated crash")

    cut = sft_config(base, [*layers, ("out", str(tmp_path / "cut"))])
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft(cut, progress=False, on_step=crash)
    with pytest.raises(KititansError, match="already holds a run"):
        sft(cut, progress=False)
    resumed = sft(cut, resume=True, progress=False)
    assert resumed.step == whole.step == 6
    losses = [
        [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics(tmp_path / d)]
        for d in ("whole", "cut")
    ]
    assert losses[0] == losses[1] and losses[0][0] == (0, None, losses[0][0][2])
    assert resumed.val_loss == whole.val_loss < whole.extra["initial_val_loss"]
    assert resumed.extra["initial_val_loss"] == pytest.approx(whole.extra["initial_val_loss"], abs=1e-5)


def test_sft_refuses_to_write_into_the_base(base):
    with pytest.raises(KititansError, match="is the base run"):
        sft(sft_config(base, [("out", str(base))]), progress=False)


def kititans(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "kititans", *args], capture_output=True, text=True, input=input, timeout=300
    )


def test_cli_sft_with_a_data_file_and_errors(base, tmp_path):
    data = tmp_path / "chats.jsonl"
    convs = generate_chat_examples(seed=3, n=40)
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = tmp_path / "cli-sft"
    r = kititans(
        "sft",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "3",
        "--compile",
        "off",
        "-q",
        "--set",
        "optim.warmup_steps=1",
    )
    assert r.returncode == 0, r.stderr
    assert "val loss on assistant tokens:" in r.stdout and "before SFT ->" in r.stdout
    assert read_meta(out)["sft_data"]["sources"] == {
        str(data): hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        data.read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n'
    )
    r = kititans("sft", str(base), "--data", str(bad), "--out", str(tmp_path / "never"))
    lines = r.stderr.strip().splitlines()
    assert (
        r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: unknown role 'robot'")
    )
    assert not (tmp_path / "never").exists()
    r = kititans("sft", str(base), "--data", str(data), "--eval-only", "-q")
    step0 = next(m["val_loss"] for m in metrics(out) if m["step"] == 0)
    printed = re.search(r"val loss on assistant tokens ([\d.]+)", r.stdout)
    assert r.returncode == 0 and printed, r.stdout + r.stderr
    assert float(printed.group(1)) == pytest.approx(step0, abs=2e-4)


def test_trim_history_drops_oldest_turns_and_keeps_the_system(debug_run):
    tok = Tokenizer.load(debug_run)
    msgs = [MULTI_TURN[0]]
    for i in range(12):
        msgs += [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    msgs.append({"role": "user", "content": "Last question?"})
    kept, ids = trim_history(tok, msgs, 80)
    assert len(ids) <= 80 and kept[0] == msgs[0] and kept[-1] == msgs[-1]
    assert kept[1]["role"] == "user" and 1 < len(kept) < len(msgs)
    assert ids == render_prompt(tok, kept)
    assert (
        len(render_prompt(tok, [msgs[0], *msgs[len(msgs) - len(kept) - 1 :]])) > 80
    )  # one more would not fit


def test_chat_repl_uses_the_template_system_prompt_and_trims(tuned, monkeypatch, capsys):
    import kititans.generate
    from kititans.cli import main

    cfg, _ = tuned
    prompts: list[list[int]] = []

    class Recording(kititans.generate.Generation):
        def __init__(self, rt, prompt_ids, *args, **kw):
            prompts.append(list(prompt_ids))
            super().__init__(rt, prompt_ids, *args, **kw)

    monkeypatch.setattr(kititans.generate, "Generation", Recording)
    convs = generate_chat_examples(seed=7, n=12)
    questions = [c[-2]["content"] for c in convs if "\n" not in c[-2]["content"]]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n/quit\n"))
    system = {"role": "system", "content": "You are a helpful assistant."}
    args = ["chat", cfg.out, "--system", system["content"], "--temperature", "0", "--max-tokens", "100"]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0 and out.count("> ") == len(questions) == len(prompts)
    assert "history trimmed to fit the context" in err  # 12 turns overflow the debug model's 256 tokens
    assert "<|" not in out  # chat tokens end turns; they are never printed
    tok = Tokenizer.load(cfg.out)
    assert prompts[0] == render_prompt(tok, [system, {"role": "user", "content": questions[0]}])
    head = conversation_ids(tok, [system])  # BOS + the system turn, without the generation prompt
    tail = render_prompt(tok, [{"role": "user", "content": questions[-1]}])[1:]  # the last turn, no BOS
    assert prompts[-1][: len(head)] == head and prompts[-1][-len(tail) :] == tail
    assert all(len(p) <= 256 - 100 for p in prompts)
