"""Retrieval on documents the encoder never saw: the document-grouped split, passages, BM25 beside the encoder,
fusion, the saved index (built, extended, verified, searched by a torch-free runtime) and the verbs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kititans.cli import main
from kititans.errors import KititansError
from kititans.retrieval.fusion import Fusion, doc_scores, fusion_choice, ranks, saved_fusion
from kititans.retrieval.lexical import LexicalIndex, detect_analyzer, terms
from kititans.retrieval.metrics import scores_report
from kititans.retrieval.passages import check_passages, split_ids, windows

TOPICS = ["fox river", "bread oven", "rain clouds", "ship harbour", "violin music", "garden roses",
          "train station", "snow mountain", "coffee beans", "chess board", "moon tides", "bees honey"]  # fmt: skip


def _pairs(path, n_q=3):
    """Labelled pairs: several questions per document (each document about one topic)."""
    rows = []
    for i, t in enumerate(TOPICS):
        a, b = t.split()
        doc = f"This note {i} is about the {a} and the {b}. " + f"The {a} is near the {b} every day. " * 3
        rows += [{"query": f"where is the {a} {k}?", "positive": doc} for k in range(n_q)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_passages_cover_every_token_and_refuse_what_does_not_fit():
    assert windows(5, 8, 6) == [(0, 5)]
    ws = windows(20, 8, 6)
    assert ws[0] == (0, 8) and ws[-1] == (12, 20) and all(b - a == 8 for a, b in ws)
    assert set().union(*(range(a, b) for a, b in ws)) == set(range(20))
    ps = split_ids([list(range(20)), [1, 2]], bos_id=1, passage_tokens=8, stride=6)
    assert ps.owner == [0, 0, 0, 1] and ps.split_docs == 1 and all(r[0] == 1 for r in ps.rows)
    assert ps.cut_share == pytest.approx(12 / 22)
    assert check_passages(127, None, 256) == (127, 95)
    with pytest.raises(KititansError, match="--passage-tokens 256 does not fit the encoder's context of 256"):
        check_passages(256, None, 256)
    with pytest.raises(KititansError, match="--stride must be in 1..8"):
        check_passages(8, 9, 256)


def test_bm25_analyzers_fusion_and_pessimistic_ties():
    assert detect_analyzer(["今日は良い天気です。明日も晴れ。"]) == "chars"
    assert detect_analyzer(["the fox ran by the river"]) == "words"
    assert terms("東京 タワー", "chars") == ["東京", "京タ", "タワ", "ワー"]
    lex = LexicalIndex.build(
        [terms(t, "words") for t in ["the fox runs", "bread in an oven", "a fox and a fox"]], "words"
    )
    s = lex.scores(terms("fox", "words"))
    assert s[1] == 0 and s[2] > s[0] > 0 and not lex.scores(["zebra"]).any()
    assert doc_scores(np.array([[1.0, 3.0, 2.0]]), np.array([0, 0, 1]), 2).tolist() == [[3.0, 2.0]]
    assert ranks(np.array([[0.1, 0.9, 0.5]])).tolist() == [[3, 1, 2]]
    dense, lexical = np.array([[0.9, 0.1, 0.5]]), np.array([[0.0, 5.0, 1.0]])
    assert (
        Fusion("rrf", 0.1)(dense, lexical)[0].argmax() == 0
        and Fusion("rrf", 10.0)(dense, lexical)[0].argmax() == 1
    )
    tied = scores_report(
        np.zeros((2, 3)), np.array([0, 1]), with_margin=False
    )  # matches nothing: last, not first
    assert tied["r_at1"] == 0 and tied["mrr"] == pytest.approx(1 / 3)
    perfect = scores_report(np.eye(3), np.arange(3))
    assert perfect["r_at1"] == perfect["ndcg_at10"] == 1.0 and perfect["margin"] == 1.0


def test_pair_store_split_groups_by_document(tmp_path, encoder_run):
    from kititans.data.pairs import build_pairs, read_heldout
    from kititans.data.tokenizer import Tokenizer

    tok = Tokenizer.load(encoder_run[0])
    rows = _pairs(tmp_path / "p.jsonl")
    m = build_pairs([str(tmp_path / "p.jsonl")], tok, tmp_path / "pairs", max_len=16, val_fraction=0.3)
    queries, gold, docs = read_heldout(tmp_path / "pairs")
    # every question of a held-out document is held out (3 per document), none of them went to training
    assert m["heldout_documents"] == len(docs) >= 1 and len(queries) == m["val"] == 3 * len(docs)
    assert m["train"] == len(rows) - m["val"] and sorted(set(gold)) == list(range(len(docs)))
    assert all(
        rows[[r["query"] for r in rows].index(q)]["positive"] == docs[g] for q, g in zip(queries, gold)
    )
    assert (
        m["split_positives"] == len(rows) and 0 < m["cut_share_without_passages"] < 1
    )  # 16 tokens: passages
    one = tmp_path / "one.jsonl"
    one.write_text(
        "".join(json.dumps({"query": f"q{i}", "positive": "the only document"}) + "\n" for i in range(9))
    )
    with pytest.raises(KititansError, match="too few pairs in a split .* grouped by positive document"):
        build_pairs([str(one)], tok, tmp_path / "p1", max_len=16, val_fraction=0.3)
    assert not (tmp_path / "p1").exists()


def test_training_reports_documents_beside_pairs(encoder_run):
    out, _ = encoder_run
    report = json.loads((out / "eval_report.json").read_text())
    docs = report["documents"]
    assert "mrr" in report["metrics"] and docs["split_rule"].startswith("by positive document")
    assert docs["candidates"] == docs["heldout_documents"] >= 2 and docs["passages"] >= docs["candidates"]
    for mode in ("lexical", "dense", "hybrid"):
        assert 0 < docs[mode]["mrr"] <= 1 and {"r_at1", "r_at5", "ndcg_at10"} <= set(docs[mode])


def test_eval_retrieval_on_any_artifact(encoder_run, tmp_path, capsys):
    out, _ = encoder_run
    _pairs(tmp_path / "p.jsonl")
    code = main(["eval-retrieval", str(out), "--pairs", str(tmp_path / "p.jsonl"), "--split", "all",
                 "--out", str(tmp_path / "r.json")])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "36 held-out queries over 12 candidate documents" in text
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["lexical"]["r_at1"] > 0.9 and rep["analyzer"] == "words" and "margin" in rep["dense"]
    one = tmp_path / "one.jsonl"
    one.write_text(
        "".join(json.dumps({"query": f"q{i}", "positive": "the only document"}) + "\n" for i in range(5))
    )
    assert main(["eval-retrieval", str(out), "--pairs", str(one), "--val-fraction", "0.3"]) == 2
    assert "documents land in the training split" in capsys.readouterr().err
    assert (
        main(["eval-retrieval", str(out), "--pairs", str(one), "--passage-tokens", "500", "--split", "all"])
        == 2
    )
    assert "does not fit the encoder's context of 128" in capsys.readouterr().err


def _docs(folder, texts):
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i}.txt").write_text(t)
    return folder


def test_convex_fusion_breaks_bm25_ties_without_overturning_it():
    # BM25 is sure of doc 1 (10 against 4) and torn between 2 and 3; the encoder, weak, prefers 3 and puts 1 last
    lexical = np.array([[1.0, 10.0, 4.0, 4.0]])
    dense = np.array([[0.3, 0.1, 0.2, 0.9]])
    rank = lambda s: np.argsort(-s[0], kind="stable").tolist()  # noqa: E731
    assert rank(Fusion("convex", 0.1)(dense, lexical)) == [1, 3, 2, 0]  # BM25's order; the tie goes to 3
    assert rank(Fusion("convex", 0.0)(dense, lexical)) == rank(lexical)  # share 0 = BM25 alone
    assert rank(Fusion("rrf", 1.0)(dense, lexical))[0] == 3  # a rank has no margin: rrf:1 overturns BM25
    assert rank(Fusion("convex", 1.0)(dense, lexical)) == rank(dense)
    flat = Fusion("convex", 0.5)(np.array([[0.3, 0.1]]), np.zeros((1, 2)))  # no term in common: dense decides
    assert flat[0].argmax() == 0 and flat.max() <= 1.0
    assert Fusion.parse("convex:0.1") == Fusion("convex", 0.1) and Fusion.parse("16") == Fusion("rrf", 16.0)
    for f in (Fusion("convex", 0.25), Fusion("rrf", 8.0)):
        assert Fusion.from_json(f.to_json()) == f
    assert saved_fusion({"lexical_weight": 16}) == Fusion("rrf", 16.0)  # a run saved before `fusion`
    assert saved_fusion({}) == Fusion("rrf", 1.0)
    assert fusion_choice(None, 2.0, {"fusion": {"method": "convex", "dense_weight": 0.1}}) == Fusion(
        "rrf", 2.0
    )
    for bad, msg in [("convex:1.5", "share from 0 to 1"), ("rrf:-1", ">= 0"), ("rrf:nan", "finite"),
                     ("mean:1", "one of rrf, convex"), ("convex:x", "method:weight")]:  # fmt: skip
        with pytest.raises(KititansError, match=msg):
            Fusion.parse(bad)
    with pytest.raises(KititansError, match="not both"):
        fusion_choice("convex:0.1", 2.0, {})


def test_fusion_choice_needs_a_gain_larger_than_the_dev_noise():
    from kititans.retrieval.recipe import CANDIDATES, pick_fusion

    rng = np.random.default_rng(0)
    bm25 = rng.choice([1.0, 0.5, 0.2], size=60, p=[0.85, 0.1, 0.05])  # 60 dev queries
    noisy = {f: bm25.copy() for f in CANDIDATES}
    noisy[Fusion("convex", 0.5)] = np.minimum(1.0, bm25 + rng.choice([0, 0.5], size=60, p=[0.93, 0.07]))
    choice, threshold = pick_fusion(noisy)  # +0.03 MRR on 60 queries: within one standard error
    assert choice == Fusion("convex", 0.0) and threshold < bm25.mean()
    clear = {f: np.full(2000, 0.5) for f in CANDIDATES}
    clear[Fusion("convex", 0.3)] = np.full(2000, 0.9)  # every query better: far beyond the noise
    assert pick_fusion(clear)[0] == Fusion("convex", 0.3)


def test_index_build_add_search_and_refusals(encoder_run, tmp_path, capsys):
    out, _ = encoder_run
    a = _docs(tmp_path / "a", ["The fox ran by the river all day.", "Bread is baked in a hot oven.",
                               "Rain falls from grey clouds. " * 30])  # fmt: skip
    b = _docs(tmp_path / "b", ["The ship sailed into the harbour at night."])
    idx = tmp_path / "idx"
    assert main(["index", str(a), "--model", str(out), "--out", str(idx), "--passage-tokens", "32"]) == 0
    assert "were split" in capsys.readouterr().out
    assert main(["index", str(b), "--model", str(out), "--out", str(idx), "--add"]) == 0
    m = json.loads((idx / "manifest.json").read_text())
    assert m["documents"] == 4 and m["passages"]["tokens"] == 32 and m["added"]["documents"] == 1
    assert m["fusion"] == {"method": "rrf", "k": 60, "lexical_weight": 1.0}  # --add keeps the index's fusion
    assert main(["search", str(out), "--index", str(idx), "--query", "x", "--fusion", "convex:0.2",
                 "--lexical-weight", "2"]) == 2  # fmt: skip
    assert "not both" in capsys.readouterr().err
    assert main(["search", str(out), "--index", str(idx), "--query", "x", "--fusion", "convex:3"]) == 2
    assert "share from 0 to 1" in capsys.readouterr().err
    assert np.load(idx / "vectors.npy").shape == (m["passage_count"], 128)
    for mode in ("dense", "lexical", "hybrid"):  # BM25 weighs 5x in the fusion: an untrained encoder is noise
        query = ["--query", "harbour ship", "--mode", mode, "--lexical-weight", "5"]
        assert main(["search", str(out), "--index", str(idx), *query]) == 0
        got = capsys.readouterr().out
        assert "were split into passages" in got
        if mode != "dense":
            assert got.splitlines()[2].split()[2].endswith("b/0.txt")  # the top hit shares the query's words
    assert main(["index", str(b), "--model", str(out), "--out", str(idx)]) == 2  # no silent overwrite
    assert "already holds an index" in capsys.readouterr().err
    assert (
        main(["index", str(_docs(tmp_path / "e", [])), "--model", str(out), "--out", str(tmp_path / "i2")])
        == 2
    )
    assert not (tmp_path / "i2").exists()
    assert (
        main(["index", str(a), "--model", str(out), "--out", str(tmp_path / "i3"), "--passage-tokens", "128"])
        == 2
    )
    assert "does not fit the encoder's context of 128" in capsys.readouterr().err
    # another encoder: different probe vectors; another tokenizer: different pieces
    other = json.loads((idx / "manifest.json").read_text())
    other["encoder"]["probe_vectors"] = (-np.asarray(other["encoder"]["probe_vectors"])).tolist()
    (idx / "manifest.json").write_text(json.dumps(other))
    assert main(["search", str(out), "--index", str(idx), "--query", "x"]) == 2
    assert "built with another encoder" in capsys.readouterr().err
    other["encoder"]["tokenizer"] = "0" * 16
    (idx / "manifest.json").write_text(json.dumps(other))
    assert main(["search", str(out), "--index", str(idx), "--query", "x"]) == 2
    assert "built with another tokenizer" in capsys.readouterr().err
    with open(idx / "vectors.npy", "r+b") as f:  # one flipped byte
        f.seek(200)
        f.write(b"\xff")
    assert main(["search", str(out), "--index", str(idx), "--query", "x", "--mode", "lexical"]) == 2
    assert "vectors.npy is missing or corrupted" in capsys.readouterr().err
    assert main(["search", str(out), "--index", str(tmp_path), "--query", "x"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_an_onnx_app_searches_the_index_without_torch(encoder_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from kititans.export import ExportOptions, export_model

    out, _ = encoder_run
    res = export_model(out, "onnx", "fp32", options=ExportOptions(progress=False))
    docs = _docs(
        tmp_path / "d", ["The fox ran by the river.", "Bread is baked in an oven.", "Snow on the mountain."]
    )
    assert main(["index", str(docs), "--model", str(out), "--out", str(tmp_path / "idx")]) == 0
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails
from kititans.retrieval.index import load_index
from kititans.retrieval.search import Searcher
from kititans.retrieval.settings import encoder_of
from kititans.runtimes import load_runtime
rt = load_runtime({str(res.path)!r}, "onnx")
s = Searcher(load_index({str(tmp_path / "idx")!r}), encoder_of(rt))  # the probe check passes: same encoder
print(sorted(r.source.rsplit("/", 1)[-1] for r in s.search("bread oven", "hybrid", 3)))
print([r.source.rsplit("/", 1)[-1] for r in s.search("bread oven", "lexical", 3)][0])
print(s.search("snow mountain", "lexical", 1)[0].passage)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    hybrid, first, second = r.stdout.splitlines()[-3:]
    # the debug encoder's dense ranking is noise; the hybrid mode must still search every document
    assert hybrid == "['0.txt', '1.txt', '2.txt']" and first == "1.txt" and second == "Snow on the mountain."


def test_two_stage_recipe_end_to_end(encoder_run, tmp_path, capsys):
    from kititans.retrieval.recipe import RecipeConfig

    out, _ = encoder_run
    rows = _pairs(tmp_path / "p.jsonl", n_q=4)
    rc = RecipeConfig.from_yaml("configs/retriever/tiny.yaml", pairs="x")  # the shipped recipe loads
    assert (rc.preset, rc.stage1_steps, rc.miners) == ("encoder-tiny", 150, "both")
    run = tmp_path / "ret"
    (tmp_path / "r.yaml").write_text("dev_fraction: 0.4\n")  # enough dev documents to tune the fusion on
    code = main(["train-retriever", "--config", str(tmp_path / "r.yaml"), "--pairs", str(tmp_path / "p.jsonl"),
                 "--out", str(run), "--init", str(out),
                 "--preset", "encoder-debug", "--stage1-steps", "3", "--stage2-steps", "3", "--batch-size", "8",
                 "--seq-len", "32", "--val-fraction", "0.3", "--set", "train.compile=off", "-q"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "stage2 hybrid" in text and "pair-level report" in text
    rep = json.loads((run / "retrieval_report.json").read_text())
    mined = [json.loads(ln) for ln in (run / "mined.jsonl").read_text().splitlines()]
    assert all(m["negative"] != m["positive"] for m in mined) and rep["mining"]["pairs_written"] == len(mined)
    held = {rows[i]["positive"] for i in range(len(rows))} - {
        json.loads(ln)["text"] for ln in (run / "stage1_docs.jsonl").read_text().splitlines()
    }
    assert len(held) == rep["split"]["heldout_documents"]  # held-out documents never reach stage 1
    assert not held & {m["negative"] for m in mined}  # nor serve as anybody's negative
    from kititans.retrieval.recipe import CANDIDATES

    saved = json.loads((run / "retrieval.json").read_text())
    assert saved["passage_tokens"] == 31 and saved["fusion"]["method"] in ("rrf", "convex")
    tuned = rep["fusion"]["tuned_on_dev"]["mrr_by_fusion"]  # every candidate tried on the dev documents
    assert set(tuned) == {str(f) for f in CANDIDATES} and set(rep["heldout_fusion_sweep"]) == set(tuned)
    chosen = Fusion.from_json(saved["fusion"])
    threshold = rep["fusion"]["tuned_on_dev"]["mrr_threshold"]  # the one-standard-error rule
    assert tuned[str(chosen)] >= threshold and max(tuned.values()) >= threshold
    assert all(tuned[str(f)] < threshold for f in CANDIDATES[: CANDIDATES.index(chosen)])
    docs = _docs(tmp_path / "d", ["The fox ran by the river.", "Bread is baked in an oven."])
    assert main(["index", str(docs), "--model", str(run), "--out", str(tmp_path / "idx")]) == 0
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert Fusion.from_json(manifest["fusion"]) == chosen  # the index searches with the run's tuned fusion
    assert (
        main(["train-retriever", "--pairs", str(tmp_path / "p.jsonl"), "--out", str(run)]) == 2
    )  # a run is there


def test_search_api_for_serve(tmp_path):
    """The /v1/search body over an index, lexical mode (no encoder needed), and its 400-class errors."""
    from kititans.retrieval.api import search_request
    from kititans.retrieval.index import Encoder, build_index, load_index
    from kititans.retrieval.search import Searcher

    class Codec:  # a character codec: enough for an index whose lexical side is searched
        bos_id, vocab_size = 0, 300

        def encode(self, t):
            return [min(ord(c), 299) for c in t]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

        def id_to_piece(self, i):
            return chr(i)

    enc = Encoder(lambda rows: np.eye(len(rows), 4, dtype=np.float32), Codec(), 64, "chars")
    docs = [{"source": "a", "text": "the fox by the river"}, {"source": "b", "text": "bread in the oven"}]
    build_index(tmp_path / "idx", enc, docs, passage_tokens=16, stride=8, analyzer="words")
    s = Searcher(load_index(tmp_path / "idx"), None)
    out = search_request(s, {"query": ["oven bread", "river"], "top_k": 1, "mode": "lexical"}, "m")
    assert [(d["query_index"], d["source"]) for d in out["data"]] == [(0, "b"), (1, "a")]
    for bad, msg in [([], "JSON object"), ({"query": ""}, "non-empty"), ({"query": "x", "top_k": 0}, "top_k"),
                     ({"query": "x", "mode": "fuzzy"}, "mode"), ({"query": "x", "lexical_weight": -1}, "lexical_weight"),
                     ({"query": "x", "fusion": "convex:2"}, "share"), ({"query": "x", "fusion": 3}, "fusion"),
                     ({"query": "x", "fusion": {"method": "convex"}}, "dense_weight"),
                     ({"query": "x", "fusion": {"method": "mean", "lexical_weight": 1}}, "one of rrf, convex"),
                     ({"query": "x", "fusion": "rrf:1", "lexical_weight": 1}, "not both")]:  # fmt: skip
        with pytest.raises(KititansError, match=msg):
            search_request(s, bad)
    with pytest.raises(KititansError, match="need the encoder"):
        search_request(s, {"query": "x", "mode": "dense"})
    with pytest.raises(KititansError, match="need the encoder"):  # the fusion is valid; hybrid needs vectors
        search_request(s, {"query": "x", "fusion": {"method": "convex", "dense_weight": 0.1}})
