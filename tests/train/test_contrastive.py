"""The sentence encoder: the model, its pairs, contrastive training, evaluation, --init, the ecosystem
(transformers remote code, sentence-transformers) and the embed/search verbs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kititans.cli import main
from kititans.data.pairs import PairStore, build_pairs, spans
from kititans.errors import KititansError
from kititans.models.spec import get_family
from kititans.train.contrastive import PairBatches, info_nce, info_nce_sum, retrieval_metrics
from tests.conftest import enc_config


@pytest.fixture(scope="module")
def enc_run(encoder_run):
    return encoder_run


def test_bidirectional_and_padding_invariant():
    spec = get_family("encoder")
    torch.manual_seed(0)
    m = spec.build(spec.make_config("encoder-debug")).eval()
    x = torch.randint(4, 500, (2, 12))
    with torch.no_grad():
        full = m.hidden_states(x)
        x2 = x.clone()
        x2[:, -1] = 7  # changing the LAST token changes the FIRST position: attention is bidirectional
        assert not torch.allclose(m.hidden_states(x2)[:, 0], full[:, 0])
        padded = torch.cat([x, torch.full((2, 5), 3)], dim=1)
        mask = torch.cat([torch.ones(2, 12), torch.zeros(2, 5)], dim=1).long()
        e1, e2 = m(x), m(padded, mask)
    assert torch.allclose(e1, e2, atol=1e-5)  # padding is invisible
    assert torch.allclose(e1.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_info_nce_and_metrics_are_what_they_say():
    q = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert info_nce(q, q, None, 0.05) < info_nce(q, q.roll(1, 0), None, 0.05)
    m = retrieval_metrics(q, q, 0.05)
    assert m["retrieval_at1"] == 1.0 == m["mrr"] and m["mean_margin"] > 0
    m = retrieval_metrics(q, q.roll(1, 0), 0.05)  # every positive is someone else's: rank > 1 for all
    assert m["retrieval_at1"] == 0.0 and m["mrr"] < 1.0 and m["mean_margin"] < 0


def test_false_negatives_are_masked():
    """Two pairs that share a positive text: neither positive is a negative of the other's query (and a query
    repeated in the batch is no negative of the positive -> query direction)."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    p = torch.nn.functional.normalize(q + 0.1 * torch.randn(4, 8), dim=-1)  # each positive near its query
    p[2] = p[1]  # pairs 1 and 2: the same positive text
    q[3] = q[0]  # pairs 0 and 3: the same query text
    hashes = torch.tensor([[10, 20], [11, 21], [12, 21], [10, 23]])
    got = info_nce_sum(q, p, None, 0.05, hashes=hashes)
    s_q, s_p = q @ p.T / 0.05, p @ q.T / 0.05
    ref = 0.0
    for i in range(4):
        keep_q = [j for j in range(4) if j == i or hashes[j, 1] != hashes[i, 1]]
        keep_p = [j for j in range(4) if j == i or hashes[j, 0] != hashes[i, 0]]
        ref += float(torch.logsumexp(s_q[i, keep_q], 0) - s_q[i, i]) / 2
        ref += float(torch.logsumexp(s_p[i, keep_p], 0) - s_p[i, i]) / 2
    assert abs(float(got) - ref) <= 1e-5 * ref
    assert float(info_nce_sum(q, p, None, 0.05)) > float(got) + 0.5  # unmasked: duplicates count as negatives


class _Store:
    """A pair store of n pairs whose token ids say which pair they are."""

    columns = ("query", "positive")

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get(self, column: str, i: int) -> np.ndarray:
        return np.array([i + 4, 1 + (column == "positive")])


def test_no_pair_twice_in_a_global_batch_and_too_big_a_batch_is_refused():
    batches = PairBatches(_Store(30), batch_size=4, seed=0, pad_id=0)
    for step in range(12):  # 3 steps of 2 x 4 pairs per epoch (6 left over, different every epoch)
        ids = [int(i) - 4 for k in range(2) for i in batches(step, k, 2)[0][:, 0]]
        assert len(set(ids)) == 8, (step, ids)
    with pytest.raises(KititansError, match="exceeds the 30 training pairs"):
        PairBatches(_Store(30), batch_size=8, seed=0, pad_id=0)(0, 0, 4)


