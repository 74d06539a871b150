"""`kititans distill score` against a minimal vLLM-shaped endpoint (prompt_logprobs computed by the real teacher
run) and against `kititans serve`; the stored top-k equals the teacher's own; training on the scores; a scores
folder of another tokenizer refused; an endpoint without prompt log-probs refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from kititans.checkpoint import load_checkpoint
from kititans.cli import main
from kititans.data.builtin import generate_chat_examples
from kititans.data.chat import render_conversation
from kititans.distill.scores import TeacherScores


class VllmShaped:
    """POST /v1/completions with token-id prompts and `prompt_logprobs`: vLLM's answer shape, the numbers from
    the teacher run itself (each position: its top k plus the prompt token, first position None)."""

    def __init__(self, run: Path):
        self.model = load_checkpoint(run).model.eval()
        shaped = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": run.name}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                k = body.get("prompt_logprobs")
                if not k:
                    self._send(400, {"error": {"message": "only prompt_logprobs here"}})
                    return
                ids = body["prompt"]
                with torch.no_grad():
                    lp = torch.log_softmax(shaped.model(torch.tensor([ids]))[0].float(), -1)  # (L, V)
                rows: list = [None]
                for i in range(1, len(ids)):
                    top = lp[i - 1].topk(k)
                    row = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": "?"}
                           for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()))}  # fmt: skip
                    row.setdefault(str(ids[i]), {"logprob": lp[i - 1, ids[i]].item(), "rank": 99})
                    rows.append(row)
                choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
                          "prompt_logprobs": rows}  # fmt: skip
                self._send(200, {"id": "c", "object": "text_completion", "choices": [choice]})

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("score") / "chats.jsonl"
    p.write_text("".join(json.dumps({"messages": c}) + "\n" for c in generate_chat_examples(3, 12)))
    return p


@pytest.fixture(scope="module")
def scored(teacher_run, chats, tmp_path_factory) -> Path:
    server = VllmShaped(teacher_run)
    out = tmp_path_factory.mktemp("score") / "scored"
    args = ["distill", "score", str(chats), "--teacher", server.url, "--tokenizer", str(teacher_run),
            "--top-k", "5", "--shard-records", "5", "--out", str(out), "-q"]  # fmt: skip
    try:
        assert main(args) == 0
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(args) == 0  # resumed: nothing left to score
        assert "(0 new" in printed.getvalue()
    finally:
        server.httpd.shutdown()
    return out


def test_scores_hold_the_teachers_top_k(scored, teacher_run):
    m = json.loads((scored / "manifest.json").read_text())
    assert (
        m["protocol"] == "vllm"
        and m["records_done"] == 12
        and [s["records"] for s in m["shards"]] == [5, 5, 2]
    )
    s = TeacherScores(scored)
    ckpt = load_checkpoint(teacher_run)
    conv = generate_chat_examples(3, 12)[7]
    ids, mask = render_conversation(ckpt.tokenizer, conv)
    got_ids, got_mask, tk, lp, rest = s.record(7)
    assert got_ids.tolist() == ids and got_mask.tolist() == [bool(x) for x in mask]
    with torch.no_grad():
        ref = torch.log_softmax(ckpt.model(torch.tensor([ids]))[0].float(), -1)[:-1].topk(5)
    assert torch.equal(tk[1:], ref.indices) and torch.allclose(lp[1:], ref.values, atol=2e-3)
    mass = lp[1:].exp().sum(-1) + rest[1:].exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-3)


def test_train_on_scores_and_refuse_another_tokenizer(scored, teacher_run, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(teacher_run, student, ignore=shutil.ignore_patterns("train_state", "checkpoints"))
    fast = ["--set=train.compile=off", "--set=train.dtype=fp32", "--set=train.batch_size=4",
            "--set=train.eval_every=3", "--set=train.report=false", "--set=sft.val_fraction=0.2"]  # fmt: skip
    assert main(["distill", str(student), "--teacher-scores", str(scored), "--steps", "3", "-q", *fast]) == 0
    rows = [json.loads(x) for x in (tmp_path / "student-distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [3] and rows[-1]["val_loss"] > 0
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((student / "tokenizer.model").read_bytes())
    proto.pieces[20].score += 1.0
    (student / "tokenizer.model").write_bytes(proto.SerializeToString())
    capsys.readouterr()
    rc = main(["distill", str(student), "--teacher-scores", str(scored), "--out", str(tmp_path / "x"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "scored with another tokenizer" in err


def test_score_against_kititans_serve(teacher_url, teacher_run, chats, scored, tmp_path, capsys):
    """`kititans serve` answers echo + top_logprobs with tokens named by id (vLLM's return_tokens_as_token_ids),
    so every top-k entry maps to its id and the scores equal the model's own log-probabilities."""
    out = tmp_path / "s"
    rc = main(["distill", "score", str(chats), "--teacher", teacher_url, "--tokenizer", str(teacher_run),
               "--top-k", "5", "--retries", "0", "--out", str(out), "-q"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 0, err
    a, b = TeacherScores(out), TeacherScores(scored)
    assert a.manifest["protocol"] == "echo" and len(a) == len(b)
    model = load_checkpoint(teacher_run).model
    for i in (0, 5):
        ids, _, tk, lp, _ = a.record(i)
        assert torch.equal(ids, b.record(i)[0])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids[None])[0].float(), -1)[:-1]  # (L-1, V): row j+1 of the scores
        mapped = tk[1:] >= 0
        assert bool(mapped.all())  # token_id:N names: no ambiguous text left to the rest mass
        assert torch.allclose(lp[1:][mapped], ref.gather(1, tk[1:].clamp(min=0))[mapped], atol=2e-3)