def test_pairs_from_every_source(tmp_path, tokenizer_dir):
    from kititans.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    f = tmp_path / "mix.jsonl"
    rows = [
        {"query": f"what is {i}", "positive": f"it is number {i} here", "negative": "no"} for i in range(30)
    ]
    rows += [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(30)]  # fmt: skip
    rows += [{"text": "Once upon a time there was a small red fox who lived near a big river. " * 4}] * 3
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = build_pairs([str(f)], tok, tmp_path / "pairs", max_len=32, val_fraction=0.2)
    assert (m["labelled"], m["spans"]) == (60, 3) and m["train"] + m["val"] == 63 and not m["has_negatives"]
    store = PairStore(tmp_path / "pairs", "train")
    assert all(store.get(c, 0)[0] == tok.bos_id for c in store.columns) and len(store.get("query", 0)) <= 32
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "only a query"}) + "\n")
    with pytest.raises(KititansError, match=r"bad.jsonl:1: a pair needs text fields 'query' and 'positive'"):
        build_pairs([str(bad)], tok, tmp_path / "p2", max_len=32, val_fraction=0.2)
    a, b = spans(list(range(100)), "doc", 20)
    assert not set(a) & set(b) and 8 <= len(a) == len(b) <= 20


def test_training_learns_to_retrieve_and_reports(enc_run):
    out, result = enc_run
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_retrieval_at1" in r]
    assert vals[0]["step"] == 0 and vals[-1]["val_mrr"] > vals[0]["val_mrr"]
    report = json.loads((out / "eval_report.json").read_text())
    assert set(report["metrics"]) >= {"retrieval_at1", "mrr", "mean_margin", "recall_at5"}
    assert report["thresholds"] == {"retrieval_at1": 0.7, "mrr": 0.5, "mean_margin": 0.05}
    assert result.extra["eval_report"]["metrics"]["mrr"] == report["metrics"]["mrr"]


def test_resume_is_exact(enc_run, tmp_path):
    from kititans.train.contrastive import train_encoder

    out, _ = enc_run
    cut = tmp_path / "cut"
    train_encoder(enc_config(cut, **{"train.steps": 20}), progress=False)
    cfg = enc_config(cut)
    train_encoder(cfg, resume=True, progress=False)
    loss = lambda run: [json.loads(ln).get("loss") for ln in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [x for x in loss(cut) if x][:2] == [x for x in loss(out) if x][:2]


def test_init_from_a_lite_run_and_refusals(debug_run, tmp_path):
    from kititans.train.contrastive import train_encoder

    cfg = enc_config(
        tmp_path / "init", **{"init": str(debug_run), "train.steps": 2, "preset": "encoder-debug"}
    )
    train_encoder(cfg, progress=False)
    from kititans.checkpoint import load_checkpoint

    enc, lite = load_checkpoint(tmp_path / "init"), load_checkpoint(debug_run)
    assert enc.config.dim == lite.config.dim and enc.tokenizer.vocab_size == lite.tokenizer.vocab_size
    titans = tmp_path / "titans-run"  # only its config is read before the refusal
    titans.mkdir()
    (titans / "config.json").write_text(json.dumps({"kititans": {"family": "titans", "model": {}}}))
    with pytest.raises(KititansError, match="a titans run; a encoder run starts from a lite or encoder run"):
        train_encoder(enc_config(tmp_path / "t", **{"init": str(titans)}), progress=False)


def test_transformers_and_sentence_transformers_load_the_run(enc_run):
    st = pytest.importorskip("sentence_transformers")
    out, _ = enc_run
    from kititans.embedding import embed_texts
    from kititans.runtimes import load_runtime

    texts = ["Lily had a red ball.", "What is the opposite of hot?", "The dog ran in the big green park."]
    ours = embed_texts(load_runtime(out), texts)
    model = st.SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    theirs = model.encode(texts)
    cos = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.9999, cos


def test_embed_and_search_commands(enc_run, debug_run, tmp_path, capsys):
    out, _ = enc_run
    assert main(["embed", str(out), "--text", "a red ball", "--text", "a cat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and abs(np.linalg.norm(json.loads(lines[0])) - 1) < 1e-4
    (tmp_path / "q.txt").write_text("one\ntwo\nthree\n")
    assert main(["embed", str(out), "--file", str(tmp_path / "q.txt"), "--out", str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy", allow_pickle=False).shape == (3, 128)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, t in enumerate(
        ["The fox ran by the river.", "Bread is baked in an oven.", "Rain falls from clouds."]
    ):
        (docs / f"{i}.txt").write_text(t)
    assert main(["search", str(out), "--docs", str(docs), "--query", "baking bread", "--top", "2"]) == 0
    assert capsys.readouterr().out.count("docs/") == 2
    assert main(["chat", str(out)]) == 2 and "use `kititans embed`" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "x"]) == 2
    assert (
        main(["embed", str(debug_run), "--text", "x"]) == 2
        and "is a language model" in capsys.readouterr().err
    )
    (tmp_path / "empty").mkdir()
    assert main(["search", str(out), "--docs", str(tmp_path / "empty"), "--query", "x"]) == 2
